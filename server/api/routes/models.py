"""GET /v1/models."""

from __future__ import annotations

from fastapi import APIRouter

from server.api.deps import EngineDep
from server.api.errors import ERROR_RESPONSES
from server.api.protocol import BehaviorCard, ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", responses=ERROR_RESPONSES)
async def list_models(engine: EngineDep) -> ModelList:
    """The served model, with its context limit and the steering behaviors loaded for it."""
    behaviors = [BehaviorCard.from_info(info) for info in engine.behaviors()]
    card = ModelCard(id=engine.model_name, max_model_len=engine.max_model_len, steering_behaviors=behaviors)
    return ModelList(data=[card])
