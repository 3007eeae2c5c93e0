"""Density-peak clustering (DPC-kNN), shared by the methods that recycle or merge tokens around
density peaks (SparseVLM's recycling, FastVID's anchors, HoliTom's and FlashVID's merging)."""

from __future__ import annotations

import torch

from vidsparse.pruning.base import for_products
from vidsparse.transfer import to_device

FEW_NEIGHBOURS = 8  # up to this many nearest of a short row, passes of a minimum beat topk (`smallest`)


def dpc_knn(x: torch.Tensor, clusters: int, neighbours: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k nearest neighbours, deterministic.

    Returns (centres, assignment): indices of the `clusters` centre tokens, and each token's cluster
    (0..clusters-1, centres in the order returned). Distances are Euclidean / sqrt(dim); density
    rho = exp(-mean squared distance to the k nearest, itself included; k = `neighbours`, by default
    `clusters` as in SparseVLM); delta = distance to the nearest denser token (the largest distance
    for the densest); centres = top rho * delta.
    """
    (found,) = dpc_knn_groups(x[None], [x.shape[0]], [clusters], [neighbours or clusters])
    return found


def dpc_knn_groups(x: torch.Tensor, counts: list[int], clusters: list[int], neighbours: list[int],
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`dpc_knn` on several groups of tokens at once (a video method's frames): group g is the first
    counts[g] rows of x[g] (x is (groups, m, d), the rest padding), clustered into clusters[g] with
    neighbours[g] neighbours. One batched product and one pass of each step for every group: a
    CPU pays per call for small ones."""
    groups, m, _ = x.shape
    device = x.device
    count = to_device(counts, device)
    valid = torch.arange(m, device=device)[None, :] < count[:, None]  # (groups, m)
    # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b from one Gram matrix (torch.cdist takes a slow path on CPU), in
    # x's dtype (bfloat16 on a bfloat16 model: several times cheaper than float32) on centred tokens,
    # so that the product's rounding is relative to the distances, not to the norms; the norms are its
    # diagonal, rounded alike. The mean is a product with weights 1 / count (a reduction over rows is
    # slower on a CPU); float16 tokens, once centred, go through bfloat16, whose range holds their
    # products. Every pass over the tokens counts here: DPC runs once per frame in the video methods.
    weights = (valid / count[:, None]).to(x.dtype)[:, None, :]
    centred = x - weights @ x
    centred = for_products(centred)  # centred first: bfloat16 would round away a spread finer than the mean
    # baddbmm, not bmm: on a CPU bmm copies the transposed operand of a batch of one first (2.5 ms for
    # SparseVLM's 577 x 4096 pool, more than half the product)
    gram = torch.baddbmm(centred.new_empty(groups, m, m), centred, centred.transpose(1, 2), beta=0).float()
    # 2 a.b as a.b + b.a: a product kernel need not round (i, j) and (j, i) alike (one on an AMD EPYC did
    # not), and the distances must be symmetric, or two mutual nearest neighbours' equal densities (a tie,
    # broken by index) come out unequal; exact where the product was symmetric
    twice = gram + gram.transpose(1, 2)
    del gram
    squared = twice.diagonal(dim1=1, dim2=2) / 2
    norms = squared[:, :, None] + squared[:, None, :]  # (i, j) as (j, i): the distances stay symmetric
    # in place from here: every (groups, m, m) temporary is a pass over memory
    distance = twice.neg_().add_(norms).clamp_min_(0)
    distance = distance.div_(x.shape[2]).sqrt_()
    distance.diagonal(dim1=1, dim2=2).fill_(0)
    padded = min(counts) < m  # known on the host: full groups need no masking
    pair = valid[:, :, None] & valid[:, None, :] if padded else None
    # density from each group's k nearest (padding is never near): the k smallest, sorted, averaged
    # over the first k of each group
    k = [min(n, c) for n, c in zip(neighbours, counts, strict=True)]
    nearest = smallest(distance.masked_fill(~pair, torch.inf) if padded else distance, max(k))
    within = torch.arange(max(k), device=device)[None, :] < to_device(k, device)[:, None]
    density = torch.exp(-nearest.square_().masked_fill_(~within[:, None, :], 0).sum(2) / within.sum(1, keepdim=True))
    density = density.masked_fill(~valid, -1.0)  # padding ranks after every token
    # j is denser than i if its density is higher, or equal with a lower index (no random noise): the
    # stable order of -density ranks every token after the ones denser than it.
    rank = torch.empty(groups, m, dtype=torch.long, device=device)
    rank.scatter_(1, torch.sort(-density, dim=1, stable=True).indices,
                  torch.arange(m, device=device).expand(groups, m).contiguous())
    denser = rank[:, None, :] < rank[:, :, None]
    delta = distance.masked_fill(~denser, torch.inf).amin(2)
    widest = (distance.masked_fill(~pair, 0) if padded else distance).amax((1, 2))
    delta = torch.where(torch.isinf(delta), widest[:, None], delta)
    score = (density * delta).masked_fill(~valid, -torch.inf)
    # every group's centres at once: the first clusters[g] of its order (past them, columns no token joins)
    most = max(clusters)
    centres = torch.sort(-score, dim=1, stable=True).indices[:, :most]
    beyond = torch.arange(most, device=device)[None, :] >= to_device(clusters, device)[:, None]
    assignment = distance.gather(2, centres[:, None, :].expand(groups, m, most)).masked_fill_(
        beyond[:, None, :], torch.inf).argmin(2)
    own = torch.arange(most, device=device).expand(groups, most)  # a centre is its own cluster's ...
    assignment.scatter_(1, centres, torch.where(beyond, assignment.gather(1, centres), own))  # ... the rest stay
    return [(centres[g, : clusters[g]], assignment[g, : counts[g]]) for g in range(groups)]


def smallest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k smallest values along the last dimension, ascending. A few neighbours of short rows are k
    passes of a minimum, each taking out one occurrence: a CPU's topk falls back to a selection over the
    whole row whenever 64 k exceeds the row's length (FastVID's k = 4 of 242 tokens a frame: 1.8 ms for 8
    frames, against 0.8 ms in passes); each pass reads x once, so past a few neighbours, and on rows long
    enough for topk's own partial sort, topk is cheaper."""
    if k > x.shape[-1]:
        raise ValueError(f"{k} smallest of rows of {x.shape[-1]}")
    if k > FEW_NEIGHBOURS or 64 * k <= x.shape[-1]:
        return torch.topk(x, k, dim=-1, largest=False).values
    remaining, values = x, []
    for i in range(k):
        value, index = remaining.min(-1, keepdim=True)
        values.append(value)
        if i < k - 1:  # a copy at the first pass: x stays as it was
            remaining = remaining.scatter(-1, index, torch.inf) if i == 0 else remaining.scatter_(-1, index, torch.inf)
    return torch.cat(values, -1)
