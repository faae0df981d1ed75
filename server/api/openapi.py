"""The OpenAPI document, completed with what FastAPI cannot infer: the streamed (SSE) answers.

FastAPI documents a route's `response_model`, i.e. the non-streamed JSON answer. With
`"stream": true` the same routes answer `text/event-stream`: `data: <chunk JSON>` events, retract
chunks among them (the `steering` extension, README "Streaming corrections"), then `data: [DONE]`.
The chunk schemas are added to the components and referenced from that media type, so generated
clients and API fuzzers know both answers.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server.api.protocol import ChatCompletionChunk, CompletionResponse

_STREAMS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionChunk,
    "/v1/completions": CompletionResponse,
}

_SSE_DESCRIPTION = (
    "With `stream: true`: server-sent events, each `data: <{name} JSON>` followed by a blank line, "
    "ending with `data: [DONE]`. A chunk whose choice carries `steering.type == \"retract\"` asks the "
    "client to delete `steering.retract_text` from the end of what it has shown. An error after the "
    "stream started arrives as `data: <error envelope>`, then `data: [DONE]`."
)


def describe_streams(app: FastAPI) -> None:
    """Make `app.openapi()` describe the `text/event-stream` answers of the generation routes."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, description=app.description,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, chunk in _STREAMS.items():
                ok = schema["paths"][path]["post"]["responses"]["200"]
                ok.setdefault("content", {})["text/event-stream"] = {
                    "schema": {"$ref": _add_component(components, chunk)},
                }
                ok["description"] = f"{ok.get('description', 'OK')}. " + _SSE_DESCRIPTION.format(name=chunk.__name__)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_component(components: dict[str, Any], model: type[BaseModel]) -> str:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)  # FastAPI's own entry for a shared model wins
    components.setdefault(model.__name__, schema)
    return f"#/components/schemas/{model.__name__}"
