"""docs/configuration.md is generated from the settings: it fails here when it is out of date."""

from __future__ import annotations

import subprocess
import sys

from server import config_docs
from server.config import Settings
from tests.e2e.harness import REPO_ROOT


def test_docs_configuration_md_is_up_to_date():
    check = subprocess.run([sys.executable, "-m", "server.config_docs", "--check"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr + "\nrun `python -m server.config_docs` and commit docs/configuration.md"


def test_every_setting_has_a_row_with_its_flag_and_variable():
    doc = config_docs.DOC_PATH.read_text()
    for name in Settings.model_fields:
        flag = {"artifacts": "--artifact", "cors_origins": "--cors-origin"}.get(name, "--" + name.replace("_", "-"))
        assert f"| `{flag}`" in doc and f"`FASB_{name.upper()}`" in doc, name


def test_check_fails_on_a_stale_file_and_passes_once_rewritten(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text(config_docs.render().replace("| `--max-queue` |", "| `--max-requests` |"))
    monkeypatch.setattr(config_docs, "DOC_PATH", stale)
    assert config_docs.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert config_docs.main([]) == 0
    assert config_docs.main(["--check"]) == 0
    assert "| `--max-queue` |" in stale.read_text()
