"""HoliTom (Shao et al., 2025; official code cokeshao/HoliTom): holistic token merging, across time and
space before the LLM, then once more inside it.

- Before layer 0 (`holitom/llava_arch.py`): every token place is compared between adjacent frames
  (cosine of the tokens at the same place). A dynamic programme cuts the clip into windows of frames
  that maximise the tokens saved by averaging over a window every place that stays similar (> tau =
  0.8) throughout it (a window of L frames with c such places saves (L - 1) c). Those *static*
  places become one token each, their mean over the window, and are merged by density peaks
  (DPC-kNN, 7 neighbours): a centre with others nearest it becomes 0.6 * centre + 0.4 * their mean.
  Every other (*dynamic*) place keeps, per frame, its most salient tokens (D = 0: no merging there).
- Inside the LLM (`holitom/modeling_qwen2.py`), before layer k (k = 18 of Qwen2-7B's 28 layers,
  scaled to the decoder's depth), the half of the visual tokens the last prompt token attends to
  least in layer k - 1 is merged, one token at a time in clip order, each into its most
  cosine-similar kept token as the pairwise mean (kept + it) / 2: a kept token that absorbs
  s_1 .. s_m ends as kept / 2^m + sum_i s_i / 2^(m - i + 1).

Adapted to the exact budget and to vidsparse's families (../shared/PEERS.md):
- B is what the inner stage leaves; the stage before layer 0 leaves min(n, 2B), since the inner
  merge halves (HOLITOM_r = 0.5).
- The original rescales its ratio by the share of tokens the windows saved and rounds per window
  (static) and per frame (dynamic); here the stage's count is split by largest remainder over those
  units in proportion to their sizes, so it lands exactly. Where the windows save more than the
  count allows (a large budget on a still clip), windows are given up, the one saving least first,
  until the averaged clip holds at least the count.
- Saliency is the family's (`StageInput.saliency`): the attention each token receives in the
  tower's feature layer (OneVision, Qwen2.5-VL: HoliTom's own mean over heads and queries) or, on
  CLIP (VideoLLaVA), the CLS query's attention. A CLS token is a place like any other.
- A window's static token is placed (and positioned) at its first frame; everything in clip order.
  Positions (`--positions authors`, the default): renumbered after each stage on a 1-D RoPE model, as
  the original does after the stage before layer 0 (its inner stage keeps the gaps, `compact` closes
  them); kept (3-D) on Qwen2.5-VL.
- Density and attention ties are broken by index instead of random noise or `topk`'s order; a token
  as near to two density centres joins the denser-scored one (the original: the lower index).
- Similarities and density-peak distances are products in the model's dtype (`still_runs`,
  `unit_vectors`, `clustering.dpc_knn`; the original: float32), so on a bfloat16 model a similarity
  within ~0.004 of tau, or near-equal density candidates, can go the other way.
"""

from __future__ import annotations

import torch

from vidsparse.errors import UserError
from vidsparse.models.visual import ClipGrid
from vidsparse.pruning.base import (
    BEFORE_FIRST_LAYER,
    MergeGroups,
    Method,
    Selection,
    StageInput,
    for_products,
    largest_remainder,
    merged_in_clip_order,
    rank_in_frame,
    top_k,
    unit_vectors,
)
from vidsparse.pruning.clustering import dpc_knn

SIMILARITY_CUT = 0.8  # tau: a place is static through a window if every adjacent pair is more similar
NEIGHBOURS = 7  # K of the density estimate (at most the number of centres)
CENTRE_WEIGHT = 0.6  # beta: weight of a centre in its merged token
MAX_WINDOW = 1024  # the longest window the programme considers
INNER_LAYER, REFERENCE_DEPTH = 18, 28  # HOLITOM_k on Qwen2-7B's 28 layers
INNER_MERGE_SHARE = 0.5  # HOLITOM_r: the share of the visual tokens the inner stage merges away

Window = tuple[int, int]  # first and last frame


class HoliTom(Method):
    summary = ("HoliTom: places that stay alike through windows of frames averaged and density-merged, each "
               "frame's other places by saliency (before layer 0, 2B); the last prompt token's least attended "
               "half merged into its most similar kept tokens (at 18/28 depth)")
    needs_attention = True
    needs_saliency = True
    allows_prune_after = False

    def default_stages(self, num_layers: int) -> list[int]:
        inner = round(num_layers * INNER_LAYER / REFERENCE_DEPTH) - 1  # prune after layer k - 1
        return [BEFORE_FIRST_LAYER, min(max(0, inner), num_layers - 2)]

    def select(self, stage: StageInput) -> Selection:
        if stage.min_per_frame:
            raise UserError("holitom merges tokens across frames; --min-per-frame does not apply to it")
        if stage.layer == BEFORE_FIRST_LAYER:
            count = min(stage.num_visual, round(stage.budget / (1 - INNER_MERGE_SHARE)))
            return merge_clip(stage.hidden, stage.saliency, stage.grid, count)
        return merge_into_kept(stage.hidden, stage.attention.mean(0), stage.frames, stage.budget)


def merge_clip(hidden: torch.Tensor, saliency: torch.Tensor, grid: ClipGrid, count: int) -> Selection:
    """The stage before layer 0: `count` tokens, static places averaged over windows and merged, dynamic
    ones chosen by saliency. The windows and every count are planned on the host from one read of the
    (frames - 1) x frames static-place counts."""
    frames, places = grid.frames, grid.per_frame
    if count >= frames * places:
        return Selection(torch.arange(frames * places, device=hidden.device), in_clip_order=True)
    runs = still_runs(hidden.view(frames, places, -1))
    static = static_counts(runs)
    windows = fit_windows(best_windows(static, frames), static, frames * places - count)
    constants = [static[start][end - start] if end > start else 0 for start, end in windows]
    sizes = [size for (start, end), constant in zip(windows, constants, strict=True)
             for size in [constant] * bool(constant) + [places - constant] * (end - start + 1)]
    shares = iter(largest_remainder(count, sizes))
    ranked_saliency = saliency.float().view(frames, places)
    keep, groups = [], []
    for (start, end), constant in zip(windows, constants, strict=True):
        order = torch.arange(places, device=hidden.device)
        if constant:  # static places first (ascending), then the dynamic ones
            order = torch.sort((runs[start] < end - start).to(torch.uint8), stable=True).indices
            centres = next(shares)
            if centres:
                groups.append(static_groups(hidden, start, end, places, order[:constant], centres))
        dynamic = order[constant:]
        for frame in range(start, end + 1):
            ranking = torch.sort(-ranked_saliency[frame, dynamic], stable=True).indices
            keep.append(frame * places + dynamic[ranking[: next(shares)]])
    return merged_in_clip_order(torch.cat(keep).sort().values, groups)


def still_runs(states: torch.Tensor) -> torch.Tensor:
    """(frames - 1, places): from each frame t, through how many following frames each place stays
    similar (> tau) to the frame before, given the (frames, places, d) states. The cosine is the
    states' product over their norms, both in the model's dtype: no normalised copy of every token
    (on a CPU a fresh n x d tensor costs more than the products)."""
    states = for_products(states)
    norms = torch.linalg.vector_norm(states, dim=-1).float().clamp_min(1e-12)
    cosine = torch.linalg.vecdot(states[:-1], states[1:]).float() / (norms[:-1] * norms[1:])
    still = cosine > SIMILARITY_CUT
    runs = torch.zeros(still.shape, dtype=torch.long, device=states.device)
    following = torch.zeros(still.shape[1], dtype=torch.long, device=states.device)
    for t in range(still.shape[0] - 1, -1, -1):
        following = still[t] * (following + 1)
        runs[t] = following
    return runs


def static_counts(runs: torch.Tensor) -> list[list[int]]:
    """static[s][k]: places static through the window of frames s .. s + k (k >= 1), read to the host
    once (the plan is made of Python numbers); static[s][0] = all of them."""
    lengths = torch.arange(runs.shape[0] + 1, device=runs.device)
    return (runs[:, :, None] >= lengths).sum(1).tolist()


def best_windows(static: list[list[int]], frames: int) -> list[Window]:
    """The windows that save the most tokens: the official dynamic programme over prefixes (a window
    of one frame saves nothing; on a tie the shorter window)."""
    best = [0] * (frames + 1)  # best[i]: the most saved in frames 0 .. i - 1
    first = list(range(frames))  # first[i]: where the window ending at frame i starts
    for i in range(frames):
        best[i + 1] = best[i]
        for size in range(2, min(i + 1, MAX_WINDOW) + 1):
            start = i - size + 1
            value = best[start] + (size - 1) * static[start][size - 1]
            if value > best[i + 1]:
                best[i + 1], first[i] = value, start
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((first[i], i))
        i = first[i] - 1
    return windows[::-1]


def fit_windows(windows: list[Window], static: list[list[int]], most_saved: int) -> list[Window]:
    """The windows, with the ones saving least (ties: the later) split into single frames until they
    save at most `most_saved` tokens."""
    def saved(window: Window) -> int:
        start, end = window
        return (end - start) * static[start][end - start] if end > start else 0

    windows = list(windows)
    while sum(map(saved, windows)) > most_saved:
        start, end = min((w for w in windows if w[1] > w[0]), key=lambda w: (saved(w), -w[0]))
        at = windows.index((start, end))
        windows[at : at + 1] = [(t, t) for t in range(start, end + 1)]
    return windows


def static_groups(hidden: torch.Tensor, start: int, end: int, places: int, static: torch.Tensor,
                  centres_wanted: int) -> MergeGroups:
    """A window's static places, averaged over its frames and merged by density peaks into
    `centres_wanted` tokens, as merge groups over the clip's tokens, a centre's anchor at the window's
    first frame."""
    length = end - start + 1
    copies = torch.arange(start, end + 1, device=hidden.device)[:, None] * places + static  # (L, c)
    averaged = hidden[copies].float().mean(0)
    centres, assignment = dpc_knn(averaged.to(hidden.dtype), centres_wanted, min(NEIGHBOURS, centres_wanted))
    members = torch.zeros(centres_wanted, device=hidden.device).index_add_(
        0, assignment, torch.ones_like(assignment, dtype=torch.float)) - 1  # each centre is assigned itself
    is_centre = torch.zeros(static.numel(), dtype=torch.bool, device=hidden.device).index_fill_(0, centres, True)
    centre_weight = torch.where(members > 0, CENTRE_WEIGHT, 1.0)[assignment]
    weight = torch.where(is_centre, centre_weight, (1 - CENTRE_WEIGHT) / members[assignment].clamp_min(1))
    return MergeGroups(copies.flatten(), assignment.repeat(length), start * places + static[centres],
                       weight.repeat(length))


def merge_into_kept(hidden: torch.Tensor, scores: torch.Tensor, frames: torch.Tensor, budget: int) -> Selection:
    """The inner stage: the `budget` tokens with the highest `scores` stay, and every other token, in
    clip order, is averaged pairwise into its most cosine-similar one (similarities taken before any
    merge, as the original computes them). Every kept token is a merge group of its absorbed tokens
    (weights 2^-(m - i + 1)) and itself (2^-m); one that absorbed none is itself alone."""
    n = hidden.shape[0]
    kept = top_k(scores, budget, frames)
    is_kept = torch.zeros(n, dtype=torch.uint8, device=hidden.device).index_fill_(0, kept, 1)
    dropped = torch.sort(is_kept, stable=True).indices[: n - budget]  # ascending: clip order
    units = unit_vectors(hidden)
    by_score = torch.sort(-scores[kept].float(), stable=True).indices  # a tie goes to the most attended
    group = by_score[(units[dropped] @ units[kept[by_score]].T).argmax(1)]
    absorbed = torch.zeros(budget, device=hidden.device).index_add_(0, group, torch.ones_like(group, dtype=torch.float))
    later = absorbed[group] - rank_in_frame(group)  # m - i + 1 for the i-th (1-based) of its group
    weight = torch.cat([0.5 ** later, 0.5 ** absorbed])
    itself = torch.arange(budget, device=hidden.device)
    return Selection(kept[:0], torch.cat([dropped, kept]), torch.cat([group, itself]), kept, weight, in_clip_order=True)
