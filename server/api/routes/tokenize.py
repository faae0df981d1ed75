"""POST /tokenize and POST /detokenize (vLLM's extension endpoints, not in the OpenAI spec).

Both go through the engine, which owns the tokenizer (the HTTP layer never imports it), and run
in the thread pool like the generation routes' tokenising: a long prompt never blocks the loop.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from server.api.deps import EngineDep, check_model
from server.api.errors import ERROR_RESPONSES
from server.api.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from server.api.serving import EngineClient

router = APIRouter(tags=["tokenize"])


@router.post("/tokenize", responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, engine: EngineDep) -> TokenizeResponse:
    """The token ids of a raw `prompt`, or of `messages` as the chat template renders them."""
    if body.model is not None:
        check_model(engine, body.model)
    return await run_in_threadpool(_tokenize, engine, body)


@router.post("/detokenize", responses=ERROR_RESPONSES)
async def detokenize(body: DetokenizeRequest, engine: EngineDep) -> DetokenizeResponse:
    """The text of a list of token ids."""
    if body.model is not None:
        check_model(engine, body.model)
    return DetokenizeResponse(prompt=await run_in_threadpool(engine.decode_tokens, body.tokens))


def _tokenize(engine: EngineClient, body: TokenizeRequest) -> TokenizeResponse:
    if body.messages is not None:
        tokens = engine.encode_chat(
            body.engine_messages(),
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            add_special_tokens=bool(body.add_special_tokens),
        )
    else:
        add_special_tokens = True if body.add_special_tokens is None else body.add_special_tokens
        tokens = engine.encode_prompt(body.prompt, add_special_tokens=add_special_tokens)
    strings = engine.token_strings(tokens) if body.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens, token_strs=strings)
