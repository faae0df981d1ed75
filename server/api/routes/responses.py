"""POST /v1/responses (stateless)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response

from server.api.deps import EngineDep, RecordDep, check_model
from server.api.errors import ERROR_RESPONSES, error_response
from server.api.observe import RequestRecord
from server.api.responses import (
    ResponseEvents,
    ResponseObject,
    ResponsesRequest,
    ResponseState,
    final_output,
    output_items,
    responses_format,
)
from server.api.serving import (
    CLIENT_CLOSED_REQUEST,
    EngineBugError,
    GenerationStream,
    calls_cannot_be_retracted,
    collect_unless_disconnected,
    encode_chat,
    encode_off_loop_if_long,
    submit_choices,
)
from server.api.sse import sse_response
from server.api.tools import ToolStream
from server.engine.types import Finished, Retraction, TextDelta
from server.errors import ServerError

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["responses"])


@router.post("/responses", response_model=ResponseObject, responses=ERROR_RESPONSES)
async def create_response(
    body: ResponsesRequest, request: Request, engine: EngineDep, record: RecordDep
) -> Response | ResponseObject:
    """Create a model response (stateless; no store), streamed or not, with tools and text.format."""
    check_model(engine, body.model)
    record.model = body.model
    chat = body.to_chat()
    prompt = await encode_off_loop_if_long(request, encode_chat, engine, chat)
    sampling = chat.to_sampling_params()
    sampling = dataclasses.replace(sampling, response_format=responses_format(sampling.response_format))
    state = ResponseState(body, id=f"resp_{record.request_id}", model=engine.model_name)
    streams = submit_choices(engine, record.request_id, prompt, sampling, chat.to_steering_params(), 1)
    if body.stream:
        record.streamed = True
        tool_stream = ToolStream(live_calls=calls_cannot_be_retracted(chat), parse_calls=chat.calls_allowed)
        return sse_response(response_events(streams[0], ResponseEvents(state, tool_stream), record), streams)
    results = await collect_unless_disconnected(request, streams, record.observe)
    if results is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    result = results[0]
    state.items = output_items(final_output(result.text, chat.calls_allowed), result.finished)
    return state.snapshot("completed", result.finished)


async def response_events(
    stream: GenerationStream, events: ResponseEvents, record: RequestRecord
) -> AsyncIterator[dict[str, str]]:
    """The Responses event sequence of one answer; an `error` event if it fails once started."""
    finished = False
    try:
        for event in events.start():
            yield event
        async for event in stream:
            record.observe(event)
            if isinstance(event, TextDelta):
                out = events.text(event.text)
            elif isinstance(event, Retraction):
                out = events.retract(event)
            elif isinstance(event, Finished):
                out, finished = events.finish(event), True
            for item in out:
                yield item
        if not finished:
            raise EngineBugError("the answer's events ended without a Finished event")
    except Exception as exc:  # the status line is long gone: report the error in-band
        yield _error_event(events, exc)
    finally:
        stream.cancel()


def _error_event(events: ResponseEvents, exc: Exception) -> dict[str, str]:
    status, body = error_response(exc)
    if isinstance(exc, ServerError) and status < 500:
        log.warning("response stream ended by %s: %s", type(exc).__name__, exc)
    else:
        log.error("response stream failed", exc_info=exc)
    error = body.error
    return events.state.event("error", code=error.code or error.type, message=error.message, param=error.param)
