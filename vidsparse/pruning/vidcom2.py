"""VidCom² (Liu et al. 2025; official code xuyang-liu16/VidCom2, vLLM's port): before layer 0, keep
the tokens most distinct from their frame and from the whole video, with more tokens for frames that
are unlike the rest of the clip. Text-agnostic; tokens are selected, never averaged.

Adapted to VideoLLaVA (../shared/PEERS.md): it runs on the projector outputs of all T x 257 tokens
and treats each frame's CLS token as an ordinary token of the frame. To land exactly on B, the
per-frame counts are reconciled as vLLM's upstream port does: drop the retained tokens with the
largest score, or add the unretained ones with the smallest, across the whole clip. vLLM never goes
below one token a frame (its target is max(T, B)); here the target is B, so below T tokens some frames
keep none. Positions (`--positions authors`, the default): renumbered on a 1-D RoPE model, as the
original, which shortens the sequence before the LLM; kept (3-D) on Qwen2.5-VL, as vLLM's port.
"""

from __future__ import annotations

import torch

from vidsparse.errors import UserError
from vidsparse.pruning.base import BeforeFirstLayer, Selection, StageInput, rank_in_frame, unit_rows

CHANNEL_SHARE = 0.5  # keep the lowest-variance half of the channels
KERNEL_SCALES = (1 / 8, 1 / 4, 1 / 2, 1, 2)  # alpha of the multi-scale Gaussian similarity
TEMPERATURE = 0.01  # frame-allocation softmax


class VidCom2(BeforeFirstLayer):
    summary = ("VidCom2: frames unlike the video get more of B; in each frame, keep the tokens least similar to "
               "their frame and to the video (before layer 0)")

    def select(self, stage: StageInput) -> Selection:
        if stage.min_per_frame:
            raise UserError("vidcom2 sets its own per-frame counts; --min-per-frame does not apply to it")
        scores, frame_scores = token_scores(stage.hidden, stage.frames, stage.grid.frames)
        counts = frame_counts(frame_scores, stage.budget, stage.grid.per_frame)
        return Selection(keep_lowest(scores, stage.frames, counts, stage.budget))


def token_scores(x: torch.Tensor, frames: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, u): per token s = K(x, video centre) + K(x, frame centre) on the normalised low-variance
    channels, and per frame u = -mean over its tokens of K(x, video centre) (its uniqueness).
    Squared distances as |x|^2 + |g|^2 - 2 x.g (|x| = 1): matrix-vector products, no n x d temporaries."""
    x = unit_rows(x, low_variance_channels(x))
    sizes = torch.zeros(num_frames, device=x.device).index_add_(0, frames, torch.ones_like(x[:, 0]))
    frame_centres = torch.zeros(num_frames, x.shape[1], device=x.device).index_add_(0, frames, x) / sizes[:, None]
    video_centre = x.mean(0)
    to_video = similarity(1 + video_centre @ video_centre - 2 * (x @ video_centre))
    to_frame_centres = x @ frame_centres.T  # (n, frames)
    to_frame = similarity(1 + frame_centres.square().sum(1)[frames]
                          - 2 * to_frame_centres.gather(1, frames[:, None]).squeeze(1))
    uniqueness = -torch.zeros(num_frames, device=x.device).index_add_(0, frames, to_video) / sizes
    return to_video + to_frame, uniqueness


def low_variance_channels(x: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """The lowest-variance CHANNEL_SHARE of the channels (ties: the lower index), ascending. One pass in row
    chunks of float32, sums and squares shifted by the first token (against cancellation): on a CPU a
    column reduction of the whole n x d block, or a float32 copy of it, costs several times more."""
    n, d = x.shape
    shift = x[0].float()
    sums = torch.zeros(d, device=x.device)
    squares = torch.zeros(d, device=x.device)
    for chunk in x.split(rows):
        centred = chunk.float() - shift
        sums += centred.sum(0)
        squares += centred.square_().sum(0)
    variance = squares / n - (sums / n).square()
    return torch.sort(variance, stable=True).indices[: max(1, int(d * CHANNEL_SHARE))].sort().values


def similarity(squared_distance: torch.Tensor) -> torch.Tensor:
    """The multi-scale Gaussian kernel sum_alpha exp(-d^2 / (2 alpha))."""
    squared = squared_distance.clamp_min(0)
    return sum(torch.exp(-squared / (2 * alpha)) for alpha in KERNEL_SCALES)


def frame_counts(uniqueness: torch.Tensor, budget: int, per_frame: int) -> torch.Tensor:
    """Tokens per frame before reconciling: r_t = min(1, r (1 + p_t - mean p)), p = softmax of the
    frames' uniqueness at temperature 0.01, r = B / total; k_t = max(1, round-half-even(r_t N_t)).
    In float64 (T numbers): in float32 a near one-hot p rounds to exactly 1.0, and r_t N_t = 7.4999998
    became 7.50000006, one token more than the formula gives."""
    ratio = budget / (per_frame * uniqueness.numel())
    uniqueness = uniqueness.double()
    p = torch.softmax((uniqueness - uniqueness.max()) / TEMPERATURE, dim=0)
    shares = (ratio * (1 + p - p.mean())).clamp(max=1.0)
    return torch.round(shares * per_frame).clamp_min(1).long()


def keep_lowest(scores: torch.Tensor, frames: torch.Tensor, counts: torch.Tensor, budget: int) -> torch.Tensor:
    """Per frame the `counts[t]` lowest scores (ties: lower index), then reconciled to exactly
    `budget` across the clip (too many: drop the kept ones with the highest scores; too few: add the
    others with the lowest). Ascending indices. Both cases are the first `budget` of one order, the
    per-frame picks lowest score first and then the rest lowest score first, so the whole choice is
    two sorts and no device sync."""
    order = torch.sort(scores, stable=True).indices  # lowest score first
    ranked_frames = frames[order]
    beyond_count = rank_in_frame(ranked_frames) >= counts[ranked_frames]  # False: one of its frame's picks
    return order[torch.sort(beyond_count.to(torch.uint8), stable=True).indices[:budget]].sort().values
