"""A request's answer as it is decoded: the text pieces that are safe to send (none that a later token
or a stop sequence could take back), and whether decoding should go on (not past a stop sequence, nor
for a client that has gone). Called by the inference thread with each token of the answer."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

Send = Callable[[str], None]  # a piece of the answer's text, from whichever thread has it

_LAST_SPACE = re.compile(r"\s(?=\S*$)")


def answer_text(answer: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The answer cut before its first stop sequence, and whether one was found."""
    cuts = [answer.find(stop) for stop in stops if stop in answer]
    return (answer[: min(cuts)], True) if cuts else (answer, False)


def settled(text: str, stops: tuple[str, ...]) -> str:
    """The part of a partial answer no later token can change: up to its last space (the next token may
    continue the last word, complete a character split between tokens, or the tokenizer's clean-up
    take the space before a punctuation mark), and short of any end of that part that could begin a
    stop sequence (which may go on past the space)."""
    space = _LAST_SPACE.search(text)
    head = text[: space.start()] if space else ""
    end = len(head)
    for stop in stops:
        for length in range(min(len(stop) - 1, len(head)), 0, -1):
            if head.endswith(stop[:length]):
                end = min(end, len(head) - length)
                break
    return head[:end]


class AnswerFeed:
    """One answer's tokens, turned into text pieces for `send` (None: nothing is streamed) as they come."""

    def __init__(self, decode_text: Callable[[list[int]], str], stops: tuple[str, ...], send: Send | None):
        self.decode_text, self.stops, self.send = decode_text, stops, send
        self.tokens: list[int] = []
        self.sent = ""
        self.left = threading.Event()

    def leave(self) -> None:
        """The client has gone: decoding stops at its next token."""
        self.left.set()

    def token(self, token: int) -> bool:
        """Take the answer's next token; whether decoding should go on."""
        if self.left.is_set():
            return False
        self.tokens.append(token)
        if self.send is None and not self.stops:  # nothing to send or look for: no text to decode
            return True
        text, stopped = answer_text(self.decode_text(self.tokens), self.stops)
        if self.send is not None:
            ready = text if stopped else settled(text, self.stops)
            if len(ready) > len(self.sent):
                self.send(ready[len(self.sent) :])
                self.sent = ready
        return not stopped
