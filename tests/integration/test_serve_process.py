"""`vidsparse serve` as users start it, a process on a localhost port: its flag mistakes are one line
before the model loads; SIGTERM lets every request already sent finish, then exits; after a SIGKILL
the same command serves again on the same port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.integration.test_serve import video_message

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(checkpoint, root, port: int, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "vidsparse", "serve", "--model", str(checkpoint), "--port", str(port),
               "--media-root", str(root), "--max-new-tokens", "4", "--served-model-name", "tiny", *flags]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if json.loads(response.read())["status"] == "ok":
                    return process
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not start")


def ask(port: int, uri: str, question: str, frames: int = 8) -> tuple[int, str]:
    body = json.dumps({"model": "tiny", "messages": video_message(uri, question),
                       "vidsparse": {"frames": frames}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, json.loads(response.read())["choices"][0]["message"]["content"]


@pytest.mark.parametrize(("flags", "says"), [
    (["--method", "magic"], "unknown method"),
    (["--budget", "0"], "--budget"),
    (["--media-root", "/no/such/folder"], "--media-root"),
])
def test_flag_mistakes_are_one_line_before_loading(tiny_checkpoint, flags, says):
    run = subprocess.run([sys.executable, "-m", "vidsparse", "serve", "--model", str(tiny_checkpoint),
                          "--port", str(free_port()), *flags], check=False, capture_output=True, text=True,
                         env=ENV, timeout=120)
    assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_a_port_in_use_is_one_line(tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "vidsparse", "serve", "--model", str(tiny_checkpoint),
                              "--port", str(port)], check=False, capture_output=True, text=True, env=ENV,
                             timeout=120)
    assert run.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in run.stderr


def test_sigterm_drains_what_was_sent_and_sigkill_restarts(tiny_checkpoint, clips):
    """24 requests that cannot share work (three codecs, eight frame counts) are sent at once; SIGTERM comes
    with the first answer, while the rest are queued or running: every one of them is still answered."""
    root, port = clips["h264"].parent, free_port()
    work = [(clips[codec].resolve().as_uri(), frames) for codec in ("h264", "vp9", "av1") for frames in range(1, 9)]
    process = start(tiny_checkpoint, root, port, "--queue-size", "32")
    try:
        expected = [ask(port, uri, "what moves ?", frames) for uri, frames in work]
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        process = start(tiny_checkpoint, root, port, "--queue-size", "32")  # a fresh server: nothing cached
        replies: dict[int, tuple[int, str] | Exception] = {}
        lock = threading.Lock()

        def client(i: int) -> None:
            try:
                reply = ask(port, work[i][0], "what moves ?", work[i][1])
            except Exception as e:  # noqa: BLE001 - recorded: the assertion below names it
                reply = e
            with lock:
                replies[i] = reply
                # SIGTERM at once from the thread the first answer woke (sent by the main thread, it came after
                # them all): a decoding holds 16 requests at most, and these 24 share no clip, so at least 8 are
                # still queued or being prepared then
                if len(replies) == 1:
                    process.send_signal(signal.SIGTERM)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(work))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        # uvicorn, once drained, raises the signal again: the exit status says SIGTERM, as process managers expect.
        assert process.wait(60) == -signal.SIGTERM
        assert [replies[i] for i in range(len(work))] == expected
        process = start(tiny_checkpoint, root, port)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        process = start(tiny_checkpoint, root, port)  # after SIGKILL: the same port serves again
        assert ask(port, work[0][0], "what moves ?", work[0][1]) == expected[0]
    finally:
        process.kill()
        process.wait(30)
