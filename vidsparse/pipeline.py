"""The whole question-answering run, as a Python API: video -> frames -> pixels -> embeddings ->
prefill + greedy decode -> answer with its statistics (SPEC section 6).

    qa = VideoQA.from_pretrained("shapes-demo")
    result = qa.ask("clip.mp4", "what color is the circle ?")
    print(result.answer, result.to_dict()["time_ms"]["prefill"])
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from vidsparse.answer import AskResult, ClipFeatures, ClipWork
from vidsparse.decoding import ClipQuestions, Decoded, Decoding, TokenHook
from vidsparse.engine import (
    ClipPrompts,
    Head,
    Prefilled,
    finish_question,
    first_logits,
    prefill_head,
    question_rows,
)
from vidsparse.errors import UserError
from vidsparse.models.family import ClipShape, VideoModel
from vidsparse.models.loading import load_model
from vidsparse.models.tower_cut import TowerCut, TowerCutter
from vidsparse.models.visual import PromptEmbeds, VideoFeatures
from vidsparse.options import DECODE_BATCH, DEFAULT_MODEL, AskOptions, ask_options
from vidsparse.pruning import plan_for
from vidsparse.pruning.base import PruningPlan
from vidsparse.questions import check_question_text
from vidsparse.stats import DecoderShape, PeakMemory, StageTimer, prefill_flops
from vidsparse.video import DecodedVideo, decode_clip

STAGES = ("preprocess", "vision", "prefill", "pruning", "generate")


@dataclass(frozen=True)
class PreparedClip:
    """A clip's shared state, ready for questions: what `answer_clip` keeps until its last question,
    and what a server's clip cache keeps across requests (`prepare_clip`, `answer_prepared`)."""

    shape: ClipShape
    options: AskOptions
    head_prompt: PromptEmbeds  # the prompt's head rows, visual map and tower outputs
    head: Head
    plan: PruningPlan
    video: DecodedVideo
    video_path: str | None
    work: ClipWork  # its `questions`: how many questions have shared the work so far
    memory: PeakMemory

    def asked(self, questions: int) -> PreparedClip:
        """The clip with `questions` more questions sharing its work (their amortised share shrinks)."""
        return replace(self, work=replace(self.work, questions=self.work.questions + questions))

    def answering(self, max_new_tokens: int) -> PreparedClip:
        """The clip with answers up to `max_new_tokens` long (nothing shared depends on it)."""
        return replace(self, options=replace(self.options, max_new_tokens=max_new_tokens))


@dataclass(frozen=True)
class _Prefilled:
    """A question between its prefill and decoding (its own keys/values travel apart: decoding takes
    them over)."""

    question: str
    prompt: PromptEmbeds
    timer: StageTimer  # its own stages
    prefilled: Prefilled
    logits: torch.Tensor  # (vocab,) after the prompt


class VideoQA:
    """A loaded model that answers questions about videos."""

    def __init__(self, model: VideoModel):
        self.model = model
        self.decoder_shape = DecoderShape.of(model.decoder)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto") -> VideoQA:
        """Load a checkpoint of any family vidsparse runs (vidsparse.models.families)."""
        return cls(load_model(name_or_path, dtype=dtype, device=device))

    def ask(self, video: str | Path | DecodedVideo | np.ndarray, question: str, *, method: str = "none",
            budget: int | str = 194, prune_after: str | Sequence[int] | None = None, positions: str = "authors",
            min_per_frame: int = 0, seed: int = 0, num_frames: int | None = None, backend: str = "auto",
            max_new_tokens: int = 64, fps: float | None = None, max_frames: int | None = None,
            tower_cut: int | None = None) -> AskResult:
        """Answer `question` about `video` (a path, frames decoded by `decode_video`, or uint8 frames
        (T, H, W, 3) of your own), pruning the visual tokens to `budget` (a count, or a share like
        "10%") with `method` (see vidsparse.pruning.METHODS). A path is sampled `num_frames` frames (8
        by default) or `fps` frames a second of video, at most `max_frames` (32 by default).
        `tower_cut`: the vision tower's layers from this one on run on the tokens a first stage chosen
        from the clip's layout keeps (stprune, uniform), as `--tower-cut`."""
        options = ask_options(method, budget, prune_after, positions, min_per_frame, seed, num_frames, backend,
                              max_new_tokens, fps, max_frames, tower_cut)
        return self.answer(video, question, options)

    def answer(self, video: str | Path | DecodedVideo | np.ndarray, question: str, options: AskOptions,
               features: ClipFeatures | None = None) -> AskResult:
        """`ask` with options already parsed. Everything that can fail without the pixels (the question,
        the prompt length, the plan) is checked before a video file is decoded. `features`: see
        `answer_clip`."""
        result = next(iter(self.answer_clip(video, [question], options, features=features)))
        if isinstance(result, Exception):
            raise result
        return result

    def clip_features(self, video: DecodedVideo, saliency: bool = False, cut: TowerCut | None = None) -> ClipFeatures:
        """Preprocessing and the vision tower for a clip, to hand to several `answer_clip` calls (a
        sweep's methods); `saliency` also keeps what vidcom2/fastvid/dycoke read inside the tower; `cut`
        runs the tower cut (`tower_cut`)."""
        model = self.model
        timer = StageTimer(model.device)
        with timer.stage("preprocess"):
            pixels = model.preprocess(video.frames)
        with timer.stage("vision"):
            if cut is None:
                tokens = model.video_features(pixels, saliency=saliency)
            else:
                tokens = VideoFeatures(self.tower_cutter.features(pixels, cut))
        return ClipFeatures(tokens, timer.seconds, time.perf_counter(), cut)

    @functools.cached_property
    def tower_cutter(self) -> TowerCutter:
        """The model's tower as a cut runs it (built once: OneVision's learns its pooling's reads)."""
        return self.model.tower_cutter()

    def tower_cut_of(self, video: DecodedVideo, options: AskOptions) -> TowerCut | None:
        """The tower cut `options` run on this decoded clip (None: the whole tower)."""
        shape = clip_shape_of(video)
        return self.tower_cut(options, self._plan(options, shape), shape)

    def tower_cut(self, options: AskOptions, plan: PruningPlan, clip: ClipShape) -> TowerCut | None:
        """Where `options` cut the vision tower, and the tokens the plan's first stage keeps of this
        clip (None: no cut, or a method that keeps every token)."""
        if options.tower_cut is None or not plan.method.chooses_by_layout:
            return None
        grid = self.tower_cutter.clip_grid(self.model.spans(clip))
        return TowerCut(options.tower_cut, tuple(plan.method.layout_stage(grid, plan.budget)))

    def answer_clip(self, video: str | Path | DecodedVideo | np.ndarray, questions: Sequence[str],
                    options: AskOptions, decode_batch: int = DECODE_BATCH,
                    features: ClipFeatures | None = None) -> Iterator[AskResult | Exception]:
        """Every question about one clip, paying once for what they share: decoding, preprocessing,
        the vision tower, and the prompt head (text + visual block) through the layers before the
        plan's first question-guided stage (engine.prefill_head). Yields, in order, each question's
        result or the error that stopped it alone; raises for what stops them all (the video, the
        plan). `features` (from `clip_features` on the same clip) skip the vision tower; their time
        still counts as this clip's. Up to `decode_batch` questions of similar length go through the
        shared layers in one batch and are decoded together (one forward per step for all); the
        shared state is released when the last question is answered."""
        clip, prompts = self.prepare_questions(video, questions, options, features)
        if clip is None:
            yield from prompts
        else:
            yield from self._answer(clip, questions, prompts, decode_batch)

    def prepare_questions(self, video: str | Path | DecodedVideo | np.ndarray, questions: Sequence[str],
                          options: AskOptions, features: ClipFeatures | None = None,
                          memory: PeakMemory | None = None,
                          ) -> tuple[PreparedClip | None, list[torch.Tensor | UserError]]:
        """`answer_clip`'s shared work, for questions to be answered later (`_answer`, or with other
        clips' questions: `answer_together`): the clip, counted as asked by the questions that may be
        asked (None if none may), and each question's prompt or the UserError that refuses it alone.
        Raises for what stops them all (the video, the plan). The results' peak memory is `memory`'s
        (reset by the caller: a group of clips answered together), by default this clip's from now."""
        model = self.model
        timer = StageTimer(model.device)  # the clip's shared work
        if memory is None:
            memory = PeakMemory(model.device)
            memory.reset()
        start = time.perf_counter()
        if isinstance(video, np.ndarray):
            video = DecodedVideo(video, list(range(len(video))), 0.0, 0.0, "given", len(video))
        # Until a file is decoded, its frames' size is not known: the prompts are checked for the clip
        # with the fewest visual tokens, and made again if the decoded clip has more.
        clip_shape = clip_shape_of(video) if isinstance(video, DecodedVideo) else self.smallest_clip(options)
        self._check_positions(options)

        def prepared(shape: ClipShape) -> tuple[list[torch.Tensor | UserError], PruningPlan | None]:
            """Each question's prompt or refusal for clips of `shape`, and the plan (None: all refused)."""
            with timer.stage("preprocess"):
                asked = [self.checked_prompt(q, shape, options) for q in questions]
            return asked, None if all(isinstance(p, UserError) for p in asked) else self._plan(options, shape)

        prompts, plan = prepared(clip_shape)
        if plan is None:
            return None, prompts
        video_path = None
        if not isinstance(video, DecodedVideo):
            video_path = str(video)
            video = decode_clip(video, options)
            provisional, clip_shape = clip_shape, clip_shape_of(video)
            if model.visual_tokens(clip_shape) != model.visual_tokens(provisional):
                prompts, plan = prepared(clip_shape)
                if plan is None:
                    return None, prompts
        cut = self.tower_cut(options, plan, clip_shape)
        if (features is None or (plan.method.needs_saliency and features.tokens.cls_attention is None)
                or features.cut != cut):
            features = self.clip_features(video, plan.method.needs_saliency, cut)
        head_ids = next(p for p in prompts if not isinstance(p, UserError))
        clip = self._prepare(video, video_path, clip_shape, options, plan, head_ids, features, timer, memory, start)
        return clip.asked(sum(not isinstance(p, UserError) for p in prompts)), prompts

    def prepare_clip(self, video: DecodedVideo, question: str, options: AskOptions,
                     video_path: str | None = None) -> PreparedClip:
        """The work a decoded clip's questions share (preprocessing, the vision tower, the prompt head's
        prefill), done once for any number of later `answer_prepared` calls: a server's clip cache.
        `question` only shows the prompt's layout (any question gives the same head); it is not
        counted as asked. Raises the UserError that refuses it or the options."""
        timer, memory, start = StageTimer(self.model.device), PeakMemory(self.model.device), time.perf_counter()
        memory.reset()
        self._check_positions(options)
        shape = clip_shape_of(video)
        prompt = self.checked_prompt(question, shape, options)
        if isinstance(prompt, UserError):
            raise prompt
        plan = self._plan(options, shape)
        features = self.clip_features(video, plan.method.needs_saliency, self.tower_cut(options, plan, shape))
        return self._prepare(video, video_path, shape, options, plan, prompt, features, timer, memory, start)

    def answer_prepared(self, clip: PreparedClip, questions: Sequence[str], decode_batch: int = DECODE_BATCH,
                        max_new_tokens: int | None = None, on_token: TokenHook | None = None,
                        ) -> Iterator[AskResult | Exception]:
        """`answer_clip` on a clip whose shared work is done (`prepare_clip`; count the questions with
        `PreparedClip.asked` first): only each question's own rows and decoding are paid. The answers'
        length may differ from the one the clip was prepared with (nothing shared depends on it).
        `on_token(i, token)` is called with each token of question i's answer as it is decoded; False
        ends that answer there."""
        if max_new_tokens is not None:
            clip = clip.answering(max_new_tokens)
        prompts = [self.checked_prompt(q, clip.shape, clip.options) for q in questions]
        return self._answer(clip, questions, prompts, decode_batch, on_token)

    def answer_together(self, asked: Sequence[tuple[PreparedClip, Sequence[str]]],
                        on_token: Callable[[int, int, int], bool] | None = None) -> list[list[AskResult | Exception]]:
        """Questions about several prepared clips (each counted with `PreparedClip.asked`, its answers as
        long as its options say: `PreparedClip.answering`) answered in one decoding batch: each clip's
        questions through its shared layers in one batch, then every question decoded together, one
        forward per step for all (the weights read once a step; a server's requests about different
        clips). Each clip's results or errors, in order. `on_token(c, i, token)` is called with each
        token of clip c's question i as it is decoded; False ends that answer there."""
        results: list[list[AskResult | Exception | None]] = [[None] * len(questions) for _, questions in asked]
        answering = Answering(self)
        answering.join(asked, lambda c, i, result: results[c].__setitem__(i, result), on_token)
        answering.finish()
        return results

    def _prepare(self, video: DecodedVideo, video_path: str | None, clip_shape: ClipShape, options: AskOptions,
                 plan: PruningPlan, head_ids: torch.Tensor, features: ClipFeatures, timer: StageTimer,
                 memory: PeakMemory, start: float) -> PreparedClip:
        """The clip's head through the shared layers, with what its shared work took (no questions yet)."""
        model = self.model
        with timer.stage("vision"):
            whole = model.embed(head_ids, features.tokens, clip_shape)
            length = whole.head_length
            head_prompt = replace(whole, input_ids=head_ids[:, :length], embeds=whole.embeds[:, :length],
                                  rope_positions=whole.rope_positions[..., :length], suffix_words=[])
        with timer.stage("prefill"):
            head = prefill_head(model.decoder, head_prompt, plan, timer)
        seconds = timer.seconds
        for name, spent in features.seconds.items():
            seconds[name] = seconds.get(name, 0.0) + spent
        shared = ClipWork(
            questions=0,
            # A clip decoded (or its features computed) before the call still counts in the total.
            seconds={"decode_video": video.seconds, **seconds,
                     "total": time.perf_counter() - start + (video.seconds if video_path is None else 0.0)
                     + features.seconds_before(start)},
            prefill_flops=prefill_flops(head.tokens_per_layer, self.decoder_shape),
            vision_flops=model.vision_flops(clip_shape) if features.cut is None
            else self.tower_cutter.flops(model.spans(clip_shape), features.cut),
            tower_cut=None if features.cut is None else features.cut.layer,
        )
        return PreparedClip(clip_shape, options, head_prompt, head, plan, video, video_path, shared, memory)

    def _answer(self, clip: PreparedClip, questions: Sequence[str], prompts: list[torch.Tensor | UserError],
                decode_batch: int, on_token: TokenHook | None = None) -> Iterator[AskResult | Exception]:
        """Each question's result or error, in order, on a prepared clip."""
        # Groups of up to `decode_batch` questions of similar length (less padding in the batch);
        # results still come out in the order asked, each as soon as those before it are out.
        done: dict[int, AskResult | Exception] = {i: p for i, p in enumerate(prompts) if isinstance(p, UserError)}
        order = sorted((i for i in range(len(prompts)) if i not in done), key=lambda i: prompts[i].shape[1])
        step, out = max(1, decode_batch), 0
        for first in range(0, len(order), step):
            group = order[first : first + step]
            hook = None if on_token is None else lambda _, row, token, group=group: on_token(group[row], token)
            (answered,) = self._decode_parts([(clip, [(questions[i], prompts[i]) for i in group])], hook)
            done |= dict(zip(group, answered, strict=True))
            while out in done:
                yield done.pop(out)
                out += 1
        while out in done:  # only errors were left
            yield done.pop(out)
            out += 1

    def check_question(self, question: str, options: AskOptions) -> None:
        """Raise the UserError that refuses ``question`` (asked of every clip: refused once, up front)."""
        refused = self.checked_prompt(question, self.smallest_clip(options), options)
        if isinstance(refused, UserError):
            raise refused

    def check_frames(self, options: AskOptions) -> None:
        """Raise the UserError that refuses every clip at these options: too many frames for the context."""
        self.model.check_context(self.smallest_clip(options), options.max_new_tokens)

    def checked_prompt(self, question: str, clip: ClipShape, options: AskOptions) -> torch.Tensor | UserError:
        """The prompt's token ids, or why this question cannot be asked (empty, special tokens, too long)."""
        model = self.model
        try:
            check_question_text(question)
            input_ids = model.prompt_ids(question, clip)
            video_rows = model.visual_tokens(clip) + model.prompt_overhead(clip)
            model.check_context(clip, options.max_new_tokens, input_ids.shape[1] - video_rows)
            return input_ids
        except UserError as e:
            return e

    def check_options(self, options: AskOptions) -> None:
        """Raise the UserError that refuses every clip at these options (the frames, the plan)."""
        self.check_frames(options)
        self.check_plan(options)

    def check_plan(self, options: AskOptions) -> None:
        """Raise the UserError that refuses these options' pruning plan on any clip (the per-frame floor
        is checked for the clip with the fewest visual tokens; every clip is checked again)."""
        self._check_positions(options)
        self._plan(options, self.smallest_clip(options))

    def smallest_clip(self, options: AskOptions) -> ClipShape:
        """The clip with the fewest visual tokens these options can sample: what is checked before a
        clip is decoded."""
        return self.model.smallest_clip(options.fewest_frames)

    def _plan(self, options: AskOptions, clip: ClipShape) -> PruningPlan:
        plan = plan_for(options, len(self.model.decoder.layers), self.model.spans(clip),
                        self.model.visual_tokens(clip), self.model.position_dims)
        if options.tower_cut is not None and plan.method.chooses_by_layout:
            type(self.model).check_tower_cut(self.model.model.config, options.tower_cut)
        return plan

    def _check_positions(self, options: AskOptions) -> None:
        """`compact` renumbers positions 0..n'-1, which only means something for 1-D RoPE."""
        if options.positions == "compact" and self.model.position_dims > 1:
            raise UserError(f"--positions compact renumbers 1-D positions, but {self.model.model_type} gives each "
                            "visual token a 3-D (time, height, width) position: use --positions keep")

    def _decode_parts(self, parts: list[tuple[PreparedClip, list[tuple[str, torch.Tensor]]]],
                      on_token: Callable[[int, int, int], bool] | None) -> list[list[AskResult | Exception]]:
        """Questions (with their prompt ids) about one or several prepared clips answered together, from
        their prefill to the end of their decoding (`Answering.join_parts`). Each clip's results or errors,
        in order; `on_token(c, i, token)` as `answer_together`'s."""
        results: list[list[AskResult | Exception | None]] = [[None] * len(group) for _, group in parts]
        answering = Answering(self)
        answering.join_parts(parts, lambda c, i, result: results[c].__setitem__(i, result), on_token)
        answering.finish()
        return results

    def _checked_result(self, done: _Prefilled, decoded: Decoded, clip: PreparedClip) -> AskResult | Exception:
        """`_result`, or the error that stopped it (this question alone)."""
        try:
            return self._result(done, decoded, clip)
        except Exception as e:  # noqa: BLE001 - one question's failure is its own; the caller records it
            return e

    def _question_prompt(self, clip: PreparedClip, ids: torch.Tensor) -> tuple[PromptEmbeds, StageTimer]:
        """A question's whole prompt on a prepared clip (the head's embeddings and positions, then its own
        text), and the timer of its own stages."""
        model = self.model
        timer = StageTimer(model.device)
        with timer.stage("preprocess"):
            length = clip.head.length
            own = model.decoder.embed_tokens(ids[:, length:])  # after the head, a prompt is text
            words = model.words(ids[0, length:])
            head_rope = clip.head_prompt.rope_positions
            text = clip.head.text_start + torch.arange(own.shape[1], device=head_rope.device)
            prompt = replace(clip.head_prompt, input_ids=ids, embeds=torch.cat([clip.head_prompt.embeds, own], 1),
                             rope_positions=torch.cat([head_rope, text.expand(head_rope.shape[0], 1, -1)], -1),
                             suffix_words=words)
        return prompt, timer

    def _prefill_parts(self, parts: list[tuple[PreparedClip, list[tuple[str, torch.Tensor]]]]
                       ) -> list[tuple[list[_Prefilled | Exception], list[DynamicCache]]]:
        """The prefill of questions about prepared clips after their shared work: their rows through the
        layers shared with their heads, in one batch for all the clips whose heads cover the same layers
        (its time split evenly among its questions), then each one's own stages and layers, then every
        question's first logits in one product. Per clip: each question's prefill or error, and the own
        keys/values of those prefilled, in order."""
        model = self.model
        asked = [[(question, *self._question_prompt(clip, ids)) for question, ids in group] for clip, group in parts]
        rows: list[list | Exception] = [[] for _ in parts]
        alike: dict[int, list[int]] = {}  # clips by the layers their heads cover
        for c, (clip, _) in enumerate(parts):
            alike.setdefault(clip.head.layers, []).append(c)
        for same in alike.values():
            batch = StageTimer(model.device)
            try:
                with batch.stage("prefill"):
                    got = question_rows(model.decoder, [ClipPrompts(parts[c][0].head, [p for _, p, _ in asked[c]],
                                                                    parts[c][0].plan) for c in same])
            except Exception as e:  # noqa: BLE001 - the batch's shared rows failed: each of its questions says so
                got = [e] * len(same)
            share = batch.seconds.get("prefill", 0.0) / sum(len(asked[c]) for c in same)
            for c, mine in zip(same, got, strict=True):
                rows[c] = mine
                for _, _, timer in asked[c]:
                    timer.calls.setdefault("prefill", []).append(share)
        finished: list[list[tuple[Prefilled, DynamicCache, torch.Tensor] | Exception]] = []
        for (clip, _), mine, rows_of in zip(parts, asked, rows, strict=True):
            if isinstance(rows_of, Exception):
                finished.append([rows_of] * len(mine))
                continue
            finished.append([])
            for (_, prompt, timer), row in zip(mine, rows_of, strict=True):
                try:
                    finished[-1].append(finish_question(model.decoder, prompt, clip.plan, timer, clip.head, row))
                except Exception as e:  # noqa: BLE001 - one question's failure is its own; the caller records it
                    finished[-1].append(e)
        done = [f for clip_finished in finished for f in clip_finished if not isinstance(f, Exception)]
        logits, share = iter([]), 0.0
        if done:
            batch = StageTimer(model.device)
            try:
                with batch.stage("prefill"):
                    logits = iter(first_logits(model.decoder, model.lm_head, [last for _, _, last in done]))
                share = batch.seconds["prefill"] / len(done)
            except Exception as e:  # noqa: BLE001 - the batch's logits failed: each of its questions says so
                finished = [[e if not isinstance(f, Exception) else f for f in clip_finished]
                            for clip_finished in finished]
        out = []
        for mine, clip_finished in zip(asked, finished, strict=True):
            ready: list[_Prefilled | Exception] = []
            for (question, prompt, timer), f in zip(mine, clip_finished, strict=True):
                if isinstance(f, Exception):
                    ready.append(f)
                    continue
                timer.calls["prefill"].append(share)
                ready.append(_Prefilled(question, prompt, timer, f[0], next(logits)))
            out.append((ready, [f[1] for f in clip_finished if not isinstance(f, Exception)]))
        return out

    def _result(self, done: _Prefilled, decoded: Decoded, clip: PreparedClip) -> AskResult:
        """The answer and statistics of a decoded question."""
        model = self.model
        shared, prefilled, input_ids = clip.work, done.prefilled, done.prompt.input_ids
        own_seconds = done.timer.seconds | {"generate": decoded.seconds}
        own_seconds["total"] = sum(own_seconds.get(name, 0.0) for name in ("preprocess", "prefill", "generate"))
        # Amortised: this question's own time plus its share of the clip's.
        seconds = {name: own_seconds.get(name, 0.0) + shared.seconds.get(name, 0.0) / shared.questions
                   for name in ("decode_video", *STAGES, "total")}
        layers = len(prefilled.tokens_per_layer)
        # Unpruned, every layer would cache the whole prompt plus each fed-back token.
        unpruned_kv = prefilled.token_kv_bytes * (input_ids.shape[1] + decoded.steps) * layers
        return AskResult(
            answer=model.decode_text(decoded.token_ids),
            question=done.question,
            video=clip.video,
            video_path=clip.video_path,
            model=model.name,
            dtype=str(model.dtype).removeprefix("torch."),
            device=str(model.device),
            plan=clip.plan,
            stage_records=prefilled.stages,
            method_report=clip.plan.method.report(prefilled.facts),
            prompt_tokens=int(input_ids.shape[1]),
            visual_before=len(done.prompt.visual),
            visual_per_layer=prefilled.visual_per_layer,
            visual_map=done.prompt.visual,
            final_block=prefilled.block,
            token_ids=decoded.token_ids,
            visual_while_decoding=decoded.visual_while_decoding,
            prefill_flops=prefill_flops(prefilled.tokens_per_layer, self.decoder_shape),
            prefill_flops_unpruned=prefill_flops([input_ids.shape[1]] * layers, self.decoder_shape),
            vision_flops=shared.vision_flops,
            shared=shared,
            peak_memory_bytes=clip.memory.peak_bytes(),
            kv_cache_bytes=prefilled.kv_bytes(decoded.steps),
            kv_cache_bytes_unpruned=unpruned_kv,
            seconds=seconds,
            decode_tokens_per_s=decoded.steps / decoded.seconds if decoded.steps else None,
            first_logits=done.logits,
        )


Answer = Callable[[int, int, AskResult | Exception], None]  # (clip, question, its result or error)


@dataclass(frozen=True, eq=False)
class _Asked:
    """A question of a join being decoded: where its result goes, and what makes it."""

    clip_index: int
    question_index: int
    clip: PreparedClip
    ready: _Prefilled
    on_answer: Answer
    on_token: Callable[[int, int, int], bool] | None


class Answering:
    """Questions about prepared clips decoded together, which more questions may join between decoding
    steps (`join`, then `step` until nothing is `unfinished`): a server's requests join the decoding
    already running instead of waiting for it to end. Each question's result or error goes to the
    `on_answer` of its join as soon as it is known: a refusal or a failed prefill at once, an answer
    when its decoding ends. What fails a step fails every question in it."""

    def __init__(self, qa: VideoQA):
        model = qa.model
        self.qa = qa
        self.decoding = Decoding(model.decoder, model.lm_head, model.eos_token_ids, model.device, self._decoded,
                                 self._token)

    @property
    def unfinished(self) -> int:
        return self.decoding.unfinished

    def join(self, asked: Sequence[tuple[PreparedClip, Sequence[str]]], on_answer: Answer,
             on_token: Callable[[int, int, int], bool] | None = None) -> None:
        """Questions about prepared clips (as `VideoQA.answer_together`'s), checked, prefilled and added to
        the decoding; `on_answer(c, i, result)` for clip c's question i, `on_token(c, i, token)` with
        each of its tokens as it is decoded (False ends that answer there)."""
        qa = self.qa
        prompts = [[qa.checked_prompt(q, clip.shape, clip.options) for q in questions] for clip, questions in asked]
        kept = [[i for i, p in enumerate(mine) if not isinstance(p, UserError)] for mine in prompts]
        for c, mine in enumerate(prompts):
            for i, prompt in enumerate(mine):
                if isinstance(prompt, UserError):
                    on_answer(c, i, prompt)
        asking = [c for c, at in enumerate(kept) if at]  # the clips with a question that may be asked
        if not asking:
            return
        parts = [(asked[c][0], [(asked[c][1][i], prompts[c][i]) for i in kept[c]]) for c in asking]
        hook = None if on_token is None else lambda p, i, token: on_token(asking[p], kept[asking[p]][i], token)
        self.join_parts(parts, lambda p, i, result: on_answer(asking[p], kept[asking[p]][i], result), hook)

    def join_parts(self, parts: list[tuple[PreparedClip, list[tuple[str, torch.Tensor]]]], on_answer: Answer,
                   on_token: Callable[[int, int, int], bool] | None = None) -> None:
        """`join` for questions with their checked prompt ids, at least one a clip: each clip's through its
        shared layers and own stages (`VideoQA._prefill_parts`), then added to the decoding. What fails in
        a batch (the shared rows of clips batched together) fails each of its questions; what fails for
        one question (its own stages) fails it alone."""
        clips, keys = [], []
        for c, ((clip, _), (ready, caches)) in enumerate(zip(parts, self.qa._prefill_parts(parts), strict=True)):
            started = []
            for i, r in enumerate(ready):
                if isinstance(r, _Prefilled):
                    started.append(r)
                    keys.append(_Asked(c, i, clip, r, on_answer, on_token))
                else:
                    on_answer(c, i, r)
            if started:
                clips.append(ClipQuestions(clip.plan, [r.prefilled for r in started], caches,
                                           torch.stack([r.logits for r in started]), clip.options.max_new_tokens))
        if clips:  # the caches now live in `clips` only, which decoding empties
            self.decoding.join(clips, keys)

    def step(self) -> None:
        """One decoding step for every unfinished question (see `Decoding.step`)."""
        try:
            self.decoding.step()
        except Exception as e:  # noqa: BLE001 - the step failed: each question in it says so
            self.abandon(e)

    def abandon(self, error: Exception) -> None:
        """Stop decoding: every unfinished question gets `error`."""
        for asked in self.decoding.abandon():
            asked.on_answer(asked.clip_index, asked.question_index, error)

    def finish(self) -> None:
        """Decode until every question joined so far is answered."""
        while self.unfinished:
            self.step()

    def _token(self, asked: _Asked, token: int) -> bool:
        return asked.on_token is None or asked.on_token(asked.clip_index, asked.question_index, token)

    def _decoded(self, asked: _Asked, decoded: Decoded) -> None:
        asked.on_answer(asked.clip_index, asked.question_index, self.qa._checked_result(asked.ready, decoded,
                                                                                         asked.clip))


def clip_shape_of(video: DecodedVideo) -> ClipShape:
    """The clip's frames, their size, and how many were sampled a second (None if the file does not say)."""
    frames = video.frames
    fps = len(video.indices) / video.total_frames * video.fps if video.fps > 0 and video.total_frames else None
    return ClipShape(len(frames), int(frames.shape[1]), int(frames.shape[2]), fps)


def load_quietly(name_or_path: str, dtype: str, device: str) -> VideoQA:
    """`VideoQA.from_pretrained` without transformers' warnings and progress bars: what the command line
    and its Ray workers load (their own output is the one line a user reads)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return VideoQA.from_pretrained(name_or_path, dtype=dtype, device=device)
