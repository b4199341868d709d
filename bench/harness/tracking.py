"""Weights & Biases, mirroring the run record; it must never stall or break a run.

Mode: `wandb_mode` in the config, else WANDB_MODE, else online when an API key is
configured and offline otherwise. Online is tried only after the W&B host answers a TCP
connect within 3 s; if that or the init fails, the run continues offline (or without
W&B) with a warning. `disabled` (what the tests use) does nothing at all.
"""

from __future__ import annotations

import netrc
import os
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse


def api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(configured: str | None) -> str:
    mode = (configured or os.environ.get("WANDB_MODE") or "").lower()
    if mode in ("disabled", "off", "false", "0"):
        return "disabled"
    if mode in ("offline", "dryrun"):
        return "offline"
    if mode in ("online", "run", ""):
        return "online" if api_key_configured() else "offline"
    raise ValueError(f"wandb mode {mode!r} is not one of online, offline, disabled")


def host_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


class Tracker:
    """No-op sink; WandbTracker overrides it."""

    mode = "disabled"
    run_id: str | None = None

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, values: dict) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(self, run, mode: str):
        self.run, self.mode = run, mode
        self.run_id = getattr(run, "id", None)

    def log(self, metrics, step):
        try:
            self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        except Exception as exc:  # a sink must not end a run
            warnings.warn(f"W&B log failed ({exc}); continuing without it")

    def summary(self, values):
        try:
            for k, v in values.items():
                if isinstance(v, (int, float, str)):
                    self.run.summary[k] = v
        except Exception as exc:
            warnings.warn(f"W&B summary failed ({exc})")

    def finish(self, failed=False):
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as exc:
            warnings.warn(f"W&B finish failed ({exc})")


def start_tracking(
    config: dict, name: str, out: Path, project: str, group: str | None, mode: str | None, run_id: str | None = None
) -> Tracker:
    """A W&B run mirroring the record; `run_id` (from the record of a resumed run) continues
    that run instead of opening a new one."""
    mode = resolve_mode(mode)
    if mode == "disabled":
        return Tracker()
    try:
        import wandb
    except ImportError:
        warnings.warn("wandb is not installed; run records are still written")
        return Tracker()
    if mode == "online" and not host_reachable():
        warnings.warn("W&B host unreachable within 3 s: logging offline (sync later with `wandb sync`)")
        mode = "offline"
    for attempt in (mode, "offline") if mode == "online" else (mode,):
        try:
            run = wandb.init(
                project=project,
                group=group,
                name=name,
                config=config,
                dir=str(out),
                mode=attempt,
                id=run_id,
                resume="allow" if run_id else None,
                reinit="finish_previous",
                settings=wandb.Settings(init_timeout=30, silent=True),
            )
            return WandbTracker(run, attempt)
        except Exception as exc:
            warnings.warn(f"W&B init ({attempt}) failed: {exc}")
    return Tracker()
