"""Schemathesis over the server's own /openapi.json: the chat and completions routes, fuzzed against
the real server process on the tiny random model (with the tier's synthetic steering artifact, so
that every steering mode is reachable).

Per operation: 100 schema-valid requests (positive mode) and 50 schema-violating ones (negative
mode), generated deterministically (Hypothesis `derandomize`, no example database). Before a case
is sent, `_shorten` keeps it cheap: a valid `max_tokens` / `max_completion_tokens` becomes at most
8 and a valid `n` at most 3 (invalid values are left alone, so the 4xx paths are fuzzed too), the
server's `--default-max-tokens` is 8 for requests that give none, and `model` / `steering.behavior`
name what is served most of the time (a random name is a 404 or 400 before any generation). A
quarter of the positive cases then get one hostile value (2**63, Infinity, NaN, a lone surrogate,
a NUL, CR/LF...) in one field: schemathesis itself only sends finite numbers and valid UTF-8.

Every case, whatever it sent: no 5xx and no hang; a 4xx body is OpenAI's error envelope; a 200 is
JSON that conforms to the documented response (schemathesis' own checks) with `n` choices, or, for
`stream: true`, server-sent events whose chunks conform to the documented chunk schema, carry no
error, and end with `data: [DONE]`. The server answers /health with 200 afterwards.

All cases run even when some fail; the failures are reported together, and each failing body is
saved in the test's tmp_path (`failure-N.json`) to replay with curl.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.harness import ServerProcess, running_server
from tests.reliability.conftest import server_args

OPERATIONS = {  # path -> the schema of one streamed chunk, as the OpenAPI document names it (None: never streams)
    "/v1/chat/completions": "ChatCompletionChunk",
    "/v1/completions": "CompletionResponse",
    "/tokenize": None,
    "/detokenize": None,
}
EXAMPLES = {GenerationMode.POSITIVE: 100, GenerationMode.NEGATIVE: 50}
MAX_TOKENS = 8  # the most any valid request may generate per choice (before backtracks)
MAX_N = 3
MAX_PROMPTS = 3  # prompts kept from a list of prompts (/v1/completions)
REQUEST_TIMEOUT_S = 120.0  # a request still unanswered after this is reported as a hang
BEHAVIOR = "synthetic"
# Positive cases get one of these merged into `steering` often, so every mode (and a backtrack, which
# the synthetic probes' P(desired) < 1 forces at threshold 1) is exercised, streamed and not.
STEERING = [
    {"mode": "off"}, {"mode": "monitor"}, {"mode": "always"}, {"mode": "fasb"},
    {"mode": "fasb", "threshold": 1.0, "backtrack_tokens": 2, "max_backtracks": 1, "stream_mode": "retract"},
    {"mode": "fasb", "threshold": 1.0, "backtrack_tokens": 3, "max_backtracks": 2, "stream_mode": "hold"},
]
# Schemathesis sends finite numbers and valid UTF-8 only; a quarter of the positive cases get one of
# these instead, in one field (values hostile clients send), sent as Python's
# json.dumps writes it (`Infinity`, `NaN`, `"\\ud800"`), which the server's JSON parser accepts.
HOSTILE_NUMBERS = (2**63, -(2**63) - 1, 2**64, 10**30, float("inf"), float("-inf"), float("nan"), 1e308, -1, 0)
HOSTILE_TEXT = ("\ud800", "\udfff\ud800x", "\x00", "a\r\nforged line\r\n", "\u202e" * 64)
NUMBER_FIELDS = (
    ("temperature",), ("top_p",), ("top_k",), ("n",), ("max_tokens",), ("seed",), ("top_logprobs",),
    ("logprobs",), ("steering", "alpha"), ("steering", "threshold"), ("steering", "backtrack_tokens"),
    ("steering", "max_backtracks"), ("steering", "num_heads"),
)
TEXT_FIELDS = (("model",), ("user",), ("steering", "behavior"), ("stop",), ("messages",), ("prompt",))
UNSUPPORTED = ("frequency_penalty", "presence_penalty", "logit_bias", "best_of", "suffix", "tools")
MAX_INT = 2**31 - 1

# Schemathesis' checks for a non-streamed answer; the envelope and the streams are checked below.
JSON_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server(long_model_dir, artifact_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    """The tier's tiny model (4096 positions: random text prompts fit) and synthetic artifact."""
    log_path = tmp_path_factory.mktemp("schemathesis-logs") / "server.log"
    args = server_args(long_model_dir, artifact_dir, "--max-batch-size", "4", "--default-max-tokens", str(MAX_TOKENS))
    with running_server(args, log_path) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    # Schemathesis stops reading a stream after 20 events by default: read them all (n=3 x 8 tokens).
    # Its reproducers hide fields named like secrets (`max_tokens`!): show them as sent.
    config = schemathesis.Config.from_dict({
        "max-stream-events": 10_000, "request-timeout": REQUEST_TIMEOUT_S,
        "output": {"sanitization": {"enabled": False}},
    })
    return schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json", config=config)


@pytest.fixture(scope="module")
def chunk_validators(fuzz_server) -> dict[str, Any]:
    """A JSON-schema validator for one streamed chunk of each operation, from the served document."""
    document = httpx.get(f"{fuzz_server.base_url}/openapi.json", timeout=30).json()
    components = document["components"]
    return {
        path: jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", "components": components})
        for path, name in OPERATIONS.items()
        if name is not None
    }


def _valid_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _knobs(body: Any) -> dict[str, int]:
    """Percentiles that decide how a case is adjusted, drawn from a `Random` seeded with the body
    itself: Hypothesis' own integers lean towards their bounds, and this is as deterministic."""
    rng = random.Random(json.dumps(body, sort_keys=True, default=repr))
    return {
        "model": rng.randrange(100), "behavior": rng.randrange(100), "supported": rng.randrange(100),
        "prompt": rng.randrange(100),
        "stream": rng.randrange(100), "steering": rng.randrange(2 * len(STEERING)),
        "max_tokens": rng.randint(1, MAX_TOKENS),
        "hostile": rng.randrange(100), "hostile_field": rng.randrange(1000), "hostile_value": rng.randrange(1000),
    }


def _shorten(body: Any, knobs: dict[str, int], model: str, mode: GenerationMode, path: str) -> Any:
    """The case's body, made cheap to answer and valid often enough (see the module docstring)."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    # Negative cases keep a `model` of the wrong type: that may be the violation under test.
    if knobs["model"] < 85 and (mode is GenerationMode.POSITIVE or isinstance(body.get("model"), str)):
        body["model"] = model
    for field in ("max_tokens", "max_completion_tokens"):
        if _valid_int(body.get(field), 1, MAX_INT):
            body[field] = min(body[field], knobs["max_tokens"])
    if _valid_int(body.get("n"), 1, 8):
        body["n"] = min(body["n"], MAX_N)
    if _valid_int(body.get("best_of"), 1, MAX_INT):
        body["best_of"] = min(body["best_of"], MAX_N)
    steering = body.get("steering")
    if isinstance(steering, dict) and isinstance(steering.get("behavior"), str) and knobs["behavior"] < 70:
        body["steering"] = {**steering, "behavior": BEHAVIOR}
    generation = path.startswith("/v1/")
    if generation and mode is GenerationMode.POSITIVE and knobs["stream"] < 40:
        body["stream"] = True
    if generation and mode is GenerationMode.POSITIVE and knobs["steering"] < len(STEERING):
        steering = body.get("steering")
        body["steering"] = {**(steering if isinstance(steering, dict) else {}), **STEERING[knobs["steering"]]}
    if mode is GenerationMode.POSITIVE and knobs["supported"] < 60:
        # OpenAI fields the server documents but refuses (a 400 naming them): often leave them out.
        for field in UNSUPPORTED:
            body.pop(field, None)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, list | str) for p in prompt):
        body["prompt"] = prompt = prompt[:MAX_PROMPTS]  # a list of prompts: n choices for each
    if mode is GenerationMode.POSITIVE and knobs["prompt"] < 75 and isinstance(prompt, list | str):
        if not prompt:
            body["prompt"] = "Hello"  # an empty prompt is a 400
        elif isinstance(prompt, list):
            body["prompt"] = _known_ids(prompt)
    if mode is GenerationMode.POSITIVE and knobs["prompt"] < 75 and isinstance(body.get("tokens"), list):
        body["tokens"] = _known_ids(body["tokens"])  # /detokenize
    if path == "/tokenize" and mode is GenerationMode.POSITIVE:  # exactly one of prompt, messages is valid
        if "prompt" in body and "messages" in body:
            del body["prompt" if knobs["prompt"] % 2 else "messages"]
        elif "prompt" not in body and "messages" not in body and knobs["prompt"] < 75:
            body["prompt"] = "Hello"
    return body


def _known_ids(value: Any) -> Any:
    """Token ids (or lists of them) mapped into the tiny vocabulary; anything else unchanged."""
    if isinstance(value, list):
        return [_known_ids(item) for item in value]
    return abs(value) % 256 if _valid_int(value, -(2**63), 2**63) else value


def _make_hostile(body: dict, knobs: dict[str, int], chat: bool) -> dict:
    """`body` with one field set to a hostile value (see HOSTILE_NUMBERS)."""
    fields = NUMBER_FIELDS + TEXT_FIELDS
    path = fields[knobs["hostile_field"] % len(fields)]
    values = HOSTILE_NUMBERS if path in NUMBER_FIELDS else HOSTILE_TEXT
    value = values[knobs["hostile_value"] % len(values)]
    body = dict(body)
    if path[0] == "steering":
        steering = body.get("steering") if isinstance(body.get("steering"), dict) else {"mode": "fasb"}
        body["steering"] = {**steering, path[1]: value}
    elif path == ("stop",):
        body["stop"] = [value]
    elif path in (("messages",), ("prompt",)):
        if chat:
            body["messages"] = [{"role": "user", "content": value}]
        else:
            body["prompt"] = value
    else:
        body[path[0]] = value
    return body


def _kind(body: dict) -> str:
    steering = body.get("steering")
    mode = steering.get("mode") if isinstance(steering, dict) else None
    return ("stream" if body.get("stream") else "json") + (f"+{mode}" if mode else "")


def _is_envelope(payload: Any) -> bool:
    error = payload.get("error") if isinstance(payload, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
        and "param" in error
        and "code" in error
        and (error["param"] is None or isinstance(error["param"], str))
        and (error["code"] is None or isinstance(error["code"], str | int))
    )


def _check_stream(text: str, validator: Any) -> list[str]:
    """Problems with a text/event-stream answer: each event a conforming chunk, then `data: [DONE]`."""
    events = [event for event in text.replace("\r\n", "\n").split("\n\n") if event.strip()]
    if not events or events[-1].strip() != "data: [DONE]":
        return [f"the stream does not end with `data: [DONE]` (last event: {events[-1][:200] if events else None!r})"]
    problems = []
    for event in events[:-1]:
        data = "\n".join(line[5:].lstrip(" ") for line in event.split("\n") if line.startswith("data:"))
        try:
            chunk = json.loads(data)
        except ValueError:
            problems.append(f"an event is not JSON: {event[:200]!r}")
            continue
        if isinstance(chunk, dict) and "error" in chunk:
            problems.append(f"an error event in the stream: {data[:300]}")
            continue
        errors = [error.message for error in validator.iter_errors(chunk)]
        if errors:
            problems.append(f"a chunk does not conform ({errors[0][:200]}): {data[:300]}")
    return problems


def _problems(case, response: schemathesis.Response, body: Any, stream_validator: Any) -> list[str]:
    status = response.status_code
    content_type = (response.headers.get("content-type") or [""])[0]
    text = response.text_lossy()
    if status >= 500:
        return [f"{status}: {text[:500]}"]
    if 400 <= status < 500:
        try:
            payload = response.json()
        except ValueError:
            payload = None
        return [] if _is_envelope(payload) else [f"{status} without the error envelope: {text[:500]}"]
    if status != 200:
        return [f"unexpected status {status}: {text[:300]}"]
    streamed = isinstance(body, dict) and body.get("stream") is True
    if streamed:
        if not content_type.startswith("text/event-stream"):
            return [f"stream: true answered with {content_type!r}"]
        if response.stream_cut_short:
            return [f"the stream did not end within {REQUEST_TIMEOUT_S:.0f}s"]
        return _check_stream(text, stream_validator)
    if not content_type.startswith("application/json"):
        return [f"a non-streamed 200 answered with {content_type!r}"]
    problems = []
    try:
        case.validate_response(response, checks=JSON_CHECKS)
    except FailureGroup as group:
        problems.extend(f"schemathesis: {failure.title}: {failure.message[:400]}" for failure in group.exceptions)
    if case.path in ("/tokenize", "/detokenize"):
        return problems
    n = body.get("n", 1) if isinstance(body, dict) else 1
    expected = n * _prompt_count(body.get("prompt")) if isinstance(n, int) else None
    choices = response.json().get("choices")
    if expected is not None and (not isinstance(choices, list) or len(choices) != expected):
        problems.append(f"{len(choices) if isinstance(choices, list) else choices!r} choices for n={n} (x prompts)")
    return problems


def _prompt_count(prompt: Any) -> int:
    """Prompts in a /v1/completions `prompt` (1 for chat, which has none)."""
    return len(prompt) if isinstance(prompt, list) and all(isinstance(p, list | str) for p in prompt) else 1


def _run(api_schema, server: ServerProcess, path: str, mode: GenerationMode, validator: Any,
         save_dir: Path) -> tuple[int, list[str]]:
    operation = api_schema[path]["POST"]
    failures: list[str] = []
    statuses: dict[int, int] = {}
    answered: dict[str, int] = {}  # 200s by kind (streamed or not, steering mode): what was exercised
    refused: dict[str, int] = {}  # 4xx by the `param` they blame
    session = requests.Session()

    @settings(
        max_examples=EXAMPLES[mode], derandomize=True, database=None, deadline=None,
        phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case):
        knobs = _knobs(case.body)
        body = _shorten(case.body, knobs, server.model, mode, path)
        if mode is GenerationMode.POSITIVE and knobs["hostile"] < 25 and isinstance(body, dict):
            body = _make_hostile(body, knobs, chat=path == "/v1/chat/completions")
            case.body = json.dumps(body).encode()  # bytes: sent as they are
        else:
            case.body = body
        started = time.monotonic()
        try:
            response = case.call(base_url=server.base_url, session=session, timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException as exc:
            problems = [f"{type(exc).__name__} after {time.monotonic() - started:.0f}s: {exc}"]
        else:
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if 400 <= response.status_code < 500:
                with contextlib.suppress(Exception):
                    param = str(response.json()["error"]["param"])
                    refused[param] = refused.get(param, 0) + 1
            if response.status_code == 200 and isinstance(body, dict):
                answered[_kind(body)] = answered.get(_kind(body), 0) + 1
            problems = _problems(case, response, body, validator)
        if problems:
            # The exact body, to replay: curl -d @FILE -H 'Content-Type: application/json' URL
            saved = save_dir / f"failure-{len(failures)}.json"
            saved.write_text(body.decode() if isinstance(body, bytes) else json.dumps(body))
            shown = body if body is not None else "<no body>"
            failures.append(f"{'; '.join(problems)}\n    body ({saved}): {json.dumps(shown, default=repr)[:1500]}")

    fuzz()
    print(f"\n{path} {mode.value}: statuses {dict(sorted(statuses.items()))}\n  200s {dict(sorted(answered.items()))}"
          f"\n  4xx by param {dict(sorted(refused.items(), key=lambda item: -item[1]))}")
    return sum(statuses.values()), failures


@pytest.mark.parametrize("mode", list(EXAMPLES), ids=lambda mode: mode.value)
@pytest.mark.parametrize("path", list(OPERATIONS))
def test_schemathesis(fuzz_server, api_schema, chunk_validators, path, mode, tmp_path):
    sent, failures = _run(api_schema, fuzz_server, path, mode, chunk_validators.get(path), tmp_path)
    assert not failures, f"{len(failures)} of {sent} cases failed:\n" + "\n".join(failures[:20])
    assert sent >= EXAMPLES[mode] // 2, f"only {sent} cases were sent"
    assert httpx.get(f"{fuzz_server.base_url}/health", timeout=10).status_code == 200


def test_healthy_after_fuzzing(fuzz_server):
    assert httpx.get(f"{fuzz_server.base_url}/health", timeout=10).status_code == 200
