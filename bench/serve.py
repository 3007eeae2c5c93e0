"""What `vidsparse serve` costs and gains, side by side in one run on the shipped ShapesQA model.

Every request is one question about one clip, sent by the official openai client over HTTP to a live
server on localhost (file:// URLs under the media root, as lmms-eval sends them). Rows:
- `ask`: `VideoQA.answer` per question in this process, one after another: decoding, vision tower and
  the whole prefill every time (what a server without reuse pays);
- `batch`: `VideoQA.answer_clip` on each clip's questions (what `vidsparse batch` runs);
- `serve cache`: the server with its clip cache, at each concurrency;
- `serve no cache` (`--cache-mb 0`): only requests waiting together share their clip's work.
Each server row starts a fresh server (an empty cache). Columns: questions/s, the ratio to `batch` and
to `ask`, p50/p95 latency of a request, and whether every answer equals `ask`'s.

    python bench/serve.py                     # 1 clip x 25 questions, concurrency 1, 4, 16
    python bench/serve.py --clips 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import openai  # noqa: E402
from batch import workload  # noqa: E402

from tests.serving import live_server, settings  # noqa: E402
from vidsparse.options import ask_options  # noqa: E402
from vidsparse.pipeline import VideoQA  # noqa: E402


def serve_row(qa: VideoQA, root: Path, work: list[tuple[Path, str]], concurrency: int, cache_mb: int,
              options) -> tuple[float, list[float], list[str]]:
    """(seconds for all of `work`, each request's latency, the answers in order) through a fresh server."""
    serve_settings = settings(root, model_name="shapes-demo", defaults=options, max_tokens=options.max_new_tokens,
                              cache_bytes=cache_mb * 2**20, max_queue=max(16, concurrency))
    with live_server(qa, serve_settings) as url:
        clients = [openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) for _ in range(concurrency)]

        def one(i: int) -> tuple[float, str]:
            path, question = work[i]
            start = time.perf_counter()
            reply = clients[i % concurrency].chat.completions.create(model="shapes-demo", messages=[
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": path.resolve().as_uri()}},
                                             {"type": "text", "text": question}]}])
            return time.perf_counter() - start, reply.choices[0].message.content

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            done = list(pool.map(one, range(len(work))))
        seconds = time.perf_counter() - start
    return seconds, [latency for latency, _ in done], [answer for _, answer in done]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=1)
    parser.add_argument("--questions", type=int, default=25, help="questions a clip")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--method", default="none")
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    qa = VideoQA.from_pretrained("shapes-demo")
    options = ask_options(args.method, "100%" if args.method == "none" else args.budget, num_frames=8,
                          max_new_tokens=args.new_tokens)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths, questions = workload("demo", args.clips, args.questions, Path(tmp))
        work = [(path, q) for path, asked in zip(paths, questions, strict=True) for q in asked]
        qa.answer(paths[0], questions[0][0], options)  # warm-up
        start = time.perf_counter()
        latencies, reference = [], []
        for path, question in work:
            began = time.perf_counter()
            reference.append(qa.answer(path, question, options).answer)
            latencies.append(time.perf_counter() - began)
        ask_rate = len(work) / (time.perf_counter() - start)
        rows.append(("ask", 1, ask_rate, latencies, True))
        start = time.perf_counter()
        together = [r.answer for path, asked in zip(paths, questions, strict=True)
                    for r in qa.answer_clip(path, asked, options)]
        batch_rate = len(work) / (time.perf_counter() - start)
        rows.append(("batch", 1, batch_rate, None, together == reference))
        for cache_mb, name in ((512, "serve cache"), (0, "serve no cache")):
            for concurrency in map(int, args.concurrency.split(",")):
                seconds, latencies, answers = serve_row(qa, Path(tmp), work, concurrency, cache_mb,
                                                        replace(options))
                rows.append((name, concurrency, len(work) / seconds, latencies, answers == reference))
    print(f"\n{platform.processor() or platform.machine()}, {qa.model.device}, "
          f"{str(qa.model.dtype).removeprefix('torch.')}, shapes-demo, method {args.method}; {args.clips} clip(s) x "
          f"{args.questions} questions, 8 frames, {args.new_tokens} new tokens\n")
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
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
