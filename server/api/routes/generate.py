"""The tail both generation routes share: run the choices, then stream them or answer once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from fastapi import Request, Response

from server.api.observe import RequestRecord
from server.api.protocol import GenerationRequestFields
from server.api.serving import (
    CLIENT_CLOSED_REQUEST,
    ChoiceResult,
    EngineClient,
    collect_unless_disconnected,
    submit_prompts,
)
from server.api.sse import ChunkBuilder, sse_response, stream_payloads
from server.engine.types import SamplingParams

Chunks = TypeVar("Chunks", bound=ChunkBuilder)
Answer = TypeVar("Answer")


async def generate(
    request: Request,
    engine: EngineClient,
    record: RequestRecord,
    body: GenerationRequestFields,
    prompts: Sequence[list[int]],
    sampling: SamplingParams,
    chunks: Chunks,
    answer: Callable[[Chunks, list[ChoiceResult]], Answer],
) -> Response | Answer:
    """Submit body.n choices per prompt (prompt-major); stream their chunks, or build the `answer`
    from their final texts."""
    streams = submit_prompts(engine, record.request_id, prompts, sampling, body.to_steering_params(), body.n)
    if body.stream:
        record.streamed = True
        return sse_response(stream_payloads(streams, chunks, record, body.include_usage, len(prompts)), streams)
    results = await collect_unless_disconnected(request, streams, record.observe)
    if results is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return answer(chunks, results)
