"""Density-peak clustering (DPC-kNN), shared by the methods that recycle or merge tokens around
density peaks (SparseVLM's recycling, FastVID's anchors, HoliTom's and FlashVID's merging)."""

from __future__ import annotations

import torch


def dpc_knn(x: torch.Tensor, clusters: int, neighbours: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k nearest neighbours, deterministic.

    Returns (centres, assignment): indices of the `clusters` centre tokens, and each token's cluster
    (0..clusters-1, centres in the order returned). Distances are Euclidean / sqrt(dim); density
    rho = exp(-mean squared distance to the k nearest, itself included; k = `neighbours`, by default
    `clusters` as in SparseVLM); delta = distance to the nearest denser token (the largest distance
    for the densest); centres = top rho * delta.
    """
    n = x.shape[0]
    # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b from one Gram matrix (torch.cdist takes a slow path on CPU), in
    # x's dtype (bfloat16 on a bfloat16 model: several times cheaper than float32) on centred tokens,
    # so that the product's rounding is relative to the distances, not to the norms; the norms are its
    # diagonal, rounded alike. The mean is a product with ones (a reduction over rows is slower on a
    # CPU); float16 tokens, once centred, go through bfloat16, whose range holds their products. Every
    # pass over the n x d tokens counts here: DPC runs once per frame in the video methods.
    centred = x - torch.full((1, n), 1 / n, dtype=x.dtype, device=x.device) @ x
    if centred.dtype == torch.float16:  # centred first: bfloat16 would round away a spread finer than the mean
        centred = centred.to(torch.bfloat16)
    gram = (centred @ centred.T).float()
    squared = gram.diagonal()
    distance = (squared[:, None] + squared[None, :] - 2 * gram).clamp_min_(0)
    distance = distance.div_(x.shape[1]).sqrt_().fill_diagonal_(0)
    nearest = torch.topk(distance, k=min(neighbours or clusters, n), dim=1, largest=False).values
    density = torch.exp(-nearest.square_().mean(1))
    # j is denser than i if its density is higher, or equal with a lower index (no random noise): the
    # stable order of -density ranks every token after the ones denser than it.
    rank = torch.empty(n, dtype=torch.long, device=x.device)
    rank[torch.sort(-density, stable=True).indices] = torch.arange(n, device=x.device)
    denser = rank[None, :] < rank[:, None]
    delta = distance.masked_fill(~denser, torch.inf).min(1).values
    delta = torch.where(torch.isinf(delta), distance.max(), delta)
    centres = torch.sort(-(density * delta), stable=True).indices[:clusters]
    assignment = distance[:, centres].argmin(1)
    assignment[centres] = torch.arange(centres.numel(), device=x.device)
    return centres, assignment
