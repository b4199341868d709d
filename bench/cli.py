"""`cslbench`: the command line. Each subcommand is a thin wrapper over a module."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from bench.runtime import keep_freed_memory


def _threads(value: int | None) -> None:
    if value is not None:
        if value < 1:
            raise SystemExit(f"--threads must be >= 1, got {value}")
        torch.set_num_threads(value)


def _devices(choice: str) -> list[str]:
    if choice == "all":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to PyTorch (use --device cpu)")
    return [choice]


def cmd_kernels(args) -> None:
    from bench.kernels import DEFAULT_SHAPES, format_table, parse_shape, time_kernels, write_json
    from bench.selection import available_selectors

    _threads(args.threads)
    try:
        shapes = [parse_shape(s) for s in args.shapes] if args.shapes else list(DEFAULT_SHAPES)
    except ValueError as exc:
        raise SystemExit(f"--shapes: {exc}")
    names = args.selectors or available_selectors()
    unknown = sorted(set(names) - set(available_selectors()))
    if unknown:
        raise SystemExit(f"--selectors: unknown {unknown}; available: {', '.join(available_selectors())}")
    rows = []
    for device in _devices(args.device):
        rows += time_kernels(
            shapes,
            device=device,
            selectors=names,
            budget_s=args.budget,
            ups_passes=args.ups_passes,
            include_svd_loop=not args.no_svd_loop,
            progress=lambda s: print(f"  timing {s}", file=sys.stderr, flush=True),
        )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(format_table(rows))
    if args.json:
        write_json(rows, args.json)
        print(f"wrote {args.json}")


def cmd_demo(args) -> None:
    from bench.demo import run_demo
    from bench.kernels import parse_shape

    _threads(args.threads)
    run_demo(Path(args.out), [parse_shape(s) for s in args.shapes], _devices(args.device), budget_s=args.budget)


def cmd_selectors(args) -> None:
    from bench.selection import selector_class, selector_params, available_selectors

    for name in available_selectors():
        cls = selector_class(name)
        params = ", ".join(f"{k}={v!r}" for k, v in selector_params(name).items())
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {params}\n{'':10s} {doc}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cslbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kernels", help="time every selector against a bare one-read threshold")
    k.add_argument("--shapes", nargs="+", metavar="BxKxHxW", help="default: 8x21x128x128 16x21x256x256")
    k.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help="all = cpu, plus cuda when present")
    k.add_argument("--selectors", nargs="+", metavar="NAME", help="default: every registered selector")
    k.add_argument("--threads", type=int, help="CPU threads for PyTorch (default: its own choice)")
    k.add_argument("--budget", type=float, default=1.0, help="seconds of timing per kernel (min 5 calls)")
    k.add_argument("--ups-passes", type=int, default=10, help="MC passes handed to UPS (its mc_passes)")
    k.add_argument("--no-svd-loop", action="store_true", help="skip the per-image SVD reference for CSL")
    k.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    k.set_defaults(func=cmd_kernels)

    d = sub.add_parser("demo", help="selection quality on a synthetic probability field, and selector speed")
    d.add_argument("--out", default="runs/demo", help="folder for the JSON results")
    d.add_argument("--shapes", nargs="+", default=["8x21x128x128"], metavar="BxKxHxW")
    d.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    d.add_argument("--threads", type=int)
    d.add_argument("--budget", type=float, default=0.5)
    d.set_defaults(func=cmd_demo)

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
