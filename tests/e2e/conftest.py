from collections.abc import Iterator

import pytest

from tests.e2e.harness import ServerProcess, running_server


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory) -> Iterator[ServerProcess]:
    """The real server on the tiny random model, without steering artifacts, shared by a session."""
    log_path = tmp_path_factory.mktemp("server-logs") / "tiny.log"
    args = ["--model", str(tiny_model_dir), "--no-default-artifacts", "--max-batch-size", "4"]
    with running_server(args, log_path) as server:
        yield server
