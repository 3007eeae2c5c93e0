"""What an answer is: `AskResult` (the answer with everything measured while producing it, and its
stable JSON layout) and what a clip's questions share (`ClipWork`, `ClipFeatures`). Apart from
`pipeline.py`, which produces them, because batch, sweep and the kept-token view only read them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vidsparse.engine import StageRecord
from vidsparse.models.tower_cut import TowerCut
from vidsparse.models.visual import VideoFeatures, VisualMap
from vidsparse.pruning.base import PruningPlan
from vidsparse.stage import VisualBlock
from vidsparse.stats import equivalent_tokens
from vidsparse.video import DecodedVideo


@dataclass(frozen=True)
class ClipWork:
    """What a clip's questions share, paid once: decoding, preprocessing, the vision tower and the
    prompt head's prefill (seconds per stage, FLOPs), and how many questions share it."""

    questions: int
    seconds: dict[str, float]
    prefill_flops: int  # the head's rows through the shared layers
    vision_flops: int
    tower_cut: int | None = None  # the tower's layers from this one on ran on the kept tokens only


@dataclass(frozen=True)
class ClipFeatures:
    """A clip's vision-tower output, computed once and handed to several runs, with what it took."""

    tokens: VideoFeatures
    seconds: dict[str, float]  # preprocess, vision
    done_at: float  # time.perf_counter() when it was computed
    cut: TowerCut | None = None  # the tower ran cut (its tokens serve only runs that cut it so)

    def seconds_before(self, start: float) -> float:
        """The part of its time spent before `start` (a run that started after it must add it)."""
        return sum(self.seconds.values()) if self.done_at <= start else 0.0


@dataclass
class AskResult:
    """The answer and everything measured while producing it."""

    answer: str
    question: str
    video: DecodedVideo
    video_path: str | None
    model: str
    dtype: str
    device: str
    plan: PruningPlan
    stage_records: list[StageRecord]
    method_report: dict[str, object]
    prompt_tokens: int
    visual_before: int
    visual_per_layer: list[int]
    visual_map: VisualMap
    final_block: VisualBlock
    token_ids: list[int]  # the answer's tokens, EOS excluded
    visual_while_decoding: float | None  # mean visual keys a fed-back token saw (a plan choosing while decoding)
    prefill_flops: int
    prefill_flops_unpruned: int
    vision_flops: int
    shared: ClipWork
    peak_memory_bytes: int | None
    kv_cache_bytes: int
    kv_cache_bytes_unpruned: int
    seconds: dict[str, float]
    decode_tokens_per_s: float | None
    first_logits: torch.Tensor  # (vocab,) after the prompt: what runs of the same question must agree on

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)

    def kept_tokens(self) -> list[dict[str, int | bool]]:
        """The visual tokens that reached the last layer: frame, row, col (-1 for CLS), merged or not."""
        visual, block = self.visual_map, self.final_block
        return [
            {"frame": int(visual.frame[o]), "row": int(visual.row[o]), "col": int(visual.col[o]), "merged": bool(m)}
            for o, m in zip(block.origin.tolist(), block.merged.tolist(), strict=True)
        ]

    @property
    def amortised_flops(self) -> int:
        """This question's own prefill plus its share of the clip's vision tower and shared prefill."""
        shared = self.shared
        own = self.prefill_flops - shared.prefill_flops
        return round(own + (shared.prefill_flops + shared.vision_flops) / shared.questions)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON layout (documented in docs/cli.md, "--json fields")."""
        visual_after = self.visual_per_layer[-1]
        shared = self.shared
        decoding = self.plan.decoding_layer
        # Only a method that chooses keys while decoding has these (the layout of the others is unchanged).
        decoding_layer = {} if decoding is None else {"decoding_layer": decoding}
        tower_cut = {} if shared.tower_cut is None else {"tower_cut": shared.tower_cut}
        while_decoding = {} if decoding is None else {
            "visual_while_decoding": None if self.visual_while_decoding is None
            else round(self.visual_while_decoding, 2)}
        return {
            "answer": self.answer,
            "question": self.question,
            "video": {
                "path": self.video_path,
                "frame_indices": self.video.indices,
                "total_frames": self.video.total_frames,
                "fps": round(self.video.fps, 3),
                "duration_s": round(self.video.duration, 3),
                "backend": self.video.backend,
            },
            "model": {"name": self.model, "dtype": self.dtype, "device": self.device},
            "pruning": {
                "method": self.plan.name,
                "budget": None if self.plan.name == "none" else self.plan.budget,
                "stages": self.plan.stages,
                "positions": self.plan.positions,
                "min_per_frame": self.plan.min_per_frame,
                "visual_per_stage": [self.visual_before] + [r.visual_out for r in self.stage_records],
                **decoding_layer,
                **tower_cut,
                **self.method_report,
            },
            "tokens": {
                "prompt": self.prompt_tokens,
                "text": self.prompt_tokens - self.visual_before,
                "visual_before": self.visual_before,
                "visual_after": visual_after,
                "equivalent_visual": round(equivalent_tokens(self.visual_per_layer), 2),
                "generated": self.generated_tokens,
                **while_decoding,
            },
            "flops": {
                "prefill": self.prefill_flops,
                "prefill_unpruned": self.prefill_flops_unpruned,
                "vision": self.vision_flops,
                "prefill_own": self.prefill_flops - shared.prefill_flops,
                "amortised": self.amortised_flops,
            },
            "shared": {
                "questions": shared.questions,
                "prefill_flops": shared.prefill_flops,
                "time_ms": {name: round(s * 1000, 3) for name, s in shared.seconds.items()},
            },
            "memory": {
                "peak_bytes": self.peak_memory_bytes,
                "kv_cache_bytes": self.kv_cache_bytes,
                "kv_cache_bytes_unpruned": self.kv_cache_bytes_unpruned,
            },
            "time_ms": {name: round(s * 1000, 3) for name, s in self.seconds.items()},
            "decode_tokens_per_s": None if self.decode_tokens_per_s is None else round(self.decode_tokens_per_s, 2),
        }
