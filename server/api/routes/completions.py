"""POST /v1/completions (legacy text completions)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.api.deps import EngineDep, RecordDep, check_choices, check_model
from server.api.errors import ERROR_RESPONSES
from server.api.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from server.api.routes.generate import generate
from server.api.serving import ChoiceResult, EngineClient, encode_off_loop_if_long, usage_of
from server.api.sse import CompletionChunks, steering_summary
from server.errors import InvalidRequestError

router = APIRouter(prefix="/v1", tags=["completions"])


@router.post("/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def create_completion(
    body: CompletionRequest, request: Request, engine: EngineDep, record: RecordDep
) -> Response | CompletionResponse:
    """Continue one or more raw prompts (no chat template), streamed or not; `steering` controls
    FASB. Choice `i * n + j` is choice j of prompt i."""
    check_model(engine, body.model)
    check_choices(engine, body.n, len(body.prompt))
    record.model = body.model
    # Tokenising (and, for echo, detokenising) long prompts takes a while: off the event loop.
    prompts, echo = await encode_off_loop_if_long(request, _encode_prompts, engine, body)
    sampling = body.to_sampling_params()
    chunks = CompletionChunks(
        id=f"cmpl-{record.request_id}", model=engine.model_name, with_logprobs=sampling.logprobs, echo=echo, n=body.n
    )
    return await generate(request, engine, record, body, prompts, sampling, chunks, text_completion)


def _encode_prompts(engine: EngineClient, body: CompletionRequest) -> tuple[list[list[int]], tuple[str, ...]]:
    """Each prompt's token ids and, with `echo`, its text (token-id prompts are decoded)."""
    prompts = [engine.encode_prompt(prompt) for prompt in body.prompt]
    for ids in prompts:
        _check_room(engine, ids)
    if not body.echo:
        return prompts, ()
    texts = (p if isinstance(p, str) else engine.decode_tokens(ids) for p, ids in zip(body.prompt, prompts))
    return prompts, tuple(texts)


def _check_room(engine: EngineClient, ids: list[int]) -> None:
    # The engine checks this too when the choice is submitted, but names `messages` (chat's field).
    if len(ids) >= engine.max_model_len:
        raise InvalidRequestError(
            f"a prompt has {len(ids)} tokens; this model's context is {engine.max_model_len} tokens",
            param="prompt",
            code="context_length_exceeded",
        )


def text_completion(chunks: CompletionChunks, results: list[ChoiceResult]) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=result.index,
            text=chunks.echoed(result.index) + result.text,
            logprobs=CompletionLogprobs.from_tokens(result.logprobs) if chunks.with_logprobs else None,
            finish_reason=result.finished.finish_reason,
            steering=steering_summary(result.finished),
        )
        for result in results
    ]
    usage = usage_of([result.finished for result in results], prompts=max(1, len(results) // chunks.n))
    return CompletionResponse(id=chunks.id, created=chunks.created, model=chunks.model, choices=choices, usage=usage)
