"""Settings from flags and FASB_* variables: precedence, and usage errors instead of tracebacks."""

from __future__ import annotations

import pytest

from server.config import parse_args


def test_flags_win_over_environment_which_wins_over_defaults(monkeypatch):
    assert parse_args([]).max_batch_size == 8
    monkeypatch.setenv("FASB_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("FASB_PREFILL_CHUNK_TOKENS", "64")
    settings = parse_args(["--max-batch-size", "2"])
    assert (settings.max_batch_size, settings.prefill_chunk_tokens) == (2, 64)


def test_bad_values_are_a_usage_error_naming_each_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--prefill-chunk-tokens", "4", "--max-batch-size", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--prefill-chunk-tokens: Input should be greater than or equal to 16" in err
    assert "--max-batch-size:" in err and "Traceback" not in err


def test_runner_compile_and_quantization_flags(monkeypatch):
    defaults = parse_args([])
    assert (defaults.runner, defaults.compile, defaults.quantization) == ("hf", True, "none")
    settings = parse_args(["--runner", "static", "--no-compile", "--quantization", "int4"])
    assert (settings.runner, settings.compile, settings.quantization) == ("static", False, "int4")
    monkeypatch.setenv("FASB_COMPILE", "false")
    assert parse_args([]).compile is False
    assert parse_args(["--compile"]).compile is True
