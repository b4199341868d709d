"""Straightforward implementations of SELECTORS.md, written independently of the package:
per image, per pixel, in float64, with an explicit SVD. Slow on purpose."""

from __future__ import annotations

import math

import numpy as np
import torch

RANK_TOLERANCE = 1e-6


def residual_variance(P: torch.Tensor, variance: str) -> torch.Tensor:
    """P: (K, N) float64 -> V (N,)."""
    K = P.shape[0]
    C, arg = P.max(dim=0)
    R = P.clone()
    R[arg, torch.arange(P.shape[1])] = 0.0
    m = (1.0 - C) / (K - 1)
    sq = (R - m) ** 2
    if variance == "author":
        return sq.sum(0) / (K - 1)
    # exact: the population variance of the K-1 residual probabilities
    keep = torch.ones_like(P, dtype=torch.bool)
    keep[arg, torch.arange(P.shape[1])] = False
    residual = P.T[keep.T].reshape(P.shape[1], K - 1)
    return residual.var(dim=1, correction=0)


def features(P, features, variance, g_alpha, eps):
    K = P.shape[0]
    C = P.max(dim=0).values
    V = residual_variance(P, variance)
    g = g_alpha * (K - 1) ** 2 / (2 * (1 - C + eps))
    if features == "cv":
        return C, V
    if features == "cgv":
        return C, g * V
    return torch.log(C), -g * V


def csl_weights(probs, valid, features_="cv", variance="author", pick="confidence", lam=0.25,
                alpha=2.0, eps=1e-8, g_alpha=1.0):
    """Loop over images; per image an SVD of the N x 2 feature matrix of its valid pixels."""
    B, K, H, W = probs.shape
    out = torch.zeros(B, H * W, dtype=torch.float64)
    for b in range(B):
        P = probs[b].double().reshape(K, -1)
        f1, f2 = features(P, features_, variance, g_alpha, eps)
        v = valid[b].reshape(-1)
        idx = torch.nonzero(v).flatten()
        if idx.numel() == 0:
            continue
        X = torch.stack([f1[idx], f2[idx]], dim=1)
        cluster = torch.zeros(idx.numel(), dtype=torch.long)
        if idx.numel() >= 2:
            U, S, _ = torch.linalg.svd(X, full_matrices=False)
            if S[1] > RANK_TOLERANCE * S[0]:
                cluster = U.abs().argmax(dim=1)
        mus, vs, scores = [], [], []
        for j in range(2):
            members = X[cluster == j]
            n = members.shape[0]
            mu = members.mean(0) if n else torch.zeros(2, dtype=torch.float64)
            var = members.var(0, correction=1) if n >= 2 else torch.zeros(2, dtype=torch.float64)
            mus.append(mu)
            vs.append(var)
            if pick == "confidence":
                scores.append(mu[0])
            elif pick == "linear":
                scores.append(mu[0] - lam * mu[1])
            else:
                scores.append(mu[0] - lam * math.log(mu[1] + eps))
        r = 1 if scores[1] > scores[0] else 0
        mu, var = mus[r], vs[r]
        for i, p in enumerate(idx.tolist()):
            zc = (f1[p] - mu[0]) / math.sqrt(var[0] + eps)
            zv = (mu[1] - f2[p]) / math.sqrt(var[1] + eps)
            if zc > 0 or zv > 0:
                out[b, p] = 1.0
            else:
                out[b, p] = math.exp(-zc**2 / alpha) * math.exp(-zv**2 / alpha)
    return out.reshape(B, H, W)


def softmatch_sequence(batches, K, momentum=0.999, n_sigma=2.0):
    mu, var = 1.0 / K, 1.0
    weights = []
    for probs, valid in batches:
        C = probs.double().max(1).values[valid].numpy()
        if C.size >= 1:
            mu = momentum * mu + (1 - momentum) * C.mean()
        if C.size >= 2:
            var = momentum * var + (1 - momentum) * C.var(ddof=1)
        Call = probs.double().max(1).values.numpy()
        w = np.exp(-np.minimum(Call - mu, 0) ** 2 / (2 * var / n_sigma**2))
        weights.append(np.where(valid.numpy(), w, 0.0))
    return weights


def freematch_sequence(batches, K, momentum=0.999):
    tau, p = 1.0 / K, np.full(K, 1.0 / K)
    masks = []
    for probs, valid in batches:
        P = probs.double().numpy().transpose(1, 0, 2, 3)[:, valid.numpy()]  # (K, n)
        if P.shape[1]:
            tau = momentum * tau + (1 - momentum) * P.max(0).mean()
            p = momentum * p + (1 - momentum) * P.mean(1)
        C, lab = probs.double().max(1)
        thr = tau * (p / p.max())[lab.numpy()]
        masks.append((C.numpy() >= thr) & valid.numpy())
    return masks


def flexmatch_sequence(batches, K, tau=0.95, window=64):
    history = []
    masks = []
    for probs, valid in batches:
        C, lab = probs.double().max(1)
        C, lab, v = C.numpy(), lab.numpy(), valid.numpy()
        recent = history[-window:]
        sigma = np.zeros(K)
        unused = 0.0
        for s, u in recent:
            sigma += s
            unused += u
        denom = max(sigma.max(), unused)
        beta = sigma / denom if denom > 0 else np.zeros(K)
        thr = tau * (beta / (2 - beta))[lab]
        masks.append((C >= thr) & v)
        confident = (C >= tau) & v
        history.append((np.bincount(lab[confident], minlength=K).astype(float), float((~confident & v).sum())))
    return masks


def u2pl_mask(probs, valid, progress, drop_start=20.0):
    P = probs.double().numpy()
    H = -(P * np.log(np.clip(P, 1e-30, None))).sum(1)
    v = valid.numpy()
    if not v.any():
        return v
    q = 100 - drop_start * (1 - progress)
    thr = np.percentile(H[v], q)
    return (H <= thr) & v


def ups_reference(mc_logits, valid, tau_p=0.7, kappa_p=0.05, tau_n=0.05, kappa_n=0.005, temp=2.0):
    L = mc_logits.double()
    P = L.softmax(2)
    mean, std = P.mean(0), P.std(0, unbiased=True)
    C, lab = mean.max(1)
    s_lab = std.gather(1, lab[:, None])[:, 0]
    pos = (C >= tau_p) & (s_lab < kappa_p) & valid
    Pn = (L / temp).softmax(2)
    mn, sn = Pn.mean(0), Pn.std(0, unbiased=True)
    neg = (mn < tau_n) & (sn < kappa_n)
    K = L.shape[2]
    onehot = torch.nn.functional.one_hot(lab, K).permute(0, 3, 1, 2).bool()
    neg = neg & ~onehot & (valid & ~pos)[:, None]
    return lab, pos, neg
