"""OpenAI request and response schemas (pydantic v2), one class per object, plus our extensions.

Requests convert themselves into the engine's plain value types (server/engine/types.py), so
routes stay thin and the engine never sees pydantic. Ranges live in `Field(ge=, le=)`; anything
pydantic rejects becomes a 400 whose `param` is the dotted path of the field (server/api/errors.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

from server.api import tools as tools_module
from server.engine.types import (
    Backtrack,
    BehaviorInfo,
    FinishReason,
    ResponseFormat,
    Retraction,
    SamplingParams,
    SteeringMode,
    SteeringParams,
    SteeringReport,
    StreamMode,
    TokenLogprob,
    ToolPrompt,
)
from server.errors import InvalidRequestError
from server.steering.types import STEERING_MODES

# Upper bounds on what one request may ask for, so that no value can overflow a tensor or keep the
# engine busy for ever (docs/operations.md "Reliability"). Lengths (max_tokens) are checked against
# the context.
# Every choice (n per prompt) takes a place in the engine's queue, so `--max-queue` is the real
# limit on n x prompts (server/api/deps.py check_choices); these caps only bound the request itself.
MAX_CHOICES = 128  # OpenAI's own cap on n
MAX_PROMPTS = 128  # prompts in one /v1/completions request
# Stop strings are matched on every new token of every running sequence (server/engine/stops.py):
# per token, one automaton step per character of the longest string plus one substring search per
# string; the automaton takes memory and build time in proportion to the total characters. 16
# strings of 256 characters: ~0.1 ms per token, worst inputs included, ~1 MB and ~10 ms once per
# request (bench/bench_stops.py; docs/operations.md "Reliability").
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_TOKENS = 2**31 - 1
MAX_TOP_K = 2**20  # above any vocabulary; the engine clamps it to the model's vocabulary size
MAX_ALPHA = 1000.0  # the paper's largest alpha is 60; beyond this a model only emits noise
MAX_BACKTRACK_TOKENS = 256
MAX_BACKTRACKS = 32
MAX_NUM_HEADS = 4096
MAX_LOGIT_BIAS = 1024  # token ids one request may bias
MAX_REPETITION_PENALTY = 10.0
MAX_SCHEMA_CHARS = 100_000  # a response_format JSON schema, serialised
NOT_SUPPORTED = "not supported by this server"


class OpenAIBaseModel(BaseModel):
    # Clients send many optional fields we have no use for (user, metadata, store, ...); like the
    # OpenAI server we ignore unknown top-level keys. Fields that would change the output if we
    # ignored them are declared and rejected explicitly instead. NaN and ±Infinity (which Python's
    # JSON parser accepts) are never a valid number here.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    # Optional fields left out of the JSON when None, rather than sent as null: our extensions
    # (so plain OpenAI objects stay plain) and stream deltas (`delta: {}` means "nothing new").
    _omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_omitted_nones(self, handler):
        data = handler(self)
        for name in self._omit_if_none:
            if data.get(name) is None:
                data.pop(name, None)
        return data


# --------------------------------------------------------------------------- requests


class RequestModel(OpenAIBaseModel):
    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # The OpenAI spec makes optional fields nullable, and clients do send `"n": null`.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class SteeringRequest(RequestModel):
    """The `steering` request object (not in the OpenAI spec). None: the server's default."""

    # A typo in a steering knob must not silently fall back to a default: 400 naming the key.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    mode: SteeringMode | None = Field(None, description=" | ".join(STEERING_MODES))
    behavior: str | list[str] | None = Field(
        None, description="which loaded artifact steers (see /v1/models), or a list of them monitored at once: "
        "a backtrack steers with those that fired, each at its own strength"
    )
    alpha: float | None = Field(None, ge=0, le=MAX_ALPHA, description="steering strength")
    threshold: float | None = Field(None, ge=0, le=1, description="backtrack when P(desired) falls below it")
    backtrack_tokens: int | None = Field(
        None, ge=1, le=MAX_BACKTRACK_TOKENS, description="tokens dropped per backtrack; check interval"
    )
    num_heads: int | None = Field(None, ge=1, le=MAX_NUM_HEADS, description="use the artifact's top n heads")
    adaptive: bool | None = Field(None, description="strength alpha*(1-p) instead of alpha")
    max_backtracks: int | None = Field(None, ge=0, le=MAX_BACKTRACKS, description="interventions allowed per answer")
    stream_mode: StreamMode | None = Field(None, description="retract: send and correct; hold: delay s tokens")
    return_scores: bool = Field(False, description="report the probe score of every answer token")

    @field_validator("behavior")
    @classmethod
    def _some_behavior(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not value:
            raise ValueError("name at least one behavior, or leave the field out for the server's default")
        return value

    def to_params(self) -> SteeringParams:
        values = self.model_dump()
        if isinstance(values["behavior"], list):
            values["behavior"] = tuple(values["behavior"])
        return SteeringParams(**values)


def _valid_unicode(text: str) -> str:
    # JSON can carry a lone surrogate ("\ud800"), which no tokenizer can encode: say so here
    # rather than let the tokenizer fail with its own message.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise ValueError(f"not valid Unicode: unpaired surrogate {bad!r} at character {exc.start}") from None
    return text


UnicodeText = Annotated[str, AfterValidator(_valid_unicode)]


class TextContentPart(RequestModel):
    type: Literal["text"]
    text: UnicodeText


_CONTENT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                "required": ["type", "text"],
            },
        },
    ],
    "title": "Content",
}


# ----- tool calling (OpenAI's `tools`; server/api/tools.py renders, constrains and parses calls)

MAX_TOOLS = 128
MAX_TOOL_SCHEMA_CHARS = 100_000  # all tools' parameter schemas, serialised


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None  # arguments always follow the schema: the grammar enforces it


class ChatTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCallRequest(RequestModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_arguments(cls, value: str) -> str:
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"must be JSON text: {exc}") from None
        except RecursionError:
            raise ValueError("is nested too deeply") from None
        return value


class ToolCallRequest(RequestModel):
    """An earlier assistant call, in the chat history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallRequest


def check_tools(tools: list[ChatTool]) -> list[ChatTool]:
    names = [tool.function.name for tool in tools]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"function names must be unique; repeated: {', '.join(repeated)}")
    for tool in tools:
        if tool.function.parameters.get("type", "object") != "object":
            raise ValueError(f"function {tool.function.name!r}: `parameters` must be a JSON schema of type object")
        try:
            tools_module.closed_objects(tool.function.parameters)  # what the grammar will compile
        except RecursionError:
            raise ValueError(f"function {tool.function.name!r}: `parameters` is nested too deeply") from None
    if len(json.dumps([tool.function.parameters for tool in tools])) > MAX_TOOL_SCHEMA_CHARS:
        raise ValueError(f"the tools' parameter schemas are longer than {MAX_TOOL_SCHEMA_CHARS} characters")
    return tools


def check_tool_choice(choice: ToolChoice | None, tools: list[ChatTool] | None) -> ToolChoice | None:
    # Refused rather than ignored: a client that relies on a forced call must find out.
    if choice not in (None, "none") and not tools:
        raise ValueError("requires `tools`")
    named = tools_module.choice_name(choice)
    if named is not None and named not in [tool.function.name for tool in tools or ()]:
        raise ValueError(f"names the function {named!r}, which is not in `tools`")
    return choice


# ----- end of tool calling


class RequestMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A plain string arrives as one text part, so every error inside a part list has a clean
    # path such as messages.0.content.1.type. The schema says what clients may send: either form.
    content: Annotated[list[TextContentPart], WithJsonSchema(_CONTENT_SCHEMA)]
    name: str | None = None
    tool_calls: list[ToolCallRequest] | None = Field(None, max_length=MAX_TOOLS)  # assistant messages
    # tool messages: the call this is the result of (checked even when left out)
    tool_call_id: str | None = Field(None, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _calls_need_no_content(cls, data: Any) -> Any:
        # OpenAI sends an assistant turn that only calls tools with `content: null`.
        if isinstance(data, dict) and data.get("tool_calls") and data.get("content") is None:
            return {**data, "content": ""}
        return data

    @field_validator("tool_calls")
    @classmethod
    def _calls_by_assistant(cls, value: list[ToolCallRequest] | None, info: ValidationInfo) -> Any:
        if value and info.data.get("role") != "assistant":
            raise ValueError("only `assistant` messages carry `tool_calls`")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _tool_message_names_its_call(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not value:
            raise ValueError("a `tool` message needs the `tool_call_id` of the call it answers")
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _string_as_one_part(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if not isinstance(value, list):
            raise ValueError("must be a string or a list of text content parts")
        return value

    def to_engine(self, tool_name: str | None = None) -> dict[str, str]:
        # `developer` is OpenAI's newer name for `system`; chat templates only know the latter.
        role = "system" if self.role == "developer" else self.role
        text = "\n".join(part.text for part in self.content)
        if self.role == "tool":  # the generic tool format (server/api/tools.py): a user turn
            return {"role": "user", "content": tools_module.render_tool_result(tool_name, text)}
        if self.tool_calls:
            text = "\n".join(t for t in (text, tools_module.render_calls(self.tool_calls)) if t)
        return {"role": role, "content": text}


class StreamOptions(RequestModel):
    include_usage: bool = False


class JsonSchemaFormat(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    # `schema` would shadow a BaseModel attribute: stored as json_schema, sent and read as "schema".
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the schema is always enforced (docs/api.md)

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


class ResponseFormatRequest(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormatRequest:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' requires a `json_schema` object with a `schema`")
        return self

    def to_engine(self) -> ResponseFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat("json_object")
        schema = json.dumps(self.json_schema.json_schema)  # key order kept: it is the order of the output
        if len(schema) > MAX_SCHEMA_CHARS:
            raise ValueError(f"the JSON schema is longer than {MAX_SCHEMA_CHARS} characters")
        return ResponseFormat("json_schema", schema)


StopSequence = Annotated[UnicodeText, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class GenerationRequestFields(RequestModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    stop: list[StopSequence] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # a 64-bit integer, as OpenAI's
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # token id (as a string, as OpenAI's) -> bias added to its logit; -100 bans, 100 forces
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    response_format: ResponseFormatRequest | None = None
    user: str | None = None

    # not in the OpenAI spec
    top_k: int | None = Field(
        None, ge=0, le=MAX_TOP_K, description="(extension) sample from the k most likely tokens; 0: all"
    )
    ignore_eos: bool = Field(False, description="(extension) keep generating past end-of-sequence")
    repetition_penalty: float | None = Field(
        None, gt=0, le=MAX_REPETITION_PENALTY,
        description="(extension) divide positive / multiply negative logits of tokens seen in prompt or answer; 1: off",
    )
    min_tokens: int = Field(
        0, ge=0, le=MAX_TOKENS, description="(extension) no end-of-sequence before this many tokens"
    )
    steering: SteeringRequest | None = Field(None, description="(extension) FASB steering for this request")

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when `stream` is true")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"keys must be token ids written as strings (e.g. \"1234\"), got {key[:20]!r}")
        return value

    @field_validator("response_format")
    @classmethod
    def _response_format_compiles(cls, value: ResponseFormatRequest | None) -> ResponseFormatRequest | None:
        if value is not None:
            value.to_engine()  # size check here, so that it is a 400 naming the field
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _sampling(self, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=tuple(self.stop),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=tuple(sorted((int(k), float(v)) for k, v in (self.logit_bias or {}).items())),
            min_tokens=self.min_tokens,
            response_format=None if self.response_format is None else self.response_format.to_engine(),
        )

    def to_steering_params(self) -> SteeringParams | None:
        """None when the request had no `steering` object (the server's defaults, stream_mode hold)."""
        return None if self.steering is None else self.steering.to_params()


class ChatCompletionRequest(GenerationRequestFields):
    messages: list[RequestMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    # False unless asked (as llama.cpp): small models, once allowed, repeat a call until max_tokens.
    parallel_tool_calls: bool = False
    # The legacy function-calling API (message.function_call) is refused: use `tools`.
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("requires `logprobs` to be true")
        return value

    @field_validator("tools")
    @classmethod
    def _valid_tools(cls, value: list[ChatTool] | None) -> list[ChatTool] | None:
        return None if value is None else check_tools(value)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, value: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        return check_tool_choice(value, info.data.get("tools"))

    @field_validator("functions", "function_call")
    @classmethod
    def _no_legacy_functions(cls, value: Any) -> Any:
        if value:
            raise ValueError(f"{NOT_SUPPORTED} (the legacy function-calling API): use `tools` and `tool_choice`")
        return value

    @model_validator(mode="after")
    def _tools_alone(self) -> ChatCompletionRequest:
        # A call's grammar and a response_format grammar cannot both hold; logprobs would cover the
        # call's markup, which the client never sees.
        if self.calls_allowed and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("`response_format` cannot be combined with `tools` (unless tool_choice is none)")
        if self.calls_allowed and self.logprobs:
            raise ValueError(f"`logprobs` together with `tools` is {NOT_SUPPORTED}")
        return self

    @property
    def calls_allowed(self) -> bool:
        """The model may call tools: there are some and tool_choice is not `none`."""
        return bool(self.tools) and self.tool_choice != "none"

    def engine_messages(self) -> list[dict[str, str]]:
        """The messages in the generic tool format; raises InvalidRequestError for a tool result
        whose call is not in the history."""
        names: dict[str, str] = {}
        messages = [{"role": "system", "content": tools_module.tools_system_block(self.tools)}] if self.tools else []
        for i, message in enumerate(self.messages):
            names.update({call.id: call.function.name for call in message.tool_calls or ()})
            if message.role == "tool" and message.tool_call_id not in names:
                raise InvalidRequestError(
                    f"no assistant message before this one has a tool call with id {message.tool_call_id!r}",
                    param=f"messages.{i}.tool_call_id",
                )
            messages.append(message.to_engine(names.get(message.tool_call_id or "")))
        return _merge_leading_system(messages)

    def tool_prompt(self) -> ToolPrompt | None:
        """The chat for a template that renders tools itself (the engine picks it or the generic
        messages); None without tools."""
        if not self.tools:
            return None
        tools = [tool.model_dump(exclude_none=True) for tool in self.tools]
        return ToolPrompt(tools_module.template_messages(self.messages), tools)

    def to_sampling_params(self, default_max_tokens: int | None = None) -> SamplingParams:
        """`default_max_tokens` None: the engine's default, capped to the room the prompt leaves."""
        # max_completion_tokens is the newer name; when both are given it is the one OpenAI honours.
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        sampling = self._sampling(max_tokens, self.logprobs, self.top_logprobs or 0)
        calls = tools_module.tool_call_format(self.tools or [], self.tool_choice, self.parallel_tool_calls)
        return sampling if calls is None else dataclasses.replace(sampling, response_format=calls)


def _merge_leading_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    # The tools' block and the client's own system text go in one system turn: many templates
    # allow only one, first.
    if len(messages) > 1 and messages[0]["role"] == messages[1]["role"] == "system":
        merged = {"role": "system", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        return [merged, *messages[2:]]
    return messages


PromptIds = list[int]

_PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_PROMPTS},
        {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        {
            "type": "array",
            "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
            "minItems": 1,
            "maxItems": MAX_PROMPTS,
        },
    ],
    "title": "Prompt",
}


def _prompt_list(value: Any) -> list[str | PromptIds]:
    """OpenAI's four prompt forms as one list of prompts: a string, a list of strings, a list of
    token ids (one prompt), or a list of token-id lists."""
    if isinstance(value, str):
        return [_valid_unicode(value)]
    if not isinstance(value, list) or not value:
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists")
    if all(_is_token_id(t) for t in value):
        return [value]
    if len(value) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
    if all(isinstance(p, str) for p in value):
        return [_valid_unicode(p) for p in value]
    if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in value):
        return value
    raise ValueError(
        "must be a string, a list of strings, a non-empty list of token ids or a list of non-empty token-id "
        "lists (one form per request)"
    )


def _is_token_id(value: Any) -> bool:
    return type(value) is int  # not bool, which is an int subclass


class CompletionRequest(GenerationRequestFields):
    # Always a list of prompts once validated; choices are indexed prompt-major (prompt i, choice j
    # -> index i * n + j), as OpenAI does.
    prompt: Annotated[list[str | PromptIds], WithJsonSchema(_PROMPT_SCHEMA)]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        return _prompt_list(value)

    @field_validator("echo")
    @classmethod
    def _echo_without_logprobs(cls, value: bool, info: ValidationInfo) -> bool:
        # OpenAI would add the prompt tokens' logprobs; prefill does not compute them (docs/api.md
        # "Differences from the OpenAI API"), and leaving them out silently would misalign the lists.
        if value and info.data.get("logprobs") is not None:
            raise ValueError(f"together with `logprobs` is {NOT_SUPPORTED} (no prompt-token logprobs)")
        return value

    @field_validator("suffix")
    @classmethod
    def _unsupported_if_set(cls, value: Any) -> Any:
        if value:
            raise ValueError(NOT_SUPPORTED)
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError(f"{NOT_SUPPORTED}; use n")
        return value

    def to_sampling_params(self, default_max_tokens: int | None = None) -> SamplingParams:
        """`default_max_tokens` None: the engine's default, capped to the room the prompt leaves."""
        # Legacy logprobs=k: the sampled token's logprob plus the k most likely alternatives.
        return self._sampling(self.max_tokens or default_max_tokens, self.logprobs is not None, self.logprobs or 0)


class TokenizeRequest(RequestModel):
    """POST /tokenize (vLLM's shape; not in the OpenAI spec): either a raw `prompt`, or chat
    `messages` as the chat template renders them."""

    model: str | None = None
    prompt: UnicodeText | None = Field(None, description="raw text to tokenize")
    messages: list[RequestMessage] | None = Field(
        None, min_length=1, validate_default=True, description="chat messages to template, then tokenize"
    )
    add_generation_prompt: bool = Field(True, description="(messages) end with the assistant's turn header")
    continue_final_message: bool = Field(False, description="(messages) leave the last, assistant message open")
    add_special_tokens: bool | None = Field(
        None, description="add the tokenizer's special tokens (e.g. BOS); default: true for prompt, false for messages"
    )
    return_token_strs: bool = Field(False, description="also return each token's string")
    tools: list[dict[str, Any]] | None = None

    @field_validator("messages")
    @classmethod
    def _prompt_or_messages(cls, value: list[RequestMessage] | None, info: ValidationInfo) -> Any:
        has_prompt = info.data.get("prompt") is not None
        if value is None and not has_prompt and "prompt" in info.data:
            raise ValueError("give either `prompt` (raw text) or `messages` (a chat)")
        if value is not None and has_prompt:
            raise ValueError("give either `prompt` or `messages`, not both")
        return value

    @field_validator("continue_final_message")
    @classmethod
    def _not_both(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("add_generation_prompt"):
            raise ValueError("cannot be combined with `add_generation_prompt` (set that to false)")
        return value

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: Any) -> Any:
        if value:
            raise ValueError(NOT_SUPPORTED)
        return value

    def engine_messages(self) -> list[dict[str, str]]:
        return [message.to_engine() for message in self.messages or ()]


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


# --------------------------------------------------------------------------- responses


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(OpenAIBaseModel):
    cached_tokens: int = Field(0, description="prompt tokens read from the prefix cache instead of computed")


class Usage(OpenAIBaseModel):
    prompt_tokens: int
    completion_tokens: int  # tokens in the final answers, as in OpenAI
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    # not in the OpenAI spec
    discarded_tokens: int = Field(0, description="(extension) tokens generated, then retracted by backtracking")


class BacktrackInfo(OpenAIBaseModel):
    token_index: int
    tokens_retracted: int
    probe_score: float
    strength: float
    behavior: str | None = Field(None, description="the behaviour that fired (the lowest score when several did)")
    behaviors: list[str] = Field(default_factory=list, description="every behaviour that fired, lowest score first")

    @classmethod
    def from_backtrack(cls, b: Backtrack) -> BacktrackInfo:
        return cls(token_index=b.token_index, tokens_retracted=b.tokens_retracted, probe_score=b.probe_score,
                   strength=b.strength, behavior=b.behaviors[0] if b.behaviors else None, behaviors=list(b.behaviors))


class SteeringSummary(OpenAIBaseModel):
    """Per-choice steering report (not in the OpenAI spec), on the message or the finish chunk."""

    _omit_if_none = frozenset({"scores", "behavior_scores"})

    mode: SteeringMode
    behavior: str | None = Field(description="the first behaviour monitored or steered")
    behaviors: list[str] = Field(default_factory=list, description="every behaviour monitored or steered")
    intervened: bool
    backtracks: list[BacktrackInfo]
    scores: list[float] | None = Field(
        None, description="probe score per answer token (return_scores); the lowest over behaviours"
    )
    behavior_scores: dict[str, list[float]] | None = Field(
        None, description="per behaviour, its probe score per answer token (return_scores, several behaviours)"
    )

    @classmethod
    def from_report(cls, report: SteeringReport) -> SteeringSummary:
        return cls(
            mode=report.mode,
            behavior=report.behavior,
            behaviors=list(report.behaviors),
            intervened=report.intervened,
            backtracks=[BacktrackInfo.from_backtrack(b) for b in report.backtracks],
            scores=report.scores,
            behavior_scores=report.behavior_scores,
        )


class SteeringRetract(OpenAIBaseModel):
    """A streamed correction (not in the OpenAI spec): delete `retract_text` from the end."""

    type: Literal["retract"] = "retract"
    retract_tokens: int
    retract_text: str
    probe_score: float
    strength: float
    behavior: str | None = None  # the behaviour that fired (the lowest score when several did)
    behaviors: list[str] = Field(default_factory=list)  # every behaviour that fired

    @classmethod
    def from_event(cls, event: Retraction) -> SteeringRetract:
        return cls(
            retract_tokens=event.tokens,
            retract_text=event.text,
            probe_score=event.probe_score,
            strength=event.strength,
            behavior=event.behaviors[0] if event.behaviors else None,
            behaviors=list(event.behaviors),
        )


class ChatTopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatChoiceLogprobs(OpenAIBaseModel):
    content: list[ChatLogprob] | None

    @classmethod
    def from_tokens(cls, entries: list[TokenLogprob]) -> ChatChoiceLogprobs:
        return cls(content=[_chat_logprob(entry) for entry in entries])


def _chat_logprob(entry: TokenLogprob) -> ChatLogprob:
    top = [ChatTopLogprob(token=token, logprob=logprob, bytes=raw) for token, logprob, raw in entry.top]
    return ChatLogprob(token=entry.token, logprob=entry.logprob, bytes=entry.bytes, top_logprobs=top)


ChatFinishReason = Literal["stop", "length", "tool_calls"]


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(OpenAIBaseModel):
    _omit_if_none = frozenset({"tool_calls"})

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatCompletionChoice(OpenAIBaseModel):
    _omit_if_none = frozenset({"steering"})

    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: ChatFinishReason
    steering: SteeringSummary | None = Field(None, description="(extension) what steering did")


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class DeltaFunctionCall(OpenAIBaseModel):
    _omit_if_none = frozenset({"name"})

    name: str | None = None
    arguments: str = ""


class DeltaToolCall(OpenAIBaseModel):
    """A piece of a streamed call: its first piece has id, type and name; the rest add arguments."""

    _omit_if_none = frozenset({"id", "type"})

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(OpenAIBaseModel):
    _omit_if_none = frozenset({"role", "content", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatCompletionStreamChoice(OpenAIBaseModel):
    _omit_if_none = frozenset({"steering"})

    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: ChatFinishReason | None = None
    steering: SteeringRetract | SteeringSummary | None = Field(
        None, description="(extension) a retraction, or the choice's report on its finish chunk"
    )


class ChatCompletionChunk(OpenAIBaseModel):
    _omit_if_none = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Usage | None = None


class CompletionLogprobs(OpenAIBaseModel):
    """The legacy /v1/completions logprobs layout: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    @classmethod
    def from_tokens(cls, entries: list[TokenLogprob], text_offset: int = 0) -> CompletionLogprobs:
        """`text_offset`: where the first entry's token starts in the choice's text."""
        logprobs = cls()
        for entry in entries:
            logprobs.tokens.append(entry.token)
            logprobs.token_logprobs.append(entry.logprob)
            logprobs.top_logprobs.append({token: logprob for token, logprob, _ in entry.top})
            logprobs.text_offset.append(text_offset)
            text_offset += len(entry.token)
        return logprobs


class CompletionChoice(OpenAIBaseModel):
    _omit_if_none = frozenset({"steering"})

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None
    steering: SteeringRetract | SteeringSummary | None = Field(None, description="(extension) see chat")


class CompletionResponse(OpenAIBaseModel):
    """A `text_completion`; OpenAI streams the same object, with `usage` only on the last one."""

    _omit_if_none = frozenset({"usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class BehaviorCard(OpenAIBaseModel):
    name: str
    num_heads: int
    prompt_format: str
    alpha: float = Field(description="recommended FASB strength")
    threshold: float
    backtrack_tokens: int
    iti_alpha: float | None = Field(None, description="recommended strength of `always` mode (ITI)")
    val_accuracy: float | None = None
    description: str | None = Field(None, description="what the probes watch for and what steering does")
    heldout_auroc: float | None = Field(None, description="the probes' AUROC on held-out answers (the build's)")
    heldout_accuracy: float | None = Field(None, description="the probes' accuracy on held-out answers")
    false_alarm_rate: float | None = Field(
        None, description="share of ordinary answers the monitor fires on at the recommended threshold"
    )

    @classmethod
    def from_info(cls, info: BehaviorInfo) -> BehaviorCard:
        return cls(**vars(info))


class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "fasb-server"
    # not in the OpenAI spec
    max_model_len: int = Field(description="(extension) context limit in tokens")
    steering_behaviors: list[BehaviorCard] = Field(description="(extension) loaded steering artifacts")


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo
