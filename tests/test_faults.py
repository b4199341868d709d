"""Faults one training run must survive or report: divergence, a checkpoint cut short or
killed mid-write, a corrupt record, a W&B that stops answering, undefined numbers."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench.harness import tracking
from bench.harness.config import load_config
from bench.results.leaderboard import load_rows
from bench.harness.checkpoint import CHECKPOINT, PREVIOUS_CHECKPOINT, CheckpointError, load_checkpoint
from bench.harness.failures import DivergedError
from bench.harness.train import Trainer

REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO / ".." / "shared" / "data" / "camvid"
TINY = [
    "backbone=test_resnet", "crop=32", "batch_size=2", "eval_every=3", "log_every=2",
    "probe_images=2", "head_channels=16", "aspp_dilations=[1,2]", "wandb_mode=disabled",
]


def config(out: Path, *extra):
    return load_config(overrides=TINY + [f"out={out}", *extra])


def result(out: Path) -> tuple[dict, dict]:
    record = json.loads((out / "record.json").read_text())
    return record, torch.load(out / CHECKPOINT, weights_only=True)["model"]


def same_result(a: Path, b: Path) -> None:
    (ra, wa), (rb, wb) = result(a), result(b)
    assert rb["status"] == "complete"
    assert ra["curves"] == rb["curves"] and ra["final"] == rb["final"] and ra["selection"] == rb["selection"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class Stop(Exception):
    pass


def interrupted(out: Path, at: int, *extra) -> Trainer:
    """A run that stops (an exception, as a crash would) while training step `at` runs."""
    trainer = Trainer(config(out, *extra), show_progress=False)
    step = trainer.optimise

    def step_or_stop(t, *args):
        if t + 1 == at:
            raise Stop(f"stopped at {at}")
        return step(t, *args)

    trainer.optimise = step_or_stop
    with pytest.raises(Stop):
        trainer.run()
    return trainer


@pytest.mark.parametrize("extra", [["framework=supervised"], ["selector=fixed"], ["selector=csl"], ["selector=softmatch"]], ids=["supervised", "unimatch", "csl", "softmatch"])
def test_divergence_stops_the_run_as_failed_and_says_where(tmp_path, extra):
    cfg = config(tmp_path / "run", "iters=6", "lr=1e12", *extra)
    with pytest.raises(DivergedError, match=r"(loss is NaN|model output is NaN or infinite) at iteration \d"):
        Trainer(cfg, show_progress=False).run()
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "failed" and record["error"]["type"] == "DivergedError"
    assert 1 <= record["error"]["iteration"] < 6 and str(record["error"]["iteration"]) in record["error"]["message"]


def test_a_selector_misuse_found_later_names_the_step_where_it_happened(tmp_path):
    """Value checks run on the device and are read at log steps; the error still names the
    step whose probabilities were wrong."""
    from bench.harness.failures import SelectorInputError

    trainer = Trainer(config(tmp_path / "run", "iters=6", "log_every=4", "eval_every=6", "selector=fixed"), show_progress=False)
    select = trainer.parts.seam.selector.select
    trainer.parts.seam.selector.select = lambda probs, valid, **context: select(probs * (3.0 if trainer.parts.seam.checks.iteration == 3 else 1.0), valid, **context)
    with pytest.raises(SelectorInputError, match=r"selector 'fixed': probs must be probabilities that sum to 1.*\(at iteration 3\)"):
        trainer.run()
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "failed" and record["error"]["iteration"] == 3 and record["error"]["type"] == "SelectorInputError"


def test_a_failure_records_type_message_and_iteration(tmp_path):
    interrupted(tmp_path / "run", 5, "iters=6", "checkpoint_every=2")
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "failed"
    assert record["error"] == {"type": "Stop", "message": "stopped at 5", "iteration": 5}
    rows, others = load_rows(tmp_path)
    assert rows.is_empty() and others["error"].to_list() == ["Stop at iteration 5: stopped at 5"]


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    common = ["iters=6", "checkpoint_every=2", "selector=softmatch"]
    Trainer(config(tmp_path / "whole", *common), show_progress=False).run()
    cut = tmp_path / "cut"
    interrupted(cut, 6, *common)  # checkpoints at 2 (previous) and 4 (newest)
    newest = cut / CHECKPOINT
    assert torch.load(cut / PREVIOUS_CHECKPOINT, weights_only=True)["iteration"] == 2
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a disk that filled up
    with pytest.warns(UserWarning, match=r"checkpoint.pt: .*resuming from the previous checkpoint .* \(iteration 2\)"):
        trainer = Trainer(config(cut, *common), resume=True, show_progress=False)
    assert trainer.start_iter == 2
    trainer.run()
    same_result(tmp_path / "whole", cut)


def test_no_readable_checkpoint_is_an_error_naming_the_files(tmp_path):
    interrupted(tmp_path / "run", 6, "iters=6", "checkpoint_every=2")
    for name in (CHECKPOINT, PREVIOUS_CHECKPOINT):
        (tmp_path / "run" / name).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=f"(?s){tmp_path / 'run' / CHECKPOINT}.*{tmp_path / 'run' / PREVIOUS_CHECKPOINT}"):
        load_checkpoint(tmp_path / "run")


def test_kill_9_during_a_checkpoint_write_resumes_to_the_uninterrupted_result(tmp_path):
    common = TINY + ["iters=8", "checkpoint_every=2", "selector=csl"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "bench.orchestration.cli", "train", "--threads", "1"]
    subprocess.run(cli + common + [f"out={tmp_path / 'whole'}"], check=True, env=env, capture_output=True)
    # The process writes half of its second checkpoint, then dies by SIGKILL mid-write.
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        import bench.harness.checkpoint as checkpoint
        real, calls = torch.save, []
        def dying_save(state, f):
            calls.append(1)
            if len(calls) == 2:
                import io
                buffer = io.BytesIO(); real(state, buffer)
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2]); f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real(state, f)
        checkpoint.torch.save = dying_save
        from bench.orchestration.cli import main
        main(["train", "--threads", "1", *{common + [f"out={tmp_path / 'cut'}"]!r}])
    """)
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=True)["iteration"] == 2  # the last good one
    subprocess.run(cli + common + [f"out={tmp_path / 'cut'}", "--resume"], check=True, env=env, capture_output=True)
    same_result(tmp_path / "whole", tmp_path / "cut")


def test_the_record_says_complete_only_after_the_final_checkpoint(tmp_path, monkeypatch):
    import bench.harness.train as train

    trainer = Trainer(config(tmp_path / "run", "iters=4", "checkpoint_every=10"), show_progress=False)
    real = train.save_checkpoint

    seen = []

    def fail_final(out, state):
        if state["iteration"] == 4:  # the process dies here: what does the disk say?
            seen.append(json.loads((tmp_path / "run" / "record.json").read_text())["status"])
            raise OSError("disk full")
        real(out, state)

    monkeypatch.setattr(train, "save_checkpoint", fail_final)
    with pytest.raises(OSError, match="disk full"):
        trainer.run()
    assert seen == ["running"]
    assert json.loads((tmp_path / "run" / "record.json").read_text())["status"] == "failed"


def test_a_corrupt_record_is_listed_as_unreadable_and_rebuilt_on_resume(tmp_path):
    out = tmp_path / "run"
    interrupted(out, 6, "iters=6", "checkpoint_every=2")
    (out / "record.json").write_text('{"status": "runn')  # half-written by something else
    rows, others = load_rows(tmp_path)
    assert rows.is_empty() and others["status"].to_list() == ["unreadable"]
    record = Trainer(config(out, "iters=6", "checkpoint_every=2"), resume=True, show_progress=False).run()
    assert record.status == "complete" and record.resumed_from == 4
    assert [c["iter"] for c in record.curves] == [2, 3, 4, 6]  # curves came back from the checkpoint


class FakeRun:
    def __init__(self, log_fails_after: int | None, **init):
        self.init, self.logged, self.fails_after = init, [], log_fails_after
        self.id = init.get("id") or "run-abc"
        self.summary, self.exit_code = {}, None

    def log(self, metrics, step):
        if self.fails_after is not None and len(self.logged) >= self.fails_after:
            raise ConnectionError("W&B host unreachable")
        self.logged.append(step)

    def finish(self, exit_code=0):
        self.exit_code = exit_code


def fake_wandb(monkeypatch, log_fails_after=None) -> list[FakeRun]:
    runs = []

    class FakeWandb:
        Settings = staticmethod(lambda **kw: kw)

        @staticmethod
        def init(**kw):
            runs.append(FakeRun(log_fails_after, **kw))
            return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    monkeypatch.setattr(tracking, "api_key_configured", lambda: True)
    monkeypatch.setattr(tracking, "host_reachable", lambda timeout=3.0: True)
    return runs


def test_wandb_failing_mid_run_does_not_stop_the_run(tmp_path, monkeypatch):
    runs = fake_wandb(monkeypatch, log_fails_after=1)
    with pytest.warns(UserWarning, match="W&B log failed .*unreachable"):
        record = Trainer(config(tmp_path / "run", "iters=6", "wandb_mode=online"), show_progress=False).run()
    assert record.status == "complete" and runs[0].logged == [2] and runs[0].exit_code == 0


def test_a_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    runs = fake_wandb(monkeypatch)
    out = tmp_path / "run"
    interrupted(out, 6, "iters=6", "checkpoint_every=2", "wandb_mode=offline")
    first_id = json.loads((out / "record.json").read_text())["wandb_id"]
    Trainer(config(out, "iters=6", "checkpoint_every=2", "wandb_mode=offline"), resume=True, show_progress=False).run()
    assert first_id == "run-abc" and runs[0].init.get("id") is None
    assert runs[1].init["id"] == first_id and runs[1].init["resume"] == "allow"
    assert json.loads((out / "record.json").read_text())["wandb_id"] == first_id


@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_cli_train_on_camvid_prints_undefined_precision_as_a_dash(tmp_path):
    """10 iterations from scratch: nothing passes 0.95 yet, so precision is undefined."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run = subprocess.run(
        [sys.executable, "-m", "bench.orchestration.cli", "train", "dataset=camvid", f"root={os.path.relpath(CAMVID, tmp_path)}",
         "selector=fixed", "iters=3", "eval_every=3", *TINY[:3], *TINY[4:], "out=run"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["selection"]["precision"] is None and record["config"]["root"] == os.path.abspath(CAMVID)
    assert "selection precision – recall" in run.stdout


def test_every_printer_shows_undefined_numbers_as_a_dash():
    from bench.results.scoring import format_scores
    from bench.orchestration.cli import show
    from bench.tools.demo import COLUMNS, format_quality

    assert [show(v) for v in (None, float("nan"), 0.5)] == ["–", "–", "0.5000"]
    row = format_scores([{"name": "x", "coverage": 0.0, "precision": None, "recall": 0.0, "auroc": None, "precision_gain": float("nan"), "gain_ci": None}])
    assert row.splitlines()[-1] == "| x | 0.0 | – | 0.0 | – | – | – |"
    table = format_quality({"fixed": {c: float("nan") for c in COLUMNS}})
    assert table.splitlines()[-1].count("–") == len(COLUMNS)


def test_a_run_started_from_a_warm_start_reloads_for_analysis(tmp_path):
    from bench.harness.runs import load_run

    Trainer(config(tmp_path / "warm", "iters=2", "framework=supervised"), show_progress=False).run()
    main = Trainer(config(tmp_path / "main", "iters=2", f"init_from={tmp_path / 'warm'}"), show_progress=False)
    warm_record = json.loads((tmp_path / "warm" / "record.json").read_text())
    assert main.config.init_from_hash == main.books.record.config["init_from_hash"] == warm_record["config_hash"]
    warm = torch.load(tmp_path / "warm" / CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(v, warm[k]) for k, v in main.parts.model.state_dict().items())  # the warm weights are loaded
    main.run()
    loaded = load_run(tmp_path / "main")
    saved = torch.load(tmp_path / "main" / CHECKPOINT, weights_only=True)["model"]
    assert not loaded.teacher and loaded.iteration == 2
    assert all(torch.equal(v, saved[k]) for k, v in loaded.model.state_dict().items())


def test_load_run_gives_the_model_that_made_the_reported_miou(tmp_path):
    """With an EMA teacher the evaluated model is the teacher, not the student: evaluating
    what load_run returns must reproduce the record's final mIoU exactly."""
    from bench.data.loaders import EvalSet
    from bench.harness.evaluate import evaluate
    from bench.harness.runs import load_run

    out = tmp_path / "ema"
    record = Trainer(config(out, "iters=3", "ema_teacher=true", "selector=fixed", "selector.tau=0.5"), show_progress=False).run()
    run = load_run(out)
    state = torch.load(out / CHECKPOINT, weights_only=True)
    assert run.teacher and all(torch.equal(v, state["ema"][k]) for k, v in run.model.state_dict().items())
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])  # they differ
    loader = torch.utils.data.DataLoader(EvalSet(run.source, run.split.val), batch_size=1)
    cfg = run.config
    again = evaluate(run.model, loader, run.num_classes, cfg.eval_mode, cfg.eval_crop or cfg.crop, cfg.eval_stride, run.device, contextlib.nullcontext)
    assert again["miou"] == record.final["miou"]


def test_a_loader_worker_error_is_reported_as_the_original(tmp_path):
    """With workers the DataLoader re-raises a wrapped copy; the record names the file."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    for split, n in (("train", 6), ("val", 2)):
        for i in range(n):
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 48, 3), 20 * i, np.uint8)).save(root / split / f"f{i}.png")
            Image.fromarray(np.full((40, 48), i % 11, np.uint8)).save(root / f"{split}annot" / f"f{i}.png")
    for i in range(6):  # every training image cut short, so the first batch hits one
        data = (root / "train" / f"f{i}.png").read_bytes()
        (root / "train" / f"f{i}.png").write_bytes(data[: len(data) // 3])
    cfg = config(tmp_path / "run", "dataset=camvid", f"root={root}", "labeled=2", "iters=2", "workers=1", "framework=supervised")
    with pytest.raises(Exception, match="cannot read image"):
        Trainer(cfg, show_progress=False).run()
    error = json.loads((tmp_path / "run" / "record.json").read_text())["error"]
    assert error["type"] == "DataError" and error["message"].startswith(f"cannot read image {root / 'train'}/f")
    assert "Traceback" not in error["message"] and error["iteration"] == 1


def test_load_run_refuses_weights_older_than_the_record(tmp_path):
    """A complete record with only the previous checkpoint readable: those weights did not
    make the reported mIoU, so analysis must not silently use them."""
    from bench.harness.runs import RunFolderError, load_run

    out = tmp_path / "run"
    Trainer(config(out, "iters=4", "checkpoint_every=2", "probe_images=0"), show_progress=False).run()
    (out / CHECKPOINT).write_bytes((out / CHECKPOINT).read_bytes()[:100])  # the final one, truncated
    with pytest.warns(UserWarning, match="previous checkpoint"), pytest.raises(RunFolderError, match="iteration 2.*iteration 4"):
        load_run(out)
