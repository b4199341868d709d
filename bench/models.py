"""DeepLabV3+ on any timm backbone (features_only), with the two extra outputs the
frameworks need: a feature-perturbed stream (UniMatch) and stochastic passes (UPS).

Pretrained weights come only from a local file or timm's local cache: the harness never
waits on a hub.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class WeightsError(RuntimeError):
    pass


def _conv_bn(cin: int, cout: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = 0 if k == 1 else dilation
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    def __init__(self, cin: int, cout: int, dilations: list[int]):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn(cin, cout, 1)] + [_conv_bn(cin, cout, 3, d) for d in dilations])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn(cin, cout, 1))
        self.project = _conv_bn(cout * (len(dilations) + 2), cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        pooled = F.interpolate(self.pool(x), size=(h, w), mode="bilinear", align_corners=False)
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


def _create_encoder(backbone: str, pretrained: str | None, output_stride: int | None) -> nn.Module:
    kwargs = {"features_only": True}
    if output_stride:
        kwargs["output_stride"] = output_stride
    try:
        probe = timm.create_model(backbone, pretrained=False, **kwargs)
    except RuntimeError as exc:
        raise WeightsError(f"backbone '{backbone}': {exc}") from exc
    if pretrained is None:
        return probe
    if pretrained == "timm":
        return _from_timm_cache(backbone, kwargs)
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"pretrained={pretrained!r} is not a file; pass a local weights file (.pth/.safetensors) "
            "or pretrained=timm for weights already in the local timm/Hugging Face cache"
        )
    state = _read_weights(path)
    state = {k.removeprefix("module.").removeprefix("backbone.").removeprefix("encoder."): v for k, v in state.items()}
    if not set(state) & set(probe.state_dict()):
        raise WeightsError(f"{path}: none of its keys match backbone '{backbone}' (e.g. {next(iter(state), '-')})")
    probe.load_state_dict(state, strict=False)
    return probe


def _read_weights(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def _from_timm_cache(backbone: str, kwargs: dict) -> nn.Module:
    """timm weights from the local Hugging Face cache only (no network)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(backbone)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    hint = (
        f"no cached pretrained weights for '{backbone}'. Download them where there is network "
        f"(python -c \"import timm; timm.create_model('{backbone}', pretrained=True)\") and copy the "
        "Hugging Face cache, or pass pretrained=/path/to/weights.pth"
    )
    if not repo:
        raise WeightsError(hint)
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(repo.split("@")[0], filename)
        if isinstance(cached, str):
            return timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay={"file": cached}, **kwargs)
    raise WeightsError(hint)


class DeepLabV3Plus(nn.Module):
    def __init__(
        self,
        backbone: str,
        num_classes: int,
        head_channels: int = 256,
        aspp_dilations: list[int] = (6, 12, 18),
        pretrained: str | None = None,
        output_stride: int | None = None,
        dropout_fp: float = 0.5,
        mc_dropout: float = 0.3,
    ):
        super().__init__()
        self.encoder = _create_encoder(backbone, pretrained, output_stride)
        info = self.encoder.feature_info
        reductions = info.reduction()
        channels = info.channels()
        self.low_index = next((i for i, r in enumerate(reductions) if r >= 4), 0)
        low_ch, high_ch = channels[self.low_index], channels[-1]
        low_out = max(8, head_channels * 3 // 16)  # 48 for 256, as in DeepLabV3+
        self.aspp = ASPP(high_ch, head_channels, list(aspp_dilations))
        self.reduce_low = _conv_bn(low_ch, low_out, 1)
        self.fuse = nn.Sequential(_conv_bn(head_channels + low_out, head_channels, 3), _conv_bn(head_channels, head_channels, 3))
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)
        self.dropout_fp = dropout_fp
        self.mc_dropout = mc_dropout

    def head_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("encoder.")]

    def backbone_parameters(self):
        return list(self.encoder.parameters())

    def _features(self, low: Tensor, high: Tensor) -> Tensor:
        x = self.aspp(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, self.reduce_low(low)], dim=1))

    def _classify(self, x: Tensor, size, stochastic: bool) -> Tensor:
        if stochastic:
            x = F.dropout2d(x, self.mc_dropout, training=True)
        # Logits leave the model in fp32 even under bf16 autocast: softmax, selection, losses
        # and argmax would otherwise work on probabilities quantised to 8 mantissa bits.
        with torch.autocast(x.device.type, enabled=False):
            logits = self.classifier(x.float())
            return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def _decode(self, low: Tensor, high: Tensor, size, stochastic: bool) -> Tensor:
        return self._classify(self._features(low, high), size, stochastic)

    @torch.no_grad()
    def mc_logits(self, x: Tensor, passes: int) -> Tensor:
        """(T, B, K, H, W): the logits of `passes` calls with stochastic=True, for the price
        of one encoder and decoder pass (the dropout sits after them; in eval mode nothing
        before it is random, and the masks are drawn in the same order)."""
        feats = self.encoder(x)
        features = self._features(feats[self.low_index], feats[-1])
        return torch.stack([self._classify(features, x.shape[-2:], True).float() for _ in range(passes)])

    def forward(self, x: Tensor, need_fp: bool = False, stochastic: bool = False):
        """Logits (B, K, H, W). need_fp: also the logits of the same features under
        Dropout2d (UniMatch's feature perturbation). stochastic: dropout in the decoder
        whatever the mode (UPS's Monte-Carlo passes)."""
        feats = self.encoder(x)
        low, high = feats[self.low_index], feats[-1]
        size = x.shape[-2:]
        if not need_fp:
            return self._decode(low, high, size, stochastic)
        low2 = torch.cat([low, F.dropout2d(low, self.dropout_fp, self.training)])
        high2 = torch.cat([high, F.dropout2d(high, self.dropout_fp, self.training)])
        clean, perturbed = self._decode(low2, high2, size, stochastic).chunk(2)
        return clean, perturbed


def build_model(config, num_classes: int) -> DeepLabV3Plus:
    return DeepLabV3Plus(
        config.backbone,
        num_classes,
        head_channels=config.head_channels,
        aspp_dilations=config.aspp_dilations,
        pretrained=config.pretrained,
        output_stride=config.output_stride,
        dropout_fp=config.dropout_fp,
    )
