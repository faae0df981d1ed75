"""POST /v1/completions (legacy text completions)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from server.api.deps import EngineDep, RecordDep, check_choices, check_model
from server.api.errors import ERROR_RESPONSES
from server.api.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from server.api.routes.generate import generate
from server.api.serving import ChoiceResult, usage_of
from server.api.sse import CompletionChunks, steering_summary

router = APIRouter(prefix="/v1", tags=["completions"])


@router.post("/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def create_completion(
    body: CompletionRequest, request: Request, engine: EngineDep, record: RecordDep
) -> Response | CompletionResponse:
    """Continue a raw prompt (no chat template), streamed or not; `steering` controls FASB."""
    check_model(engine, body.model)
    check_choices(engine, body.n)
    record.model = body.model
    prompt = await run_in_threadpool(engine.encode_prompt, body.prompt)  # off the event loop, as in chat
    sampling = body.to_sampling_params()
    chunks = CompletionChunks(id=f"cmpl-{record.request_id}", model=engine.model_name, with_logprobs=sampling.logprobs)
    return await generate(request, engine, record, body, prompt, sampling, chunks, text_completion)


def text_completion(chunks: CompletionChunks, results: list[ChoiceResult]) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=result.index,
            text=result.text,
            logprobs=CompletionLogprobs.from_tokens(result.logprobs) if chunks.with_logprobs else None,
            finish_reason=result.finished.finish_reason,
            steering=steering_summary(result.finished),
        )
        for result in results
    ]
    usage = usage_of([result.finished for result in results])
    return CompletionResponse(id=chunks.id, created=chunks.created, model=chunks.model, choices=choices, usage=usage)
