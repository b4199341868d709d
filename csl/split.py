"""CSL's per-image boundary, batched over images.

For each image, the valid pixels' features form X (N x 2, not centred). The two-way
spectral relaxation assigns pixel i to cluster argmax_j |v_ij| with v_j = X u_j / s_j, the
left singular vectors of X. The (u_j, s_j^2) are the eigenpairs of the 2 x 2 Gram matrix
X^T X, which has a closed form, so no image needs an N x 2 SVD and nothing loops over
images or indexes with a data-dependent mask (no host sync on a GPU).

The 2 x 2 algebra and the cluster sums run in float64: for (C, V) the two columns differ in
scale by ~1e3, and float32 sums of squares would decide the second singular vector by
rounding noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PICKS = ("confidence", "linear", "neglog")
# s_2 / s_1 below this counts as rank 1 (e.g. every pixel identical): every pixel then
# goes to the first cluster instead of being split on rounding noise.
RANK_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ClusterStats:
    """Per image (B, 2) mean and unbiased variance of each feature in each cluster."""

    count: Tensor  # (B, 2)
    mean: Tensor  # (B, 2 clusters, 2 features)
    var: Tensor  # (B, 2 clusters, 2 features)


def spectral_split(f1: Tensor, f2: Tensor, valid: Tensor) -> Tensor:
    """Bool (B, N): True where a valid pixel falls in the second spectral cluster.

    f1, f2: (B, N) float64 features; valid: (B, N) bool.
    """
    x1 = torch.where(valid, f1, 0.0)
    x2 = torch.where(valid, f2, 0.0)
    a = (x1 * x1).sum(dim=1)
    b = (x1 * x2).sum(dim=1)
    d = (x2 * x2).sum(dim=1)
    # Eigen decomposition of [[a, b], [b, d]]: u_1 = (cos t, sin t) with the larger
    # eigenvalue lambda_1, u_2 = (-sin t, cos t); lambda_2 from the determinant (stable).
    theta = 0.5 * torch.atan2(2.0 * b, a - d)
    cos, sin = torch.cos(theta), torch.sin(theta)
    lam1 = 0.5 * (a + d) + torch.hypot(0.5 * (a - d), b)
    det = (a * d - b * b).clamp(min=0.0)
    lam2 = torch.where(lam1 > 0, det / lam1.clamp(min=1e-300), 0.0)
    s1, s2 = lam1.sqrt(), lam2.sqrt()
    inv_s1 = torch.where(s1 > 0, 1.0 / s1.clamp(min=1e-300), 0.0)
    inv_s2 = torch.where(s2 > RANK_TOLERANCE * s1, 1.0 / s2.clamp(min=1e-300), 0.0)
    v1 = (x1 * cos[:, None] + x2 * sin[:, None]).abs() * inv_s1[:, None]
    v2 = (x2 * cos[:, None] - x1 * sin[:, None]).abs() * inv_s2[:, None]
    return (v2 > v1) & valid


def cluster_stats(f1: Tensor, f2: Tensor, valid: Tensor, second: Tensor) -> ClusterStats:
    """Mean and unbiased variance of both features in both clusters of every image.

    Empty cluster: mean 0, variance 0. One pixel: that pixel, variance 0."""
    first = valid & ~second
    count = torch.stack([first.sum(dim=1), second.sum(dim=1)], dim=1).to(f1.dtype)  # (B, 2)
    n = count.clamp(min=1)

    def per_cluster(values: Tensor) -> Tensor:  # (B, N) -> (B, 2) sums over each cluster
        return torch.stack(
            [torch.where(first, values, 0.0).sum(dim=1), torch.where(second, values, 0.0).sum(dim=1)],
            dim=1,
        )

    mean = torch.stack([per_cluster(f1) / n, per_cluster(f2) / n], dim=-1)  # (B, 2, 2)
    # Second pass over values centred on their own cluster's mean (sum of squares minus
    # n mean^2 would cancel).
    dev1 = (f1 - torch.where(second, mean[:, 1, 0:1], mean[:, 0, 0:1])).square()
    dev2 = (f2 - torch.where(second, mean[:, 1, 1:2], mean[:, 0, 1:2])).square()
    dof = (count - 1).clamp(min=1)
    var = torch.stack([per_cluster(dev1) / dof, per_cluster(dev2) / dof], dim=-1)
    return ClusterStats(count=count, mean=mean, var=var)


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
    exp(-z1^2/alpha) exp(-z2^2/alpha); 0 outside valid. mean, var: (B, 2 features)."""
    z1 = (f1 - mean[:, 0:1]) / torch.sqrt(var[:, 0:1] + eps)
    z2 = (mean[:, 1:2] - f2) / torch.sqrt(var[:, 1:2] + eps)
    decayed = torch.exp(-(z1.square() + z2.square()) / alpha)
    weight = torch.where((z1 > 0) | (z2 > 0), 1.0, decayed)
    return torch.where(valid, weight, 0.0)
