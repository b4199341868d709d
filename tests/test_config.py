import pytest

from pathlib import Path

from bench.harness.config import ConfigError, TrainConfig, config_differences, from_dict, load_config, parse_overrides


def test_defaults_resolve_dataset_dependent_values():
    cfg = load_config()
    assert (cfg.scale_min, cfg.scale_max) == (0.8, 1.25)  # synthetic
    cam = load_config(overrides=["dataset=camvid", "root=/x"])
    assert (cam.scale_min, cam.scale_max) == (0.5, 2.0)  # the published weak-view range
    assert load_config(overrides=["dataset=camvid", "scale_min=0.7"]).scale_min == 0.7


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match="unknown config key 'iter'.*did you mean 'iters'"):
        load_config(overrides=["iter=10"])
    with pytest.raises(ConfigError, match="'selecter'.*'selector'"):
        load_config(overrides=["selecter=csl"])


def test_command_line_wins_over_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("iters: 50\nselector: {name: csl, alpha: 8.0}\nlr: 0.02\n")
    cfg = load_config(path, ["iters=7", "selector.alpha=4"])
    assert cfg.iters == 7 and cfg.lr == 0.02
    assert cfg.selector == "csl" and cfg.selector_params == {"alpha": 4}


def test_unknown_key_in_file_is_named_with_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batchsize: 8\n")
    with pytest.raises(ConfigError, match=r"'batchsize' in .*run.yaml.*'batch_size'"):
        load_config(path)


def test_values_are_typed():
    cfg = load_config(overrides=["csl_mask_view=true", "iters=30", "lr=1e-3", "aspp_dilations=[1,2,3]", "wandb_group=null"])
    assert cfg.csl_mask_view is True and cfg.iters == 30 and cfg.lr == 0.001
    assert cfg.aspp_dilations == [1, 2, 3] and cfg.wandb_group is None
    with pytest.raises(ConfigError, match="iters='many' is not a valid int"):
        load_config(overrides=["iters=many"])
    with pytest.raises(ConfigError, match="framework='mean_teacher' is not one of"):
        load_config(overrides=["framework=mean_teacher"])
    with pytest.raises(ConfigError, match="csl_mask_view=true needs framework=unimatch"):
        load_config(overrides=["csl_mask_view=true", "framework=fixmatch"])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["iters"])


def test_hash_ignores_where_results_go_but_not_what_is_computed():
    a = load_config(overrides=["out=runs/a"])
    b = load_config(overrides=["out=runs/b", "workers=2"])
    c = load_config(overrides=["seed=1"])
    assert a.hash() == b.hash() != c.hash()
    # a tuple from Python and a list from YAML are one setting; a default stays out of the hash
    tup = TrainConfig(resize=(120, 160), blur_sigma=(0.1, 2.0)).absolute().validate()
    lst = load_config(overrides=["resize=[120,160]"])
    assert tup.hash() == lst.hash() != a.hash()
    assert TrainConfig(blur_sigma=(0.1, 2.0)).absolute().validate().hash() == TrainConfig().absolute().validate().hash()


def test_round_trip_through_a_record():
    cfg = load_config(overrides=["selector=csl", "selector.alpha=8", "iters=5"])
    assert from_dict(cfg.to_dict()) == cfg
    assert TrainConfig().absolute().validate() == load_config()


def test_relative_paths_resolve_against_the_launch_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["root=../data/camvid", "out=runs/x", "init_from=~/w", "pretrained=timm"])
    assert cfg.root == str(tmp_path.parent / "data" / "camvid") and cfg.out == str(tmp_path / "runs" / "x")
    assert cfg.split_dir == str(tmp_path / "splits") and cfg.init_from == str(Path.home() / "w")
    assert cfg.pretrained == "timm"  # a name, not a path


def test_hash_follows_the_warm_start_by_identity_and_the_device_by_type():
    a = load_config(overrides=["init_from=/store/a/warm", "init_from_hash=abc"])
    moved = load_config(overrides=["init_from=/elsewhere/warm", "init_from_hash=abc"])
    other = load_config(overrides=["init_from=/store/a/warm", "init_from_hash=def"])
    assert a.hash() == moved.hash() != other.hash()
    cpu, cuda, cuda1 = (load_config(overrides=[f"device={d}"]) for d in ("cpu", "cuda", "cuda:1"))
    assert cuda.hash() == cuda1.hash() != cpu.hash()


def test_config_differences_accept_what_a_run_resolves():
    stored = load_config(overrides=["device=cpu", "init_from_hash=abc", "iters=7"]).to_dict()
    wanted = load_config(overrides=["iters=9"]).to_dict()  # device auto, no hash yet
    assert config_differences(stored, wanted) == {"iters": (7, 9)}
    assert config_differences(stored, {**wanted, "device": "cuda", "iters": 7}) == {"device": ("cpu", "cuda")}
    assert config_differences({**stored, "root": "/a/b/../c"}, {**stored, "root": "/a/c"}) == {}


@pytest.mark.parametrize(
    "overrides,message",
    [(["selector=csll"], "unknown selector 'csll'.*did you mean 'csl'"), (["selector=csl", "selector.alpah=8"], "no parameter 'alpah'.*did you mean 'alpha'")],
)
def test_selector_names_and_parameters_are_checked_with_the_config(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)
