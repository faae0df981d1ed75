"""POST /v1/chat/completions."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import APIRouter, Request, Response

from server.api.deps import EngineDep, RecordDep, check_choices, check_model
from server.api.errors import ERROR_RESPONSES
from server.api.protocol import (
    AssistantMessage,
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatFinishReason,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    SteeringRetract,
    ToolCall,
    Usage,
)
from server.api.routes.generate import generate
from server.api.serving import (
    ChoiceResult,
    EngineBugError,
    calls_cannot_be_retracted,
    encode_chat,
    encode_off_loop_if_long,
    usage_of,
)
from server.api.sse import ChatChunks, ChoiceStreamState, steering_summary
from server.api.tools import CallState, StreamUpdate, ToolStream, call_id, parse_output
from server.engine.types import Finished, Retraction, TextDelta

router = APIRouter(prefix="/v1", tags=["chat"])


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, record: RecordDep
) -> Response | ChatCompletionResponse:
    """Create a chat completion, streamed or not, with tool calls; the `steering` extension controls FASB."""
    check_model(engine, body.model)
    check_choices(engine, body.n)
    record.model = body.model
    prompt = await encode_off_loop_if_long(request, encode_chat, engine, body)
    sampling = body.to_sampling_params()
    chunks = ChatChunks(id=f"chatcmpl-{record.request_id}", model=engine.model_name, with_logprobs=body.logprobs)
    if body.calls_allowed:
        chunks = ToolChatChunks(chunks, live_calls=calls_cannot_be_retracted(body))
    return await generate(request, engine, record, body, [prompt], sampling, chunks, chat_completion)


def chat_completion(chunks: ChatChunks | ToolChatChunks, results: list[ChoiceResult]) -> ChatCompletionResponse:
    base = chunks.chunks if isinstance(chunks, ToolChatChunks) else chunks
    choices = [
        ChatCompletionChoice(
            index=result.index,
            message=_message(result.text, isinstance(chunks, ToolChatChunks)),
            logprobs=ChatChoiceLogprobs.from_tokens(result.logprobs) if base.with_logprobs else None,
            finish_reason=_finish_reason(result.finished, result.text, isinstance(chunks, ToolChatChunks)),
            steering=steering_summary(result.finished),
        )
        for result in results
    ]
    usage = usage_of([result.finished for result in results])
    return ChatCompletionResponse(id=base.id, created=base.created, model=base.model, choices=choices, usage=usage)


def _message(text: str, with_tools: bool) -> AssistantMessage:
    if not with_tools:
        return AssistantMessage(content=text)
    parsed = parse_output(text, final=True)
    calls = [
        ToolCall(id=call_id(), function=FunctionCall(name=call.name, arguments=call.arguments))
        for call in parsed.calls
        if call.name is not None
    ]
    return AssistantMessage(content=parsed.content or (None if calls else ""), tool_calls=calls or None)


def _finish_reason(finished: Finished, text: str, with_tools: bool) -> ChatFinishReason:
    if with_tools and finished.finish_reason == "stop" and any(c.complete for c in parse_output(text, True).calls):
        return "tool_calls"
    return finished.finish_reason


@dataclass
class ToolChatChunks:
    """Chat chunks when the model may call tools: its text read as content and tool_calls deltas
    (server/api/tools.py ToolStream), in the pieces OpenAI's SDK accumulates."""

    chunks: ChatChunks
    live_calls: bool = True
    streams: dict[int, ToolStream] = field(default_factory=dict)

    def _stream(self, index: int) -> ToolStream:
        return self.streams.setdefault(index, ToolStream(live_calls=self.live_calls))

    def role(self, index: int) -> ChatCompletionChunk:
        return self.chunks.role(index)

    def text(self, choice: ChoiceStreamState, event: TextDelta) -> ChatCompletionChunk | None:
        update = self._stream(choice.index).append(event.text)
        return self._delta_chunk(choice.index, update) if update else None

    def retract(self, index: int, event: Retraction) -> ChatCompletionChunk | None:
        try:
            update = self._stream(index).retract(event.text)
        except ValueError as exc:
            raise EngineBugError(str(exc)) from None
        if not update.retracted:
            return None  # only text not sent yet (a call's) was taken back
        steering = SteeringRetract.from_event(event).model_copy(update={"retract_text": update.retracted})
        choice = ChatCompletionStreamChoice(index=index, delta=DeltaMessage(), steering=steering)
        return self.chunks._chunk(choice)

    def finish(self, index: int, event: Finished) -> ChatCompletionChunk:
        stream = self._stream(index)
        update = stream.finish()
        reason = "tool_calls" if event.finish_reason == "stop" and stream.has_calls else event.finish_reason
        choice = ChatCompletionStreamChoice(
            index=index, delta=_delta(stream, update), finish_reason=reason, steering=steering_summary(event)
        )
        return self.chunks._chunk(choice)

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return self.chunks.usage(usage)

    def _delta_chunk(self, index: int, update: StreamUpdate) -> ChatCompletionChunk:
        return self.chunks._chunk(ChatCompletionStreamChoice(index=index, delta=_delta(self._stream(index), update)))


def _delta(stream: ToolStream, update: StreamUpdate) -> DeltaMessage:
    """One delta per update: new content, and per call its first piece (id, name) and new arguments."""
    started = {stream.calls.index(call) for call in update.started}
    arguments = dict(update.arguments)
    indexes = sorted(started | set(arguments))
    calls = [_delta_call(stream.calls[i], i, i in started, arguments.get(i, "")) for i in indexes]
    return DeltaMessage(content=update.content or None, tool_calls=calls or None)


def _delta_call(call: CallState, index: int, first: bool, arguments: str) -> DeltaToolCall:
    if not first:
        return DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=arguments))
    return DeltaToolCall(
        index=index, id=call.id, type="function", function=DeltaFunctionCall(name=call.name, arguments=arguments)
    )
