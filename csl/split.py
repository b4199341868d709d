"""CSL's per-image boundary, batched over images.

For each image, the valid pixels' features form X (N x 2, not centred). The two-way
spectral relaxation assigns pixel i to cluster argmax_j |v_ij| with v_j = X u_j / s_j, the
left singular vectors of X. The (u_j, s_j^2) are the eigenpairs of the 2 x 2 Gram matrix
X^T X, which has a closed form, so no image needs an N x 2 SVD and nothing loops over
images or indexes with a data-dependent mask (no host sync on a GPU).

Per-pixel work stays in the features' dtype (float32) on the (B, N) maps; the per-image
sums are cascade sums and the 2 x 2 algebra runs in float64, where the small eigenvalue
(the two columns of (C, V) differ in scale by ~1e3) would otherwise drown in rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PICKS = ("confidence", "linear", "neglog")
# s_2 / s_1 at or below this counts as rank 1 (e.g. every pixel identical): every pixel
# then goes to the first cluster instead of being split on rounding noise.
RANK_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ClusterStats:
    """Per image: the size of both clusters and each feature's mean and unbiased variance."""

    count: Tensor  # (B, 2 clusters)
    mean: Tensor  # (B, 2 clusters, 2 features)
    var: Tensor  # (B, 2 clusters, 2 features)


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Row-wise dot product of (B, N) maps, returned in float64."""
    return torch.linalg.vecdot(x, y).double()


def spectral_split(x1: Tensor, x2: Tensor) -> Tensor:
    """Bool (B, N): True where a pixel falls in the second spectral cluster.

    x1, x2: (B, N) features already set to 0 outside the valid pixels (a zero row adds
    nothing to X^T X and, projecting to 0, never lands in the second cluster).
    """
    a, b, d = _dot(x1, x1), _dot(x1, x2), _dot(x2, x2)
    # Eigenpairs of [[a, b], [b, d]]: u_1 = (cos t, sin t) with the larger eigenvalue,
    # u_2 = (-sin t, cos t); lambda_2 from the determinant, which does not cancel.
    theta = 0.5 * torch.atan2(2.0 * b, a - d)
    cos, sin = torch.cos(theta), torch.sin(theta)
    lam1 = 0.5 * (a + d) + torch.hypot(0.5 * (a - d), b)
    lam2 = (a * d - b * b).clamp(min=0.0) / lam1.clamp(min=1e-300)
    s1, s2 = lam1.sqrt(), lam2.sqrt()
    inv_s1 = torch.where(s1 > 0, 1.0 / s1.clamp(min=1e-300), 0.0)
    inv_s2 = torch.where(s2 > RANK_TOLERANCE * s1, 1.0 / s2.clamp(min=1e-300), 0.0)
    # |v_i1| = |x1 cos + x2 sin| / s_1 and |v_i2| = |x2 cos - x1 sin| / s_2
    k = torch.stack([cos * inv_s1, sin * inv_s1, cos * inv_s2, -sin * inv_s2], dim=1)
    k = k.to(x1.dtype).unsqueeze(-1)  # (B, 4, 1)
    v1 = torch.addcmul(x1 * k[:, 0], x2, k[:, 1]).abs_()
    v2 = torch.addcmul(x2 * k[:, 2], x1, k[:, 3]).abs_()
    return v2 > v1


def cluster_stats(x1: Tensor, x2: Tensor, valid: Tensor, second: Tensor) -> ClusterStats:
    """Mean and unbiased variance of both features in both clusters of every image.

    x1, x2 zero outside valid. Empty cluster: mean 0, variance 0. One pixel: that pixel,
    variance 0."""
    in_valid = valid.to(x1.dtype)
    in_second = second.to(x1.dtype)
    n = in_valid.sum(dim=1, dtype=torch.float64)
    n2 = in_second.sum(dim=1, dtype=torch.float64)
    count = torch.stack([n - n2, n2], dim=1)
    size = count.clamp(min=1)
    dof = (count - 1).clamp(min=1)

    def split_sums(values: Tensor) -> Tensor:  # (B, N) -> (B, 2): sum over each cluster
        total, in2 = _dot(values, in_valid), _dot(values, in_second)
        return torch.stack([total - in2, in2], dim=1)

    means, variances = [], []
    for x in (x1, x2):
        mean = split_sums(x) / size  # (B, 2)
        # Second pass around each pixel's own cluster mean: sum of squares minus
        # n mean^2 would cancel.
        m0 = mean[:, 0:1].to(x.dtype)
        own_mean = torch.addcmul(m0, in_second, mean[:, 1:2].to(x.dtype) - m0)
        deviation = (x - own_mean).square_()
        means.append(mean)
        variances.append(split_sums(deviation) / dof)
    return ClusterStats(count=count, mean=torch.stack(means, -1), var=torch.stack(variances, -1))


def reliable_cluster(stats: ClusterStats, pick: str = "confidence", lam: float = 0.25, eps: float = 1e-8) -> Tensor:
    """Index (B,) of the cluster taken as reliable; ties go to the first cluster."""
    mu1, mu2 = stats.mean[..., 0], stats.mean[..., 1]
    if pick == "confidence":
        score = mu1
    elif pick == "linear":
        score = mu1 - lam * mu2
    elif pick == "neglog":
        score = mu1 - lam * torch.log(mu2 + eps)
    else:
        raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
    return (score[:, 1] > score[:, 0]).long()


def gaussian_weights(
    f1: Tensor, f2: Tensor, valid: Tensor, mean: Tensor, var: Tensor, alpha: float, eps: float
) -> Tensor:
    """w = 1 where f1 is above or f2 below the reliable cluster's mean, else
    exp(-z1^2/alpha) exp(-z2^2/alpha); 0 outside valid.

    f1, f2: (B, N); mean, var: (B, 2 features) of the reliable cluster."""
    inv_sd = torch.rsqrt(var + eps)
    scale = torch.stack([inv_sd[:, 0], -inv_sd[:, 1]], dim=1).to(f1.dtype).unsqueeze(-1)
    shift = (mean * torch.stack([-inv_sd[:, 0], inv_sd[:, 1]], dim=1)).to(f1.dtype).unsqueeze(-1)
    z1 = torch.addcmul(shift[:, 0], f1, scale[:, 0])  # (f1 - mu1) / sd1
    z2 = torch.addcmul(shift[:, 1], f2, scale[:, 1])  # (mu2 - f2) / sd2
    above = (z1 > 0).logical_or_(z2 > 0)
    weight = z1.square_().addcmul_(z2, z2).mul_(-1.0 / alpha).exp_()
    return weight.masked_fill_(above, 1.0).masked_fill_(~valid, 0.0)
