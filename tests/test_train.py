"""The harness end to end on tiny runs: every framework, record fields, resume after
kill -9, and that no selector ever sees unlabeled ground truth."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench.contract as selection
from bench.harness.config import load_config
from bench.harness.train import Trainer

TINY = [
    "backbone=test_resnet", "crop=32", "batch_size=2", "iters=6", "eval_every=3", "log_every=2",
    "checkpoint_every=3", "probe_images=4", "head_channels=16", "aspp_dilations=[1,2]", "wandb_mode=disabled",
]


def tiny(tmp_path, *extra):
    return load_config(overrides=TINY + [f"out={tmp_path / 'run'}", *extra])


@pytest.mark.parametrize(
    "extra",
    [
        ["framework=supervised"],
        ["framework=fixmatch", "selector=fixed", "selector.tau=0.5"],
        ["framework=unimatch", "selector=csl", "csl_mask_view=true"],
        ["framework=unimatch", "selector=softmatch", "ema_teacher=true", "normaliser=selected"],
    ],
    ids=["supervised", "fixmatch", "unimatch-csl-mask", "unimatch-ema-softmatch"],
)
def test_tiny_run_writes_a_complete_record(tmp_path, extra):
    cfg = tiny(tmp_path, *extra)
    started = time.perf_counter()
    record = Trainer(cfg, show_progress=False).run()
    elapsed = time.perf_counter() - started
    on_disk = json.loads((Path(cfg.out) / "record.json").read_text())
    assert on_disk["status"] == record.status == "complete"
    for key in ("config", "config_hash", "splits", "git_sha", "versions", "device", "curves", "final", "cost"):
        assert key in on_disk
    assert on_disk["config"]["iters"] == 6 and on_disk["config_hash"] == cfg.hash()
    assert set(on_disk["splits"]["sha256"]) == {"labeled.txt", "unlabeled.txt", "val.txt", "generator"}
    assert on_disk["splits"]["sha256"]["generator"] == "synthetic v2"  # generated images: the ids alone do not name them
    # log_every=2, eval_every=3: an evaluation is logged at the iteration it was measured
    assert [c["iter"] for c in on_disk["curves"]] == [2, 3, 4, 6]
    assert [c["iter"] for c in on_disk["curves"] if "val_miou" in c] == [3, 6]
    final = on_disk["final"]
    evals = [c["val_miou"] for c in on_disk["curves"] if "val_miou" in c]
    assert final["miou"] == evals[-1] and final["miou_best_val"] == max(evals) and "best_val_note" in final
    assert final["best_val_iter"] == [3, 6][evals.index(max(evals))]
    assert len(final["per_class_iou"]) == 6
    assert final["unlabeled_probe"]["images"] == 4
    cost = on_disk["cost"]
    assert cost["iters"] == 6 and 0 < cost["wall_s"] < elapsed  # seconds; evaluation excluded
    assert cost["it_per_s"] == pytest.approx(6 / cost["wall_s"])
    assert 50 < cost["peak_mem_mb"] < 16_000  # MiB of process RSS, not KiB or bytes
    if "framework=supervised" in extra:
        assert on_disk["selection"] is None
    else:
        sel = on_disk["selection"]
        assert set(sel) >= {"precision", "recall", "coverage", "weighted_precision", "f1", "auroc"}
        assert all("sel_coverage" in c for c in on_disk["curves"])
        assert 0 < cost["selector_ms_per_iter"] * 6 / 1e3 < cost["wall_s"]  # ms per iteration, inside training time
    if "csl_mask_view=true" in extra:
        assert all("loss_mask" in c for c in on_disk["curves"])


def test_ups_runs_its_passes_and_counts_them(tmp_path, monkeypatch):
    from bench.harness import frameworks

    stochastic = []
    mc_logits = frameworks.mc_logits
    monkeypatch.setattr(frameworks, "mc_logits", lambda model, weak, passes: (stochastic.append(passes), mc_logits(model, weak, passes))[1])
    seen = []
    select = selection.selector_class("ups").select
    monkeypatch.setattr(selection.selector_class("ups"), "select", lambda self, p, v, **ctx: (seen.append(ctx["mc_logits"].shape), select(self, p, v, **ctx))[1])
    cfg = tiny(tmp_path, "selector=ups", "selector.passes=3", "iters=2", "eval_every=2", "log_every=2", "batch_size=2")
    record = Trainer(cfg, show_progress=False).run()
    assert stochastic == [3, 3]
    assert [s[:2] for s in seen] == [(3, 4), (3, 4)]  # 3 passes over the 2 + 2 weak images
    assert record.cost["extra_forward_passes"] == 3 * 2


def test_keeping_every_pixel_selects_everything(tmp_path):
    """`all` admits every valid pixel: coverage and recall are 1 in every interval, and the
    precision is the accuracy of the pseudo-labels."""
    record = Trainer(tiny(tmp_path, "selector=all", "iters=4", "eval_every=4"), show_progress=False).run()
    sel = record.selection
    assert sel["coverage"] == 1.0 and sel["recall"] == 1.0 and sel["precision"] == pytest.approx(sel["label_accuracy"])
    assert [c["sel_coverage"] for c in record.curves] == [1.0, 1.0]


class Spy(selection.Selector):
    """Records everything it is handed; labels with the fixed threshold."""

    context_keys = ("mc_logits", "labeled_probs", "labeled_target", "progress")
    seen: list = []

    def _select(self, probs, valid, moments, **context):
        Spy.seen.append((probs, valid, dict(context)))
        return selection.hard_selection(moments.label, moments.confidence >= 0.5, valid)


def test_selectors_never_receive_unlabeled_ground_truth(tmp_path, monkeypatch, scoped_registry):
    selection.register_selector("spy")(Spy)
    Spy.seen = []
    trainer = Trainer(tiny(tmp_path, "selector=spy", "iters=3", "eval_every=3", "log_every=3"), show_progress=False)
    truths, labeled = [], []
    update = trainer.parts.log.meter.update
    monkeypatch.setattr(trainer.parts.log.meter, "update", lambda sel, gt, **kw: (truths.append(gt), update(sel, gt, **kw)))
    step = trainer.optimise
    monkeypatch.setattr(trainer, "optimise", lambda t, batch: (labeled.append(batch.mask), step(t, batch))[1])
    trainer.run()
    assert len(Spy.seen) == len(truths) == 3
    for (probs, valid, context), gt, lab_mask in zip(Spy.seen, truths, labeled):
        received = [probs, valid, *[v for v in context.values() if isinstance(v, torch.Tensor)]]
        for tensor in received:
            assert tensor.data_ptr() != gt.data_ptr()
            assert not (tensor.shape == gt.shape and tensor.dtype == gt.dtype and torch.equal(tensor, gt))
        assert set(context) == {"progress", "labeled_probs", "labeled_target"}  # no passes: mc_passes = 0
        assert torch.equal(context["labeled_target"], lab_mask)  # labelled truth is allowed


def test_the_step_cannot_be_given_unlabeled_truth():
    """By construction: an unlabelled batch as the loader yields it does not fit the type
    a step receives until its truth is taken out."""
    from dataclasses import fields

    from bench.data.loaders import UNLABELED, UnlabeledSet
    from bench.data.sources import get_source
    from bench.data.splits import load_split
    from bench.harness.frameworks import UnlabeledView
    from bench.harness.build import split_truth

    source = get_source("synthetic", None)
    split = load_split(source, "splits", "default", 20)
    item = UnlabeledSet(source, split.unlabeled, 32, (0.8, 1.25), 0, UNLABELED, mask_view=True)[(0, 0, 0)]
    assert "gt" in item  # the loader does carry it, for the meter
    with pytest.raises(TypeError, match="gt"):
        UnlabeledView(**item)
    batch = {k: v[None] for k, v in item.items()}
    step_batch, gt = split_truth({"image": batch["weak"], "mask": batch["gt"]}, batch, batch)
    assert torch.equal(gt, torch.cat([batch["gt"], batch["gt"]]))
    assert {f.name for f in fields(UnlabeledView)} == {"weak", "strong1", "strong2", "box1", "box2", "valid", "masked", "hide"}
    assert "gt" in batch  # the caller's dicts are left as they were


@pytest.mark.parametrize(
    "extra",
    [["selector=fixed", "selector.tau=0.3"], ["selector=csl", "csl_mask_view=true"], ["selector=daw", "ema_teacher=true", "framework=fixmatch"]],
    ids=["unimatch-fixed", "unimatch-csl-mask", "fixmatch-ema-daw"],
)
def test_training_is_blind_to_unlabeled_truth(tmp_path, monkeypatch, extra):
    """Scrambling the unlabelled ground truth (random classes, some void) must change the
    selection-quality numbers and nothing else: a tensor derived from it (say
    `valid & (gt != 255)`) reaching a selector, a loss or a view would change the losses."""
    from bench.data.loaders import UnlabeledSet

    common = ["iters=4", "eval_every=4", "log_every=2", "probe_images=0", *extra]
    Trainer(tiny(tmp_path / "true", *common), show_progress=False).run()
    getitem = UnlabeledSet.__getitem__

    def scrambled(self, key):
        item = getitem(self, key)
        g = torch.Generator().manual_seed(hash(key) % 2**31)
        noise = torch.randint(0, 7, item["gt"].shape, generator=g)
        item["gt"] = torch.where(noise == 6, 255, noise)
        return item

    monkeypatch.setattr(UnlabeledSet, "__getitem__", scrambled)
    Trainer(tiny(tmp_path / "scrambled", *common), show_progress=False).run()
    (a, wa), (b, wb) = _final_state(tmp_path / "true" / "run"), _final_state(tmp_path / "scrambled" / "run")
    strip = lambda curves: [{k: v for k, v in c.items() if not k.startswith("sel_")} for c in curves]  # noqa: E731
    assert strip(a["curves"]) == strip(b["curves"]) and a["final"] == b["final"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["selection"] != b["selection"]  # the meter did see the truth


def _final_state(out: Path):
    record = json.loads((out / "record.json").read_text())
    weights = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    return record, weights


def test_kill_9_and_resume_gives_the_uninterrupted_result(tmp_path):
    common = TINY + ["iters=12", "checkpoint_every=4", "eval_every=6", "log_every=2", "selector=softmatch", "csl_mask_view=true"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "bench.orchestration.cli", "train", "--threads", "1"]
    whole = tmp_path / "whole"
    subprocess.run(cmd + common + [f"out={whole}"], check=True, env=env, capture_output=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(cmd + common + [f"out={cut}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        rec = cut / "record.json"
        if (cut / "checkpoint.pt").exists() and rec.exists() and json.loads(rec.read_text())["iteration"] >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = json.loads((cut / "record.json").read_text())
    assert killed["status"] == "running" and killed["iteration"] < 12  # really cut mid-run
    subprocess.run(cmd + common + [f"out={cut}", "--resume"], check=True, env=env, capture_output=True)

    (rec_a, w_a), (rec_b, w_b) = _final_state(whole), _final_state(cut)
    assert rec_b["status"] == "complete" and rec_b["resumed_from"] in (4, 8)
    assert rec_a["curves"] == rec_b["curves"]
    assert rec_a["final"] == rec_b["final"] and rec_a["selection"] == rec_b["selection"]
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_resume_refuses_another_config(tmp_path):
    Trainer(tiny(tmp_path, "iters=3", "eval_every=3", "log_every=3", "checkpoint_every=3"), show_progress=False).run()
    from bench.harness.checkpoint import ResumeError

    with pytest.raises(ResumeError, match="another config"):
        Trainer(tiny(tmp_path, "iters=3", "eval_every=3", "log_every=3", "checkpoint_every=3", "seed=5"), resume=True)


def test_resume_refuses_a_checkpoint_of_an_older_format(tmp_path):
    from bench.harness.checkpoint import CHECKPOINT, ResumeError

    cfg = tiny(tmp_path, "iters=3", "eval_every=3", "log_every=3", "checkpoint_every=3", "selector=fixed", "framework=fixmatch")
    Trainer(cfg, show_progress=False).run()
    state = torch.load(Path(cfg.out) / CHECKPOINT, weights_only=True)
    state["selector"] = state.pop("seam")["selector"]  # how checkpoints held the selector before the seam
    torch.save(state, Path(cfg.out) / CHECKPOINT)
    with pytest.raises(ResumeError, match=r"older cslbench.*delete .*checkpoint\*\.pt"):
        Trainer(cfg, resume=True, show_progress=False)


def test_resume_of_a_complete_run_does_nothing(tmp_path):
    cfg = tiny(tmp_path, "iters=3", "eval_every=3", "log_every=3", "checkpoint_every=3")
    first = Trainer(cfg, show_progress=False).run()
    again = Trainer(cfg, resume=True, show_progress=False).run()
    assert again.final == first.final and again.updated == first.updated


def test_a_run_killed_between_its_final_checkpoint_and_its_complete_record_resumes_to_the_same_record(tmp_path):
    """The final checkpoint is written before the record says complete; a kill between the
    two leaves a `running` record and a checkpoint at the budget. The resume runs no step,
    and its complete record still holds the run's curves and counts the restart."""
    from bench.results.record import read_record, write_record

    cfg = tiny(tmp_path, "iters=4", "eval_every=2", "log_every=2", "checkpoint_every=2", "selector=fixed", "framework=fixmatch")
    whole = Trainer(cfg, show_progress=False).run()
    killed = read_record(cfg.out)
    killed.status, killed.final, killed.selection = "running", None, None  # as the last log step left it
    write_record(cfg.out, killed)
    again = Trainer(cfg, resume=True, show_progress=False).run()
    assert again.status == "complete" and len(whole.curves) == 2
    assert again.curves == whole.curves and again.final == whole.final and again.selection == whole.selection
    assert again.restarts == [{"cause": "died", "reached": 4, "resumed_from": 4, "recomputed": 0}]


def test_cli_print_config_and_errors(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "bench.orchestration.cli", "train", "--print-config", "selector=csl", "selector.alpha=8"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "selector: csl" in out.stdout and "alpha: 8" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "bench.orchestration.cli", "train", "lr_rate=0.1"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "did you mean 'lr'" in bad.stderr


CAMVID = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "camvid"


@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_a_few_iterations_on_real_camvid(tmp_path):
    cfg = load_config(overrides=TINY + [
        "dataset=camvid", f"root={CAMVID}", "labeled=46", "crop=64", "iters=2", "eval_every=2",
        "log_every=1", "probe_images=2", "selector=csl", f"out={tmp_path / 'camvid'}",
    ])
    record = Trainer(cfg, show_progress=False).run()
    assert record.status == "complete"
    assert record.splits["sizes"] == {"labeled": 46, "unlabeled": 321, "val": 101, "test": 0}
    assert len(record.final["per_class_iou"]) == 11


def test_eval_split_test_reports_the_held_out_images(tmp_path):
    from bench.harness.evaluate import evaluate
    from bench.data.loaders import EvalSet
    from bench.data.sources import get_source
    from bench.data import synthetic

    cfg = tiny(tmp_path, "framework=supervised", "eval_split=test")
    trainer = Trainer(cfg, show_progress=False)
    record = trainer.run()
    final = record.final
    assert final["eval_split"] == "test" and record.splits["sizes"]["test"] == synthetic.TEST_IMAGES
    assert "test (dataset list)" in record.splits["sha256"]
    evals = [c["val_miou"] for c in record.curves if "val_miou" in c]
    assert final["miou_last_val"] == evals[-1] and final["miou_best_val"] == max(evals)  # curves stay on val
    # the final number is the trained model on the 200 test scenes, which no curve saw
    source = get_source("synthetic", None)
    test_ids = [e for e in source.pool("test")]
    assert {e.image.split("/")[0] for e in test_ids} == {"test"}
    loader = torch.utils.data.DataLoader(EvalSet(source, test_ids), batch_size=1)
    direct = evaluate(trainer.parts.eval_model, loader, 6, "whole", cfg.crop, cfg.eval_stride, torch.device("cpu"), trainer.parts.autocast)
    assert final["miou"] == pytest.approx(direct["miou"]) and final["miou"] != final["miou_last_val"]
    # another eval split is another result: its own hash
    assert cfg.hash() != tiny(tmp_path, "framework=supervised").hash()


@pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid not present")
def test_eval_split_test_without_test_images_is_a_clear_error(tmp_path):
    from bench.data.sources import DataError

    cfg = load_config(overrides=TINY + ["dataset=camvid", f"root={CAMVID}", "labeled=46", "eval_split=test", f"out={tmp_path / 'c'}"])
    with pytest.raises(DataError, match="eval_split=test, but dataset 'camvid' has no labelled test images.*use eval_split=val"):
        Trainer(cfg, show_progress=False)


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path):
    from bench.harness.recorder import RunExistsError

    cfg = tiny(tmp_path, "iters=1", "eval_every=1", "log_every=1", "probe_images=0")
    Trainer(cfg, show_progress=False).run()
    before = (tmp_path / "run" / "record.json").read_bytes()
    with pytest.raises(RunExistsError, match=r"already holds a run \(complete\).*--resume.*out="):
        Trainer(tiny(tmp_path, "iters=1", "eval_every=1", "log_every=1", "probe_images=0", "seed=3"), show_progress=False)
    assert (tmp_path / "run" / "record.json").read_bytes() == before


def test_bank_points_score_every_selector_and_leave_training_alone(tmp_path):
    plain = Trainer(tiny(tmp_path / "a", "selector=fixed"), show_progress=False).run()
    probed_cfg = tiny(tmp_path / "b", "selector=fixed", "bank_points=2", "bank_images=3")
    assert probed_cfg.hash() == tiny(tmp_path / "a", "selector=fixed").hash()  # measurement, not a result key
    probed = Trainer(probed_cfg, show_progress=False).run()
    # the probes' stochastic passes draw from their own generator: training is bit-identical
    assert [{k: v for k, v in c.items()} for c in probed.curves] == plain.curves
    assert probed.final["miou"] == plain.final["miou"] and probed.selection == plain.selection
    probes = probed.selection_over_training
    assert [p["iter"] for p in probes] == [3, 6] and all(p["images"] == 3 for p in probes)
    assert set(probes[0]["selectors"]) == set(selection.available_selectors()) | {"max confidence", "margin (top-1 - top-2)", "1 - normalised entropy"}
    for p in probes:
        assert 0 <= p["ece"] <= 1 and 0 <= p["accuracy"] <= 1
        fixed = p["selectors"]["fixed"]
        if fixed["coverage"] > 0:  # fixed is a global threshold: no gain over the matched one
            assert abs(fixed["precision_gain"]) < 0.02 and fixed["gain_ci"][0] <= fixed["precision_gain"] <= fixed["gain_ci"][1]
    assert plain.selection_over_training is None
    # cslbench analyze draws the probes over training next to the other figures
    from bench.orchestration.cli import main

    main(["analyze", str(tmp_path / "b"), "--images", "2", "--out", str(tmp_path / "fig")])
    assert (tmp_path / "fig" / "selection_over_training.png").read_bytes()[:4] == b"\x89PNG"
    # the checkpoint holding the probes loads with weights_only, so the run resumes
    resumed = Trainer(tiny(tmp_path / "b", "selector=fixed", "bank_points=2", "bank_images=3"), resume=True, show_progress=False).run()
    assert resumed.selection_over_training == probes
    # one mechanism: the scores in the record are the bank's, read back from disk
    from bench.results.scoring import score_bank

    offline = score_bank(tmp_path / "b" / "run" / "bank", bootstrap=500)
    for p in probes:
        at = {r["name"]: r for r in offline if r["iteration"] == p["iter"]}
        for name, online_row in p["selectors"].items():
            assert online_row["coverage" if "coverage" in online_row else "auroc"] == at[name]["coverage" if "coverage" in at[name] else "auroc"]
    # offline equals online: the run's own stateless selector (fixed at tau 0.22) in training,
    # through its meter, on the same images, against the bank scored afterwards
    tuned = tiny(tmp_path / "c", "selector=fixed", "selector.tau=0.22", "bank_points=2", "bank_images=3")
    online = Trainer(tuned, show_progress=False).run().selection_over_training
    offline = score_bank(tmp_path / "c" / "run" / "bank", ["fixed"], bootstrap=10, params={"fixed": {"tau": 0.22}})
    rows = [r for r in offline if r["name"] == "fixed"]
    assert any(0 < r["coverage"] < 1 for r in rows)  # the threshold cuts through the pixels somewhere
    for p, row in zip(online, rows):
        assert p["online"]["selector"] == "fixed" and p["online"]["params"] == {"tau": 0.22}
        assert [p["online"][k] for k in ("coverage", "precision", "recall")] == [row[k] for k in ("coverage", "precision", "recall")]


def test_a_stateful_selector_scored_from_the_bank_is_the_one_in_training(tmp_path):
    """Offline equals online for a stateful selector: the bank stores the state the run's
    flexmatch had at each point, so the bank's score is what its meter measured there; the
    followers' states ride along for the others (freematch here), and a bank without
    stored states falls back to a warm-up, which the row says."""
    from bench.results.bank import load_point, load_truth, read_manifest
    from bench.results.scoring import score_bank, score_predictions

    online = Trainer(tiny(tmp_path, "selector=flexmatch", "bank_points=2", "bank_images=3"), show_progress=False).run().selection_over_training
    folder = tmp_path / "run" / "bank"
    rows = [r for r in score_bank(folder, ["flexmatch", "freematch"], bootstrap=10) if r["name"] in ("flexmatch", "freematch")]
    assert {r["state"] for r in rows} == {"training"}
    flex = [r for r in rows if r["name"] == "flexmatch"]
    for p, row in zip(online, flex):
        assert p["online"]["selector"] == "flexmatch"
        assert [p["online"][k] for k in ("coverage", "precision", "recall")] == [row[k] for k in ("coverage", "precision", "recall")]
    manifest = read_manifest(folder)
    last = load_point(folder, manifest, manifest.points[-1], load_truth(folder, manifest))
    assert last.selector_states["flexmatch"]["state"]["step"] > 0  # it followed the run's stream
    last.selector_states = {}
    [warm] = [r for r in score_predictions(last, ["flexmatch"], bootstrap=10) if r["name"] == "flexmatch"]
    assert warm["state"] == "warm-up"


def test_strong_views_can_leave_batchnorm_running_statistics_alone():
    from types import SimpleNamespace

    from bench.harness.frameworks import strong_view_statistics

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4, momentum=None)).train()
    x = torch.randn(2, 3, 5, 5) * 3 + 1
    before = [m.running_mean.clone() for m in model[1:]]
    with strong_view_statistics(model, SimpleNamespace(strong_bn_stats=False)):
        frozen = model(x)
    assert all(torch.equal(m.running_mean, b) for m, b in zip(model[1:], before))
    assert model[1].momentum == 0.1 and model[2].momentum is None  # restored
    with strong_view_statistics(model, SimpleNamespace(strong_bn_stats=True)):
        moving = model(x)
    assert not torch.equal(model[1].running_mean, before[0])
    assert torch.allclose(frozen, moving)  # normalised by the batch either way
