"""The `vidsparse` command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from vidsparse.errors import UserError
from vidsparse.models.video_llava import DEFAULT_MODEL
from vidsparse.pruning import METHODS, check_options

app = typer.Typer(
    help="VideoLLaVA video question answering with visual-token pruning.\n\n"
    'Example:  vidsparse ask clip.mp4 "What is happening?" --model models/shapes-videollava',
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn mistakes a user can make into one line on stderr and exit code 2, never a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@app.command(epilog='Example:  vidsparse ask clip.mp4 "What is happening?" --method sparsevlm --budget 194 --json')
@user_errors
def ask(
    video: Annotated[Path, typer.Argument(help="Video file (mp4, webm, mkv, ...).")],
    question: Annotated[str, typer.Argument(help="The question about the video.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Hub id or local checkpoint folder.")] = DEFAULT_MODEL,
    frames: Annotated[int, typer.Option(help="Frames sampled uniformly over the clip.")] = 8,
    backend: Annotated[str, typer.Option(help="Video decoder: auto (decord, then PyAV), decord, pyav.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16, bfloat16 (auto: fp32 CPU, bf16 GPU).")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 64,
    method: Annotated[str, typer.Option(help=f"Pruning method: {', '.join(METHODS)}.")] = "none",
    budget: Annotated[int, typer.Option(help="Visual tokens left after the last pruning stage.")] = 194,
    prune_after: Annotated[
        str | None, typer.Option(help="Decoder layers to prune after, e.g. 1 or 2,6,15 (default: the method's).")
    ] = None,
    positions: Annotated[str, typer.Option(help="RoPE positions after pruning: keep (original) or compact.")] = "keep",
    min_per_frame: Annotated[int, typer.Option(help="Keep at least this many tokens of every frame.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the random method.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
) -> None:
    """Answer a question about a video and report latency, memory and FLOPs."""
    _quiet_transformers()
    from vidsparse.pipeline import VideoQA
    from vidsparse.video import decode_video

    if not question.strip():
        raise UserError("the question is empty")
    check_options(method, budget, prune_after=prune_after, positions=positions, min_per_frame=min_per_frame)
    decoded = decode_video(video, frames, backend)  # before loading: a bad file fails in a second
    qa = VideoQA.from_pretrained(model, dtype=dtype, device=device)
    result = qa.ask(decoded, question, method=method, budget=budget, prune_after=prune_after, positions=positions,
                    min_per_frame=min_per_frame, seed=seed, max_new_tokens=max_new_tokens)
    result.video_path = str(video)
    stats = result.to_dict()
    if as_json:
        sys.stdout.write(json.dumps(stats) + "\n")
    else:
        console.print(f"[bold]Answer:[/] {result.answer}", highlight=False)
        console.print(stats_table(stats))


def _si(flops: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if flops >= scale:
            return f"{flops / scale:.3f} {unit}"
    return f"{flops:,}"


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MB"


def stats_table(stats: dict[str, Any]) -> Table:
    """The per-run statistics as a two-column rich table."""
    table = Table(title="Run statistics", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    tokens, flops, memory, times = stats["tokens"], stats["flops"], stats["memory"], stats["time_ms"]
    video, model = stats["video"], stats["model"]
    table.add_row("model", f"{model['name']} ({model['dtype']}, {model['device']})")
    table.add_row("video", f"{video['duration_s']:.2f} s @ {video['fps']:.2f} fps, frames {video['frame_indices']} "
                  f"({video['backend']})")
    pruning = stats["pruning"]
    table.add_row("pruning", f"{pruning['method']}" + (
        f", budget {pruning['budget']}, after layers {pruning['stages']}, positions {pruning['positions']}"
        if pruning["method"] != "none" else ""))
    if "raters" in pruning:
        table.add_row("raters", pruning["raters"])
    table.add_row("visual tokens", " -> ".join(map(str, pruning["visual_per_stage"]))
                  + f" (equivalent {tokens['equivalent_visual']:g})")
    table.add_row("text tokens", str(tokens["text"]))
    table.add_row("prefill FLOPs", f"{_si(flops['prefill'])} (unpruned {_si(flops['prefill_unpruned'])})")
    table.add_row("vision FLOPs", _si(flops["vision"]))
    table.add_row("peak memory", _mb(memory["peak_bytes"]))
    table.add_row("KV cache", f"{_mb(memory['kv_cache_bytes'])} (unpruned {_mb(memory['kv_cache_bytes_unpruned'])})")
    for name, ms in times.items():
        table.add_row(f"time: {name.replace('_', ' ')}", f"{ms:,.1f} ms")
    rate = stats["decode_tokens_per_s"]
    table.add_row("decoding", f"{stats['tokens']['generated']} tokens" + (f", {rate:,.1f} tokens/s" if rate else ""))
    return table


_NOT_YET = "not yet implemented: this command arrives with its own issue"


@app.command(epilog="Example:  vidsparse batch videos/ --questions qa.jsonl --out results.jsonl")
@user_errors
def batch() -> None:
    """(Not yet implemented) Answer questions over a whole folder of videos, resumably."""
    raise UserError(_NOT_YET)


@app.command(epilog='Example:  vidsparse sweep clip.mp4 "What is happening?" --budgets 2056,1024,512,194,64')
@user_errors
def sweep() -> None:
    """(Not yet implemented) Accuracy, latency and memory across pruning budgets."""
    raise UserError(_NOT_YET)


def main() -> None:
    app()
