"""The typed configuration of one training run.

One flat dataclass: every key is a field with a type and a default, set from a YAML file
and then from `key=value` arguments (the command line always wins). `selector.<param>`
sets a selector parameter. An unknown key is an error naming the closest valid key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.suggest import did_you_mean

NORMALISERS = ("valid", "selected")
EVAL_MODES = ("whole", "sliding", "center")
EVAL_SPLITS = ("val", "test")
# Defaults that depend on the dataset, filled in when the config is resolved. The
# synthetic scenes are small (80 px), so the general 0.5-2.0 range would shrink their
# objects to a few pixels.
DATASET_DEFAULTS = {"synthetic": {"scale_min": 0.8, "scale_max": 1.25, "protocol": "synthetic"}}
GENERAL_DEFAULTS = {"scale_min": 0.5, "scale_max": 2.0, "protocol": "classic"}
# Keys that say where or how loudly a run works, not what it computes: left out of the hash.
# `init_from` is a location too: the run it names enters the hash as `init_from_hash`, so a
# storage folder can be moved and still resumed.
# `deterministic` changes how reproducible a CUDA run is, not what it computes: a run may be
# resumed with it switched, and adding it left every earlier config hash as it was.
# Bank points measure the teacher on the side (their random draws are kept apart from
# training's), so a run with them trains exactly as one without.
NON_RESULT_KEYS = (
    "out", "workers", "wandb_project", "wandb_group", "wandb_mode", "checkpoint_every", "log_every", "init_from", "deterministic",
    "bank_points", "bank_images", "eval_batch_size",
)
# Keys added after runs were stored: at their default they stay out of the hash, so the
# hashes (and resumes) of those runs still hold.
HASHED_UNLESS_DEFAULT = {"sum_losses": False, "replicas": 1, "eval_split": "val", "resize": None, "blur_sigma": [0.1, 2.0],
                         "logit_penalty": 0.0, "logit_penalty_margin": 10.0, "strong_bn_stats": True}
# Keys holding file-system paths: relative ones resolve against the directory the command
# was launched from, once, when the config is built (Ray runs trials in other folders).
PATH_KEYS = ("root", "split_dir", "init_from", "pretrained", "out")


@dataclass
class TrainConfig:
    # data
    dataset: str = "synthetic"  # synthetic | camvid | pascal | cityscapes | coco
    root: str | None = None  # data root (not needed for synthetic)
    split: str = "default"  # splits/<dataset>/<split>/{labeled,unlabeled}.txt
    split_dir: str = "splits"  # where split folders live
    labeled: int = 20  # labelled images when a split is made on the fly (synthetic default)
    protocol: str | None = None  # label for tables: classic | blended | u2pl (synthetic for synthetic data)
    crop: int = 64
    resize: list[int] | None = None  # [height, width]: every image and mask resized at load (masks nearest); mIoU at that size
    scale_min: float | None = None  # weak-view rescale range; default 0.5 (0.8 for synthetic)
    scale_max: float | None = None  # default 2.0 (1.25 for synthetic)
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # strong views' Gaussian blur range (UniMatch's, for 321+ px crops)
    batch_size: int = 4  # labelled images per step
    unlabeled_batch_size: int | None = None  # default: batch_size
    workers: int = 0
    # evaluation
    eval_split: str = "val"  # where the final mIoU is measured: val | test (held out; curves and best-val stay on val)
    eval_every: int = 250
    eval_mode: str = "whole"  # whole | sliding | center
    eval_crop: int | None = None  # window / centre crop size; default: crop
    eval_stride: float = 2 / 3  # sliding-window stride as a fraction of eval_crop
    eval_batch_size: int = 8  # images per evaluation forward, when they share a size (1 for a tight GPU)
    probe_images: int = 200  # unlabeled images scored at the end: AUROC of max confidence
    bank_points: int = 0  # points in training where the teacher's predictions are banked (out/bank) and every selector scored on them
    bank_images: int = 30  # unlabeled images per bank point
    # model
    backbone: str = "resnet10t"  # any timm model with features_only
    pretrained: str | None = None  # efficientnet_lite0/1/2 (ImageNet weights from pip packages), a local weights file, or "timm" (local cache only)
    output_stride: int | None = None  # timm output_stride (8 or 16 dilates the last stages)
    init_from: str | None = None  # a run folder (or checkpoint.pt) whose model weights start this run
    init_from_hash: str | None = None  # config hash of that run; filled in from its checkpoint when unset
    head_channels: int = 64
    aspp_dilations: list[int] = field(default_factory=lambda: [6, 12, 18])
    dropout_fp: float = 0.5  # feature perturbation (UniMatch): Dropout2d on the features
    # training
    framework: str = "unimatch"  # supervised | fixmatch | unimatch
    selector: str = "fixed"
    selector_params: dict[str, Any] = field(default_factory=dict)
    csl_mask_view: bool = False
    mask_block: int = 32
    mask_ratio: float = 0.7
    ema_teacher: bool = False
    ema_momentum: float = 0.999
    sum_losses: bool = False  # loss = x + u (FixMatch) instead of UniMatch's (x + u) / 2, which halves the labelled step
    strong_bn_stats: bool = True  # strong views update BatchNorm's running statistics (UniMatch); false: only labelled and weak views do
    logit_penalty: float = 0.0  # weight of "Do not trust what you trust"'s penalty on the strong views' logits (0: off; the paper's 0.1)
    logit_penalty_margin: float = 10.0  # its margin m in max(0, max_j z_j - z_k - m)
    normaliser: str = "valid"  # valid: sum(w CE)/#valid ; selected: sum(w CE)/sum(w)
    iters: int = 1000
    lr: float = 0.01
    head_lr_mult: float | None = None  # the head's lr over the backbone's; default 10 for a fresh head (UniMatch), 1 after init_from
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    replicas: int = 1  # data-parallel workers (GPUs) per run, through Ray Train; batch_size is per worker
    deterministic: bool = False  # deterministic torch/cuDNN/cuBLAS kernels (slower on CUDA)
    # output
    out: str = "runs/default"
    checkpoint_every: int = 250
    log_every: int = 10
    wandb_project: str = "cslbench"
    wandb_group: str | None = None
    wandb_mode: str | None = None  # online | offline | disabled; default from the environment

    def validate(self) -> "TrainConfig":
        for key, value in {**GENERAL_DEFAULTS, **DATASET_DEFAULTS.get(self.dataset, {})}.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.head_lr_mult is None:  # a head a warm start already trained is not a random one
            self.head_lr_mult = 1.0 if self.init_from else 10.0
        from bench.harness.frameworks import FRAMEWORKS  # the registry of steps decides what exists

        choices = {"framework": list(FRAMEWORKS), "normaliser": NORMALISERS, "eval_mode": EVAL_MODES, "eval_split": EVAL_SPLITS}
        for key, options in choices.items():
            if getattr(self, key) not in options:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {list(options)}")
        positive = ("crop", "batch_size", "eval_batch_size", "iters", "eval_every", "checkpoint_every", "log_every", "labeled", "head_channels", "replicas")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(f"blur_sigma is [low, high] with 0 < low <= high, got {self.blur_sigma}")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            raise ConfigError(f"resize is [height, width] in pixels, got {self.resize}")
        if not 0 < self.scale_min <= self.scale_max:
            raise ConfigError(f"need 0 < scale_min <= scale_max, got {self.scale_min}, {self.scale_max}")
        if self.bank_points < 0 or self.bank_points > self.iters or self.bank_images < 1:
            raise ConfigError(f"need 0 <= bank_points <= iters and bank_images >= 1, got {self.bank_points}, {self.bank_images}")
        if not 0 < self.eval_stride <= 1:
            raise ConfigError(f"eval_stride is a fraction of the window in (0, 1], got {self.eval_stride}")
        if self.logit_penalty < 0 or self.logit_penalty_margin < 0:
            raise ConfigError(f"logit_penalty and logit_penalty_margin must be >= 0, got {self.logit_penalty}, {self.logit_penalty_margin}")
        if self.logit_penalty > 0 and self.framework == "supervised":
            raise ConfigError("logit_penalty needs a semi-supervised framework (it acts on the strong views' pseudo-labelled pixels)")
        if self.csl_mask_view and self.framework != "unimatch":
            raise ConfigError("csl_mask_view=true needs framework=unimatch (it replaces the second strong view)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        from bench.contract import check_selector

        try:
            check_selector(self.selector, self.selector_params)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return self

    def absolute(self, base: str | Path | None = None) -> "TrainConfig":
        """Make every relative path absolute against `base` (default: the current folder)."""
        from bench.harness.pretrained import PACKAGED

        base = Path(base or Path.cwd())
        for key in PATH_KEYS:
            value = getattr(self, key)
            if value is None or (key == "pretrained" and (value == "timm" or value in PACKAGED)):
                continue
            setattr(self, key, os.path.abspath(base / Path(value).expanduser()))  # normalised, links kept
        return self

    @property
    def u_batch_size(self) -> int:
        return self.unlabeled_batch_size or self.batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Identifies what the run computes (not where it writes)."""
        return hashlib.sha256(json.dumps(result_keys(self.to_dict()), sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class ConfigError(ValueError):
    pass


def read_yaml_mapping(path, error: type[Exception], what: str) -> dict:
    """A YAML file that must hold a mapping, read with safe_load."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a mapping of key: value")
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def result_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The keys that decide what a run computes. The device enters as its type (cuda:1 and
    cuda compute the same; cpu and cuda do not: CUDA runs in bf16)."""
    config = {k: _plain(v) for k, v in config.items()}  # (120, 160) and [120, 160] are one setting
    data = {k: v for k, v in config.items() if k not in NON_RESULT_KEYS and not (k in HASHED_UNLESS_DEFAULT and v == HASHED_UNLESS_DEFAULT[k])}
    if isinstance(data.get("device"), str):
        data["device"] = data["device"].split(":")[0]
    return data


def config_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Result keys whose values differ: {key: (stored, wanted)}. What a run resolves when it
    starts (device `auto`, the hash of its warm start) accepts whatever the run resolved."""
    a, b = result_keys(stored), result_keys(wanted)
    for data in (a, b):  # two spellings of one path are one path
        for key in PATH_KEYS:
            if isinstance(data.get(key), str) and data[key] != "timm":
                data[key] = os.path.normpath(data[key])
    for key, unresolved in (("device", "auto"), ("init_from_hash", None)):
        if b.get(key) == unresolved and key in a:
            b[key] = a[key]
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: Any) -> Any:
    hint = _HINTS[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    base = next((a for a in args if a is not type(None)), hint) if isinstance(hint, types.UnionType) or optional else hint
    origin = typing.get_origin(base) or base
    try:
        if origin is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if origin is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if origin is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if origin is str:
            return str(value)
        if origin is list:
            if not isinstance(value, (list, tuple)):
                raise ValueError
            (item,) = typing.get_args(base)
            return [item(v) for v in value]
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{key}={value!r} is not a valid {getattr(base, '__name__', base)}")


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply(config: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    """Set `values` on `config`; `selector.<param>` keys go to selector_params."""
    for key, value in values.items():
        if key.startswith("selector."):
            config.selector_params[key.split(".", 1)[1]] = value
            continue
        if key == "selector" and isinstance(value, dict):  # YAML: selector: {name: csl, alpha: 8}
            value = dict(value)
            if "name" in value:
                config.selector = str(value.pop("name"))
            config.selector_params.update(value)
            continue
        if key not in _FIELDS:
            raise ConfigError(f"unknown config key '{key}' in {source}{did_you_mean(key, _FIELDS)}")
        coerced = _coerce(key, value)
        if key == "selector_params":
            config.selector_params.update(coerced)
        else:
            setattr(config, key, coerced)
    return config


def parse_overrides(items: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r} (e.g. selector=csl iters=300)")
        key, text = item.split("=", 1)
        values[key.strip()] = _parse_value(text)
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then the command line (which wins)."""
    config = TrainConfig()
    if path is not None:
        apply(config, read_yaml_mapping(path, ConfigError, "config file"), str(path))
    apply(config, parse_overrides(overrides or []), "the command line")
    return config.absolute().validate()


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from `to_dict()` output (run records, checkpoints)."""
    return apply(TrainConfig(), data, "a stored config").validate()
