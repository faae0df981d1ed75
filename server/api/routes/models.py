"""GET /v1/models and GET /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import EngineDep
from server.api.errors import ERROR_RESPONSES
from server.api.protocol import BehaviorCard, ModelCard, ModelList
from server.api.serving import EngineClient
from server.errors import ModelNotFoundError

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", responses=ERROR_RESPONSES)
async def list_models(engine: EngineDep) -> ModelList:
    """The served model, with its context limit and the steering behaviors loaded for it."""
    return ModelList(data=[model_card(engine)])


# `:path`: model ids are hub ids such as HuggingFaceTB/SmolLM2-135M-Instruct, with a slash.
@router.get("/models/{model:path}", responses=ERROR_RESPONSES)
async def retrieve_model(model: str, engine: EngineDep) -> ModelCard:
    """One model by id (OpenAI's retrieve-model call); 404 in the error envelope for any other id."""
    if model != engine.model_name:
        raise ModelNotFoundError(model)
    return model_card(engine)


def model_card(engine: EngineClient) -> ModelCard:
    behaviors = [BehaviorCard.from_info(info) for info in engine.behaviors()]
    return ModelCard(id=engine.model_name, max_model_len=engine.max_model_len, steering_behaviors=behaviors)
