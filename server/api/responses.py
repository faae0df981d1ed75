"""POST /v1/responses, stateless: OpenAI's Responses request translated onto a chat request (the
same engine, tools and grammar), and its answer and event stream built back from the chat text.

Nothing is stored: `previous_response_id`, and `store: true`, are a 400 naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from server.api.errors import field_path
from server.api.protocol import (
    MAX_TOKENS,
    MAX_TOOLS,
    ChatCompletionRequest,
    OpenAIBaseModel,
    RequestModel,
    SteeringRequest,
    SteeringSummary,
)
from server.api.tools import CallState, ParsedOutput, StreamUpdate, ToolStream, call_id, parse_output
from server.engine.types import Finished, ResponseFormat, Retraction
from server.errors import InvalidRequestError

NO_STORE = "this server keeps no responses (it is stateless): send the whole conversation in `input`"


# --------------------------------------------------------------------------- request


class InputText(RequestModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(RequestModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(part.text for part in self.content)


class FunctionCallItem(RequestModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(RequestModel):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "\n".join(part.text for part in self.output)


InputItem = FunctionCallItem | FunctionCallOutputItem | MessageItem


class FunctionTool(RequestModel):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class FunctionToolChoice(RequestModel):
    type: Literal["function"]
    name: str


class TextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = {"extra": "ignore", "allow_inf_nan": False, "populate_by_name": True}

    @model_validator(mode="after")
    def _schema_for_json_schema(self) -> TextFormat:
        if self.type == "json_schema" and (self.json_schema is None or not self.name):
            raise ValueError("type 'json_schema' needs a `name` and a `schema`")
        return self


class TextConfig(RequestModel):
    format: TextFormat | None = None


class ResponsesRequest(RequestModel):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool = False  # as chat: small models repeat calls when allowed
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    metadata: dict[str, str] | None = None
    # not in the OpenAI spec
    steering: SteeringRequest | None = Field(None, description="(extension) FASB steering for this request")

    @field_validator("previous_response_id")
    @classmethod
    def _no_previous_response(cls, value: str | None) -> str | None:
        if value:
            raise ValueError(NO_STORE)
        return value

    @field_validator("store")
    @classmethod
    def _no_store(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError(NO_STORE + "; send `store: false` or leave it out")
        return value

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("background responses are not supported by this server (nothing is stored)")
        return value

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: str | list[InputItem]) -> str | list[InputItem]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one input item")
        return value

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as /v1/chat/completions takes it; errors name this request's fields."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": self._messages(),
            "stream": self.stream,
            "parallel_tool_calls": self.parallel_tool_calls,
        }
        for name, value in (("max_tokens", self.max_output_tokens), ("temperature", self.temperature),
                            ("top_p", self.top_p)):
            if value is not None:
                body[name] = value
        if self.steering is not None:
            body["steering"] = self.steering.model_dump(exclude_none=True)
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"})} for t in self.tools]
        if self.tool_choice is not None:
            choice = self.tool_choice
            named = not isinstance(choice, str)
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}} if named else choice
        if self.text is not None and self.text.format is not None:
            body["response_format"] = _response_format(self.text.format)
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = _responses_param(field_path(first["loc"]))
            raise InvalidRequestError(f"Invalid value for `{param}`: {first['msg']}", param=param) from None

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        calls: set[str] = set()
        for i, item in enumerate(items):
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                calls.add(item.call_id)
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                if item.call_id not in calls:
                    raise InvalidRequestError(
                        f"no function_call item before this one has call_id {item.call_id!r}",
                        param=f"input.{i}.call_id",
                    )
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        return messages


def _response_format(fmt: TextFormat) -> dict[str, Any]:
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    return {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.json_schema, "strict": fmt.strict}}


_CHAT_TO_RESPONSES = {"messages": "input", "response_format": "text.format", "max_tokens": "max_output_tokens"}


def _responses_param(param: str | None) -> str:
    if param is None:
        return "input"
    head, _, rest = param.partition(".")
    if head == "response_format":
        return "text.format" + ("." + rest.removeprefix("json_schema.") if rest else "")
    if head == "tools":
        rest = rest.replace(".function", "", 1)
    return ".".join(p for p in (_CHAT_TO_RESPONSES.get(head, head), rest) if p)


def responses_format(sampling_format: ResponseFormat | None) -> ResponseFormat | None:
    """A JSON schema's grammar errors name text.format.schema, as this request spells it."""
    if sampling_format is None or sampling_format.type == "lark":
        return sampling_format
    return ResponseFormat(sampling_format.type, sampling_format.schema, param="text.format.schema")


# --------------------------------------------------------------------------- response


class ResponseUsage(OpenAIBaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int
    # not in the OpenAI spec
    discarded_tokens: int = Field(0, description="(extension) tokens generated, then retracted by backtracking")


class OutputText(OpenAIBaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(OpenAIBaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(OpenAIBaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = OutputMessage | OutputFunctionCall


class ResponseObject(OpenAIBaseModel):
    _omit_if_none = frozenset({"usage", "steering"})

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    store: bool = False
    metadata: dict[str, str] = Field(default_factory=dict)
    usage: ResponseUsage | None = None
    steering: SteeringSummary | None = Field(None, description="(extension) what steering did")


def response_usage(finished: Finished) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=finished.prompt_tokens,
        output_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
        discarded_tokens=finished.discarded_tokens,
        input_tokens_details={"cached_tokens": finished.cached_tokens},
    )


@dataclass
class ResponseState:
    """One response as it is built: the request's echo, the output items so far, the event count."""

    body: ResponsesRequest
    id: str
    model: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    items: list[OutputItem] = field(default_factory=list)
    sequence: int = 0

    def snapshot(self, status: str, finished: Finished | None = None) -> ResponseObject:
        body = self.body
        incomplete = finished is not None and finished.finish_reason == "length"
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status="incomplete" if incomplete else status,
            incomplete_details={"reason": "max_output_tokens"} if incomplete else None,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            model=self.model,
            output=[item.model_copy(deep=True) for item in self.items],
            parallel_tool_calls=body.parallel_tool_calls,
            temperature=body.temperature,
            top_p=body.top_p,
            tool_choice=_echo(body.tool_choice) if body.tool_choice is not None else "auto",
            tools=[tool.model_dump(exclude_none=True) for tool in body.tools or ()],
            text={"format": _echo(body.text.format) if body.text and body.text.format else {"type": "text"}},
            metadata=body.metadata or {},
            usage=None if finished is None else response_usage(finished),
            steering=None if finished is None or finished.steering is None else SteeringSummary.from_report(
                finished.steering
            ),
        )

    def event(self, kind: str, **fields: Any) -> dict[str, str]:
        """One server-sent event: its name is its type, as OpenAI sends them."""
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return {"event": kind, "data": json.dumps(_dumped(payload))}


def _echo(value: Any) -> Any:
    return value.model_dump(by_alias=True, exclude_none=True) if isinstance(value, OpenAIBaseModel) else value


def _dumped(value: Any) -> Any:
    if isinstance(value, OpenAIBaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _dumped(v) for k, v in value.items()}
    return value


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def output_items(parsed: ParsedOutput, finished: Finished) -> list[OutputItem]:
    """The output of a whole answer: its text as one message (if any), then its calls."""
    status = "incomplete" if finished.finish_reason == "length" else "completed"
    items: list[OutputItem] = []
    if parsed.content or not parsed.calls:
        items.append(OutputMessage(id=item_id("msg"), status=status, content=[OutputText(text=parsed.content)]))
    for call in parsed.calls:
        if call.name is not None:
            items.append(
                OutputFunctionCall(
                    id=item_id("fc"), call_id=call_id(), name=call.name, arguments=call.arguments,
                    status="completed" if call.complete else "incomplete",
                )
            )
    return items


def final_output(text: str, with_tools: bool) -> ParsedOutput:
    return parse_output(text, final=True) if with_tools else ParsedOutput(text)


# --------------------------------------------------------------------------- stream


@dataclass
class ResponseEvents:
    """Engine events of one answer -> the Responses event sequence (as dicts for the SSE writer).

    A message item opens with the first text, and closes when a call starts or the answer ends; a
    function_call item opens when its name is known, takes argument deltas, and closes when the
    call does. A FASB retraction of sent text is a `response.steering.retract` event (ours)."""

    state: ResponseState
    stream: ToolStream
    message: OutputMessage | None = None
    calls: dict[int, OutputFunctionCall] = field(default_factory=dict)

    def start(self) -> list[dict[str, str]]:
        created = self.state.snapshot("in_progress")
        return [
            self.state.event("response.created", response=created),
            self.state.event("response.in_progress", response=created),
        ]

    def text(self, text: str) -> list[dict[str, str]]:
        return self._apply(self.stream.append(text))

    def retract(self, event: Retraction) -> list[dict[str, str]]:
        update = self.stream.retract(event.text)
        if not update.retracted:
            return []
        text = self.message.content[0]
        text.text = text.text[: len(text.text) - len(update.retracted)]
        return [
            self.state.event(
                "response.steering.retract", item_id=self.message.id, output_index=self._index(self.message),
                content_index=0, retract_text=update.retracted, retract_tokens=event.tokens,
                probe_score=event.probe_score, strength=event.strength,
            )
        ]

    def finish(self, finished: Finished) -> list[dict[str, str]]:
        events = self._apply(self.stream.finish())
        status = "incomplete" if finished.finish_reason == "length" else "completed"
        if self.message is None and not self.calls:
            events += self._open_message()
        events += self._close_message(status)
        for index, call in self.calls.items():
            if call.status == "in_progress":
                events += self._close_call(index, "incomplete")
        # Always response.completed (the status inside says incomplete): the SDK's stream helper
        # waits for that event whatever the status.
        return events + [self.state.event("response.completed", response=self.state.snapshot("completed", finished))]

    def _apply(self, update: StreamUpdate) -> list[dict[str, str]]:
        events: list[dict[str, str]] = []
        if update.content:
            if self.message is None:
                events += self._open_message()
            self.message.content[0].text += update.content
            events.append(self._text_event("response.output_text.delta", delta=update.content))
        for call in update.started:
            events += self._close_message("completed") + self._open_call(self.stream.calls.index(call), call)
        for index, delta in update.arguments:
            item = self.calls[index]
            item.arguments += delta
            events.append(self.state.event(
                "response.function_call_arguments.delta", item_id=item.id, output_index=self._index(item), delta=delta
            ))
        for index in update.finished:
            events += self._close_call(index, "completed")
        return events

    def _open_message(self) -> list[dict[str, str]]:
        self.message = OutputMessage(id=item_id("msg"), status="in_progress", content=[])
        self.state.items.append(self.message)
        events = [self.state.event("response.output_item.added", output_index=self._index(self.message),
                                   item=self.message.model_copy(deep=True))]
        self.message.content.append(OutputText(text=""))
        return events + [self._part_event("response.content_part.added", OutputText(text=""))]

    def _close_message(self, status: str) -> list[dict[str, str]]:
        message = self.message
        if message is None or message.status != "in_progress":
            return []
        message.status = status
        text = message.content[0]
        return [
            self._text_event("response.output_text.done", text=text.text),
            self._part_event("response.content_part.done", text),
            self.state.event("response.output_item.done", output_index=self._index(message), item=message),
        ]

    def _open_call(self, index: int, call: CallState) -> list[dict[str, str]]:
        item = OutputFunctionCall(id=item_id("fc"), call_id=call.id, name=call.name, arguments="", status="in_progress")
        self.calls[index] = item
        self.state.items.append(item)
        return [self.state.event("response.output_item.added", output_index=self._index(item), item=item)]

    def _close_call(self, index: int, status: str) -> list[dict[str, str]]:
        item = self.calls[index]
        item.status = status
        output_index = self._index(item)
        return [
            self.state.event("response.function_call_arguments.done", item_id=item.id, output_index=output_index,
                             name=item.name, arguments=item.arguments),
            self.state.event("response.output_item.done", output_index=output_index, item=item),
        ]

    def _text_event(self, kind: str, **fields: Any) -> dict[str, str]:
        return self.state.event(
            kind, item_id=self.message.id, output_index=self._index(self.message), content_index=0, logprobs=[],
            **fields,
        )

    def _part_event(self, kind: str, part: OutputText) -> dict[str, str]:
        return self.state.event(
            kind, item_id=self.message.id, output_index=self._index(self.message), content_index=0,
            part=part.model_copy(),
        )

    def _index(self, item: OutputItem) -> int:
        return next(i for i, known in enumerate(self.state.items) if known is item)
