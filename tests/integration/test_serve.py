"""`vidsparse serve` live on a localhost port, driven by the official `openai` client and by raw HTTP:
answers equal `ask`'s with the same settings (plain, streamed, per-request pruning, clips by path, by
value and as frames, from the clip cache), and every bad request is a 4xx with OpenAI's error shape and
one line."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from email.message import Message

import numpy as np
import openai
import pytest
from PIL import Image

from tests.serving import MODEL_NAME, live_server, settings
from vidsparse.options import ask_options
from vidsparse.pipeline import Answering, VideoQA
from vidsparse.video import decode_video

QUESTION = "what color is the square ?"


@pytest.fixture(scope="module")
def qa(tiny_checkpoint) -> VideoQA:
    return VideoQA.from_pretrained(str(tiny_checkpoint))


@pytest.fixture(scope="module")
def server(qa, clips):
    with live_server(qa, settings(clips["h264"].parent)) as url:
        yield url


@pytest.fixture
def held(monkeypatch) -> tuple[threading.Event, list[list[str]]]:
    """The inference thread held each time requests join the decoding (`Answering.join`) until the event is
    set; each join's questions, per clip."""
    release, calls = threading.Event(), []
    join = Answering.join

    def waits(self, asked, *args, **kwargs):
        calls.append([list(questions) for _, questions in asked])
        release.wait(30)
        return join(self, asked, *args, **kwargs)

    monkeypatch.setattr(Answering, "join", waits)
    return release, calls


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def video_message(url: str, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def data_url(path, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict, Message]:
    """(status, JSON body, headers) of a raw POST to the chat endpoint."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def expected(qa: VideoQA, video, question: str = QUESTION, method: str = "none", budget: str = "194",
             tower_cut: int | None = None) -> dict:
    return qa.answer(video, question, ask_options(method, budget, num_frames=8, max_new_tokens=4,
                                                  tower_cut=tower_cut)).to_dict()


@pytest.mark.parametrize(("method", "budget", "cut"), [("none", "194", None), ("stprune", "25%", None),
                                                       ("sparsevlm", "20", None), ("stprune", "25%", 0)])
def test_answers_equal_ask_by_path_and_by_value_and_again_from_the_clip_cache(server, qa, clips, method, budget,
                                                                               cut):
    alone = expected(qa, clips["h264"], method=method, budget=budget, tower_cut=cut)
    extra = {} if method == "none" else {"vidsparse": {"method": method, "budget": budget}
                                         | ({} if cut is None else {"tower_cut": cut})}
    seen = []
    for url in (clips["h264"].resolve().as_uri(), data_url(clips["h264"]), clips["h264"].resolve().as_uri()):
        reply = client(server).chat.completions.create(model=MODEL_NAME, messages=video_message(url),
                                                       extra_body=extra)
        stats = reply.model_extra["vidsparse"]
        assert reply.choices[0].message.content == alone["answer"]
        assert stats["tokens"] == alone["tokens"] and stats["flops"]["prefill"] == alone["flops"]["prefill"]
        assert stats["pruning"]["method"] == method and stats["pruning"].get("tower_cut") == cut
        assert stats["flops"]["vision"] == alone["flops"]["vision"]
        assert reply.usage.prompt_tokens == alone["tokens"]["prompt"]
        assert reply.usage.completion_tokens == alone["tokens"]["generated"]
        seen.append(stats["clip_cache"])
    # The same bytes by path or by value are one clip: decoded and prefilled once per setting.
    assert seen[1:] == ["hit", "hit"]


def test_the_default_positions_and_what_they_mean_share_one_cache_entry(server, clips):
    """FastV's default positions (`authors`) are `keep`: asking for `keep` explicitly reuses the clip."""
    seen = []
    for positions in ({}, {"positions": "keep"}):
        extra = {"vidsparse": {"method": "fastv", "budget": "21"} | positions}
        reply = client(server).chat.completions.create(model=MODEL_NAME, messages=video_message(
            clips["h264"].resolve().as_uri()), extra_body=extra)
        assert reply.model_extra["vidsparse"]["pruning"]["positions"] == "keep"
        seen.append(reply.model_extra["vidsparse"]["clip_cache"])
    assert seen == ["miss", "hit"]


def test_a_streamed_answer_is_the_plain_one_with_usage_last(server, qa, clips):
    alone = expected(qa, clips["vp9"])
    chunks = list(client(server).chat.completions.create(
        model=MODEL_NAME, messages=video_message(clips["vp9"].resolve().as_uri()), stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == alone["answer"]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == alone["tokens"]["generated"]


def test_a_streamed_answer_arrives_while_it_is_decoded(qa, clips, monkeypatch):
    """At its third decoding step the inference thread waits until the client has a piece of the answer:
    a server that sent the answer whole would never get there. The pieces make the plain answer."""
    from vidsparse.decoding import DecodeState

    received, waited, steps = threading.Event(), [], []
    step = DecodeState.step

    def held_at_the_third(self, tokens):
        steps.append(1)
        if len(steps) == 3:
            waited.append(received.wait(20))
        return step(self, tokens)

    uri = clips["h264"].resolve().as_uri()
    with live_server(qa, settings(clips["h264"].parent, max_tokens=12)) as url:
        plain = client(url).chat.completions.create(model=MODEL_NAME, messages=video_message(uri), max_tokens=12)
        monkeypatch.setattr(DecodeState, "step", held_at_the_third)
        pieces = []
        for chunk in client(url).chat.completions.create(model=MODEL_NAME, messages=video_message(uri),
                                                         max_tokens=12, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                received.set()
    assert len(steps) == 11 and waited == [True]
    assert len(pieces) > 1 and "".join(pieces) == plain.choices[0].message.content


def test_a_client_that_leaves_a_stream_stops_its_decoding(qa, clips, monkeypatch):
    """The client reads the first piece and hangs up: decoding stops within a few steps instead of
    running to max_tokens, the request is counted as 499, and the server goes on."""
    import http.client

    from vidsparse.decoding import DecodeState

    steps = []
    step = DecodeState.step

    def slow(self, tokens):
        steps.append(1)
        time.sleep(0.1)
        return step(self, tokens)

    uri = clips["h264"].resolve().as_uri()
    with live_server(qa, settings(clips["h264"].parent, max_tokens=12)) as url:
        monkeypatch.setattr(DecodeState, "step", slow)
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                           body=json.dumps({"model": MODEL_NAME, "messages": video_message(uri), "max_tokens": 12,
                                            "stream": True}))
        response = connection.getresponse()
        assert response.status == 200
        while '"content": "square' not in response.readline().decode():
            pass
        connection.sock.close()  # hangs up mid-answer
        connection.close()
        _wait_for(lambda: _metric(url, 'vidsparse_requests_total{status="499"}') == 1)
        # Answered after the left request's decoding has ended (one inference thread); it decodes nothing.
        assert post(url, {"model": MODEL_NAME, "messages": video_message(uri), "max_tokens": 1})[0] == 200
        assert len(steps) < 8  # of the 11 its 12 tokens would take


def short_question_during_a_long_answer(qa, clips, monkeypatch, short_codec: str, cache_bytes: int
                                        ) -> tuple[list[int], list[int], dict[str, tuple[float, object]]]:
    """A 12-token answer about the h264 clip decodes slowly (a pause each step); after its second step a
    2-token question about `short_codec`'s clip is asked. The rows of each decoding step, the steps decoded
    before each clip preparation, and each reply ("long", "short") with the time it arrived."""
    from vidsparse.decoding import DecodeState

    rows, prepared, step, prepare = [], [], DecodeState.step, VideoQA.prepare_clip

    def slow(self, tokens):
        rows.append(len(tokens))
        time.sleep(0.05)
        return step(self, tokens)

    long_uri, short_uri = clips["h264"].resolve().as_uri(), clips[short_codec].resolve().as_uri()
    with live_server(qa, settings(clips["h264"].parent, max_tokens=12, cache_bytes=cache_bytes)) as url:
        monkeypatch.setattr(DecodeState, "step", slow)
        monkeypatch.setattr(VideoQA, "prepare_clip", lambda self, *args, **kwargs: prepared.append(len(rows))
                            or prepare(self, *args, **kwargs))
        replies: dict[str, tuple[float, object]] = {}

        def ask(name: str, uri: str, question: str, max_tokens: int) -> None:
            reply = client(url).chat.completions.create(model=MODEL_NAME, messages=video_message(uri, question),
                                                        max_tokens=max_tokens)
            replies[name] = (time.monotonic(), reply)

        long = threading.Thread(target=ask, args=("long", long_uri, QUESTION, 12))
        long.start()
        _wait_for(lambda: len(rows) >= 2)
        ask("short", short_uri, "what moves ?", 2)
        long.join(60)
    served = list(rows), list(prepared)  # before `ask`'s own decoding below adds its steps
    for name, video, question, max_tokens in (("long", clips["h264"], QUESTION, 12),
                                              ("short", clips[short_codec], "what moves ?", 2)):
        want = qa.answer(video, question, ask_options("none", "194", num_frames=8, max_new_tokens=max_tokens))
        assert replies[name][1].choices[0].message.content == want.answer
        assert replies[name][1].usage.completion_tokens == want.generated_tokens
    return *served, replies


@pytest.mark.parametrize(("short_codec", "cache_bytes"), [("vp9", 512 * 2**20), ("h264", 0)])
def test_a_request_that_comes_while_another_decodes_joins_its_decoding(qa, clips, monkeypatch, short_codec,
                                                                      cache_bytes):
    """A short question comes while a long answer decodes, about another clip, or about the same clip with
    no clip cache (the decoding's clip serves it): the short one joins the running decoding at a step (two
    rows from then on), gets its answer while the long one is still decoding, and both answers are
    `ask`'s."""
    rows, prepared, replies = short_question_during_a_long_answer(qa, clips, monkeypatch, short_codec, cache_bytes)
    assert 1 in rows[:2] and 2 in rows  # alone at first, then the two together
    assert replies["short"][0] < replies["long"][0]
    assert len(prepared) == (2 if short_codec != "h264" else 1)


def test_a_clip_that_would_overfill_the_budget_waits_prepared_until_the_decoding_ends(qa, clips, monkeypatch):
    """With room in the cache's budget for one clip (and a half), a question about a second clip comes
    while the first clip's long answer decodes: its clip is prepared at once but joins only when the
    first answer has ended (never two rows in a step), and both answers are `ask`'s."""
    from vidsparse.stats import nbytes

    size = nbytes(qa.prepare_clip(decode_video(clips["h264"], 8), QUESTION, ask_options("none", "194",
                                                                                       num_frames=8)))
    rows, prepared, replies = short_question_during_a_long_answer(qa, clips, monkeypatch, "vp9", int(1.5 * size))
    assert rows == [1] * len(rows) and len(rows) == 11 + 1  # the long answer's 11 steps, then the short one's
    assert prepared[0] == 0 and 2 <= prepared[1] < 11  # the second clip prepared while the first decoded
    assert replies["long"][0] < replies["short"][0]


def test_frames_sent_as_images_before_or_after_the_text_answer_as_those_frames(server, qa, clips):
    frames = decode_video(clips["h264"], 8).frames
    alone = qa.answer(frames, QUESTION, ask_options(max_new_tokens=4)).to_dict()

    text = {"type": "text", "text": QUESTION}
    for content in ([*map(_png_part, frames), text], [text, *map(_png_part, frames)]):
        reply = client(server).chat.completions.create(model=MODEL_NAME,
                                                       messages=[{"role": "user", "content": content}])
        assert reply.choices[0].message.content == alone["answer"]
        assert reply.model_extra["vidsparse"]["tokens"] == alone["tokens"]


def test_stop_sequences_and_the_length_limit(server, clips):
    reply = client(server).chat.completions.create(model=MODEL_NAME, max_tokens=1,
                                                   messages=video_message(clips["h264"].resolve().as_uri()))
    assert reply.usage.completion_tokens <= 1
    assert reply.choices[0].finish_reason == ("length" if reply.usage.completion_tokens == 1 else "stop")
    full = client(server).chat.completions.create(model=MODEL_NAME,
                                                  messages=video_message(clips["h264"].resolve().as_uri()))
    answer = full.choices[0].message.content
    if len(answer) > 1:
        cut = client(server).chat.completions.create(model=MODEL_NAME, stop=[answer[1:]],
                                                     messages=video_message(clips["h264"].resolve().as_uri()))
        assert cut.choices[0].message.content == answer[:1] and cut.choices[0].finish_reason == "stop"
    # A stop sequence ends the decoding at the token that completes it (the tiny tokenizer's tokens are words).
    words = answer.split()
    stop = " ".join(words[1:3])
    ended = next(n for n in range(1, len(words) + 1) if stop in " ".join(words[:n]))
    cut = client(server).chat.completions.create(model=MODEL_NAME, stop=stop,
                                                 messages=video_message(clips["h264"].resolve().as_uri()))
    assert ended < len(words) and cut.usage.completion_tokens == ended  # not the 4 it would have taken


def _png_part(frame: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    url = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
    return {"type": "image_url", "image_url": {"url": url}}


def _bad_requests(clips, outside) -> list[tuple[str, bytes | dict, dict, int]]:
    good = clips["h264"].resolve().as_uri()

    def chat(**changes) -> dict:
        return {"model": MODEL_NAME, "messages": video_message(good), **changes}

    return [
        ("malformed JSON", b"{\"model\": ", {}, 400),
        ("not an object", b"[1, 2]", {}, 400),
        ("unknown method", chat(vidsparse={"method": "magic"}), {}, 400),
        ("bad budget", chat(vidsparse={"method": "stprune", "budget": "150%"}), {}, 400),
        ("unknown vidsparse key", chat(vidsparse={"budjet": "10%"}), {}, 400),
        ("corrupt video", chat(messages=video_message(data_url(clips["bad_truncated"]))), {}, 400),
        ("not video data", chat(messages=video_message(data_url(clips["bad_not_video"]))), {}, 400),
        ("not a video mime type", chat(messages=video_message("data:text/plain;base64,aGVsbG8=")), {}, 400),
        ("bad base64", chat(messages=video_message("data:video/mp4;base64,@@@@")), {}, 400),
        ("outside the media root", chat(messages=video_message(outside.as_uri())), {}, 403),
        ("dot-dot out of the root", chat(messages=video_message(good.rsplit("/", 1)[0] + "/../" + outside.name)),
         {}, 403),
        ("no such file", chat(messages=video_message(clips["bad_missing"].resolve().as_uri())), {}, 404),
        ("http off", chat(messages=video_message("http://127.0.0.1:9/clip.mp4")), {}, 400),
        ("unknown model", chat(model="gpt-5"), {}, 404),
        ("no question", chat(messages=[{"role": "user", "content": [{"type": "video_url",
                                                                      "video_url": {"url": good}}]}]), {}, 400),
        ("no clip", chat(messages=[{"role": "user", "content": QUESTION}]), {}, 400),
        ("two turns", chat(messages=[*video_message(good), {"role": "assistant", "content": "red"},
                                     {"role": "user", "content": "sure ?"}]), {}, 400),
        ("sampling", chat(temperature=0.7), {}, 400),
        ("n > 1", chat(n=2), {}, 400),
        ("too many frames", chat(vidsparse={"frames": 1000}), {}, 400),
        # found by an independent review: each was a 500 or unchecked
        ("an integer past 4300 digits", b'{"model": "tiny", "max_tokens": ' + b"1" * 5000 + b"}", {}, 400),
        ("JSON nested too deep", b'{"x": ' * 5000 + b"1" + b"}" * 5000, {}, 400),
        ("prune_after of strings", chat(vidsparse={"method": "fastv", "prune_after": ["a"]}), {}, 400),
        ("prune_after true", chat(vidsparse={"method": "fastv", "prune_after": True}), {}, 400),
        ("a seed past 2**64 - 1", chat(vidsparse={"method": "random", "seed": 2**64}), {}, 400),
        ("frames and fps", chat(vidsparse={"frames": 4, "fps": 2}), {}, 400),
        ("max_frames without fps", chat(vidsparse={"max_frames": 4}), {}, 400),
        ("a tower cut for a method that reads the tokens", chat(vidsparse={"method": "fastv", "tower_cut": 0}),
         {}, 400),
        ("a tower cut past the tower", chat(vidsparse={"method": "stprune", "tower_cut": 9}), {}, 400),
        ("a tower cut as text", chat(vidsparse={"method": "stprune", "tower_cut": "0"}), {}, 400),
        ("a tower cut of true", chat(vidsparse={"method": "stprune", "tower_cut": True}), {}, 400),
        ("a negative tower cut", chat(vidsparse={"method": "stprune", "tower_cut": -1}), {}, 400),
        ("a tower cut past any tower", chat(vidsparse={"method": "uniform", "tower_cut": 10**30}), {}, 400),
        ("a tower cut with a list", chat(vidsparse={"method": "stprune", "tower_cut": [0]}), {}, 400),
        ("a broken IPv6 URL", chat(messages=video_message("file://[::1/x")), {}, 400),
        ("a NUL in the path", chat(messages=video_message(good + "%00.png")), {}, 400),
        ("a name too long", chat(messages=video_message(good.rsplit("/", 1)[0] + "/" + "a" * 5000)), {}, 400),
        ("too many image parts", chat(messages=[{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, *[_png_part(np.zeros((4, 4, 3), np.uint8))] * 65]}]), {}, 400),
        ("image frames too large", chat(messages=[{"role": "user", "content": [
            {"type": "text", "text": QUESTION}, _png_part(np.zeros((1, 4097, 3), np.uint8))]}]), {}, 400),
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_every_bad_request_is_a_4xx_with_one_line_and_the_server_goes_on(server, clips, tmp_path, stream):
    """Streamed too: a refusal found while the clip is prepared (a corrupt video) comes before the first
    piece of text, so it is still the status and one JSON line, not an event in a 200 stream."""
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(clips["h264"].read_bytes())
    for name, body, headers, status in _bad_requests(clips, outside):
        sent = {**body, "stream": True} if stream and isinstance(body, dict) else body
        code, reply, _ = post(server, sent, headers)
        assert code == status, (name, reply)
        message = reply["error"]["message"]
        assert message and "\n" not in message and "Traceback" not in message, (name, message)
    code, reply, _ = post(server, {"model": MODEL_NAME, "messages": video_message(clips["h264"].resolve().as_uri())})
    assert code == 200 and reply["choices"][0]["message"]["content"]


def test_an_odd_data_url_subtype_names_no_file_and_a_decode_error_names_no_temporary_file(server, qa, clips):
    body = {"model": MODEL_NAME, "messages": video_message(data_url(clips["av1"], "video/a/../b"))}
    code, reply, _ = post(server, body)
    assert code == 200 and reply["choices"][0]["message"]["content"] == expected(qa, clips["av1"])["answer"]
    code, reply, _ = post(server, {"model": MODEL_NAME, "messages": video_message(data_url(clips["bad_truncated"]))})
    assert code == 400 and "/tmp" not in reply["error"]["message"]


def test_a_client_that_leaves_while_sending_its_body_is_counted_and_the_server_goes_on(server, clips):
    import http.client

    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Length", "100")
    connection.endheaders()
    connection.send(b'{"')
    connection.close()
    _wait_for(lambda: _metric(server, 'vidsparse_requests_total{status="499"}') == 1)
    code, _, _ = post(server, {"model": MODEL_NAME, "messages": video_message(clips["h264"].resolve().as_uri())})
    assert code == 200


def test_an_oversized_body_is_refused_before_it_is_read(server):
    """A body declared larger than the limit is answered 413 at once: the server reads none of it."""
    import http.client

    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(7 * 2**20))
    connection.endheaders()
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    assert response.status == 413 and "limit" in reply["error"]["message"]


def test_a_symlink_out_of_the_media_root_is_refused(qa, clips, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "escape.mp4").symlink_to(clips["h264"])
    with live_server(qa, settings(root)) as url:
        code, reply, _ = post(url, {"model": MODEL_NAME, "messages": video_message((root / "escape.mp4").as_uri())})
    assert code == 403 and "media-root" in reply["error"]["message"]


def test_the_api_key_is_required_when_set(qa, clips):
    with live_server(qa, settings(clips["h264"].parent, api_key="s3cret")) as url:
        body = {"model": MODEL_NAME, "messages": video_message(clips["h264"].resolve().as_uri())}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            code, reply, _ = post(url, body, headers)
            assert code == 401 and reply["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert client(url, "s3cret").models.list().data[0].id == MODEL_NAME
        code, _, _ = post(url, body, {"Authorization": "Bearer s3cret"})
        assert code == 200
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:  # health needs no key
            assert json.loads(response.read())["status"] == "ok"


def test_a_full_queue_answers_429_and_waiting_requests_on_one_clip_are_answered_together(qa, clips, held):
    """The inference thread is held on the first request; meanwhile two more on the same clip queue (one
    more is refused with 429 and Retry-After); released, the two are answered in one call, as `ask` would."""
    release, calls = held
    questions = [QUESTION, "what moves ?", "what is happening ?"]
    uri = clips["h264"].resolve().as_uri()
    with live_server(qa, settings(clips["h264"].parent, max_queue=2)) as url:
        replies: dict[int, tuple[int, dict, dict]] = {}

        def ask(i: int) -> None:
            replies[i] = post(url, {"model": MODEL_NAME, "messages": video_message(uri, questions[i])})

        first = threading.Thread(target=ask, args=(0,))
        rest = [threading.Thread(target=ask, args=(i,)) for i in (1, 2)]
        try:
            first.start()
            _wait_for(lambda: calls)
            for thread in rest:
                thread.start()
            _wait_for(lambda: _metric(url, "vidsparse_queue_depth") == 2)
            code, reply, headers = post(url, {"model": MODEL_NAME, "messages": video_message(uri)})
        finally:
            release.set()
            for thread in [first, *rest]:
                thread.join(60)
        assert code == 429 and headers.get("Retry-After") == "1" and reply["error"]["type"] == "rate_limit_error"
        assert calls[0] == [[questions[0]]] and len(calls) == 2
        assert len(calls[1]) == 1 and sorted(calls[1][0]) == sorted(questions[1:])  # one clip, both questions
        for i, question in enumerate(questions):
            code, reply, _ = replies[i]
            assert code == 200 and reply["choices"][0]["message"]["content"] == expected(qa, clips["h264"],
                                                                                          question)["answer"]
        assert _metric(url, 'vidsparse_clip_cache_total{result="hit"}') == 2
        assert _metric(url, 'vidsparse_requests_total{status="429"}') == 1


@pytest.mark.parametrize("cache_bytes", [512 * 2**20, 0])
def test_requests_about_different_clips_waiting_together_are_decoded_together(qa, clips, held, cache_bytes,
                                                                              monkeypatch):
    """While the inference thread is held, requests about two videos (one of them also with its own
    pruning and answer length) queue, the other video's first; released, they join the decoding in one
    call, as `ask` would answer them. Without a clip cache the decoding holds one clip at a time: each
    clip's requests are decoded before the next clip is prepared (the request about the first clip waits
    behind the other video's, so it does not join the first clip's decoding)."""
    release, calls = held
    events: list[str] = []
    prepare, join = VideoQA.prepare_clip, Answering.join
    monkeypatch.setattr(VideoQA, "prepare_clip", lambda self, *args, **kwargs: events.append("prepare")
                        or prepare(self, *args, **kwargs))
    monkeypatch.setattr(Answering, "join", lambda self, *args, **kwargs: events.append("decode")
                        or join(self, *args, **kwargs))
    asked = [(clips["h264"], QUESTION, {}), (clips["vp9"], "what moves ?", {}), (clips["h264"], "what moves ?", {}),
             (clips["vp9"], QUESTION, {"max_tokens": 3, "extra_body": {"vidsparse": {"method": "stprune",
                                                                                     "budget": "25%"}}})]
    with live_server(qa, settings(clips["h264"].parent, cache_bytes=cache_bytes)) as url:
        replies: dict[int, object] = {}
        talk = client(url)

        def ask(i: int) -> None:
            video, question, extra = asked[i]
            replies[i] = talk.chat.completions.create(model=MODEL_NAME, messages=video_message(
                video.resolve().as_uri(), question), **extra)

        first = threading.Thread(target=ask, args=(0,))
        rest = [threading.Thread(target=ask, args=(i,)) for i in (1, 2, 3)]
        try:
            first.start()
            _wait_for(lambda: calls)
            for depth, thread in enumerate(rest, 1):  # queued in order: which comes first decides what joins
                thread.start()
                _wait_for(lambda depth=depth: _metric(url, "vidsparse_queue_depth") == depth)
        finally:
            release.set()
            for thread in [first, *rest]:
                thread.join(60)
    assert calls[0] == [[QUESTION]]
    if cache_bytes:  # the three groups (two videos, two settings on one) in one call, in the order they came
        assert len(calls) == 2 and sorted(calls[1]) == [[QUESTION], ["what moves ?"], ["what moves ?"]]
        assert events == ["prepare", "decode", "prepare", "prepare", "decode"]  # the first clip from the cache
    else:
        assert sorted(calls[1:]) == [[[QUESTION]], [["what moves ?"]], [["what moves ?"]]]
        assert events == ["prepare", "decode"] * 4
    for i, (video, question, extra) in enumerate(asked):
        method, budget = ("stprune", "25%") if extra else ("none", "194")
        want = qa.answer(video, question, ask_options(method, budget, num_frames=8,
                                                      max_new_tokens=extra.get("max_tokens", 4)))
        assert replies[i].choices[0].message.content == want.answer


def test_a_refused_question_about_a_cached_clip_is_a_400_and_fails_alone(qa, clips, held):
    """A question the clip refuses (a special token) about a clip already in the cache, alone and then in
    the same join as a good request about another clip: a 400 for it, the other answered."""
    release, calls = held
    h264, vp9 = clips["h264"].resolve().as_uri(), clips["vp9"].resolve().as_uri()
    refused = "what is <video> here ?"
    with live_server(qa, settings(clips["h264"].parent)) as url:
        release.set()
        assert post(url, {"model": MODEL_NAME, "messages": video_message(h264)})[0] == 200
        code, reply, _ = post(url, {"model": MODEL_NAME, "messages": video_message(h264, refused)})
        assert code == 400 and "special token" in reply["error"]["message"]
        release.clear()
        replies = queued_behind_a_held_request(url, calls, release,
                                               [(vp9, "what moves ?"), (vp9, QUESTION), (h264, refused)])
    assert len(calls[3]) == 2  # the good and the refused request in one join
    assert replies[1][0] == 200 and replies[1][1]["choices"][0]["message"]["content"] == expected(
        qa, clips["vp9"])["answer"]
    assert replies[2][0] == 400 and "special token" in replies[2][1]["error"]["message"]


def test_a_request_whose_answer_would_not_fit_the_context_fails_alone_beside_others_on_its_clip(qa, clips, held):
    """Two requests about one clip wait together, the first asking for an answer longer than the model's
    positions hold: a 400 for it, and the second (a short answer, in the same group) is answered."""
    release, calls = held
    h264, vp9 = clips["h264"].resolve().as_uri(), clips["vp9"].resolve().as_uri()
    with live_server(qa, settings(clips["h264"].parent, max_tokens=100_000)) as url:
        replies = queued_behind_a_held_request(url, calls, release, [(vp9, QUESTION),
                                                                     (h264, QUESTION, {"max_tokens": 100_000}),
                                                                     (h264, "what moves ?", {"max_tokens": 4})])
    assert replies[1][0] == 400 and "positions" in replies[1][1]["error"]["message"]
    assert replies[2][0] == 200 and replies[2][1]["choices"][0]["message"]["content"] == expected(
        qa, clips["h264"], "what moves ?")["answer"]


def test_a_refused_request_about_a_clip_not_yet_prepared_fails_alone(qa, clips, held):
    """The first of two requests about a clip not in the cache is refused (a special token): the clip is
    still prepared, and the second is answered."""
    release, calls = held
    h264, vp9 = clips["h264"].resolve().as_uri(), clips["vp9"].resolve().as_uri()
    with live_server(qa, settings(clips["h264"].parent)) as url:
        replies = queued_behind_a_held_request(url, calls, release, [(vp9, QUESTION), (h264, "what is <video> here ?"),
                                                                     (h264, QUESTION)])
    assert replies[1][0] == 400 and "special token" in replies[1][1]["error"]["message"]
    assert replies[2][0] == 200 and replies[2][1]["choices"][0]["message"]["content"] == expected(
        qa, clips["h264"])["answer"]


def test_a_clips_requests_are_answered_before_the_next_clip_is_prepared(qa, clips, held, monkeypatch):
    """Without a clip cache the decoding holds one clip at a time: a clip's requests get their answers as
    they end, before the next waiting clip is prepared."""
    release, calls = held
    h264, vp9 = clips["h264"].resolve().as_uri(), clips["vp9"].resolve().as_uri()
    replies: dict[int, tuple] = {}
    prepared, answered_first = [], []
    prepare = VideoQA.prepare_clip

    def waits_for_the_first_answer(self, *args, **kwargs):
        prepared.append(1)
        if len(prepared) == 3:  # the second waiting clip: the first clip's request should be answered already
            deadline = time.monotonic() + 10
            while 1 not in replies and time.monotonic() < deadline:
                time.sleep(0.02)
            answered_first.append(1 in replies)
        return prepare(self, *args, **kwargs)

    monkeypatch.setattr(VideoQA, "prepare_clip", waits_for_the_first_answer)
    with live_server(qa, settings(clips["h264"].parent, cache_bytes=0)) as url:
        queued_behind_a_held_request(url, calls, release, [(vp9, QUESTION), (h264, QUESTION), (vp9, "what moves ?")],
                                     replies)
    assert calls[1:] == [[[QUESTION]], [["what moves ?"]]] and answered_first == [True]
    assert all(replies[i][0] == 200 for i in range(3))


def test_a_failed_batch_fails_its_own_requests_only(qa, clips, monkeypatch):
    """Without a clip cache the decoding holds one clip at a time; the last clip's join fails (simulated):
    the requests answered before keep their answers."""
    release, calls = threading.Event(), []
    join = Answering.join

    def fails_on_boom(self, asked, *args, **kwargs):
        calls.append([list(questions) for _, questions in asked])
        release.wait(30)
        if any("boom" in q for _, questions in asked for q in questions):
            raise RuntimeError("out of memory (simulated)")
        return join(self, asked, *args, **kwargs)

    monkeypatch.setattr(Answering, "join", fails_on_boom)
    h264, vp9 = clips["h264"].resolve().as_uri(), clips["vp9"].resolve().as_uri()
    with live_server(qa, settings(clips["h264"].parent, cache_bytes=0)) as url:  # "boom ?": the second batch
        replies = queued_behind_a_held_request(url, calls, release,
                                               [(vp9, "what moves ?"), (h264, QUESTION), (vp9, "boom ?")])
    assert calls[1:] == [[[QUESTION]], [["boom ?"]]]
    assert replies[1][0] == 200 and replies[1][1]["choices"][0]["message"]["content"] == expected(
        qa, clips["h264"])["answer"]
    assert replies[2][0] == 500


def test_a_request_whose_client_left_before_its_turn_costs_nothing(qa, clips, held):
    """While the inference thread is held, a client gives up on its queued request; released, the thread
    answers the others and never runs the abandoned one."""
    release, calls = held
    first_uri, other_uri = clips["h264"].resolve().as_uri(), clips["vp9"].resolve().as_uri()
    with live_server(qa, settings(clips["h264"].parent)) as url:
        first = threading.Thread(target=post, args=(url, {"model": MODEL_NAME, "messages": video_message(first_uri)}))
        try:
            first.start()
            _wait_for(lambda: calls)
            request = urllib.request.Request(
                f"{url}/v1/chat/completions", method="POST", headers={"Content-Type": "application/json"},
                data=json.dumps({"model": MODEL_NAME, "messages": video_message(other_uri, "what moves ?")}).encode())
            with pytest.raises(TimeoutError):
                urllib.request.urlopen(request, timeout=0.5)  # gives up while queued
            _wait_for(lambda: _metric(url, 'vidsparse_requests_total{status="499"}') == 1)
        finally:
            release.set()
            first.join(60)
        code, _, _ = post(url, {"model": MODEL_NAME, "messages": video_message(first_uri, "what is happening ?")})
        assert code == 200
    assert calls == [[[QUESTION]], [["what is happening ?"]]]  # "what moves ?" about the other clip never ran


def test_a_request_past_the_timeout_is_a_504_and_the_server_goes_on(qa, clips, held):
    release, _ = held
    uri = clips["h264"].resolve().as_uri()
    with live_server(qa, settings(clips["h264"].parent, request_timeout_s=0.5)) as url:
        try:
            code, reply, _ = post(url, {"model": MODEL_NAME, "messages": video_message(uri)})
        finally:
            release.set()
        assert code == 504 and "0.5 s" in reply["error"]["message"]
        assert post(url, {"model": MODEL_NAME, "messages": video_message(uri)})[0] == 200


def test_http_urls_only_when_allowed_and_within_the_size_limit(qa, clips):
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(clips["h264"].parent))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        clip_url = f"http://127.0.0.1:{files.server_address[1]}/{clips['h264'].name}"
        body = {"model": MODEL_NAME, "messages": video_message(clip_url)}
        size = clips["h264"].stat().st_size
        allowed = settings(None)
        with live_server(qa, replace(allowed, media=replace(allowed.media, allow_http=True))) as url:
            code, reply, _ = post(url, body)
            assert code == 200 and reply["choices"][0]["message"]["content"] == expected(qa, clips["h264"])["answer"]
        too_small = replace(allowed.media, allow_http=True, max_bytes=size - 1)
        with live_server(qa, replace(allowed, media=too_small)) as url:
            code, reply, _ = post(url, body)
            assert code == 413 and "limit" in reply["error"]["message"]
        files.shutdown()


def _metric(url: str, name: str) -> float | None:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return None


def queued_behind_a_held_request(url: str, calls: list, release: threading.Event, asked: list[tuple],
                                 replies: dict[int, tuple] | None = None) -> dict[int, tuple]:
    """POST each (clip URI, question[, more body fields]) to a server whose inference thread waits for
    `release` at each call it records in `calls`: the first until the thread holds it, then the others one
    at a time, each queued before the next is sent; then release the thread. Each request's (status, body,
    headers) in `replies` (a new dict if not given), by its place in `asked`, once all are answered."""
    replies = {} if replies is None else replies

    def ask(i: int, uri: str, question: str, more: dict | None = None) -> None:
        replies[i] = post(url, {"model": MODEL_NAME, "messages": video_message(uri, question)} | (more or {}))

    threads = [threading.Thread(target=ask, args=(i, *item)) for i, item in enumerate(asked)]
    held_at = len(calls) + 1
    try:
        threads[0].start()
        _wait_for(lambda: len(calls) == held_at)
        for depth, thread in enumerate(threads[1:], 1):
            thread.start()
            _wait_for(lambda depth=depth: _metric(url, "vidsparse_queue_depth") == depth)
    finally:
        release.set()
        for thread in threads:
            thread.join(60)
    return replies


def _wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_unknown_routes_and_methods_are_openai_errors(server):
    for path, method, status in (("/v1/nothing", "GET", 404), ("/v1/chat/completions", "GET", 405),
                                 ("/v1/chat/completions/", "POST", 404)):
        request = urllib.request.Request(f"{server}{path}", method=method)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == status and json.loads(caught.value.read())["error"]["message"]


def test_options_unchanged_by_the_server_defaults(qa, clips):
    """The server's own flags are a request's defaults: a server started with stprune prunes unasked."""
    defaults = replace(settings(None).defaults, method="stprune", budget=ask_options("stprune", "25%").budget)
    with live_server(qa, settings(clips["h264"].parent, defaults=defaults)) as url:
        reply = client(url).chat.completions.create(model=MODEL_NAME,
                                                    messages=video_message(data_url(clips["h264"])))
    assert reply.model_extra["vidsparse"]["tokens"] == expected(qa, clips["h264"], method="stprune",
                                                                budget="25%")["tokens"]


def test_a_request_for_another_method_inherits_only_the_server_options_it_takes(qa, clips):
    """A server started with FastV after layer 0 and a tower cut answers a request for SparseVLM with
    SparseVLM's own stages and the whole tower, one for stprune with the cut (or without, asked null),
    and one for FastV with the server's stage (or FastV's own, asked null)."""
    defaults = replace(settings(None).defaults, method="fastv", budget=ask_options("fastv", "25%").budget,
                       prune_after=(0,), tower_cut=0)
    asked = [("sparsevlm", {}, [1], None), ("stprune", {}, [-1, 1], 0), ("stprune", {"tower_cut": None}, [-1, 1], None),
             ("fastv", {}, [0], None), ("fastv", {"prune_after": None}, [1], None)]
    with live_server(qa, settings(clips["h264"].parent, defaults=defaults)) as url:
        for method, more, stages, cut in asked:
            reply = client(url).chat.completions.create(
                model=MODEL_NAME, messages=video_message(data_url(clips["h264"])),
                extra_body={"vidsparse": {"method": method, "budget": "25%", **more}})
            stats = reply.model_extra["vidsparse"]
            assert (stats["pruning"]["stages"], stats["pruning"].get("tower_cut")) == (stages, cut), (method, more)
            alone = qa.answer(clips["h264"], QUESTION, ask_options(
                method, "25%", prune_after=[0] if stages == [0] else None, num_frames=8, max_new_tokens=4,
                tower_cut=cut)).to_dict()
            assert stats["flops"] == alone["flops"] and reply.choices[0].message.content == alone["answer"]
