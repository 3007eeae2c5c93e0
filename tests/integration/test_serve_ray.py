"""`vidsparse serve --ray` on a local Ray instance it starts: two CPU replicas behind the front. Answers
equal `ask`'s, a refusal raised inside a replica reaches the client as the same 4xx line, the
questions about a clip go to the replica whose cache holds it (every repeat is a cache hit), and SIGTERM
shuts it all down with exit status 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from tests.integration.test_serve import video_message
from tests.integration.test_serve_process import ENV, free_port
from vidsparse.options import ask_options
from vidsparse.pipeline import VideoQA

pytest.importorskip("ray.serve")


def post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def ray_server(tiny_checkpoint, clips):
    port = free_port()
    command = [sys.executable, "-m", "vidsparse", "serve", "--model", str(tiny_checkpoint), "--port", str(port),
               "--media-root", str(clips["h264"].parent), "--max-new-tokens", "4", "--served-model-name", "tiny",
               "--ray", "--replicas", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while True:
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the Ray Serve app did not start"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if json.loads(response.read()).get("status") == "ok":
                    break
        except (OSError, ValueError):
            time.sleep(1)
    yield port
    process.send_signal(signal.SIGTERM)  # as a process manager stops it: Serve and the Ray it started shut down
    try:
        assert process.wait(120) == 0, process.stderr.read()[-2000:]
    finally:
        process.kill()


def test_replicas_answer_as_ask_and_each_clip_stays_on_its_replica(ray_server, tiny_checkpoint, clips):
    qa = VideoQA.from_pretrained(str(tiny_checkpoint))
    options = ask_options(num_frames=8, max_new_tokens=4)
    seen = {}
    for round_ in range(3):
        if round_ == 1:
            # Ray Serve learns which replica holds which clip from the replicas' reports (every 0.1 s, then
            # broadcast by its controller): routing follows once it knows.
            time.sleep(3)
        for codec in ("h264", "vp9", "av1"):
            status, reply = post(ray_server, {"model": "tiny", "messages": video_message(
                clips[codec].resolve().as_uri(), "what moves ?")})
            assert status == 200
            alone = qa.answer(clips[codec], "what moves ?", options).to_dict()
            assert reply["choices"][0]["message"]["content"] == alone["answer"]
            assert reply["vidsparse"]["tokens"] == alone["tokens"]
            seen.setdefault(codec, []).append(reply["vidsparse"]["clip_cache"])
    # The first question about a clip fills a replica's cache; the repeats are routed to it.
    assert all(caches == ["miss", "hit", "hit"] for caches in seen.values()), seen


def test_a_refusal_inside_a_replica_is_the_clients_4xx(ray_server, clips):
    status, reply = post(ray_server, {"model": "tiny", "messages": video_message(
        clips["bad_not_video"].resolve().as_uri(), "what moves ?")})
    assert status == 400 and "\n" not in reply["error"]["message"] and "internal" not in reply["error"]["message"]
    status, reply = post(ray_server, {"model": "tiny", "vidsparse": {"method": "magic"},
                                      "messages": video_message(clips["h264"].resolve().as_uri())})
    assert status == 400 and "unknown method" in reply["error"]["message"]


def test_a_streamed_answer_comes_from_the_replica_in_pieces(ray_server, clips):
    """A stream through the front: the replica's pieces make the plain answer, and a refusal inside the
    replica is still the client's 4xx (it comes before any piece)."""
    uri = clips["vp9"].resolve().as_uri()
    status, plain = post(ray_server, {"model": "tiny", "messages": video_message(uri, "what moves ?")})
    assert status == 200
    request = urllib.request.Request(
        f"http://127.0.0.1:{ray_server}/v1/chat/completions", method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "tiny", "messages": video_message(uri, "what moves ?"), "stream": True,
                         "stream_options": {"include_usage": True}}).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        events = [line[len("data: "):] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    pieces = [delta["content"] for delta in deltas if delta.get("content")]
    assert "".join(pieces) == plain["choices"][0]["message"]["content"]
    assert len(pieces) == len(plain["choices"][0]["message"]["content"].split())  # a word at a time, as decoded
    assert chunks[-1]["usage"] == plain["usage"]
    status, reply = post(ray_server, {"model": "tiny", "stream": True, "messages": video_message(
        clips["bad_not_video"].resolve().as_uri(), "what moves ?")})
    assert status == 400 and "\n" not in reply["error"]["message"]
