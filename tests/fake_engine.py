"""A scripted stand-in for server.engine.engine.Engine, for in-process HTTP tests.

It follows the engine interface exactly (see server/api/serving.py EngineClient): `submit` validates
and returns a stream of canned events; `cancel()` is recorded so tests can see it was called.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from server.engine.types import (
    Backtrack,
    BehaviorInfo,
    EngineEvent,
    Finished,
    GenerationRequest,
    Retraction,
    SteeringReport,
    TextDelta,
    TokenLogprob,
)
from server.errors import EngineNotReadyError, InvalidRequestError, ServerError, ShuttingDownError

PROMPT_TOKENS = 7
BOS = 1  # the special token encode_prompt adds by default, as a real tokenizer's BOS


def _logprobs(texts: list[str]) -> list[TokenLogprob]:
    return [TokenLogprob(t, -0.5, list(t.encode()), [(t, -0.5, list(t.encode())), ("x", -2.0, [120])]) for t in texts]


def backtracking_script(request: GenerationRequest) -> list[EngineEvent]:
    """"Paris is" + " in Italy" (retracted) + " the capital." — final text "Paris is the capital."."""
    report = SteeringReport("fasb", ("truthfulness",), True, [Backtrack(4, 2, 0.31, 41.4, ("truthfulness",))])
    return [
        TextDelta("Paris", [1], _logprobs(["Paris"])),
        TextDelta(" is", [2], _logprobs([" is"])),
        TextDelta(" in Italy", [3, 4], _logprobs([" in", " Italy"])),
        Retraction(text=" in Italy", tokens=2, sent_tokens=2, token_index=4, probe_score=0.31, strength=41.4,
                   behaviors=("truthfulness",)),
        TextDelta(" the capital.", [5, 6], _logprobs([" the", " capital."])),
        Finished("stop", PROMPT_TOKENS, completion_tokens=4, discarded_tokens=2, steering=report),
    ]


def plain_script(request: GenerationRequest) -> list[EngineEvent]:
    """One delta per max_tokens budget, echoing the seed so choices can be told apart."""
    text = f"seed={request.sampling.seed}"
    return [TextDelta(text, [1]), Finished("length", PROMPT_TOKENS, 1, 0, None)]


@dataclass
class FakeStream:
    events: list[EngineEvent]
    delay_s: float = 0.0
    endless: bool = False  # keep sending deltas until cancelled (disconnect tests)
    cancelled: bool = False
    exhausted: bool = False
    fail_with: Exception | None = None  # raised after the first event (engine bug mid-stream)
    fail_now: Exception | None = None  # raised by the next read (the engine aborted everything)
    _sent: int = 0

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> EngineEvent:
        await asyncio.sleep(self.delay_s)
        if self.cancelled or self.exhausted:
            raise StopAsyncIteration
        if self.fail_now is not None:
            self.exhausted = True
            raise self.fail_now
        if self.fail_with is not None and self._sent == 1:
            raise self.fail_with
        if self.endless:
            self._sent += 1
            return TextDelta("tick ", [self._sent])
        event = self.events[self._sent]
        self._sent += 1
        self.exhausted = self._sent == len(self.events)
        return event

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeEngine:
    script: Callable[[GenerationRequest], list[EngineEvent]] = backtracking_script
    model_name: str = "fake-model"
    max_model_len: int = 64
    ready: bool = False
    start_gate: asyncio.Event | None = None  # start() waits for it: "the model is loading"
    submit_error: ServerError | None = None
    stream_options: dict = field(default_factory=dict)  # FakeStream keyword arguments
    submitted: list[GenerationRequest] = field(default_factory=list)
    streams: list[FakeStream] = field(default_factory=list)
    stopped: bool = False
    max_queue: int = 64
    state: str = "ok"  # what health() reports once ready
    aborted_with: Exception | None = None

    def health(self) -> str:
        return self.state if self.ready else "loading"

    def begin_drain(self) -> None:
        self.state = "draining"

    def idle(self) -> bool:
        return self.stats()["running"] == 0

    def abort_all(self, error: Exception) -> None:
        self.aborted_with = error
        for stream in self.streams:
            stream.fail_now = error

    async def start(self) -> None:
        if self.start_gate is not None:
            await self.start_gate.wait()
        self.ready = True

    async def stop(self) -> None:
        self.stopped = True

    def behaviors(self) -> list[BehaviorInfo]:
        return [BehaviorInfo("truthfulness", 24, "chat", 8.0, 0.5, 10, 0.8)]

    def encode_chat(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
    ) -> list[int]:
        text = "".join(m["role"] + m["content"] for m in messages) + ("assistant" if add_generation_prompt else "")
        return ([BOS] if add_special_tokens else []) + self._encode(text, "messages")

    def encode_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, list):
            return list(prompt)
        return ([BOS] if add_special_tokens else []) + self._encode(prompt, "prompt")

    def decode_tokens(self, token_ids: list[int]) -> str:
        """The inverse of `_encode` (one character per token id)."""
        if any(not 0 <= t < 256 for t in token_ids):
            raise InvalidRequestError("token ids must be in [0, 256)", param="tokens")
        return "".join(chr(t) for t in token_ids)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return [f"<{t}>" for t in token_ids]

    def _encode(self, text: str, param: str) -> list[int]:
        if len(text) > self.max_model_len:
            raise InvalidRequestError(f"prompt of {len(text)} tokens exceeds the context limit", param=param)
        return [ord(c) % 256 for c in text]

    def submit(self, request: GenerationRequest) -> FakeStream:
        if not self.ready:
            raise EngineNotReadyError()
        if self.submit_error is not None:
            raise self.submit_error
        if self.state == "draining":
            raise ShuttingDownError()
        behavior = request.steering.behavior if request.steering else None
        if behavior not in (None, "truthfulness"):
            raise InvalidRequestError(f"unknown steering behavior {behavior!r}", param="steering.behavior")
        room = self.max_model_len - len(request.prompt_token_ids)
        if request.sampling.max_tokens is not None and request.sampling.max_tokens > room:
            raise InvalidRequestError("max_tokens does not fit the context", param="max_tokens")
        self.submitted.append(request)
        stream = FakeStream(self.script(request), **self.stream_options)
        self.streams.append(stream)
        return stream

    def stats(self) -> dict[str, int]:
        running = sum(not (s.cancelled or s.exhausted) for s in self.streams)
        return {"waiting": 0, "running": running}
