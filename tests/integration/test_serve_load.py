"""A bounded load on a live server: 8 concurrent clients x 25 questions over 4 clips, and 64 concurrent
connections against a queue of 16 (clients retry a 429 after its Retry-After, as the openai client
does). No request fails, none is a server error, and every answer is the one a sequential run gives."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import moving_square_frames, write_video
from tests.integration.test_serve import video_message
from tests.serving import MODEL_NAME, live_server, settings
from vidsparse.options import ask_options
from vidsparse.pipeline import VideoQA

QUESTIONS = ["what color is the square ?", "what moves ?", "what is happening ?", "what is the color ?",
             "how many objects are there ?"]


@pytest.fixture(scope="module")
def four_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    return [write_video(root / f"clip{i}.mp4", moving_square_frames(12 + 4 * i, 48, 64 + 8 * i)) for i in range(4)]


@pytest.fixture(scope="module")
def qa(tiny_checkpoint) -> VideoQA:
    return VideoQA.from_pretrained(str(tiny_checkpoint))


def _ask(url: str, uri: str, question: str, retries: list[int]) -> tuple[int, str]:
    """(status, answer) of one request; a 429 is retried after its Retry-After (counted in `retries`)."""
    body = json.dumps({"model": MODEL_NAME, "messages": video_message(uri, question)}).encode()
    while True:
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            if e.code != 429:
                return e.code, e.read().decode()
            retries.append(1)
            time.sleep(float(e.headers.get("Retry-After", "1")) / 10)  # a tenth: keeps the test short


def test_concurrent_clients_get_the_sequential_answers(qa, four_clips):
    options = ask_options(num_frames=8, max_new_tokens=4)
    sequential = {(str(c), q): qa.answer(c, q, options).answer for c in four_clips for q in QUESTIONS}
    work = [(four_clips[(client + i) % 4], QUESTIONS[(client * 3 + i) % len(QUESTIONS)])
            for client in range(8) for i in range(25)]
    retries: list[int] = []
    with live_server(qa, settings(four_clips[0].parent)) as url, ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda item: _ask(url, item[0].resolve().as_uri(), item[1], retries), work))
    assert [status for status, _ in replies] == [200] * len(work)
    assert [answer for _, answer in replies] == [sequential[(str(c), q)] for c, q in work]


def test_64_connections_against_a_queue_of_16(qa, four_clips):
    options = ask_options(num_frames=8, max_new_tokens=4)
    sequential = {(str(c), q): qa.answer(c, q, options).answer for c in four_clips for q in QUESTIONS}
    work = [(four_clips[i % 4], QUESTIONS[i % len(QUESTIONS)]) for i in range(64)]
    retries: list[int] = []
    with live_server(qa, settings(four_clips[0].parent, max_queue=16)) as url, ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(lambda item: _ask(url, item[0].resolve().as_uri(), item[1], retries), work))
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            metrics = response.read().decode()
    assert [status for status, _ in replies] == [200] * len(work)
    assert [answer for _, answer in replies] == [sequential[(str(c), q)] for c, q in work]
    assert f'vidsparse_requests_total{{status="429"}} {float(len(retries))}' in metrics
    assert f'vidsparse_requests_total{{status="200"}} {float(len(work))}' in metrics
    assert 'status="5' not in metrics
