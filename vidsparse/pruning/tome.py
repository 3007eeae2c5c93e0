"""ToMe: text-agnostic merging of the projector outputs before layer 0 (SPEC section 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vidsparse.errors import UserError
from vidsparse.pruning.base import BeforeFirstLayer, Selection, StageInput


class ToMe(BeforeFirstLayer):
    summary = "bipartite soft matching of the visual embeddings, merging by cosine similarity until B remain"

    def select(self, stage: StageInput) -> Selection:
        if stage.min_per_frame:
            raise UserError("tome merges tokens across the clip; --min-per-frame does not apply to it")
        group = bipartite_merge(stage.hidden.float(), stage.budget)
        return groups_to_selection(group)


def bipartite_merge(x: torch.Tensor, target: int) -> torch.Tensor:
    """Group id (0..target-1, ordered by earliest member) of each of the n tokens of `x` (n, d).

    Each round splits the current tokens alternately into sets A and B, matches every A token to
    its most similar B token (cosine) and merges the best-matching pairs, at most |A| a round.
    A merged token's features are the mean of its original members (= the size-weighted average).
    """
    n, device = x.shape[0], x.device
    group = torch.arange(n, device=device)
    count = n
    while count > target:
        sizes = torch.bincount(group, minlength=count).unsqueeze(1).float()
        feats = torch.zeros(count, x.shape[1], device=device).index_add_(0, group, x) / sizes
        a_ids, b_ids = torch.arange(0, count, 2, device=device), torch.arange(1, count, 2, device=device)
        similarity = F.normalize(feats[a_ids], dim=1) @ F.normalize(feats[b_ids], dim=1).T
        best, partner = similarity.max(dim=1)
        merges = min(count - target, a_ids.numel())
        merged_a = torch.sort(-best, stable=True).indices[:merges]
        destination = torch.arange(count, device=device)
        destination[a_ids[merged_a]] = b_ids[partner[merged_a]]
        group = destination[group]
        # Renumber the surviving tokens by their earliest original member, so order follows the clip.
        survivors = group.unique()
        earliest = torch.full((count,), n, device=device).scatter_reduce_(
            0, group, torch.arange(n, device=device), "amin")[survivors]
        rank = torch.empty(count, dtype=torch.long, device=device)
        rank[survivors[torch.argsort(earliest)]] = torch.arange(survivors.numel(), device=device)
        group = rank[group]
        count = survivors.numel()
    return group


def groups_to_selection(group: torch.Tensor, in_clip_order: bool = False) -> Selection:
    """Singleton groups are kept as they are; larger groups become merged tokens (anchor: earliest)."""
    sizes = torch.bincount(group)
    singleton = sizes[group] == 1
    keep = singleton.nonzero().squeeze(1)
    source = (~singleton).nonzero().squeeze(1)
    merged_groups, target = group[source].unique(return_inverse=True)
    anchor = torch.full((merged_groups.numel(),), group.numel(), device=group.device).scatter_reduce_(
        0, target, source, "amin")
    return Selection(keep, source, target, anchor, in_clip_order=in_clip_order)
