"""The whole question-answering run, as a Python API: video -> frames -> pixels -> embeddings ->
prefill + greedy decode -> answer with its statistics (SPEC section 6).

    qa = VideoQA.from_pretrained("models/shapes-videollava")
    result = qa.ask("clip.mp4", "what color is the circle ?")
    print(result.answer, result.to_dict()["time_ms"]["prefill"])
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vidsparse.engine import StageRecord, generate
from vidsparse.errors import UserError
from vidsparse.models.video_llava import VideoLlava, VisualMap
from vidsparse.options import DEFAULT_MODEL, AskOptions, ask_options
from vidsparse.preprocess import preprocess_frames
from vidsparse.pruning import plan_for
from vidsparse.pruning.base import PruningPlan
from vidsparse.pruning.stage import VisualBlock
from vidsparse.stats import (
    PeakMemory,
    StageTimer,
    equivalent_tokens,
    kv_cache_bytes,
    prefill_flops,
    vision_flops,
)
from vidsparse.video import DecodedVideo, decode_video

STAGES = ("preprocess", "vision", "prefill", "pruning", "generate")


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
    generated_tokens: int
    prefill_flops: int
    prefill_flops_unpruned: int
    vision_flops: int
    peak_memory_bytes: int | None
    kv_cache_bytes: int
    kv_cache_bytes_unpruned: int
    seconds: dict[str, float]
    decode_tokens_per_s: float | None

    def kept_tokens(self) -> list[dict[str, int | bool]]:
        """The visual tokens that reached the last layer: frame, row, col (-1 for CLS), merged or not."""
        visual, block = self.visual_map, self.final_block
        return [
            {"frame": int(visual.frame[o]), "row": int(visual.row[o]), "col": int(visual.col[o]), "merged": bool(m)}
            for o, m in zip(block.origin.tolist(), block.merged.tolist(), strict=True)
        ]

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON layout (documented in the README)."""
        visual_after = self.visual_per_layer[-1]
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
                "method": self.plan.method.name,
                "budget": None if self.plan.method.name == "none" else self.plan.budget,
                "stages": self.plan.stages,
                "positions": self.plan.positions,
                "min_per_frame": self.plan.min_per_frame,
                "visual_per_stage": [self.visual_before] + [r.visual_out for r in self.stage_records],
                **self.method_report,
            },
            "tokens": {
                "prompt": self.prompt_tokens,
                "text": self.prompt_tokens - self.visual_before,
                "visual_before": self.visual_before,
                "visual_after": visual_after,
                "equivalent_visual": round(equivalent_tokens(self.visual_per_layer), 2),
                "generated": self.generated_tokens,
            },
            "flops": {
                "prefill": self.prefill_flops,
                "prefill_unpruned": self.prefill_flops_unpruned,
                "vision": self.vision_flops,
            },
            "memory": {
                "peak_bytes": self.peak_memory_bytes,
                "kv_cache_bytes": self.kv_cache_bytes,
                "kv_cache_bytes_unpruned": self.kv_cache_bytes_unpruned,
            },
            "time_ms": {name: round(s * 1000, 3) for name, s in self.seconds.items()},
            "decode_tokens_per_s": None if self.decode_tokens_per_s is None else round(self.decode_tokens_per_s, 2),
        }


class VideoQA:
    """A loaded model that answers questions about videos."""

    def __init__(self, model: VideoLlava):
        self.model = model

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto") -> VideoQA:
        return cls(VideoLlava.from_pretrained(name_or_path, dtype=dtype, device=device))

    def ask(self, video: str | Path | DecodedVideo | np.ndarray, question: str, *, method: str = "none",
            budget: int | str = 194, prune_after: str | Sequence[int] | None = None, positions: str = "keep",
            min_per_frame: int = 0, seed: int = 0, num_frames: int = 8, backend: str = "auto",
            max_new_tokens: int = 64) -> AskResult:
        """Answer `question` about `video` (a path, frames decoded by `decode_video`, or uint8 frames
        (T, H, W, 3) of your own), pruning the visual tokens to `budget` (a count, or a share like
        "10%") with `method` (see vidsparse.pruning.METHODS)."""
        options = ask_options(method, budget, prune_after, positions, min_per_frame, seed, num_frames, backend,
                              max_new_tokens)
        return self.answer(video, question, options)

    def answer(self, video: str | Path | DecodedVideo | np.ndarray, question: str, options: AskOptions) -> AskResult:
        """`ask` with options already parsed. Everything that can fail without the pixels (the question,
        the prompt length, the plan) is checked before a video file is decoded."""
        if not question.strip():
            raise UserError("the question is empty")
        model = self.model
        timer = StageTimer(model.device)
        memory = PeakMemory(model.device)
        memory.reset()
        start = time.perf_counter()
        if isinstance(video, np.ndarray):
            video = DecodedVideo(video, list(range(len(video))), 0.0, 0.0, "given", len(video))
        num_frames = len(video.frames) if isinstance(video, DecodedVideo) else options.num_frames
        with timer.stage("preprocess"):
            input_ids = model.prompt_ids(question, num_frames)
        num_visual = num_frames * model.tokens_per_frame
        model.check_context(input_ids.shape[1] - num_visual, num_frames, options.max_new_tokens)
        plan = plan_for(options, len(model.decoder.layers), num_frames, num_visual)
        video_path = None
        if not isinstance(video, DecodedVideo):
            video_path = str(video)
            video = decode_video(video, options.num_frames, options.backend)
        with timer.stage("preprocess"):
            pixels = preprocess_frames(video.frames, model.image_size, model.mean, model.std)
        with timer.stage("vision"):
            prompt = model.embed(input_ids, model.video_features(pixels, saliency=plan.method.needs_saliency))
        generation = generate(model.decoder, model.lm_head, prompt, options.max_new_tokens, model.eos_token_ids,
                              timer, plan)
        answer = model.decode_text(generation.token_ids)
        seconds = {"decode_video": video.seconds, **{name: timer.seconds.get(name, 0.0) for name in STAGES}}
        # A clip decoded before ask() was called still counts in the total.
        seconds["total"] = time.perf_counter() - start + (video.seconds if video_path is None else 0.0)
        text_config = model.model.config.text_config
        d, m = text_config.hidden_size, text_config.intermediate_size
        n_visual = len(prompt.visual)
        decode_steps = timer.calls.get("generate", [])
        # Unpruned, every layer would cache the whole prompt plus each decoded token.
        kv_bytes = kv_cache_bytes(generation.cache)
        cached_tokens = sum(layer.keys.shape[-2] for layer in generation.cache.layers)
        kv_per_token_layer = kv_bytes / cached_tokens
        cached_per_layer = input_ids.shape[1] + len(decode_steps)
        return AskResult(
            answer=answer,
            question=question,
            video=video,
            video_path=video_path,
            model=model.name,
            dtype=str(model.dtype).removeprefix("torch."),
            device=str(model.device),
            plan=plan,
            stage_records=generation.stages,
            method_report=plan.method.report(),
            prompt_tokens=int(input_ids.shape[1]),
            visual_before=n_visual,
            visual_per_layer=generation.visual_per_layer,
            visual_map=prompt.visual,
            final_block=generation.block,
            generated_tokens=len(generation.token_ids),
            prefill_flops=prefill_flops(generation.tokens_per_layer, d, m),
            prefill_flops_unpruned=prefill_flops([input_ids.shape[1]] * len(generation.tokens_per_layer), d, m),
            vision_flops=vision_flops(model.model.config, len(video.frames)),
            peak_memory_bytes=memory.peak_bytes(),
            kv_cache_bytes=kv_bytes,
            kv_cache_bytes_unpruned=round(kv_per_token_layer * cached_per_layer * len(generation.cache.layers)),
            seconds=seconds,
            decode_tokens_per_s=len(decode_steps) / sum(decode_steps) if decode_steps else None,
        )

