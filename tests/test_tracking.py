import pytest

from bench.harness import tracking


@pytest.mark.parametrize(
    "configured,env,key,expected",
    [
        (None, "disabled", True, "disabled"),
        (None, None, False, "offline"),
        (None, None, True, "online"),
        (None, "online", False, "offline"),  # online without a key would hang on login
        ("offline", "online", True, "offline"),  # the config says what it says
        ("disabled", None, True, "disabled"),
    ],
)
def test_mode_resolution(monkeypatch, configured, env, key, expected):
    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    monkeypatch.setattr(tracking, "api_key_configured", lambda: key)
    assert tracking.resolve_mode(configured) == expected


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="'sometimes'"):
        tracking.resolve_mode("sometimes")


def test_disabled_tracker_does_nothing(tmp_path):
    t = tracking.start_tracking({}, "x", tmp_path, "p", None, "disabled")
    t.log({"a": 1.0}, step=1)
    t.summary({"b": 2})
    t.finish()
    assert t.mode == "disabled" and not any(tmp_path.iterdir())


def fake_wandb(monkeypatch, fail_online=False):
    """A stand-in wandb module recording the modes init was called with."""
    calls = []

    class FakeWandb:
        Settings = staticmethod(lambda **kw: kw)

        @staticmethod
        def init(**kw):
            calls.append(kw["mode"])
            if fail_online and kw["mode"] == "online":
                raise RuntimeError("bad key")
            return type("Run", (), {"log": lambda *a, **k: None, "finish": lambda *a, **k: None, "summary": {}})()

    monkeypatch.setitem(__import__("sys").modules, "wandb", FakeWandb)
    monkeypatch.setattr(tracking, "api_key_configured", lambda: True)
    return calls


def test_unreachable_host_degrades_to_offline(tmp_path, monkeypatch):
    calls = fake_wandb(monkeypatch)
    monkeypatch.setattr(tracking, "host_reachable", lambda timeout=3.0: False)
    with pytest.warns(UserWarning, match="unreachable"):
        t = tracking.start_tracking({}, "x", tmp_path, "p", None, "online")
    assert calls == ["offline"] and t.mode == "offline"


def test_failed_online_init_falls_back_to_offline(tmp_path, monkeypatch):
    calls = fake_wandb(monkeypatch, fail_online=True)
    monkeypatch.setattr(tracking, "host_reachable", lambda timeout=3.0: True)
    with pytest.warns(UserWarning, match="bad key"):
        t = tracking.start_tracking({}, "x", tmp_path, "p", None, "online")
    assert calls == ["online", "offline"] and t.mode == "offline"
