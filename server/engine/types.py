"""Plain value types shared by the engine and the HTTP layer.

The HTTP layer converts pydantic requests into these and turns the events back into OpenAI
chunks; nothing here imports torch or FastAPI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

# Steering's types live with steering (server/steering/types.py); re-exported for the engine and API.
from server.steering.types import Backtrack as Backtrack
from server.steering.types import SteeringMode as SteeringMode
from server.steering.types import SteeringParams as SteeringParams
from server.steering.types import SteeringReport as SteeringReport
from server.steering.types import StreamMode as StreamMode


@dataclass(frozen=True)
class ResponseFormat:
    """Structured output: a JSON object, JSON that validates against `schema` (JSON text), or text
    in a lark grammar given as `schema` (tool calls). `param`: the request field a grammar error names."""

    type: Literal["json_object", "json_schema", "lark"]
    schema: str | None = None
    param: str = "response_format.json_schema.schema"


FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ToolPrompt:
    """A chat with tools in Hugging Face's convention (`tools` as function schemas, assistant
    `tool_calls`, `tool` messages), for chat templates that render tools themselves."""

    messages: list[dict]
    tools: list[dict]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the context limit
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    # OpenAI's penalties, the common repetition_penalty extension, and logit_bias as (token id,
    # bias) pairs; all applied by server/engine/logits.py (docs/api.md).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # EOS is banned until this many tokens were generated
    response_format: ResponseFormat | None = None  # None: free text


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    # None: the request carried no `steering` object (server defaults apply, stream_mode "hold").
    steering: SteeringParams | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int] | None
    top: list[tuple[str, float, list[int] | None]] = field(default_factory=list)


@dataclass(frozen=True)
class TextDelta:
    """New text to append to what the client has shown."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Retraction:
    """Delete `text` (an exact suffix of everything sent so far) from the client's view."""

    text: str
    tokens: int  # generated tokens thrown away (the client-facing `retract_tokens`)
    sent_tokens: int  # how many of the token ids already sent in TextDeltas the text covers
    token_index: int  # tokens generated when the check fired
    probe_score: float
    strength: float
    behaviors: tuple[str, ...] = ()  # the behaviours that fired, lowest score first


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int  # tokens in the final answer
    discarded_tokens: int  # tokens generated and thrown away by backtracking
    steering: SteeringReport | None
    cached_tokens: int = 0  # prompt tokens read from the prefix cache, not computed


@dataclass(frozen=True)
class BehaviorInfo:
    """A loaded steering artifact, as listed in /v1/models and at start."""

    name: str
    num_heads: int
    prompt_format: str
    alpha: float
    threshold: float
    backtrack_tokens: int
    iti_alpha: float | None = None  # the strength `always` mode uses
    val_accuracy: float | None = None
    description: str | None = None
    heldout_auroc: float | None = None  # the probes' ensemble on held-out answers
    heldout_accuracy: float | None = None
    false_alarm_rate: float | None = None  # share of ordinary answers the monitor fires on at `threshold`


EngineEvent = Union[TextDelta, Retraction, Finished]
