"""The semi-supervised algorithms, one plain function per framework.

Each step reads top to bottom like UniMatch's training loop: predictions on the weak views,
selection, strong views, losses. A step receives what a learner may see and nothing more:
`UnlabeledView` has no ground-truth field, so unlabelled truth cannot reach a step, a
selector or a loss (the loop gives it to the selection meter itself). The step returns
its loss and loss parts as tensors; the loop does the backward pass, the optimiser and
the EMA teacher.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from bench.harness.losses import PseudoTargets, logit_penalty, pseudo_label_loss, supervised_loss
from bench.contract import Selection
from bench.harness.seam import SelectorSeam
from csl.masking import hide_pixels, reliable_block_mask


@dataclass(frozen=True)
class UnlabeledView:
    """One unlabelled batch as the learner sees it (no ground truth, by construction)."""

    weak: Tensor  # (B, 3, H, W)
    strong1: Tensor
    strong2: Tensor
    box1: Tensor  # (B, H, W) bool CutMix boxes
    box2: Tensor
    valid: Tensor  # (B, H, W) bool: image rather than padding
    masked: Tensor | None = None  # CSL masking view (mild jitter or strong), with `hide`
    hide: Tensor | None = None  # (B,) bool: which images of `masked` get pixels hidden


@dataclass(frozen=True)
class Batch:
    image: Tensor  # labelled images (B, 3, H, W)
    mask: Tensor  # their labels (B, H, W)
    unl: UnlabeledView | None = None  # the unlabelled batch
    mix: UnlabeledView | None = None  # the batch CutMix pastes from


@dataclass
class StepOut:
    loss: Tensor  # what the loop back-propagates
    parts: dict[str, Tensor]  # the loss terms, for the curves
    selection: Selection | None = None  # on torch.cat([unl, mix]), for the meter
    valid: Tensor | None = None  # the pixels the selection was made on


class Step(Protocol):
    def __call__(self, model, teacher, select: SelectorSeam, batch: Batch, cfg, t: int) -> StepOut: ...


def supervised_step(model, teacher, select: SelectorSeam, batch: Batch, cfg, t: int) -> StepOut:
    loss_x = supervised_loss(model(batch.image), batch.mask)
    return StepOut(loss_x, {"loss_x": loss_x})


def fixmatch_step(model, teacher, select: SelectorSeam, batch: Batch, cfg, t: int) -> StepOut:
    """FixMatch for segmentation: one CutMix strong view trained on the selected labels."""
    x, y, u, m = batch.image, batch.mask, batch.unl, batch.mix
    bx, bu = x.shape[0], u.weak.shape[0]
    pred = model(torch.cat([x, u.weak]))
    pred_x = pred[:bx]
    probs = pseudo_label_logits(model, teacher, u.weak, m.weak, pred[bx:].detach()).float().softmax(1)
    valid = torch.cat([u.valid, m.valid])
    selection = select(probs, valid, **offered_context(model, teacher, batch, pred_x, cfg, t))
    target_u, target_mix = PseudoTargets.from_selection(selection, valid).split([bu, bu])

    with strong_view_statistics(model, cfg):
        pred_s = model(cutmix(u.strong1, m.strong1, u.box1))

    loss_x = supervised_loss(pred_x, y)
    target_s = target_u.paste(target_mix, u.box1)
    loss_s = pseudo_label_loss(pred_s, target_s, cfg.normaliser)
    parts = {"loss_x": loss_x, "loss_s": loss_s}
    return StepOut(with_penalty(combine(loss_x, loss_s, cfg), parts, [(pred_s, target_s)], cfg), parts, selection, valid)


def unimatch_step(model, teacher, select: SelectorSeam, batch: Batch, cfg, t: int) -> StepOut:
    """UniMatch: a feature-perturbed weak view and two CutMix strong views; with
    `csl_mask_view`, CSL's masking view (no CutMix) replaces the second strong view."""
    x, y, u, m = batch.image, batch.mask, batch.unl, batch.mix
    bx, bu = x.shape[0], u.weak.shape[0]
    pred, pred_fp = model(torch.cat([x, u.weak]), need_fp=True)
    pred_x, pred_fp = pred[:bx], pred_fp[bx:]
    probs = pseudo_label_logits(model, teacher, u.weak, m.weak, pred[bx:].detach()).float().softmax(1)
    valid = torch.cat([u.valid, m.valid])
    selection = select(probs, valid, **offered_context(model, teacher, batch, pred_x, cfg, t))
    target_u, target_mix = PseudoTargets.from_selection(selection, valid).split([bu, bu])

    view1, target1 = cutmix(u.strong1, m.strong1, u.box1), target_u.paste(target_mix, u.box1)
    if cfg.csl_mask_view:
        view2, target2, name2 = masking_view(u, selection.reliable[:bu], cfg, t), target_u, "loss_mask"
    else:
        view2, target2, name2 = cutmix(u.strong2, m.strong2, u.box2), target_u.paste(target_mix, u.box2), "loss_s2"
    with strong_view_statistics(model, cfg):
        pred_s1, pred_s2 = model(torch.cat([view1, view2])).split(bu)

    loss_x = supervised_loss(pred_x, y)
    loss_s1 = pseudo_label_loss(pred_s1, target1, cfg.normaliser)
    loss_s2 = pseudo_label_loss(pred_s2, target2, cfg.normaliser)
    loss_fp = pseudo_label_loss(pred_fp, target_u, cfg.normaliser)
    loss = combine(loss_x, 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp, cfg)
    # "loss_s" (not "loss_s1") keeps the curve names of FixMatch and of earlier records
    parts = {"loss_x": loss_x, "loss_fp": loss_fp, "loss_s": loss_s1, name2: loss_s2}
    loss = with_penalty(loss, parts, [(pred_s1, target1), (pred_s2, target2)], cfg)
    return StepOut(loss, parts, selection, valid)


@dataclass(frozen=True)
class Framework:
    step: Step
    semi_supervised: bool  # needs unlabelled batches


FRAMEWORKS: dict[str, Framework] = {
    "supervised": Framework(supervised_step, semi_supervised=False),
    "fixmatch": Framework(fixmatch_step, semi_supervised=True),
    "unimatch": Framework(unimatch_step, semi_supervised=True),
}


# --------------------------------------------------------------------------------------
# Pieces the steps share
# --------------------------------------------------------------------------------------
def offered_context(model, teacher, batch: Batch, pred_x: Tensor, cfg, t: int) -> dict:
    """Everything a selector may declare (bench.contract.selection.build_context takes what it asks
    for): training progress, the labelled batch's prediction and labels, and stochastic
    passes of the pseudo-labelling model over both weak batches, run only when asked."""
    weak = lambda: torch.cat([batch.unl.weak, batch.mix.weak])  # noqa: E731
    return {
        "progress": t / cfg.iters,
        "labeled_probs": lambda: pred_x.detach().float().softmax(1),
        "labeled_target": batch.mask,
        "mc_logits": lambda passes: mc_logits(teacher if teacher is not None else model, weak(), passes),
    }


@torch.no_grad()
def pseudo_label_logits(model, teacher, weak: Tensor, weak_mix: Tensor, student_weak: Tensor) -> Tensor:
    """The EMA teacher on both weak batches, or (UniMatch's default) the student's own
    prediction on the weak view plus an eval-mode pass on the mix batch."""
    if teacher is not None:
        return teacher(torch.cat([weak, weak_mix]))
    model.eval()
    mix_logits = model(weak_mix)
    model.train()
    return torch.cat([student_weak, mix_logits])


@torch.no_grad()
def mc_logits(model, weak: Tensor, passes: int) -> Tensor:
    """`passes` stochastic (decoder dropout) passes in eval mode, stacked (T, B, K, H, W)."""
    was_training = model.training
    model.eval()
    out = getattr(model, "module", model).mc_logits(weak, passes)  # under data parallelism: the wrapped model, no gradient to sync
    model.train(was_training)
    return out


def combine(loss_x: Tensor, loss_u: Tensor, cfg) -> Tensor:
    """UniMatch averages the labelled and unlabelled losses, which halves the labelled step
    against a supervised run at the same lr; `sum_losses` adds them (FixMatch's x + u)."""
    return loss_x + loss_u if cfg.sum_losses else (loss_x + loss_u) / 2


@contextlib.contextmanager
def strong_view_statistics(model, cfg):
    """With `strong_bn_stats=false` the strong views are normalised by their own batch
    statistics as usual but leave BatchNorm's running statistics (what evaluation uses)
    alone, so colour jitter, greyscale and blur do not shift them; UniMatch lets them in."""
    if cfg.strong_bn_stats:
        yield
        return
    norms = [mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    saved = [mod.momentum for mod in norms]
    for mod in norms:
        mod.momentum = 0.0
    try:
        yield
    finally:
        for mod, momentum in zip(norms, saved):
            mod.momentum = momentum


def with_penalty(loss: Tensor, parts: dict, strong: list[tuple[Tensor, PseudoTargets]], cfg) -> Tensor:
    """Add the logit penalty (`logit_penalty` > 0), averaged over the strong views, to the
    loss; its value joins the curves as loss_pen."""
    if cfg.logit_penalty <= 0:
        return loss
    parts["loss_pen"] = sum(logit_penalty(pred, target, cfg.logit_penalty_margin) for pred, target in strong) / len(strong)
    return loss + cfg.logit_penalty * parts["loss_pen"]


def cutmix(images: Tensor, source: Tensor, box: Tensor) -> Tensor:
    """Paste `source` into `images` inside `box` (B, H, W)."""
    return torch.where(box.unsqueeze(1), source, images)


def masking_view(u: UnlabeledView, reliable: Tensor, cfg, t: int) -> Tensor:
    """CSL: hide reliable pixels inside random blocks of the images drawn for hiding (mild
    jitter); the others keep an ordinary strong view."""
    # drawn where the images are: a CPU draw copied to a GPU would make every step wait
    g = torch.Generator(device=u.masked.device).manual_seed(cfg.seed * 1_000_003 + t)
    hidden = reliable_block_mask(reliable, cfg.mask_block, cfg.mask_ratio, generator=g)
    hidden &= u.hide.view(-1, 1, 1)
    return hide_pixels(u.masked, hidden)
