"""How a chat with tools becomes the prompt: a chat template that renders tools in the `<tool_call>`
convention gets them in Hugging Face's form; any other template gets the generic format (a
system block describing the tools, calls and results as text). On the tiny model's tokenizer,
with its ChatML template and with a Hermes-style one that renders tools."""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoTokenizer

from server.api.protocol import ChatCompletionRequest
from server.api.serving import encode_chat
from server.config import Settings
from server.engine.engine import Engine

pytestmark = pytest.mark.asyncio

# A Hermes-style template written for this test: tools listed in the system turn, calls and
# results in tags, ChatML turns.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n"
    "Call a function with <tool_call>\n{\"name\": <name>, \"arguments\": <object>}\n</tool_call><|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and tools %}"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "{%- for call in message.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CHAT = {
    "model": "m",
    "tools": [WEATHER],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees"},
    ],
}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def hermes_model_dir(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-hermes") / "model"
    shutil.copytree(tiny_model_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = HERMES_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


async def prompt_text(model_dir) -> str:
    engine = Engine(Settings(model=str(model_dir), max_batch_size=1, compile=False))
    await engine.start()
    try:
        return engine.decode_tokens(encode_chat(engine, ChatCompletionRequest.model_validate(CHAT)))
    finally:
        await engine.stop()


async def test_a_template_that_renders_tools_gets_them(hermes_model_dir):
    text = await prompt_text(hermes_model_dir)
    listed = text.split("<tools>")[1].split("</tools>")[0]
    assert [json.loads(line) for line in listed.strip().splitlines()] == [WEATHER]
    assert "Be brief." in text and CALL_TEXT in text
    assert "<tool_response>\nSunny, 24 degrees\n</tool_response>" in text
    assert "You can call these tools" not in text  # not the generic block as well


async def test_other_templates_get_the_generic_format(tiny_model_dir):
    text = await prompt_text(tiny_model_dir)
    assert "You can call these tools" in text and json.dumps(WEATHER["function"]["parameters"]) in text
    assert "Be brief." in text  # the client's system text follows the tools' block, in one turn
    assert text.count("<|im_start|>system") == 1
    assert CALL_TEXT in text  # the assistant's call, as the model writes calls
    assert '<tool_response>\n{"name": "get_weather"}\nSunny, 24 degrees\n</tool_response>' in text
