"""One harness training step against a bare loop doing the same forward/backward passes
on the same batch. Claim, asserted here: the harness (framework step, selector object,
selection meter, loss bookkeeping) costs less than 10% more than the bare loop.

    pytest benchmarks/test_train_step.py
"""

import copy

import torch
import torch.nn.functional as F

from bench.config import load_config
from bench.labels import IGNORE
from bench.train import Trainer, _to, split_truth

OVERRIDES = ["device=cpu", "wandb_mode=disabled", "selector=fixed", "framework=unimatch", "out=/tmp/cslbench-bench-step"]


def bare_step(model, optimizer, lab, unl, mix, tau=0.95):
    """UniMatch written out flat: no selector object, no meters, no bookkeeping."""
    x, y = lab["image"], lab["mask"]
    bx, bu = x.shape[0], unl["weak"].shape[0]
    pred, pred_fp = model(torch.cat([x, unl["weak"]]), need_fp=True)
    with torch.no_grad():
        model.eval()
        mix_logits = model(mix["weak"])
        model.train()
        probs = torch.cat([pred[bx:].detach(), mix_logits]).softmax(1)
        conf, label = probs.max(1)
        weight = ((conf >= tau) & torch.cat([unl["valid"], mix["valid"]])).float()
    label_u, label_m = label.split(bu)
    w_u, w_m = weight.split(bu)
    box1, box2 = unl["box1"], unl["box2"]
    s1 = torch.where(box1.unsqueeze(1), mix["strong1"], unl["strong1"])
    s2 = torch.where(box2.unsqueeze(1), mix["strong2"], unl["strong2"])
    p1, p2 = model(torch.cat([s1, s2])).split(bu)
    n_valid = unl["valid"].sum()

    def masked(logits, lbl, w):
        return (F.cross_entropy(logits, lbl, reduction="none") * w).sum() / n_valid

    loss_x = F.cross_entropy(pred[:bx], y, ignore_index=IGNORE)
    loss_s1 = masked(p1, torch.where(box1, label_m, label_u), torch.where(box1, w_m, w_u))
    loss_s2 = masked(p2, torch.where(box2, label_m, label_u), torch.where(box2, w_m, w_u))
    loss_fp = masked(pred_fp[bx:], label_u, w_u)
    loss = (loss_x + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp) / 2
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def harness_step(trainer, t, batch, gt):
    """What the training loop does per step besides data loading and logging."""
    out = trainer.train_step(t, batch)
    trainer.log.meter.update(out.selection, gt, ignore_index=IGNORE, valid=out.valid)
    trainer.log.add_step(trainer._finite_losses(out, t + 1))
    return out.loss.item()


def _setup():
    trainer = Trainer(load_config(overrides=OVERRIDES), show_progress=False)
    streams = [iter(loader) for loader in trainer._loaders()]
    lab, unl, mix = (_to(next(s), trainer.device) for s in streams)
    model = copy.deepcopy(trainer.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    return trainer, model, optimizer, lab, unl, mix


def test_harness_step_vs_bare_loop(benchmark, ratio_log):
    import time

    trainer, model, optimizer, lab, unl, mix = _setup()
    batch, gt = split_truth(lab, unl, mix)
    trainer.model.train()
    model.train()
    torch.manual_seed(0)  # the same feature-perturbation draw on both sides
    bare_loss = bare_step(model, optimizer, lab, unl, mix)
    torch.manual_seed(0)
    assert harness_step(trainer, 0, batch, gt) == bare_loss  # the same computation, from the same weights
    bare_times, harness_times = [], []
    for _ in range(3):  # warm-up both
        bare_step(model, optimizer, lab, unl, mix)
        harness_step(trainer, 0, batch, gt)
    for i in range(15):  # interleaved, so drift in machine speed hits both alike
        t0 = time.perf_counter()
        bare_step(model, optimizer, lab, unl, mix)
        bare_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        harness_step(trainer, i, batch, gt)
        harness_times.append(time.perf_counter() - t0)
    benchmark.pedantic(harness_step, args=(trainer, 0, batch, gt), rounds=5, warmup_rounds=1)
    bare = sorted(bare_times)[len(bare_times) // 2] * 1e3
    harness = sorted(harness_times)[len(harness_times) // 2] * 1e3
    ratio = harness / bare
    benchmark.extra_info.update(bare_ms=round(bare, 2), harness_ms=round(harness, 2), ratio=round(ratio, 3))
    ratio_log.append(f"unimatch step  harness {harness:8.1f} ms  bare loop {bare:8.1f} ms  ratio {ratio:5.3f}")
    assert ratio < 1.10, f"the harness step costs {ratio:.3f}x the bare loop (claim: < 1.10x)"
