"""`cslbench selector-demo` (`make selector-demo`): what each selector selects on a
synthetic probability field with known ground truth, and what it costs, in a minute.
The benchmark itself is `make demo` (sweeps/default.yaml)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm import tqdm

from bench.tools.kernels import format_table, time_kernels, write_json
from bench.contract.metrics import SelectionQualityMeter
from bench.tools.probability_field import IGNORE, prediction_field
from bench.files import atomic_write_text
from bench.contract import available_selectors, build_context, get_selector

COLUMNS = ("coverage", "precision", "recall", "weighted_precision", "f1", "auroc", "pseudo_miou")


def selection_quality(batches: int = 4, batch_size: int = 8, num_classes: int = 8, size: int = 96) -> dict:
    """Every selector on the same synthetic predictions; stateful selectors see the
    batches in order, starting from their initial state (as at the start of training)."""
    names = available_selectors()
    selectors = {n: get_selector(n, num_classes=num_classes) for n in names}
    mc_passes = max(sel.mc_passes for sel in selectors.values())
    meters = {n: SelectionQualityMeter(num_classes) for n in names}
    for i in tqdm(range(batches), desc="selection quality", unit="batch", leave=False):
        field, mc = prediction_field(batch_size, num_classes, size, seed=2 * i, mc_passes=mc_passes)
        labeled, _ = prediction_field(batch_size, num_classes, size, seed=2 * i + 1)
        available = {
            "mc_logits": lambda passes, mc=mc: mc[:passes],
            "labeled_probs": labeled.probs,
            "labeled_target": labeled.gt,
            "progress": i / max(batches - 1, 1),
        }
        for n, sel in selectors.items():
            out = sel.select(field.probs, field.valid, **build_context(sel, available))
            meters[n].update(out, field.gt, ignore_index=IGNORE)
    return {n: m.compute() for n, m in meters.items()}


def format_quality(results: dict) -> str:
    def cell(v: float | None) -> str:
        return "–" if v is None or math.isnan(v) else f"{100 * v:.1f}"

    header = ("selector", *COLUMNS)
    rows = [(n, *(cell(r[c]) for c in COLUMNS)) for n, r in sorted(results.items(), key=lambda kv: -kv[1]["f1"] if not math.isnan(kv[1]["f1"]) else 0)]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def run_demo(out: Path, shapes, devices, budget_s: float = 0.5) -> None:
    out.mkdir(parents=True, exist_ok=True)
    print("Selection quality on a synthetic probability field (8 classes, 4 x 8 images of 96x96;")
    print("percentages over labelled pixels; reliable = the hard selected set)\n")
    quality = selection_quality()
    print(format_quality(quality))
    atomic_write_text(out / "selection_quality.json", json.dumps(quality, indent=2))
    rows = []
    for device in devices:
        with tqdm(total=None, desc=f"kernels on {device}", leave=False) as bar:
            rows += time_kernels(shapes, device=device, budget_s=budget_s, progress=lambda s: bar.set_postfix_str(s) or bar.update())
    print("\nSelector speed (median per call; x bare = ratio to (probs.max(1).values >= 0.95) & valid, x one read = ratio to probs.sum(), both in this process)\n")
    print(format_table(rows))
    write_json(rows, out / "kernels.json")
    print(f"\nwrote {out / 'selection_quality.json'} and {out / 'kernels.json'}")
