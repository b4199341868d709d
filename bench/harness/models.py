"""DeepLabV3+ on any timm backbone (features_only), with the two extra outputs the
frameworks need: a feature-perturbed stream (UniMatch) and stochastic passes (UPS).

Pretrained weights come only from pip packages, a local file or timm's local cache
(bench/harness/pretrained.py): the harness never waits on a hub.
"""

from __future__ import annotations

import math
import warnings

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from bench.harness.pretrained import WeightsError, WeightsInfo, input_normalization, load_pretrained, timm_cached_encoder

__all__ = ["ASPP", "ASPPFitWarning", "DeepLabV3Plus", "WeightsError", "aspp_reach", "build_model"]


class ASPPFitWarning(UserWarning):
    """An ASPP whose dilations do not fit the feature map it reads."""


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


def _create_encoder(backbone: str, pretrained: str | None, output_stride: int | None, load: bool) -> tuple[nn.Module, WeightsInfo | None]:
    kwargs = {"features_only": True}
    if output_stride:
        kwargs["output_stride"] = output_stride
    if pretrained == "timm" and load:
        return timm_cached_encoder(backbone, kwargs)
    try:
        encoder = timm.create_model(backbone, pretrained=False, **kwargs)
    except RuntimeError as exc:
        raise WeightsError(f"backbone '{backbone}': {exc}") from exc
    if pretrained is None or not load:
        return encoder, None
    return encoder, load_pretrained(encoder, backbone, pretrained)


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
        load_weights: bool = True,
    ):
        """`load_weights=False`: the architecture and input normalisation of `pretrained`
        without reading its file (a checkpoint's weights follow)."""
        super().__init__()
        self.encoder, self.weights = _create_encoder(backbone, pretrained, output_stride, load_weights)
        self.normalization = input_normalization(backbone, pretrained)
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


    @property
    def output_stride(self) -> int:
        return self.encoder.feature_info.reduction()[-1]

    def describe(self) -> dict:
        """For the run record: where the encoder's weights came from and the input scale."""
        return {
            "weights": self.weights.to_dict() if self.weights is not None else None,
            "input_normalization": {"mean": list(self.normalization.mean), "std": list(self.normalization.std)},
            "output_stride": self.output_stride,
        }


def aspp_reach(crop: int, output_stride: int, dilations) -> tuple[int, list[int]]:
    """The last feature map's side at a `crop` input, and the dilations whose off-centre
    taps never land on it (a 3x3 kernel dilated by d reads rows d apart: with d >= the
    map's side, only its centre tap sees features, and the branch is a 1x1 convolution)."""
    side = math.ceil(crop / output_stride)
    return side, [d for d in dilations if d >= side]


def build_model(config, num_classes: int, load_weights: bool = True) -> DeepLabV3Plus:
    model = DeepLabV3Plus(
        config.backbone,
        num_classes,
        head_channels=config.head_channels,
        aspp_dilations=config.aspp_dilations,
        pretrained=config.pretrained,
        output_stride=config.output_stride,
        dropout_fp=config.dropout_fp,
        load_weights=load_weights,
    )
    side, outside = aspp_reach(config.crop, model.output_stride, config.aspp_dilations)
    if outside:
        which = f"every dilation of {outside} reaches" if outside == list(config.aspp_dilations) else f"dilations {outside} of {list(config.aspp_dilations)} reach"
        warnings.warn(
            f"aspp_dilations: {which} past the last feature map ({side}x{side} at crop {config.crop}, output stride "
            f"{model.output_stride}), so those branches only see their centre tap (1x1 convolutions). Use dilations "
            f"below {side}, or output_stride=16 or 8 for a larger map",
            ASPPFitWarning,
            stacklevel=2,
        )
    return model
