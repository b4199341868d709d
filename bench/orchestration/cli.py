"""`cslbench`: the command line. Each subcommand is a thin wrapper over a module."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from bench.harness.runtime import keep_freed_memory


def _threads(value: int | None) -> None:
    if value is not None:
        if value < 1:
            raise SystemExit(f"--threads must be >= 1, got {value}")
        torch.set_num_threads(value)


def show(value, digits: int = 4) -> str:
    """A number, or "–" where it is undefined (null in a record, NaN)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        return "–"
    return f"{value:.{digits}f}"


def _devices(choice: str) -> list[str]:
    if choice == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to PyTorch (use --device cpu)")
    return [choice]


def selector_params_from(items: list[str]) -> dict[str, dict]:
    """`NAME.KEY=VALUE` items -> {NAME: {KEY: VALUE}}, each checked against the registry."""
    from bench.harness.config import parse_overrides
    from bench.contract import check_selector

    params: dict[str, dict] = {}
    for key, value in parse_overrides(items).items():
        name, dot, param = key.partition(".")
        if not dot or not param:
            raise ValueError(f"{key!r} should look like SELECTOR.KEY=VALUE (e.g. ups.passes=5)")
        params.setdefault(name, {})[param] = value
    for name, values in params.items():
        check_selector(name, values)
    return params


def cmd_kernels(args) -> None:
    from bench.tools.kernels import DEFAULT_SHAPES, format_table, parse_shape, time_kernels, write_json
    from bench.contract import available_selectors

    _threads(args.threads)
    try:
        shapes = [parse_shape(s) for s in args.shapes] if args.shapes else list(DEFAULT_SHAPES)
    except ValueError as exc:
        raise SystemExit(f"--shapes: {exc}")
    names = args.selectors or available_selectors()
    unknown = sorted(set(names) - set(available_selectors()))
    if unknown:
        raise SystemExit(f"--selectors: unknown {unknown}; available: {', '.join(available_selectors())}")
    try:
        params = selector_params_from(args.param or [])
    except ValueError as exc:
        raise SystemExit(f"--param: {exc}")
    rows = []
    for device in _devices(args.device):
        rows += time_kernels(
            shapes,
            device=device,
            selectors=names,
            budget_s=args.budget,
            params=params,
            include_svd_loop=not args.no_svd_loop,
            progress=lambda s: print(f"  timing {s}", file=sys.stderr, flush=True),
        )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json)
        print(f"wrote {args.json}")


def cmd_demo(args) -> None:
    from bench.tools.demo import run_demo
    from bench.tools.kernels import parse_shape

    _threads(args.threads)
    run_demo(Path(args.out), [parse_shape(s) for s in args.shapes], _devices(args.device), budget_s=args.budget)


def cmd_selectors(args) -> None:
    from bench.contract import selector_class, selector_params, available_selectors

    for name in available_selectors():
        cls = selector_class(name)
        params = ", ".join(f"{k}={v!r}" for k, v in selector_params(name).items())
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {params}\n{'':10s} {doc}")


def cmd_check_selector(args) -> None:
    from bench.contract import available_selectors, selector_class
    from bench.tools.check_selector import CHECKS, run_checks

    _threads(args.threads)
    names = args.names or available_selectors()
    for name in names:
        try:
            selector_class(name)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}")
    width = max(len(n) for n in names)
    failed, total = [], 0
    for name in names:
        for result in run_checks(name):
            total += 1
            if not result.passed:
                failed.append(f"{name} {result.check}")
            detail = " ".join(result.detail.split())  # one line per check
            print(f"{name:<{width}}  {result.check:<{max(map(len, CHECKS))}}  {'PASS' if result.passed else 'FAIL'}  {detail}", flush=True)
    print(f"{total - len(failed)} of {total} checks passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        raise SystemExit(1)


def cmd_train(args) -> None:
    from bench.harness.config import ConfigError, load_config
    from bench.data.sources import DataError
    from bench.harness.models import WeightsError
    from bench.harness.checkpoint import CheckpointError
    from bench.results.record import failure
    from bench.harness.checkpoint import ResumeError
    from bench.harness.failures import DivergedError
    from bench.harness.launch import train

    _threads(args.threads)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"config: {exc}")
    if args.print_config:
        print(config.to_yaml(), end="")
        return
    try:
        record = train(config, resume=args.resume)
    except (DataError, WeightsError, ResumeError, DivergedError, CheckpointError, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {failure(exc, None)['message']}")  # a loader worker's error as the original
    final, sel = record.final or {}, record.selection or {}
    line = f"{config.out}: mIoU {show(final.get('miou'))} (best on val {show(final.get('miou_best_val'))})"
    if sel:
        line += f"; selection precision {show(sel.get('precision'))} recall {show(sel.get('recall'))} coverage {show(sel.get('coverage'))}"
    print(line)


def cmd_data_split(args) -> None:
    from bench.data.sources import DataError, get_source
    from bench.data.splits import write_split

    try:
        source = get_source(args.dataset, args.root)
        name = args.name or f"{args.labeled}_seed{args.seed}"
        folder = Path(args.out) / args.dataset / name
        hashes = write_split(source, folder, args.labeled, args.seed)
    except DataError as exc:
        raise SystemExit(f"error: {exc}")
    for file, digest in hashes.items():
        print(f"{folder / file}  sha256 {digest}")
    print(f"use it with: cslbench train dataset={args.dataset} root={args.root} split={name} split_dir={args.out}")


def cmd_data_download(args) -> None:
    from bench.data.download import BY_HAND, RECIPES, download
    from bench.data.sources import DataError

    if args.dataset in BY_HAND:
        raise SystemExit(BY_HAND[args.dataset].replace("ROOT", args.root))
    try:
        summary = download(RECIPES[args.dataset], args.root, cache=args.cache)
    except DataError as exc:
        raise SystemExit(f"error: {exc}")
    images = ", ".join(f"{n} {split}" for split, n in summary["images"].items())
    print(f"{args.dataset} ready in {args.root}: {images} images ({summary['files_checked']} files checked against the manifest)")
    print(f"use it with: cslbench train dataset={args.dataset} root={args.root}")


def cmd_data_check(args) -> None:
    from bench.data.download import check_layout
    from bench.data.sources import DataError

    try:
        sizes = check_layout(args.dataset, args.root)
    except DataError as exc:
        raise SystemExit(f"error: {exc}")
    print(f"{args.dataset} in {args.root}: " + ", ".join(f"{n} {split}" for split, n in sizes.items()) + " images, every listed file present")


def cmd_leaderboard(args) -> None:
    from bench.results.leaderboard import leaderboard
    from bench.files import atomic_write_text

    try:
        text = leaderboard(args.folder, fmt=args.format, by=args.by, reference=args.reference, figure=args.figure, differences=args.differences)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")


def cmd_sweep(args) -> None:
    from bench.orchestration.cluster import ClusterError
    from bench.orchestration.sweeps import SweepError, load_sweep, run_sweep
    from bench.results.leaderboard import leaderboard

    try:
        sweep = load_sweep(args.file)
        outcome = run_sweep(
            sweep, args.storage, resume=args.resume, address=args.address, max_concurrent=args.max_concurrent,
            verbose=2 if args.verbose else 0, rerun_stale=args.rerun_stale,
        )
    except (SweepError, ClusterError, OSError) as exc:  # OSError: the storage folder cannot be written
        raise SystemExit(f"error: {exc}")
    print(f"\ntrials in {outcome.trials_dir}\n")
    table_error = None
    try:
        if sweep.search is not None:  # samples ranked per trial of the grid, not a leaderboard
            from bench.results.search import search_table

            s = sweep.search
            print(search_table(outcome.trials_dir, list(s.space), s.metric, s.mode), end="")
        else:
            print(leaderboard(outcome.trials_dir), end="")
    except ValueError as exc:  # e.g. two runs in one cell: the records are kept, the table is not drawn
        table_error = exc
    if not outcome.ok:
        print(f"\n{outcome.summary()}", file=sys.stderr)
        raise SystemExit(f"sweep {sweep.name}: {len(outcome.failed)} failed, {len(outcome.skipped)} skipped (records in {outcome.trials_dir.parent})")
    if table_error is not None:
        raise SystemExit(f"sweep {sweep.name}: every trial done (records in {outcome.trials_dir}), but no leaderboard: {table_error}")


def _load_run_or_exit(path: str):
    from bench.data.sources import DataError
    from bench.harness.checkpoint import CheckpointError
    from bench.harness.runs import RunFolderError, load_run

    try:
        return load_run(path)
    except (RunFolderError, DataError, CheckpointError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}")


def _record_checkpoint(run, folder: Path, images: int):
    """The checkpoint's teacher as one point of the bank in `folder`; the point."""
    import contextlib

    from bench.harness.banking import BankRecorder
    from bench.results.bank import BankError

    try:
        recorder = BankRecorder(folder, run.config, run.source, run.split, images)
        return recorder.record(run.model, run.device, run.iteration, run.iteration / run.config.iters, contextlib.nullcontext)
    except BankError as exc:
        raise SystemExit(f"error: {exc}")


def cmd_bank_record(args) -> None:
    _threads(args.threads)
    run = _load_run_or_exit(args.run)
    folder = Path(args.out or run.path / "bank")
    preds = _record_checkpoint(run, folder, args.images)
    print(f"{folder}: iteration {run.iteration} of {run.path} banked ({len(preds.probs)} unlabeled images)")


def cmd_bank_score(args) -> None:
    from tqdm import tqdm

    from bench.results.bank import BankError
    from bench.results.figures import plot_bank_scores
    from bench.results.scoring import format_scores, score_bank, write_scores

    _threads(args.threads)
    bar = tqdm(desc="points scored", unit="point", disable=not sys.stderr.isatty())

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(1)

    try:
        rows = score_bank(args.bank, args.selectors, bootstrap=args.bootstrap, progress=progress)
    except (BankError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    finally:
        bar.close()
    out = Path(args.out or Path(args.bank) / "scores")
    written = write_scores(rows, out)
    plot_bank_scores(rows, out / "scores_over_training.png", args.selectors)
    for iteration in sorted({r["iteration"] for r in rows}):
        at = [r for r in rows if r["iteration"] == iteration]
        print(f"\niteration {iteration} (progress {at[0]['progress']:.2f})\n{format_scores(at)}")
    print(f"\nwrote {', '.join(str(out / f) for f in written + ['scores_over_training.png'])}")


def cmd_select_eval(args) -> None:
    from bench.files import atomic_write_text
    from bench.harness import analysis
    from bench.results.scoring import format_scores, score_predictions

    _threads(args.threads)
    run = _load_run_or_exit(args.run)
    out = Path(run.path / "select_eval")
    bank = Path(args.out or out / "bank")
    preds = _record_checkpoint(run, bank, args.images)
    table = format_scores(score_predictions(preds))
    print(f"{len(preds.probs)} unlabeled images of {args.run} (banked in {bank}); every selector on the same predictions\n")
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "select_eval.md", table + "\n")
    analysis.plot_precision_coverage(preds, out / "precision_coverage.png")
    print(f"\nwrote {out / 'select_eval.md'} and {out / 'precision_coverage.png'}")


def cmd_analyze(args) -> None:
    from bench.harness import analysis
    from bench.results import figures
    from bench.results.leaderboard import load_rows

    _threads(args.threads)
    out = Path(args.out or Path(args.folder) / "figures")
    out.mkdir(parents=True, exist_ok=True)
    frame, _ = load_rows(args.folder)
    written = []
    if frame.height:
        figures.plot_curves(frame, out / "curves.png")
        written.append("curves.png")
        probes = figures.selection_over_training(frame)
        if probes:
            figures.plot_selection_over_training(probes, out / "selection_over_training.png")
            written.append("selection_over_training.png")
    run = args.checkpoint or next((str(p.parent) for p in sorted(Path(args.folder).rglob("checkpoint.pt"))), None)
    if run:
        from bench.data.sources import DataError
        from bench.harness.checkpoint import CheckpointError
        from bench.harness.runs import RunFolderError, load_run

        try:
            loaded = load_run(run)
        except (RunFolderError, DataError, CheckpointError) as exc:
            raise SystemExit(f"error: {exc}")
        preds = analysis.collect_predictions(loaded, limit=args.images)
        analysis.plot_confidence_overlap(preds, out / "confidence_overlap.png")
        analysis.plot_cv_plane(preds, out / "cv_plane.png")
        analysis.plot_precision_coverage(preds, out / "precision_coverage.png")
        written += ["confidence_overlap.png", "cv_plane.png", "precision_coverage.png"]
    print(f"wrote {', '.join(str(out / w) for w in written) or 'nothing (no complete runs, no checkpoint)'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cslbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kernels", help="time every selector against a bare one-read threshold")
    k.add_argument("--shapes", nargs="+", metavar="BxKxHxW", help="default: 8x21x128x128 16x21x256x256")
    k.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help="all = cpu, plus cuda when present")
    k.add_argument("--selectors", nargs="+", metavar="NAME", help="default: every registered selector")
    k.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: its own choice)")
    k.add_argument("--budget", type=float, default=1.0, help="seconds of timing per kernel (min 5 calls)")
    k.add_argument("--param", action="append", metavar="SELECTOR.KEY=VALUE", help="a selector parameter, e.g. ups.passes=5 (repeatable)")
    k.add_argument("--no-svd-loop", action="store_true", help="skip the per-image SVD reference for CSL")
    k.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    k.set_defaults(func=cmd_kernels)

    d = sub.add_parser("selector-demo", help="selection quality on a synthetic probability field, and selector speed (make selector-demo)")
    d.add_argument("--out", default="runs/demo", help="folder for the JSON results")
    d.add_argument("--shapes", nargs="+", default=["8x21x128x128"], metavar="BxKxHxW")
    d.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    d.add_argument("--threads", type=int)
    d.add_argument("--budget", type=float, default=0.5)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train one run: cslbench train [--config FILE] key=value ...")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. selector=csl selector.alpha=8 iters=300")
    t.add_argument("--config", help="YAML file of key: value (the command line wins)")
    t.add_argument("--resume", action="store_true", help="continue from out/checkpoint.pt")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--threads", type=int)
    t.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    sp = data_sub.add_parser("split", help="write UniMatch-format labeled/unlabeled split files")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--root", help="data root (not needed for synthetic)")
    sp.add_argument("--labeled", type=int, required=True, help="number of labelled images")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", default="splits", help="split folder root (default: splits)")
    sp.add_argument("--name", help="split name (default: <labeled>_seed<seed>)")
    sp.set_defaults(func=cmd_data_split)
    from bench.data.download import BY_HAND, RECIPES

    dl = data_sub.add_parser("download", help="download, verify and unpack a dataset (camvid, pascal); cityscapes and coco: the steps")
    dl.add_argument("dataset", choices=[*RECIPES, *BY_HAND])
    dl.add_argument("--root", required=True, help="folder the dataset goes to")
    dl.add_argument("--cache", help="where archives are kept while downloading (default: beside the root)")
    dl.set_defaults(func=cmd_data_download)
    ck = data_sub.add_parser("check", help="check a dataset folder's layout and that every listed file exists")
    ck.add_argument("--dataset", required=True)
    ck.add_argument("--root", required=True)
    ck.set_defaults(func=cmd_data_check)

    sw = sub.add_parser("sweep", help="run a sweep file on Ray Tune, then print its leaderboard")
    sw.add_argument("file", help="sweep YAML (see sweeps/)")
    sw.add_argument("--storage", default="runs/sweeps", help="folder (shared on a cluster) for trials and Ray state")
    sw.add_argument("--address", help="Ray cluster to join (host:port or auto); default RAY_ADDRESS, else a private local Ray")
    sw.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    sw.add_argument("--resume", action="store_true", help="continue: keep finished trials, resume the others")
    sw.add_argument("--rerun-stale", action="store_true", help="with --resume: rerun trials whose config no longer matches the file")
    sw.add_argument("--verbose", action="store_true", help="Ray's own progress tables instead of one line per trial")
    sw.set_defaults(func=cmd_sweep)

    se = sub.add_parser("select-eval", help="every selector on one trained model's predictions (no retraining)")
    se.add_argument("run", help="a run folder (record.json + checkpoint.pt)")
    se.add_argument("--images", type=int, default=100, help="unlabeled images to score")
    se.add_argument("--out", help="the bank the predictions go to (default: RUN/select_eval/bank); table and figure in RUN/select_eval")
    se.add_argument("--threads", type=int)
    se.set_defaults(func=cmd_select_eval)

    bank = sub.add_parser("bank", help="prediction banks: a teacher's outputs kept for scoring any selector later (docs/banks.md)")
    bank_sub = bank.add_subparsers(dest="bank_command", required=True)
    br = bank_sub.add_parser("record", help="bank a trained run's checkpoint (one point)")
    br.add_argument("run", help="a run folder (record.json + checkpoint.pt)")
    br.add_argument("--images", type=int, default=30, help="unlabeled images (the first of the split)")
    br.add_argument("--out", help="the bank folder (default: RUN/bank, where bank_points also go)")
    br.add_argument("--threads", type=int)
    br.set_defaults(func=cmd_bank_record)
    bs = bank_sub.add_parser("score", help="score every registered selector at every point of a bank")
    bs.add_argument("bank", help="a bank folder (manifest.json)")
    bs.add_argument("--selectors", nargs="+", metavar="NAME", help="default: every registered selector, plugins included")
    bs.add_argument("--bootstrap", type=int, default=1000, help="resamples of images for the gain's interval")
    bs.add_argument("--out", help="folder for scores.json/.csv/.md and the figure (default: BANK/scores)")
    bs.add_argument("--threads", type=int)
    bs.set_defaults(func=cmd_bank_score)

    an = sub.add_parser("analyze", help="figures: confidence overlap, (C, V) plane, precision-coverage, curves")
    an.add_argument("folder", help="folder of run records (e.g. a sweep's trials/)")
    an.add_argument("--checkpoint", help="run whose model the prediction figures use (default: the first found)")
    an.add_argument("--images", type=int, default=50)
    an.add_argument("--out", help="figure folder (default: FOLDER/figures)")
    an.add_argument("--threads", type=int)
    an.set_defaults(func=cmd_analyze)

    lb = sub.add_parser("leaderboard", help="tables of mean ± std over seeds from run records")
    lb.add_argument("folder", help="folder searched recursively for record.json")
    lb.add_argument("--format", choices=["markdown", "csv", "latex", "html"], default="markdown")
    lb.add_argument("--by", help="config key pivoted into columns instead of the split (e.g. selector.alpha)")
    lb.add_argument("--out", help="write to this file instead of printing")
    lb.add_argument("--reference", default="fixed", help="the method every other is compared with (default: fixed)")
    lb.add_argument("--figure", help="also draw the critical-difference figure (mean ranks across protocols/splits) to this PNG")
    lb.add_argument("--differences", help="also draw each method's paired difference to the reference against the columns (e.g. with --by iters: the SSL gain over the budget) to this PNG")
    lb.set_defaults(func=cmd_leaderboard)

    cs = sub.add_parser("check-selector", help="run the selector contract checks (bench/tools/check_selector.py) on registered selectors")
    cs.add_argument("names", nargs="*", metavar="NAME", help="default: every registered selector")
    cs.add_argument("--threads", type=int, help="CPU threads for PyTorch (the speed check times one thread either way)")
    cs.set_defaults(func=cmd_check_selector)

    s = sub.add_parser("selectors", help="list registered selectors and their parameters")
    s.set_defaults(func=cmd_selectors)
    return parser


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    keep_freed_memory()
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
