"""Streamed responses: engine events -> OpenAI chunks -> server-sent events.

Chunk discipline (what clients, the OpenAI SDK included, rely on):
- chat: the first chunk of every choice carries `delta.role = "assistant"`;
- text arrives as content deltas; a backtrack is a chunk with an empty delta and a
  `steering: {"type": "retract", ...}` object telling the client which suffix to delete;
- each choice ends with exactly one chunk that has a `finish_reason` (and its steering report);
- with `stream_options.include_usage`, a last chunk with `choices: []` and the usage;
- `[DONE]` always comes last, also after an error, which is sent as an error envelope.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from server.api.errors import error_response
from server.api.observe import RequestRecord
from server.api.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    OpenAIBaseModel,
    SteeringRetract,
    SteeringSummary,
    Usage,
)
from server.api.serving import EngineBugError, GenerationStream, cancel_all, merged_events, usage_of
from server.engine.types import EngineEvent, Finished, Retraction, TextDelta
from server.errors import ServerError

log = logging.getLogger(__name__)

DONE = "[DONE]"


@dataclass
class ChoiceStreamState:
    index: int
    text_offset: int = 0  # characters the client shows now: where the next delta starts
    finished: bool = False


class ChunkBuilder(Protocol):
    """Pure functions from one event of one choice to the chunk that reports it."""

    # text and retract may return None: nothing to tell the client yet (a tool call being held).
    def role(self, index: int) -> OpenAIBaseModel | None: ...
    def text(self, choice: ChoiceStreamState, event: TextDelta) -> OpenAIBaseModel | None: ...
    def retract(self, index: int, event: Retraction) -> OpenAIBaseModel | None: ...
    def finish(self, index: int, event: Finished) -> OpenAIBaseModel: ...
    def usage(self, usage: Usage) -> OpenAIBaseModel: ...


def steering_summary(event: Finished) -> SteeringSummary | None:
    return None if event.steering is None else SteeringSummary.from_report(event.steering)


@dataclass(frozen=True)
class ChatChunks:
    """Chunks of one chat stream; every chunk repeats the stream's id, creation time and model."""

    id: str
    model: str
    with_logprobs: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def _chunk(self, choice: ChatCompletionStreamChoice) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def role(self, index: int) -> ChatCompletionChunk:
        return self._chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content="")))

    def text(self, choice: ChoiceStreamState, event: TextDelta) -> ChatCompletionChunk:
        logprobs = ChatChoiceLogprobs.from_tokens(event.logprobs or []) if self.with_logprobs else None
        delta = DeltaMessage(content=event.text)
        return self._chunk(ChatCompletionStreamChoice(index=choice.index, delta=delta, logprobs=logprobs))

    def retract(self, index: int, event: Retraction) -> ChatCompletionChunk:
        steering = SteeringRetract.from_event(event)
        return self._chunk(ChatCompletionStreamChoice(index=index, delta=DeltaMessage(), steering=steering))

    def finish(self, index: int, event: Finished) -> ChatCompletionChunk:
        choice = ChatCompletionStreamChoice(
            index=index, delta=DeltaMessage(), finish_reason=event.finish_reason, steering=steering_summary(event)
        )
        return self._chunk(choice)

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)


@dataclass(frozen=True)
class CompletionChunks:
    """Chunks of one /v1/completions stream (legacy `text_completion` objects).

    `echo`: with `echo: true`, each prompt's text, sent as the first chunk of each of its `n`
    choices (choice index // n is the prompt's index)."""

    id: str
    model: str
    with_logprobs: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    echo: tuple[str, ...] = ()
    n: int = 1

    def _chunk(self, choice: CompletionChoice) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[choice])

    def echoed(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo else ""

    def role(self, index: int) -> CompletionResponse | None:
        # Legacy completions have no roles; the first chunk is the echoed prompt, if asked for.
        # (Echo comes without logprobs, so the logprobs' text offsets need not count it.)
        return self._chunk(CompletionChoice(index=index, text=self.echoed(index))) if self.echo else None

    def text(self, choice: ChoiceStreamState, event: TextDelta) -> CompletionResponse:
        logprobs = None
        if self.with_logprobs:
            logprobs = CompletionLogprobs.from_tokens(event.logprobs or [], choice.text_offset)
        return self._chunk(CompletionChoice(index=choice.index, text=event.text, logprobs=logprobs))

    def retract(self, index: int, event: Retraction) -> CompletionResponse:
        return self._chunk(CompletionChoice(index=index, text="", steering=SteeringRetract.from_event(event)))

    def finish(self, index: int, event: Finished) -> CompletionResponse:
        choice = CompletionChoice(
            index=index, text="", finish_reason=event.finish_reason, steering=steering_summary(event)
        )
        return self._chunk(choice)

    def usage(self, usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)


def next_chunk(chunks: ChunkBuilder, choice: ChoiceStreamState, event: EngineEvent) -> OpenAIBaseModel | None:
    """The chunk reporting `event` (None: nothing to send yet), and the choice's state moved past it."""
    if isinstance(event, TextDelta):
        chunk = chunks.text(choice, event)
        choice.text_offset += len(event.text)
    elif isinstance(event, Retraction):
        chunk = chunks.retract(choice.index, event)
        choice.text_offset -= len(event.text)
    else:
        if choice.finished:
            raise EngineBugError(f"choice {choice.index} finished twice")
        chunk = chunks.finish(choice.index, event)
        choice.finished = True
    return chunk


async def stream_payloads(
    streams: Sequence[GenerationStream], chunks: ChunkBuilder, record: RequestRecord, include_usage: bool,
    prompts: int = 1,
) -> AsyncIterator[str]:
    """The `data:` payloads of one streamed response, `[DONE]` last; the streams are cancelled
    however this ends (finished, failed, or closed because the client went away). `prompts`: how
    many prompts the streams answer, prompt-major (the usage counts each prompt once)."""
    choices = [ChoiceStreamState(i) for i in range(len(streams))]
    finished: list[Finished | None] = [None] * len(streams)
    try:
        for choice in choices:
            if (first := chunks.role(choice.index)) is not None:
                yield first.model_dump_json()
        async for index, event in merged_events(streams):
            record.observe(event)
            if isinstance(event, Finished):
                finished[index] = event
            if (chunk := next_chunk(chunks, choices[index], event)) is not None:
                yield chunk.model_dump_json()
        if None in finished:
            raise EngineBugError("a choice's events ended without a Finished event")
        if include_usage:
            yield chunks.usage(usage_of(finished, prompts)).model_dump_json()
    except Exception as exc:  # the status line is long gone: report the error in-band
        yield _error_payload(exc)
    finally:
        cancel_all(streams)
    yield DONE


def _error_payload(exc: Exception) -> str:
    status, body = error_response(exc)
    if isinstance(exc, ServerError) and status < 500:
        log.warning("stream ended by %s: %s", type(exc).__name__, exc)
    else:
        log.error("stream failed", exc_info=exc)
    return body.model_dump_json()


def sse_response(payloads: AsyncIterator[str], streams: Sequence[GenerationStream]) -> EventSourceResponse:
    # sep="\n": `data: {...}\n\n`, the framing OpenAI's servers use (sse-starlette defaults to \r\n).
    # The background task cancels the streams also when the client left before `payloads` started
    # (a generator that never ran has no `finally` to run).
    return EventSourceResponse(payloads, sep="\n", background=BackgroundTask(cancel_all, streams))
