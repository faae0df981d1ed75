from collections.abc import Iterator

import httpx
import openai
import pytest
import pytest_asyncio
from transformers import AutoModelForCausalLM

from tests.e2e.harness import ServerProcess, running_server
from tests.synthetic_artifact import write_synthetic_artifact


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    """The real server on the tiny random model, without steering artifacts, shared by a session."""
    log_path = tmp_path_factory.mktemp("server-logs") / "tiny.log"
    args = ["--model", str(tiny_model_dir), "--no-default-artifacts", "--max-batch-size", "4"]
    with running_server(args, log_path) as server:
        yield server


@pytest_asyncio.fixture
async def sdk(tiny_server):
    """The official openai client on `tiny_server` (modules with another server define their own)."""
    async with openai.AsyncOpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest_asyncio.fixture
async def http(tiny_server):
    async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def steered_server(tiny_model_dir, tmp_path_factory, request) -> Iterator[ServerProcess]:
    """The real server on the tiny model with a synthetic steering artifact, one per test module."""
    folder = tmp_path_factory.mktemp("artifact")
    write_synthetic_artifact(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder, behavior="synthetic")
    log_path = tmp_path_factory.mktemp("server-logs") / f"{request.module.__name__.rsplit('.', 1)[-1]}.log"
    args = ["--model", str(tiny_model_dir), "--no-default-artifacts", "--artifact", str(folder)]
    with running_server(args, log_path) as server:
        yield server
