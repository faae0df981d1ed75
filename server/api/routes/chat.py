"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from server.api.deps import EngineDep, RecordDep, check_choices, check_model
from server.api.errors import ERROR_RESPONSES
from server.api.protocol import (
    AssistantMessage,
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from server.api.routes.generate import generate
from server.api.serving import ChoiceResult, usage_of
from server.api.sse import ChatChunks, steering_summary

router = APIRouter(prefix="/v1", tags=["chat"])


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, record: RecordDep
) -> Response | ChatCompletionResponse:
    """Create a chat completion, streamed or not; the `steering` extension controls FASB."""
    check_model(engine, body.model)
    check_choices(engine, body.n)
    record.model = body.model
    # Templating and tokenising a long prompt take a while: never on the event loop.
    prompt = await run_in_threadpool(engine.encode_chat, body.engine_messages())
    sampling = body.to_sampling_params()
    chunks = ChatChunks(id=f"chatcmpl-{record.request_id}", model=engine.model_name, with_logprobs=body.logprobs)
    return await generate(request, engine, record, body, [prompt], sampling, chunks, chat_completion)


def chat_completion(chunks: ChatChunks, results: list[ChoiceResult]) -> ChatCompletionResponse:
    choices = [
        ChatCompletionChoice(
            index=result.index,
            message=AssistantMessage(content=result.text),
            logprobs=ChatChoiceLogprobs.from_tokens(result.logprobs) if chunks.with_logprobs else None,
            finish_reason=result.finished.finish_reason,
            steering=steering_summary(result.finished),
        )
        for result in results
    ]
    usage = usage_of([result.finished for result in results])
    return ChatCompletionResponse(
        id=chunks.id, created=chunks.created, model=chunks.model, choices=choices, usage=usage
    )
