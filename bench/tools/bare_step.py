"""UniMatch's training step written out flat, as its authors write it: no selector object,
no meters, no bookkeeping. The reference the harness step is measured against
(`make bench`, `make gpu-check`): same model, batch, views and losses, a fixed threshold.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from bench.labels import IGNORE


def bare_unimatch_step(model, optimizer, lab: dict, unl: dict, mix: dict, tau: float = 0.95, autocast=contextlib.nullcontext) -> torch.Tensor:
    """One step on batches already on the device; the loss (not read on the host)."""
    x, y = lab["image"], lab["mask"]
    bx, bu = x.shape[0], unl["weak"].shape[0]
    with autocast():
        pred, pred_fp = model(torch.cat([x, unl["weak"]]), need_fp=True)
        with torch.no_grad():
            model.eval()
            mix_logits = model(mix["weak"])
            model.train()
            probs = torch.cat([pred[bx:].detach(), mix_logits]).float().softmax(1)
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
            return (F.cross_entropy(logits.float(), lbl, reduction="none") * w).sum() / n_valid

        loss_x = F.cross_entropy(pred[:bx].float(), y, ignore_index=IGNORE)
        loss_s1 = masked(p1, torch.where(box1, label_m, label_u), torch.where(box1, w_m, w_u))
        loss_s2 = masked(p2, torch.where(box2, label_m, label_u), torch.where(box2, w_m, w_u))
        loss_fp = masked(pred_fp[bx:], label_u, w_u)
        loss = (loss_x + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp) / 2
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
