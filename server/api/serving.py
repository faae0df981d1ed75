"""What both generation endpoints do with the engine: submit n choices, read their events, and
(for non-streamed answers) fold the events into final texts.

The engine interface used here is server/engine/engine.py's:
`engine.submit(GenerationRequest) -> GenerationStream`, an async iterator of TextDelta,
Retraction and Finished events with an idempotent `cancel()`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from server.api.protocol import ChatCompletionRequest, PromptTokensDetails, Usage
from server.engine.types import (
    BehaviorInfo,
    EngineEvent,
    Finished,
    GenerationRequest,
    Retraction,
    SamplingParams,
    SteeringParams,
    TextDelta,
    TokenLogprob,
    ToolPrompt,
)


class GenerationStream(Protocol):
    """Events of one engine request, ending after Finished; `cancel()` is idempotent."""

    def __aiter__(self) -> AsyncIterator[EngineEvent]: ...
    async def __anext__(self) -> EngineEvent: ...
    def cancel(self) -> None: ...


class EngineClient(Protocol):
    """What the HTTP layer needs of server.engine.engine.Engine (kept structural, so that this
    package never imports the engine module and, through it, torch)."""

    ready: bool
    model_name: str
    max_model_len: int
    max_queue: int

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def health(self) -> str: ...  # "loading" | "ok" | "draining" | "dead" | "stalled"
    def begin_drain(self) -> None: ...
    def idle(self) -> bool: ...
    def abort_all(self, error: Exception) -> None: ...
    def behaviors(self) -> list[BehaviorInfo]: ...
    def encode_chat(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
        tools: ToolPrompt | None = None,
    ) -> list[int]: ...
    def encode_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]: ...
    def decode_tokens(self, token_ids: list[int]) -> str: ...
    def token_strings(self, token_ids: list[int]) -> list[str]: ...
    def submit(self, request: GenerationRequest) -> GenerationStream: ...
    def stats(self) -> dict[str, int]: ...


CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client went away before the answer"


class EngineBugError(RuntimeError):
    """The engine broke its event contract; reported to the client as a 500."""


def submit_choices(
    engine: EngineClient,
    request_id: str,
    prompt_token_ids: list[int],
    sampling: SamplingParams,
    steering: SteeringParams | None,
    n: int,
) -> list[GenerationStream]:
    """One engine request per choice; choice i samples with seed + i so choices differ yet repeat."""
    streams: list[GenerationStream] = []
    try:
        for i in range(n):
            seed = None if sampling.seed is None else sampling.seed + i
            choice_id = request_id if n == 1 else f"{request_id}-{i}"
            choice_sampling = dataclasses.replace(sampling, seed=seed)
            streams.append(engine.submit(GenerationRequest(choice_id, prompt_token_ids, choice_sampling, steering)))
    except BaseException:
        cancel_all(streams)  # e.g. the queue filled up at choice 3: drop choices 0-2 too
        raise
    return streams


def submit_prompts(
    engine: EngineClient,
    request_id: str,
    prompts: Sequence[list[int]],
    sampling: SamplingParams,
    steering: SteeringParams | None,
    n: int,
) -> list[GenerationStream]:
    """n choices for each prompt, prompt-major: choice j of prompt i is stream i * n + j."""
    if len(prompts) == 1:
        return submit_choices(engine, request_id, prompts[0], sampling, steering, n)
    streams: list[GenerationStream] = []
    try:
        for i, prompt in enumerate(prompts):
            streams += submit_choices(engine, f"{request_id}-p{i}", prompt, sampling, steering, n)
    except BaseException:
        cancel_all(streams)
        raise
    return streams


def cancel_all(streams: Sequence[GenerationStream]) -> None:
    for stream in streams:
        stream.cancel()


async def _next_event(stream: GenerationStream) -> EngineEvent:
    return await stream.__anext__()


async def merged_events(streams: Sequence[GenerationStream]) -> AsyncIterator[tuple[int, EngineEvent]]:
    """(choice index, event) from all streams as they arrive, each stream's events in order."""
    if len(streams) == 1:  # one choice, nearly every request: no task and no wait() per event
        async for event in streams[0]:
            yield 0, event
        return
    pending = {asyncio.ensure_future(_next_event(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                try:
                    event = task.result()
                except StopAsyncIteration:
                    continue
                yield index, event
                pending[asyncio.ensure_future(_next_event(streams[index]))] = index
    finally:
        for task in pending:
            task.cancel()


@dataclass
class ChoiceResult:
    """One choice of a non-streamed answer, built by applying its events in order."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: Finished | None = None

    def apply(self, event: EngineEvent) -> None:
        if isinstance(event, TextDelta):
            self.text += event.text
            self.logprobs.extend(event.logprobs or ())
        elif isinstance(event, Retraction):
            self._retract(event)
        elif isinstance(event, Finished):
            self.finished = event

    def _retract(self, event: Retraction) -> None:
        if not self.text.endswith(event.text):
            raise EngineBugError(f"retraction {event.text!r} is not a suffix of the text sent so far")
        self.text = self.text[: len(self.text) - len(event.text)]
        if self.logprobs and event.sent_tokens > 0:  # [-0:] would clear the whole list
            del self.logprobs[-event.sent_tokens :]


async def collect_choices(
    streams: Sequence[GenerationStream], on_event: Callable[[EngineEvent], None] | None = None
) -> list[ChoiceResult]:
    """Run every choice to its Finished event; the streams are cancelled however this ends."""
    results = [ChoiceResult(i) for i in range(len(streams))]
    try:
        async for index, event in merged_events(streams):
            if on_event is not None:
                on_event(event)
            results[index].apply(event)
    finally:
        cancel_all(streams)
    for result in results:
        if result.finished is None:
            raise EngineBugError(f"choice {result.index} ended without a Finished event")
    return results


async def collect_unless_disconnected(
    request: Request, streams: Sequence[GenerationStream], on_event: Callable[[EngineEvent], None] | None = None
) -> list[ChoiceResult] | None:
    """collect_choices, or None when the client goes away first: its generations stop at once
    instead of running to max_tokens for nobody."""
    work = asyncio.ensure_future(collect_choices(streams, on_event))
    watch = asyncio.ensure_future(_client_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()  # unwinding it runs collect_choices' finally, which cancels the streams
    return work.result() if work.done() else None


async def _client_disconnected(request: Request) -> None:
    # The body has been read already, so the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage_of(finished: Sequence[Finished], prompts: int = 1) -> Usage:
    """Usage over all choices, in choice order (prompt-major, as many per prompt): each prompt
    counts once, answers and discarded tokens add up."""
    per_prompt = max(1, len(finished) // prompts)
    prompt = sum(f.prompt_tokens for f in finished[::per_prompt])
    completion = sum(f.completion_tokens for f in finished)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(f.cached_tokens for f in finished[::per_prompt])),
        discarded_tokens=sum(f.discarded_tokens for f in finished),
    )


# A request body up to this size is templated and tokenised on the event loop: a one-line prompt
# takes 0.2 ms, 2,000 characters 1 ms (SmolLM2's tokenizer, 2-core EPYC), while the two thread hops
# of doing it off the loop add ~0.4 ms to every request's time to first token.
INLINE_ENCODE_BYTES = 2048

T = TypeVar("T")


async def encode_off_loop_if_long(request: Request, encode: Callable[..., T], *args) -> T:
    """`encode(*args)`: on a worker thread when the body is long (or of unknown length), so a long
    prompt never stalls the other streams; inline when it is short."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) <= INLINE_ENCODE_BYTES:
        return encode(*args)
    return await run_in_threadpool(encode, *args)


def encode_chat(engine: EngineClient, body: ChatCompletionRequest) -> list[int]:
    """The prompt: the generic tool format, or the template's own when it renders tools (engine's pick)."""
    messages, tools = body.engine_messages(), body.tool_prompt()
    return engine.encode_chat(messages) if tools is None else engine.encode_chat(messages, tools=tools)


def calls_cannot_be_retracted(body: ChatCompletionRequest) -> bool:
    # Without a `steering` object the engine holds text back instead of retracting it.
    return body.steering is None or body.steering.stream_mode == "hold"
