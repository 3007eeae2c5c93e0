"""The `vidsparse` command line: ask, batch, sweep, serve, make-shapes."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperCommand
from typer.exceptions import TyperException  # the base of typer's (vendored click's) usage errors

from vidsparse.errors import UserError
from vidsparse.options import (
    DECODE_BATCH,
    DEFAULT_MODEL,
    GROUP_MB,
    METHOD_NAMES,
    AskOptions,
    ask_options,
    parse_budgets,
    parse_methods,
)
from vidsparse.results import ResultsFile

# Only light modules at the top: help and option mistakes are answered before torch and
# transformers (seconds of imports) are loaded; each command imports what it needs.

app = typer.Typer(
    help="VideoLLaVA video question answering with visual-token pruning.\n\n"
    'Example:  vidsparse ask clip.mp4 "What is happening?" --method sparsevlm --budget 194',
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

# Options shared by ask, batch and sweep.
Model = Annotated[str, typer.Option(
    "--model", "-m", help="Hub id, local checkpoint folder, shapes-demo, shapes-hd or shapes-ov.")]
Frames = Annotated[int | None, typer.Option("--frames", help="Frames sampled uniformly over each clip [default: 8].")]
Fps = Annotated[float | None, typer.Option(
    "--fps", help="Sample this many frames a second of video instead of --frames (as Qwen2.5-VL's processors do).")]
MaxFrames = Annotated[int | None, typer.Option("--max-frames", help="The most frames --fps samples [default: 32].")]
Backend = Annotated[str, typer.Option("--backend", help="Video decoder: auto (decord, then PyAV), decord, pyav.")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto, float32, float16, bfloat16 (auto: fp32 CPU, bf16 GPU).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda.")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate.")]
Method = Annotated[str, typer.Option("--method", help=f"Pruning method: {', '.join(METHOD_NAMES)}.")]
Budget = Annotated[str, typer.Option("--budget", help="Visual tokens after the last stage: a count, or a share: 10%.")]
PruneAfter = Annotated[
    str | None,
    typer.Option("--prune-after", help="Decoder layers to prune after, e.g. 1 or 2,6,15 (default: the method's)."),
]
Positions = Annotated[str, typer.Option(
    "--positions", help="RoPE positions after pruning: keep (original), compact (renumbered), or authors: compact "
                        "for vidcom2, dycoke, holitom and flashvid on 1-D RoPE models (their code's), else keep.")]
MinPerFrame = Annotated[int, typer.Option("--min-per-frame", help="Keep at least this many tokens of every frame.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the random method.")]
TowerCut = Annotated[int | None, typer.Option(
    "--tower-cut", metavar="LAYER",
    help="Run the vision tower's layers from LAYER on (0-based) only on the tokens the method keeps before layer 0 "
         "(stprune, uniform: they choose from the clip's layout alone; on LLaVA-OneVision, on the patches those are "
         "pooled from). LAYER = the tower's depth: the same features for them, projector work saved; a smaller LAYER "
         "saves more and changes their features. VideoLLaVA and LLaVA-OneVision.")]
def _path(text: str | Path) -> Path:
    """A path option's value (or its default, a Path already); an empty one is refused, where Path('')
    would quietly be the working directory (`--out "$OUT"` with OUT unset)."""
    if isinstance(text, Path):
        return text
    if not text.strip():
        raise typer.BadParameter("it is empty")
    return Path(text)


Questions = Annotated[Path | None, typer.Option("--questions", parser=_path, metavar="<path>",
                                                help="qa.jsonl, or an MSVD/MSRVTT-QA json file.")]


AllowOutside = Annotated[bool, typer.Option(
    "--allow-outside-folder", help="Read videos that the questions file names outside the folder (../, absolute "
    "paths); without it they are refused.")]


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn mistakes a user can make into one line on stderr and exit code 2, never a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as e:  # the file system said no (full disk, permissions, a vanished folder)
            where = f": {e.filename}" if e.filename else ""
            err_console.print(f"[bold red]error:[/] {escape(str(e.strerror or e) + where)}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _check_context_early(model: str, options: AskOptions, methods: Sequence[str] = ()) -> None:
    """When the checkpoint's config is on disk already, check that the frames fit its context, and that
    its tower takes a --tower-cut where one of `methods` (default: the options' own) would run it,
    before any clip is decoded or the weights are loaded (the run checks again with the real prompt)."""
    from vidsparse.models.loading import peek_config
    from vidsparse.pruning import METHODS

    found = peek_config(model)
    if found is not None:
        family, config = found
        family.check_frames(config, options.fewest_frames, options.max_new_tokens)
        if options.tower_cut is not None and any(METHODS[m].chooses_by_layout for m in methods or [options.method]):
            family.check_tower_cut(config, options.tower_cut)


def _load(model: str, dtype: str, device: str):
    from vidsparse.pipeline import load_quietly

    return load_quietly(model, dtype, device)


def _options(method: str, budget: str, prune_after: str | None, positions: str, min_per_frame: int, seed: int,
             frames: int | None, backend: str, max_new_tokens: int, fps: float | None,
             max_frames: int | None, tower_cut: int | None) -> AskOptions:
    """The flags of one answer, typed and checked (the method-specific rule too, which needs torch)."""
    options = ask_options(method, budget, prune_after, positions, min_per_frame, seed, frames, backend,
                          max_new_tokens, fps, max_frames, tower_cut)
    _check_method(options)
    return options


def _check_method(options: AskOptions) -> None:
    """The method-specific rules (which methods take --prune-after): they import the methods, and torch."""
    from vidsparse.pruning import check_method

    check_method(options.method, options.prune_after, tower_cut=options.tower_cut)


@app.command(epilog='Example:  vidsparse ask clip.mp4 "What is happening?" --method sparsevlm --budget 194 --json')
@user_errors
def ask(
    video: Annotated[Path, typer.Argument(parser=_path, help="Video file (mp4, webm, mkv, ...).")],
    question: Annotated[str, typer.Argument(help="The question about the video.")],
    model: Model = DEFAULT_MODEL,
    method: Method = "none",
    budget: Budget = "194",
    prune_after: PruneAfter = None,
    positions: Positions = "authors",
    min_per_frame: MinPerFrame = 0,
    seed: Seed = 0,
    frames: Frames = None,
    fps: Fps = None,
    max_frames: MaxFrames = None,
    tower_cut: TowerCut = None,
    backend: Backend = "auto",
    dtype: Dtype = "auto",
    device: Device = "auto",
    max_new_tokens: MaxNewTokens = 64,
    show_kept: Annotated[Path | None, typer.Option("--show-kept", parser=_path, metavar="<path>",
                                                   help="Write a PNG of the tokens kept.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
) -> None:
    """Answer a question about a video and report latency, memory and FLOPs."""
    from vidsparse.outputs import check_output_file
    from vidsparse.questions import check_question_text
    from vidsparse.video import check_video_file

    check_question_text(question)
    check_video_file(video)  # before any heavy import: a mistyped path is answered at once
    if show_kept is not None:
        check_output_file(show_kept, "--show-kept")
    options = _options(method, budget, prune_after, positions, min_per_frame, seed, frames, backend, max_new_tokens,
                       fps, max_frames, tower_cut)
    from vidsparse.video import decode_clip

    _check_context_early(model, options)
    decoded = decode_clip(video, options)  # before loading: a bad file fails fast
    qa = _load(model, dtype, device)
    result = qa.answer(decoded, question, options)
    result.video_path = str(video)
    stats = result.to_dict()
    if show_kept is not None:
        from vidsparse.kept_view import draw_kept

        draw_kept(result, qa.model, show_kept)
    if as_json:
        sys.stdout.write(json.dumps(stats, allow_nan=False) + "\n")
        return
    console.print(f"[bold]Answer:[/] {escape(result.answer)}", highlight=False)
    console.print(stats_table(stats))
    if show_kept is not None:
        console.print(f"kept tokens drawn in {show_kept}", markup=False)


def _si(flops: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3f} {unit}"
    return f"{flops:,.0f}"


def _mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MB"


def stats_table(stats: dict[str, Any]) -> Table:
    """The per-run statistics as a two-column rich table."""
    table = Table(title="Run statistics", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    tokens, flops, memory, times = stats["tokens"], stats["flops"], stats["memory"], stats["time_ms"]
    video, model, pruning = stats["video"], stats["model"], stats["pruning"]
    table.add_row("model", f"{model['name']} ({model['dtype']}, {model['device']})")
    table.add_row("video", f"{video['duration_s']:.2f} s @ {video['fps']:.2f} fps, frames {video['frame_indices']} "
                  f"({video['backend']})")
    table.add_row("pruning", pruning["method"] + (
        f", budget {pruning['budget']}, after layers {pruning['stages']}, positions {pruning['positions']}"
        if pruning["method"] != "none" else "")
        + (f", tower cut at layer {pruning['tower_cut']}" if "tower_cut" in pruning else ""))
    if "raters" in pruning:
        table.add_row("raters", pruning["raters"])
    unpruned = pruning["method"] != "none" and tokens["visual_after"] >= tokens["visual_before"]
    table.add_row("visual tokens", " -> ".join(map(str, pruning["visual_per_stage"]))
                  + f" (equivalent {tokens['equivalent_visual']:g})"
                  + (": the budget is not below the clip's tokens, nothing was pruned" if unpruned else ""))
    table.add_row("text tokens", str(tokens["text"]))
    table.add_row("prefill FLOPs", f"{_si(flops['prefill'])} (unpruned {_si(flops['prefill_unpruned'])})")
    table.add_row("vision FLOPs", _si(flops["vision"]))
    table.add_row("peak memory", _mb(memory["peak_bytes"]))
    table.add_row("KV cache", f"{_mb(memory['kv_cache_bytes'])} (unpruned {_mb(memory['kv_cache_bytes_unpruned'])})")
    for name, ms in times.items():
        table.add_row(f"time: {name.replace('_', ' ')}", f"{ms:,.1f} ms")
    rate = stats["decode_tokens_per_s"]
    table.add_row("decoding", f"{tokens['generated']} tokens" + (f", {rate:,.1f} tokens/s" if rate else ""))
    return table


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=err_console)


class LazyBar:
    """A progress bar shown from its first update on: work refused before it starts (a bad questions
    file, a folder that cannot be written) prints its one line of error and no bar."""

    def __init__(self, description: str, total: int | None = None):
        self.description, self.total = description, total
        self.progress: Progress | None = None

    def update(self, completed: int, total: int | None = None, status: str = "") -> None:
        if self.progress is None:
            self.progress = _progress()
            self.progress.start()
            self.task = self.progress.add_task(self.description, total=total or self.total, status=status)
        self.progress.update(self.task, completed=completed, status=status)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __enter__(self) -> LazyBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class OptionalRayAddress(TyperCommand):
    """Lets `--ray` stand alone (start Ray here) or take an address, which click cannot express:
    an alone `--ray` gets the value `local`. A following word is its address only if it looks like one."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        args = list(args)
        after_ray = None  # the word after an alone --ray: left over, it was meant as an address
        for i, arg in enumerate(args):
            if arg == "--":
                break
            if arg == "--ray" and not (i + 1 < len(args) and _is_ray_address(args[i + 1])):
                after_ray = args[i + 1] if i + 1 < len(args) else None
                args.insert(i + 1, "local")
                break
        try:
            return super().parse_args(ctx, args)
        except TyperException as e:
            message = e.format_message()  # the word left over is no folder: it was meant as an address
            if after_ray is not None and "extra argument" in message and not Path(after_ray).exists():
                ctx.fail(f"--ray {after_ray}: a cluster's address is auto, HOST:PORT or ray://HOST:PORT (--ray alone "
                         "starts Ray on this machine)")
            raise


def _is_ray_address(word: str) -> bool:
    return word in ("auto", "local") or word.startswith("ray://") or (":" in word and "/" not in word)


@app.command(cls=OptionalRayAddress,
             epilog="Example:  vidsparse batch videos/ --questions qa.jsonl --out results.jsonl --method sparsevlm "
             "--budget 10%    On Ray workers: add --ray --workers 2 (this machine) or --ray auto (the cluster "
             "this node belongs to).")
@user_errors
def batch(
    videos_dir: Annotated[Path, typer.Argument(parser=_path, help="Folder of videos (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", parser=_path, metavar="<path>",
                                      help="Results file (JSON lines); re-running resumes it.")],
    questions: Questions = None,
    question: Annotated[str | None, typer.Option("--question", help="Ask this about every video.")] = None,
    model: Model = DEFAULT_MODEL,
    method: Method = "none",
    budget: Budget = "194",
    prune_after: PruneAfter = None,
    positions: Positions = "authors",
    min_per_frame: MinPerFrame = 0,
    seed: Seed = 0,
    frames: Frames = None,
    fps: Fps = None,
    max_frames: MaxFrames = None,
    tower_cut: TowerCut = None,
    backend: Backend = "auto",
    dtype: Dtype = "auto",
    device: Device = "auto",
    max_new_tokens: MaxNewTokens = 64,
    decode_batch: Annotated[int, typer.Option(
        "--decode-batch", min=1,
        help="Questions of a clip prefilled and decoded together (lower it to hold less memory).")] = DECODE_BATCH,
    group_mb: Annotated[int | None, typer.Option(
        "--group-mb", min=0,
        help=f"Memory (MB, default {GROUP_MB}) that clips with fewer questions than --decode-batch may hold, "
             "prepared, to be decoded together (one batch for several clips); 0 answers each clip alone. Not "
             "with --ray (a worker answers whole clips).")] = None,
    ray_address: Annotated[str | None, typer.Option(
        "--ray", metavar="[ADDRESS]",
        help="Answer on Ray workers: alone, start Ray on this machine; 'auto' or ray://HOST:PORT joins a cluster "
             "(needs pip install 'vidsparse\\[ray]').")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", min=1, help="Ray workers (default: one per GPU; without GPUs, 1 sharing the CPU cores).")] = None,
    retry_errors: Annotated[bool, typer.Option(
        "--retry-errors", help="Ask again the questions recorded with an error (say, after fixing a video); the "
        "new record supersedes the error.")] = False,
    allow_outside_folder: AllowOutside = False,
) -> None:
    """Answer questions over a whole folder of videos, appending to a results file as it goes.

    A clip's questions share its decoding, vision tower and prompt head, and are decoded together;
    clips with few questions are decoded several at a time (--group-mb).
    Re-running the same command resumes: recorded ids are skipped. A video that cannot be decoded
    is recorded as an error and the run goes on; the exit code is 1 if any question failed
    (--retry-errors asks those again).
    With --ray, whole clips go to Ray workers (each holding the model); this process alone writes
    the results file, under the same rules.
    """
    from vidsparse.questions import QuestionsFileError, QuestionSource

    options = ask_options(method, budget, prune_after, positions, min_per_frame, seed, frames, backend, max_new_tokens,
                          fps, max_frames, tower_cut)
    source = QuestionSource(videos_dir, questions, question, allow_outside_folder)
    if questions is not None and out.exists() and out.resolve() == questions.resolve():
        raise UserError(f"--out {out} is the questions file: give the results their own file")
    if workers is not None and ray_address is None:
        raise UserError("--workers needs --ray")
    if group_mb is not None and ray_address is not None:
        raise UserError("--group-mb does not apply with --ray: a Ray worker answers whole clips, one at a time")
    with ExitStack() as stack:
        # The lock first: a second run on this file is refused before torch, Ray or the weights are loaded.
        results = stack.enter_context(ResultsFile(out, retry_errors))
        _check_method(options)
        _check_context_early(model, options)
        from vidsparse.batch import batch_settings, clip_jobs, run_batch, source_settings, unanswered
        from vidsparse.metrics import Tally, summarize
        from vidsparse.outputs import replace_file

        if ray_address is None:
            pool, settings = None, batch_settings(model, dtype, device, options)
        else:
            from vidsparse.ray_batch import WorkerPool

            pool = stack.enter_context(WorkerPool.start(ray_address, workers, model, dtype, device))
            settings = pool.settings(options, question)
        results.load(settings | source_settings(videos_dir, question))
        qa = _load(model, dtype, device) if pool is None else None
        if question is not None and qa is not None:  # one question for every video: refused once, not per video
            qa.check_question(question, options)
        tally = Tally()
        with LazyBar("answering", source.count()) as bar:

            def update() -> None:
                bar.update(tally.questions, status=tally.status())

            jobs = clip_jobs(unanswered(source, videos_dir, results, tally, update))
            started = time.perf_counter()
            try:
                if pool is None:
                    run_batch(qa, jobs, videos_dir, results, options, tally, update, decode_batch,
                              (GROUP_MB if group_mb is None else group_mb) * 2**20)
                else:
                    pool.run(jobs, videos_dir, results, options, tally, update, decode_batch)
            except KeyboardInterrupt:
                bar.stop()
                err_console.print(f"interrupted: {_kept(results)}; the same command resumes", markup=False,
                                  highlight=False, soft_wrap=True)
                raise typer.Exit(130) from None
            except QuestionsFileError as e:  # found on the way (a line of the file): what was answered stays
                if not results.appended:
                    raise
                bar.stop()
                raise UserError(f"{e} ({_kept(results)}; once it is fixed, the same command resumes)") from None
            seconds = time.perf_counter() - started - tally.skipping_seconds  # answering, not resuming
        summary = summarize(results.latest_records(source.ids))
    summary["questions_per_s_this_run"] = round(tally.new_answers / seconds, 3) if tally.new_answers else None
    summary_path = out.with_name(out.stem + ".summary.json")
    replace_file(summary_path, json.dumps(summary, indent=1, allow_nan=False) + "\n")
    console.print(summary_table(summary))
    console.print(f"results: {out}  summary: {summary_path}", markup=False)
    if summary["errors"]:
        err_console.print(f"{summary['errors']} question(s) failed; see the 'error' field in {out} (once fixed, "
                          "the same command with --retry-errors asks them again)", markup=False, soft_wrap=True)
        raise typer.Exit(1)


def _kept(results: ResultsFile) -> str:
    """What an interrupted run kept, for the line that says so."""
    return (f"the {results.appended} record(s) of this run are kept in {results.path}" if results.appended
            else "nothing of this run was written")


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title="Batch summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("questions", f"{summary['questions']} ({summary['answered']} answered, {summary['errors']} errors)")
    if summary["accuracy"] is not None:
        table.add_row("accuracy", f"{summary['accuracy']:.1%}")
        for kind, acc in summary["accuracy_by_type"].items():
            if acc is not None:
                table.add_row(f"  {kind}", f"{acc:.1%} of {summary['count_by_type'][kind]}")
    for stage, ms in summary["time_ms_mean"].items():
        table.add_row(f"time: {stage.replace('_', ' ')}",
                      f"mean {ms:,.1f} ms, median {summary['time_ms_median'][stage]:,.1f} ms")
    if summary.get("questions_per_s_this_run"):
        table.add_row("questions/s (this run)", f"{summary['questions_per_s_this_run']:,.2f}")
    table.add_row("peak memory", _mb(summary["peak_memory_bytes"]))
    if summary["equivalent_visual_tokens_mean"] is not None:
        table.add_row("equivalent visual tokens", f"{summary['equivalent_visual_tokens_mean']:,.1f}")
        table.add_row("prefill FLOPs (mean)", _si(summary["prefill_flops_mean"]))
    if summary.get("amortised_flops_mean") is not None:
        table.add_row("amortised FLOPs a question", _si(summary["amortised_flops_mean"]))
    return table


@app.command(epilog='Example:  vidsparse sweep clip.mp4 "What is happening?" --budgets 100%,50%,25%,10%,5% '
             "--methods none,fastv,sparsevlm,stprune")
@user_errors
def sweep(
    target: Annotated[Path, typer.Argument(parser=_path,
                                           help="A video file, or a folder of videos (with --questions).")],
    question: Annotated[str | None, typer.Argument(
        help="The question: about the video, or about every video of a folder given without --questions.")] = None,
    questions: Questions = None,
    answer: Annotated[str | None, typer.Option("--answer", help="Reference answer of the question about one video "
                                               "(a folder's answers come from --questions).")] = None,
    budgets: Annotated[str, typer.Option("--budgets", help="Comma-separated budgets (counts or shares).")] = (
        "100%,50%,25%,10%,5%"),
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated methods.")] = (
        "none,fastv,sparsevlm,stprune"),
    repeats: Annotated[int, typer.Option("--repeats", help="Timed runs per cell (median reported).")] = 3,
    out: Annotated[Path, typer.Option("--out", parser=_path, metavar="<path>",
                                      help="Folder for sweep.csv, sweep.json and the plots.")] = Path("sweep"),
    show_kept: Annotated[bool, typer.Option("--show-kept", help="Also draw the kept tokens (a PNG per method).")] = (
        False),
    model: Model = DEFAULT_MODEL,
    prune_after: PruneAfter = None,
    positions: Positions = "authors",
    min_per_frame: MinPerFrame = 0,
    seed: Seed = 0,
    frames: Frames = None,
    fps: Fps = None,
    max_frames: MaxFrames = None,
    tower_cut: TowerCut = None,
    backend: Backend = "auto",
    dtype: Dtype = "auto",
    device: Device = "auto",
    max_new_tokens: MaxNewTokens = 64,
    allow_outside_folder: AllowOutside = False,
) -> None:
    """Accuracy, latency and memory across pruning methods and budgets, with plots."""
    from vidsparse.outputs import new_output_dir
    from vidsparse.questions import Question, check_question_text, load_questions

    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    budget_list = parse_budgets(budgets)
    method_list = parse_methods(methods)
    # Shared by every cell; options_for gives each cell its method and budget (--prune-after where it applies).
    options = ask_options("none", "100%", prune_after, positions, min_per_frame, seed, frames, backend, max_new_tokens,
                          fps, max_frames, tower_cut)
    if not target.exists():
        raise UserError(f"{target}: no such video or folder")
    if target.is_dir():
        if answer is not None:
            raise UserError("--answer is the reference of the question about one video; a folder's reference "
                            "answers come from --questions")
        todo = load_questions(target, questions, question, allow_outside_folder)
    else:
        if questions is not None:
            raise UserError("--questions is for a folder of videos; about one video, give the QUESTION after it")
        if question is None:
            raise UserError("give the QUESTION after the video (or a folder with --questions)")
        check_question_text(question)
        from vidsparse.video import check_video_file

        check_video_file(target)
        todo = [Question("0", target, question, answer)]
    with new_output_dir(out, "--out"):  # a run refused before its first row leaves no empty folder
        _check_context_early(model, options, method_list)
        from vidsparse.sweep import (
            check_out_folder,
            remove_stale_pictures,
            run_sweep,
            sweep_cells,
            sweep_rows,
            write_plots,
            write_tables,
        )

        check_out_folder(out)
        cells = sweep_cells(method_list, budget_list, options)
        from vidsparse.video import decode_clip

        # One video is decoded before the model loads (as `ask` does): a bad file fails at once, in one line.
        decoded = {} if target.is_dir() else {target: decode_clip(target, options)}
        qa = _load(model, dtype, device)
        if questions is None:  # the user's one question (of one video, or every video): refused, not skipped
            qa.check_question(question, options)
        with _progress() as progress:
            task = progress.add_task("sweeping", total=len(todo) * len(cells) * repeats, status="")
            try:
                skipped = run_sweep(qa, todo, cells, options, repeats, lambda: progress.update(task, advance=1),
                                    lambda: write_tables(sweep_rows(cells), out), decoded)
            except KeyboardInterrupt:
                progress.stop()
                rows = len(sweep_rows(cells))
                kept = (f"the {rows} row(s) measured so far are in {out / 'sweep.csv'}, sweep.json and sweep.md"
                        if rows else "nothing was written")
                err_console.print(f"interrupted: {kept} (a sweep does not resume: run it again for the rest)",
                                  markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(130) from None
        rows = sweep_rows(cells)
        if not rows:
            raise UserError("nothing could be answered: " + "; ".join(skipped))
        paths = write_tables(rows, out) | write_plots(rows, out)
        console.print(sweep_table(rows))
        if show_kept:
            from vidsparse.kept_view import draw_kept

            for cell in cells:
                if cell.method != "none" and cell.budget_value == budget_list[-1] and cell.first_result is not None:
                    path = draw_kept(cell.first_result, qa.model,
                                     out / f"kept-{cell.method}.png", f"{cell.first_result.question} ({cell.method}, "
                                     f"budget {cell.budget})")
                    paths[f"kept {cell.method}"] = path
        remove_stale_pictures(out, list(paths.values()))
        console.print("wrote " + ", ".join(str(p) for p in paths.values()), markup=False)
        if skipped:
            for why in skipped:
                err_console.print(f"skipped: {why}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1)


def sweep_table(rows: list[dict[str, Any]]) -> Table:
    graded = any(r["accuracy"] is not None for r in rows)
    single = all(r["answer"] is not None for r in rows)
    table = Table(title="Sweep (timings: medians of interleaved runs; x = speedup vs none)", title_justify="left")
    headers = ["method", "budget", "tokens", "answer" if single else "", "acc" if graded else "=none",
               "equiv", "prefill FLOPs", "FLOPs %", "prefill ms", "total ms", "peak MB", "x prefill", "x total"]
    for h in (h for h in headers if h):
        table.add_column(h, justify="left" if h in ("method", "budget", "answer") else "right",
                         no_wrap=h != "answer", max_width=24 if h == "answer" else None)
    for r in rows:
        quality = r["accuracy"] if graded else r["agreement_with_none"]
        cells = [r["method"], r["budget"], f"{r['visual_tokens']:g}"]
        if single:
            cells.append(str(r["answer"]))
        cells += ["-" if quality is None else f"{quality:.1%}", f"{r['equivalent_tokens']:g}",
                  _si(r["prefill_tflops"] * 1e12), f"{r['prefill_flops_share']:.1%}", f"{r['prefill_ms']:,.1f}",
                  f"{r['total_ms']:,.1f}",
                  "-" if r["peak_mb"] is None else f"{r['peak_mb']:,.0f}",
                  "-" if r["prefill_speedup"] is None else f"{r['prefill_speedup']:.2f}",
                  "-" if r["total_speedup"] is None else f"{r['total_speedup']:.2f}"]
        table.add_row(*cells)
    return table


@app.command(epilog="Example:  vidsparse methods")
def methods() -> None:
    """List the pruning methods, what each does, and where it prunes in a 32-layer decoder."""
    from vidsparse.pruning import METHODS

    table = Table(title="Pruning methods (--method)", title_justify="left")
    table.add_column("method", style="bold")
    table.add_column("prunes after layers (32-layer default)")
    table.add_column("what it does")
    for name, cls in METHODS.items():
        stages = cls().default_stages(32)
        where = ", ".join("before layer 0" if layer == -1 else str(layer) for layer in stages) or "-"
        table.add_row(name, where, cls.summary)
    console.print(table)


@app.command(cls=OptionalRayAddress,
             epilog="Example:  vidsparse serve --model shapes-demo --method stprune --budget 25% "
             "--media-root clips/\n\n"
             "then: curl localhost:8000/v1/chat/completions -d '{\"model\": \"shapes-demo\", \"messages\": [{\"role\": "
             "\"user\", \"content\": [{\"type\": \"video_url\", \"video_url\": {\"url\": \"file:///abs/clips/"
             "clip.mp4\"}}, {\"type\": \"text\", \"text\": \"what moves ?\"}]}]}'")
@user_errors
def serve(
    model: Model = DEFAULT_MODEL,
    method: Method = "none",
    budget: Budget = "194",
    prune_after: PruneAfter = None,
    positions: Positions = "authors",
    min_per_frame: MinPerFrame = 0,
    seed: Seed = 0,
    frames: Frames = None,
    fps: Fps = None,
    max_frames: MaxFrames = None,
    tower_cut: TowerCut = None,
    backend: Backend = "auto",
    dtype: Dtype = "auto",
    device: Device = "auto",
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", min=1, help="Answer length when a request names none, and the most it may ask.")] = 64,
    host: Annotated[str, typer.Option("--host", help="Address to bind (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    served_model_name: Annotated[str | None, typer.Option(
        "--served-model-name", help="The model name clients send [default: --model as given].")] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="VIDSPARSE_API_KEY", help="Require Authorization: Bearer <key> (or set VIDSPARSE_API_KEY).",
        show_envvar=False)] = None,
    media_root: Annotated[Path | None, typer.Option(
        "--media-root", parser=_path, metavar="<dir>", help="Serve file:// videos from under this folder only.")
    ] = None,
    allow_http: Annotated[bool, typer.Option("--allow-http", help="Fetch http(s) video URLs (size- and time-limited).")
                          ] = False,
    cache_mb: Annotated[int, typer.Option("--cache-mb", min=0, help="Clip cache size (least recently used out).")
                        ] = 512,
    queue_size: Annotated[int, typer.Option("--queue-size", min=1, help="Requests that may wait; beyond, 429.")] = 16,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Seconds a request may wait for its answer.")
                       ] = 300.0,
    max_body_mb: Annotated[int, typer.Option("--max-body-mb", min=1, help="Largest request body and clip.")] = 64,
    max_video_seconds: Annotated[float, typer.Option("--max-video-seconds", min=1, help="Longest video accepted.")
                                 ] = 3600.0,
    frame_limit: Annotated[int, typer.Option("--frame-limit", min=1, help="Most frames a request may sample or send.")
                           ] = 64,
    ray_address: Annotated[str | None, typer.Option(
        "--ray", metavar="[ADDRESS]",
        help="Serve on Ray Serve: alone, start Ray on this machine; 'auto' or ray://HOST:PORT joins a cluster "
             "(needs pip install 'vidsparse\\[serve,ray]').")] = None,
    replicas: Annotated[int | None, typer.Option(
        "--replicas", min=1, help="With --ray: model replicas (default: one per GPU; without GPUs, 1).")] = None,
) -> None:
    """Serve the model behind an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health, /metrics).

    A request's clip is one video_url part (data:video/...;base64, file:// under --media-root, or http(s) with
    --allow-http) or image_url frames; its pruning is the flags' unless its "vidsparse" object says otherwise
    (e.g. {"method": "stprune", "budget": "10%"}; the OpenAI client's extra_body). Questions about a clip
    already seen reuse its decoding, vision tower and prompt head from the clip cache. With --ray, the same app
    runs on Ray Serve, each replica with its own clip cache; requests about a clip go to the replica that has it.
    """
    from vidsparse.serve.command import ServeFlags, run_server

    options = _options(method, budget, prune_after, positions, min_per_frame, seed, frames, backend, max_new_tokens,
                       fps, max_frames, tower_cut)
    _check_context_early(model, options, METHOD_NAMES)  # a request may name any method
    if replicas is not None and ray_address is None:
        raise UserError("--replicas needs --ray")
    run_server(ServeFlags(model, dtype, device, options, host, port, served_model_name or model, api_key, media_root,
                          allow_http, cache_mb, queue_size, timeout, max_body_mb, max_video_seconds, frame_limit,
                          ray_address, replicas))


@app.command("make-shapes", epilog="Examples:  vidsparse make-shapes shapes-eval --n 500 --seed 1000\n\n"
             "           vidsparse make-shapes shapes-hd-eval --kind hd --n 500 --seed 1000")
@user_errors
def make_shapes(
    out_dir: Annotated[Path, typer.Argument(parser=_path, help="Folder to write the clips and qa.jsonl to.")],
    n: Annotated[int, typer.Option("--n", help="Number of clips (one question each).")] = 500,
    seed: Annotated[int, typer.Option("--seed", help="Seed; the same seed gives the same data.")] = 0,
    kind: Annotated[str, typer.Option("--kind", help="demo: ShapesQA, 32x32 frames, 8 x 17 tokens, 5 question "
                                      "types; hd: ShapesQA-HD, 64x64, 8 x 65 tokens, still background, 7 types.")]
    = "demo",
) -> None:
    """Generate ShapesQA: short clips of coloured shapes with questions (the batch format)."""
    from vidsparse.datasets import make_shapes as generate_demo
    from vidsparse.datasets import make_shapes_hd
    from vidsparse.outputs import check_output_dir

    generators = {"demo": generate_demo, "hd": make_shapes_hd}
    if kind not in generators:
        raise UserError(f"--kind must be demo or hd, got {kind!r}")
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if seed < 0:
        raise UserError(f"--seed must be 0 or more, got {seed}")
    check_output_dir(out_dir, "OUT_DIR")
    with LazyBar("writing clips") as bar:
        qa = generators[kind](out_dir, n, seed, bar.update)
    console.print(f"{out_dir}: {n} clips and {qa.name}", markup=False)


def main() -> None:
    """The console script: click's own handling, except that a usage mistake (an unknown option, a
    value of the wrong type) is one line, like every other error a user can make."""
    try:
        code = app(standalone_mode=False)
    except TyperException as e:
        if type(e).__name__ != "NoArgsIsHelpError":  # `vidsparse` alone: the help is printed already
            ctx = getattr(e, "ctx", None)
            hint = f" (see {escape(ctx.command_path)} --help)" if ctx is not None else ""
            err_console.print(f"[bold red]error:[/] {escape(e.format_message().rstrip('.'))}{hint}", highlight=False,
                              soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2))
    except OSError as e:  # what no command caught: stdout itself cannot be written (a full disk, /dev/full)
        err_console.print(f"[bold red]error:[/] {escape(str(e.strerror or e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as e:
        if interrupted(e):  # Ctrl-C inside an import that re-raised it as another error (transformers' lazy modules)
            sys.exit(130)
        raise
    sys.exit(code if isinstance(code, int) else 0)


def interrupted(error: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt is anywhere in the chain of causes that led to `error`."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False
