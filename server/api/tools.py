"""Tool calling: how tools are shown to the model, the grammar that constrains its calls, and how
its text is read back as calls (whole, or as a stream grows). The request schema is in protocol.py.

Calls are always written as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(the Hermes / Qwen convention). A chat template that renders tools in that convention gets the
tools and the history in Hugging Face's form (template_messages; the engine picks it); any other
template gets the generic format, as llama.cpp's generic handler: a system block that lists the
tools as JSON and asks for calls in that form, with the history's calls and results as text, so
the model sees its own format back.

The grammar engine enforces the form: `required` and a named function force a call from the
first token; `auto` lets the model write text, and once it writes `<tool_call>` the rest must be a
valid call. Arguments always validate against the function's schema, because they are generated
inside that schema's JSON grammar, which rolls back with FASB's backtracks.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.engine.types import ResponseFormat

if TYPE_CHECKING:  # the request models live with the others; this module only reads them
    from server.api.protocol import ChatTool, RequestMessage, ToolCallRequest, ToolChoice

CALL_OPEN = "<tool_call>\n"
CALL_CLOSE = "\n</tool_call>"
CALL_SEPARATOR = "\n"
_NAME_PREFIX = '{"name": "'
_ARGUMENTS_PREFIX = '", "arguments": '
_CALL_END = "}" + CALL_CLOSE  # the call object's own closing brace, then the closing tag
# The JSON of calls is compact and in key order (as structured output's), so the text of a call
# is exactly what the parser below expects and a finished call is finished.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# --------------------------------------------------------------------------- prompt


def tools_system_block(tools: list[ChatTool]) -> str:
    """The generic format's description of the tools, put before the conversation's system text."""
    listed = "\n".join(json.dumps(tool.model_dump(exclude_none=True)) for tool in tools)
    return (
        "You can call these tools (functions); each is given as JSON with a JSON schema of its arguments:\n"
        f"{listed}\n"
        "To call a tool, answer with the call as JSON between tags, and nothing after it:\n"
        f'{CALL_OPEN}{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}{CALL_CLOSE}\n'
        "The tool's result comes back in <tool_response> tags; use it to answer."
    )


def render_calls(calls: list[ToolCallRequest]) -> str:
    return CALL_SEPARATOR.join(_call_text(c.function.name, c.function.arguments) for c in calls)


def _call_text(name: str, arguments: str) -> str:
    compact = json.dumps(json.loads(arguments), separators=(", ", ": "))
    return f'{CALL_OPEN}{{"name": "{name}", "arguments": {compact}}}{CALL_CLOSE}'


def render_tool_result(name: str | None, content: str) -> str:
    head = json.dumps({"name": name}) + "\n" if name else ""
    return f"<tool_response>\n{head}{content}\n</tool_response>"


# --------------------------------------------------------------------------- grammar


def choice_name(choice: ToolChoice | None) -> str | None:
    return None if choice is None or isinstance(choice, str) else choice.function.name


def tool_call_format(
    tools: list[ChatTool], choice: ToolChoice | None, parallel: bool, param: str = "tools"
) -> ResponseFormat | None:
    """The grammar for this tool_choice; None when the model may not call (`none`, or no tools)."""
    if not tools or choice == "none":
        return None
    named = choice_name(choice)
    callable_tools = [t for t in tools if named is None or t.function.name == named]
    bodies = " | ".join(f"call_{i}" for i in range(len(callable_tools)))
    more = f' ("{_lark(CALL_SEPARATOR + CALL_OPEN)}" call)*' if parallel else ""
    forced = choice == "required" or named is not None
    lines = [
        f'start: "{_lark(CALL_OPEN)}" call{more}' if forced else f"start: TEXT | text call{more}",
        f'call: ({bodies}) "{_lark(CALL_CLOSE)}"',
    ]
    if not forced:
        # Free text that never contains the opening tag, or text that ends at its first opening tag
        # (a `suffix` rule is lazy: it ends there), then the call. `suffix`, not `stop`: the same
        # tokens, but llguidance can roll a `stop` lexeme back by no token, and FASB backtracks.
        lines.append(f"TEXT: /(?s:.+)/ & ~/(?s:.*{_regex(CALL_OPEN.strip())}.*)/")
        lines.append(f'text[suffix="{_lark(CALL_OPEN)}"]: /(?s:.*)/')
    lines += [f"call_{i}: %json {json.dumps(_call_schema(t))}" for i, t in enumerate(callable_tools)]
    return ResponseFormat("lark", "\n".join(lines) + "\n", param=param)


def _call_schema(tool: ChatTool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": closed_objects(tool.function.parameters)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": _JSON_OPTIONS,
    }


def closed_objects(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` wherever an object lists its properties and says
    nothing about others (as llama.cpp does): a small model otherwise keeps inventing keys until
    max_tokens. What it generates still validates against the schema as given."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed_value(key, value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


def _closed_value(key: str, value: Any) -> Any:
    if key in _SUBSCHEMAS:
        return closed_objects(value)
    if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
        return {name: closed_objects(sub) for name, sub in value.items()}
    return value


# Keywords whose value is a subschema (or a list of them), and those whose value maps names to one.
_SUBSCHEMAS = {"items", "anyOf", "oneOf", "allOf", "not", "prefixItems", "additionalProperties", "if", "then", "else"}
_SUBSCHEMA_MAPS = {"properties", "$defs", "definitions", "patternProperties"}


def _lark(text: str) -> str:
    return json.dumps(text)[1:-1]  # a lark string literal's escapes are JSON's


def _regex(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


_REGEX_SPECIAL = set("\\.+*?()|[]{}^$#&-~/")


# --------------------------------------------------------------------------- reading calls back


@dataclass
class ParsedCall:
    name: str | None  # None until its closing quote arrived
    arguments: str  # the arguments' JSON text so far (only what cannot still be the call's end)
    complete: bool


@dataclass
class ParsedOutput:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


def parse_output(text: str, final: bool) -> ParsedOutput:
    """Split the model's text into content and calls. Mid-stream (`final` False) a tail that could
    still become the opening tag is held back from the content, and the arguments of an open call
    stop where its end could begin, so that later text only ever extends what was read."""
    start = text.find(CALL_OPEN)
    if start < 0:
        return ParsedOutput(text if final else _hold_back(text, CALL_OPEN))
    output = ParsedOutput(text[:start])
    rest = text[start + len(CALL_OPEN) :]
    while True:
        call, rest = _parse_call(rest)
        output.calls.append(call)
        if not call.complete or not rest.startswith(CALL_SEPARATOR + CALL_OPEN):
            return output
        rest = rest[len(CALL_SEPARATOR + CALL_OPEN) :]


def _parse_call(text: str) -> tuple[ParsedCall, str]:
    """One call from the text after its opening tag, and the text after the call."""
    body = text[len(_NAME_PREFIX) :] if text.startswith(_NAME_PREFIX) else ""
    name_end = body.find('"')
    if name_end < 0 or not body[name_end:].startswith(_ARGUMENTS_PREFIX):
        return ParsedCall(None, "", False), ""
    name, arguments = body[:name_end], body[name_end + len(_ARGUMENTS_PREFIX) :]
    end = arguments.find(_CALL_END)
    if end >= 0:
        return ParsedCall(name, arguments[:end], True), arguments[end + len(_CALL_END) :]
    return ParsedCall(name, _hold_back(arguments, _CALL_END), False), ""


def _hold_back(text: str, marker: str) -> str:
    """`text` less its longest suffix that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return text[:-size]
    return text


@dataclass
class CallState:
    id: str
    name: str
    arguments_sent: int = 0
    done: bool = False


@dataclass
class StreamUpdate:
    """What to tell a client since the last update: content to delete (a retraction), new
    content, calls that started (index, id, name), new argument text per call, calls finished."""

    retracted: str = ""
    content: str = ""
    started: list[CallState] = field(default_factory=list)
    arguments: list[tuple[int, str]] = field(default_factory=list)
    finished: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.retracted or self.content or self.started or self.arguments or self.finished)


@dataclass
class ToolStream:
    """One choice's streamed text read as content and calls, incrementally.

    Calls are sent as they grow when nothing can be retracted; when FASB may retract text
    (`stream_mode: "retract"`) they are held until the answer finishes, since a client cannot
    take back argument text it has accumulated. Content is retracted as usual."""

    live_calls: bool = True
    parse_calls: bool = True  # False: no tools, all text is content
    text: str = ""
    content_sent: str = ""
    calls: list[CallState] = field(default_factory=list)

    def append(self, text: str) -> StreamUpdate:
        self.text += text
        return self._update(final=False)

    def retract(self, text: str) -> StreamUpdate:
        if not self.text.endswith(text):
            raise ValueError("a retraction must be a suffix of the text so far")
        self.text = self.text[: len(self.text) - len(text)]
        return self._update(final=False)

    def finish(self) -> StreamUpdate:
        return self._update(final=True)

    def _update(self, final: bool) -> StreamUpdate:
        parsed = parse_output(self.text, final) if self.parse_calls else ParsedOutput(self.text)
        update = StreamUpdate()
        if not parsed.content.startswith(self.content_sent):
            if self.calls:
                raise ValueError("a retraction reached into tool calls already sent")
            kept = _common_prefix(parsed.content, self.content_sent)
            update.retracted = self.content_sent[len(kept) :]
            self.content_sent = kept
        update.content = parsed.content[len(self.content_sent) :]
        self.content_sent = parsed.content
        if self.live_calls or final:
            self._update_calls(parsed.calls, update)
        return update

    def _update_calls(self, parsed: list[ParsedCall], update: StreamUpdate) -> None:
        for index, call in enumerate(parsed):
            if call.name is None:
                continue
            if index == len(self.calls):
                self.calls.append(CallState(call_id(), call.name))
                update.started.append(self.calls[index])
            state = self.calls[index]
            if len(call.arguments) > state.arguments_sent:
                update.arguments.append((index, call.arguments[state.arguments_sent :]))
                state.arguments_sent = len(call.arguments)
            if call.complete and not state.done:
                state.done = True
                update.finished.append(index)

    @property
    def has_calls(self) -> bool:
        return any(call.done for call in self.calls)


def _common_prefix(a: str, b: str) -> str:
    size = 0
    while size < min(len(a), len(b)) and a[size] == b[size]:
        size += 1
    return a[:size]


def template_messages(messages: list[RequestMessage]) -> list[dict[str, Any]]:
    """The chat in Hugging Face's tool convention, for a chat template that renders tools itself:
    assistant `tool_calls` with their arguments as objects, `tool` messages with the call's name."""
    names: dict[str, str] = {}
    rendered = []
    for message in messages:
        entry: dict[str, Any] = {
            "role": "system" if message.role == "developer" else message.role,
            "content": "\n".join(part.text for part in message.content),
        }
        for call in message.tool_calls or ():
            names[call.id] = call.function.name
            function = {"name": call.function.name, "arguments": json.loads(call.function.arguments)}
            entry.setdefault("tool_calls", []).append({"id": call.id, "type": "function", "function": function})
        if message.role == "tool":
            entry |= {"tool_call_id": message.tool_call_id, "name": names.get(message.tool_call_id or "", "")}
        rendered.append(entry)
    return rendered
