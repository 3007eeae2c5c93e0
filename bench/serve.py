"""What `vidsparse serve` costs and gains, side by side in one run.

Every request is one question about one clip, sent by the official openai client over HTTP to
`vidsparse serve` running in its own process on localhost (file:// URLs under the media root, as
lmms-eval sends them), warmed up on a clip of its own. Rows:
- `ask`: `VideoQA.answer` per question in this process, one after another: decoding, vision tower and
  the whole prefill every time (what a server without reuse pays);
- `batch`: each clip's shared work once, then its questions answered together, those of one answer
  length in one call (`prepare_clip` and `answer_prepared`: the work `vidsparse batch` runs);
- `rounds`: the server's model work without HTTP: the requests in order, in rounds of the concurrency,
  each round's clips prepared when first seen (then kept) and its questions answered in one
  `VideoQA.answer_together` (what the server's inference thread runs when every client's request waits
  together and their answers are as long): the bound the server's row could reach then;
- `serve cache`: the server with its clip cache, at each concurrency;
- `serve no cache` (`--cache-mb 0`): only requests waiting together share their clip's work.
Each server row starts a fresh server (an empty cache). Columns: questions/s, the ratio to `batch` and
to `ask`, p50/p95 latency of a request, and whether every answer equals `ask`'s.

    python bench/serve.py                     # shapes-demo: 1 clip x 25 questions, concurrency 1, 4, 16
    python bench/serve.py --model 7b          # Video-LLaVA-7B's geometry (random weights, 3 layers on a CPU)
    python bench/serve.py --clips 4 --json out.json
    python bench/serve.py --model 7b --clips 4 --questions 4 --spread   # requests in flight about different clips
    python bench/serve.py --model 7b --questions 16 --concurrency 4 --new-tokens 2,16   # short answers beside long
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai  # noqa: E402
import torch  # noqa: E402
from batch import WORDS, workload  # noqa: E402
from common import build_7b, hardware  # noqa: E402

from lab.fast_dtype import fastest_dtype  # noqa: E402
from vidsparse.answer import AskResult  # noqa: E402
from vidsparse.options import ask_options  # noqa: E402
from vidsparse.pipeline import PreparedClip, VideoQA  # noqa: E402
from vidsparse.serve.scheduler import DECODING_QUESTIONS  # noqa: E402
from vidsparse.video import decode_clip  # noqa: E402


@contextmanager
def server_process(model: str, dtype: str, root: Path, options, cache_mb: int, queue: int) -> Iterator[str]:
    """`vidsparse serve` as users start it, in its own process (its own GIL), on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "vidsparse", "serve", "--model", model, "--port", str(port), "--media-root",
               str(root), "--method", options.method, "--budget", str(options.budget), "--frames",
               str(options.num_frames), "--max-new-tokens", str(options.max_new_tokens), "--cache-mb", str(cache_mb),
               "--queue-size", str(queue), "--served-model-name", "bench", "--dtype", dtype]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(60)


def serve_row(model: str, dtype: str, root: Path, work: list[tuple[Path, str, int]], concurrency: int,
              cache_mb: int, options) -> tuple[float, list[float], list[str]]:
    """(seconds for all of `work`, each request's latency, the answers in order) through a fresh server."""
    with server_process(model, dtype, root, options, cache_mb, max(16, concurrency)) as url:
        clients = [openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) for _ in range(concurrency)]
        clients[0].chat.completions.create(model="bench", messages=[  # warm-up: a clip of its own, no cache hit
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": (root / "warm.mp4").as_uri()}},
                                         {"type": "text", "text": work[0][1]}]}])

        def one(i: int) -> tuple[float, str]:
            path, question, new_tokens = work[i]
            start = time.perf_counter()
            reply = clients[i % concurrency].chat.completions.create(model="bench", max_tokens=new_tokens, messages=[
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": path.resolve().as_uri()}},
                                             {"type": "text", "text": question}]}])
            return time.perf_counter() - start, reply.choices[0].message.content

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            done = list(pool.map(one, range(len(work))))
        seconds = time.perf_counter() - start
    return seconds, [latency for latency, _ in done], [answer for _, answer in done]


def rounds_rate(qa: VideoQA, work: list[tuple[Path, str, int]], options, size: int) -> tuple[float, list[str]]:
    """(questions/s, answers in order) of `work` answered in process in rounds of `size` requests: each
    round's clips prepared when first seen, and its questions answered together."""
    prepared: dict[Path, PreparedClip] = {}
    answers = []
    size = min(size, DECODING_QUESTIONS)  # as many as the server decodes together
    start = time.perf_counter()
    for first in range(0, len(work), size):
        chunk = work[first : first + size]
        groups: dict[tuple[Path, int], list[str]] = {}  # by clip and answer length
        for path, question, new_tokens in chunk:
            groups.setdefault((path, new_tokens), []).append(question)
        for (path, _), asked in groups.items():
            if path not in prepared:
                prepared[path] = qa.prepare_clip(decode_clip(path, options), asked[0], options)
            prepared[path] = prepared[path].asked(len(asked))
        results = qa.answer_together([(prepared[path].answering(new_tokens), asked)
                                      for (path, new_tokens), asked in groups.items()])
        answered = {(path, q, new_tokens): r.answer if isinstance(r, AskResult) else f"error: {r}"
                    for ((path, new_tokens), asked), mine in zip(groups.items(), results, strict=True)
                    for q, r in zip(asked, mine, strict=True)}
        answers += [answered[item] for item in chunk]
    return len(work) / (time.perf_counter() - start), answers


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def load(kind: str, folder: Path, dtype: str) -> tuple[VideoQA, str, int]:
    """(the model in this process, the checkpoint the servers load, frames a clip): the shipped ShapesQA
    model, or Video-LLaVA-7B's geometry with random weights (CLIP ViT-L/14, the 7B-width decoder 3 layers
    deep on a CPU), saved for the servers; `dtype` auto: the model's own choice (the 7B geometry: the
    fastest on this CPU)."""
    if kind == "demo":
        return VideoQA.from_pretrained("shapes-demo", dtype=dtype), "shapes-demo", 8
    if dtype == "auto":
        dtype, why = fastest_dtype(torch.device("cpu"))
        print(f"dtype: {dtype} ({why})")
    qa = build_7b(3, torch.device("cpu"), getattr(torch, dtype), WORDS)
    qa.model.model.save_pretrained(folder)
    qa.model.tokenizer.save_pretrained(folder)
    return qa, str(folder), 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["demo", "7b"], default="demo")
    parser.add_argument("--clips", type=int, default=1)
    parser.add_argument("--questions", type=int, default=25, help="questions a clip")
    parser.add_argument("--spread", action="store_true",
                        help="send the requests round the clips (one question of each clip, then the next), so that "
                             "the requests in flight are about different clips; by default clip after clip")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--method", default="none")
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--new-tokens", default="4",
                        help="answer length (max_tokens); a list (2,16) is cycled through the requests: short answers "
                             "beside long ones, where a request that joins the running decoding gains most")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: the model's own choice (--model 7b: the fastest on this CPU; bfloat16 near-ties "
                             "on random weights may flip a token between batch shapes, float32 shows the answers "
                             "are the same)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        qa, checkpoint, frames = load(args.model, Path(tmp) / "checkpoint", args.dtype)
        lengths = [int(n) for n in args.new_tokens.split(",")]
        options = ask_options(args.method, "100%" if args.method == "none" else args.budget, num_frames=frames,
                              max_new_tokens=max(lengths))
        paths, questions = workload(args.model, args.clips + 1, args.questions, Path(tmp))
        shutil.copy(paths.pop(), Path(tmp) / "warm.mp4")  # the servers' warm-up clip
        questions.pop()
        work = [(path, q) for path, asked in zip(paths, questions, strict=True) for q in asked]
        if args.spread:
            work = [(path, asked[i]) for i in range(args.questions) for path, asked in zip(paths, questions,
                                                                                            strict=True)]
        work = [(path, q, lengths[i % len(lengths)]) for i, (path, q) in enumerate(work)]
        qa.answer(paths[0], questions[0][0], options)  # warm-up
        start = time.perf_counter()
        latencies, reference = [], []
        for path, question, new_tokens in work:
            began = time.perf_counter()
            reference.append(qa.answer(path, question, replace(options, max_new_tokens=new_tokens)).answer)
            latencies.append(time.perf_counter() - began)
        ask_rate = len(work) / (time.perf_counter() - start)
        rows.append(("ask", 1, ask_rate, latencies, True))
        start = time.perf_counter()
        answered = {}
        for path in paths:
            mine = [(q, new_tokens) for p, q, new_tokens in work if p == path]
            clip = qa.prepare_clip(decode_clip(path, options), mine[0][0], options).asked(len(mine))
            for new_tokens in lengths:
                asked = [q for q, n in mine if n == new_tokens]
                answered |= {(path, q, new_tokens): r.answer for q, r in zip(
                    asked, qa.answer_prepared(clip, asked, max_new_tokens=new_tokens), strict=True)}
        together = [answered[item] for item in work]
        batch_rate = len(work) / (time.perf_counter() - start)
        rows.append(("batch", 1, batch_rate, None, together == reference))
        for concurrency in map(int, args.concurrency.split(",")):
            rate, answers = rounds_rate(qa, work, options, concurrency)
            rows.append(("rounds", concurrency, rate, None, answers == reference))
        device, dtype = qa.model.device, str(qa.model.dtype).removeprefix("torch.")
        del qa  # the servers hold their own copy
        for cache_mb, name in ((512, "serve cache"), (0, "serve no cache")):
            for concurrency in map(int, args.concurrency.split(",")):
                seconds, latencies, answers = serve_row(checkpoint, dtype, Path(tmp), work, concurrency, cache_mb,
                                                        options)
                rows.append((name, concurrency, len(work) / seconds, latencies, answers == reference))
    model = "shapes-demo" if args.model == "demo" else "Video-LLaVA-7B geometry, 3 decoder layers, random weights"
    print(f"\n{hardware(device)}, {dtype}, {model}, method {args.method}; "
          f"{args.clips} clip(s) x {args.questions} questions{' sent round the clips' if args.spread else ''}, "
          f"{frames} frames, {args.new_tokens} new tokens\n")
    header = ["path", "concurrency", "questions/s", "x batch", "x ask", "p50 ms", "p95 ms", "same answers"]
    print("  ".join(f"{h:>14}" for h in header))
    out = []
    for name, concurrency, rate, latencies, same in rows:
        p50, p95 = ((round(percentile(latencies, q) * 1000, 1) for q in (50, 95)) if latencies else ("-", "-"))
        row = {"path": name, "concurrency": concurrency, "questions_per_s": round(rate, 2),
               "x_batch": round(rate / batch_rate, 2), "x_ask": round(rate / ask_rate, 2), "p50_ms": p50,
               "p95_ms": p95, "same_answers": same}
        out.append(row)
        print("  ".join(f"{v!s:>14}" for v in row.values()))
    if len(lengths) > 1:  # each answer length's latency apart: a short answer need not wait for a long one
        print("\nlatency p50 / p95 ms by answer length (max_tokens):")
        for (name, concurrency, _, latencies, _), row in zip(rows, out, strict=True):
            if latencies:
                by_length = {n: [t for t, (_, _, m) in zip(latencies, work, strict=True) if m == n] for n in lengths}
                row["p50_ms_by_length"] = {n: round(percentile(mine, 50) * 1000, 1) for n, mine in by_length.items()}
                print(f"  {name} (concurrency {concurrency}): " + ", ".join(
                    f"{n} tokens {percentile(mine, 50) * 1000:.0f} / {percentile(mine, 95) * 1000:.0f}"
                    for n, mine in by_length.items()))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
