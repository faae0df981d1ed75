"""Steering artifacts: round-trip, validation, fingerprints, discovery, and layer lookup."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.steering.artifact import (
    ArtifactMismatchError,
    SteeringArtifact,
    check_compatible,
    find_default_artifacts,
    load_artifact,
    model_fingerprint,
    model_slug,
    save_artifact,
)
from server.steering.layers import attention_output_projections, decoder_layers
from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def make_artifact(model, k=3, head_dim=16) -> SteeringArtifact:
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(k, head_dim, generator=generator)
    layers = torch.tensor([1, 0, 1][:k])
    return SteeringArtifact(
        behavior="honesty",
        layers=layers,
        heads=torch.tensor([2, 0, 3][:k]),
        probe_weight=torch.randn(k, head_dim, generator=generator),
        probe_bias=torch.randn(k, generator=generator),
        direction=direction / direction.norm(dim=1, keepdim=True),
        sigma=torch.rand(k, generator=generator),
        val_accuracy=torch.tensor([0.9, 0.8, 0.7][:k]),
        manifest={
            "format_version": 1,
            "behavior": "honesty",
            "model_id": "tiny",
            "fingerprint": model_fingerprint(model, layers.tolist()),
            "prompt_format": "chat",
            "recommended": {"alpha": 4.0, "threshold": 0.5, "backtrack_tokens": 10},
        },
    )


def test_round_trip_is_identity(tiny_model, tmp_path):
    artifact = make_artifact(tiny_model)
    save_artifact(artifact, tmp_path / "a")
    loaded = load_artifact(tmp_path / "a")
    assert loaded == artifact
    assert loaded.path == tmp_path / "a"
    assert (loaded.num_heads, loaded.head_dim, loaded.prompt_format) == (3, 16, "chat")
    assert (loaded.alpha, loaded.threshold, loaded.backtrack_tokens) == (4.0, 0.5, 10)


def test_matching_model_is_accepted(tiny_model):
    check_compatible(make_artifact(tiny_model), tiny_model)


def test_bf16_load_of_the_same_model_matches(tiny_model, tiny_model_dir):
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    check_compatible(make_artifact(tiny_model), bf16)


def test_other_weights_are_refused_naming_the_hash(tiny_model, tmp_path):
    other = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "seed1", seed=1))
    with pytest.raises(ArtifactMismatchError, match="o_proj_sha256: expected") as info:
        check_compatible(make_artifact(tiny_model), other)
    assert "num_layers" not in str(info.value)


def test_other_shape_is_refused_naming_each_field(tiny_model, tmp_path):
    other = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "deep", num_layers=3, num_heads=8))
    with pytest.raises(ArtifactMismatchError) as info:
        check_compatible(make_artifact(tiny_model), other)
    message = str(info.value)
    for field in (
        "num_layers: expected 2, found 3",
        "num_heads: expected 4, found 8",
        "head_dim: expected 16, found 8",
    ):
        assert field in message


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda folder: (folder / "manifest.json").unlink(), "manifest.json is missing"),
        (lambda folder: (folder / "artifact.safetensors").unlink(), "artifact.safetensors is missing"),
        (lambda folder: (folder / "manifest.json").write_text("{"), "not valid JSON"),
        (lambda folder: _edit_manifest(folder, format_version=99), "format_version 99 is not supported"),
        (lambda folder: _edit_manifest(folder, prompt_format="xml"), "prompt_format must be one of"),
        (lambda folder: _edit_manifest(folder, recommended={"alpha": 1}), "'recommended' must hold"),
        (lambda folder: (folder / "artifact.safetensors").write_bytes(b"garbage"), "cannot read"),
    ],
)
def test_malformed_artifacts_are_refused(tiny_model, tmp_path, corrupt, message):
    save_artifact(make_artifact(tiny_model), tmp_path)
    corrupt(tmp_path)
    with pytest.raises(ValueError, match=message):
        load_artifact(tmp_path)


def _edit_manifest(folder, **changes):
    path = folder / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def test_non_unit_directions_are_refused(tiny_model, tmp_path):
    artifact = make_artifact(tiny_model)
    artifact.direction = artifact.direction * 2
    with pytest.raises(ValueError, match="unit vectors"):
        save_artifact(artifact, tmp_path)


def test_find_default_artifacts(tiny_model, tmp_path):
    assert model_slug("HuggingFaceTB/SmolLM2-135M-Instruct") == "huggingfacetb--smollm2-135m-instruct"
    for name in ("truthfulness-qa", "truthfulness"):
        save_artifact(make_artifact(tiny_model), tmp_path / "org--m" / name)
    (tmp_path / "org--m" / "not-an-artifact").mkdir()
    assert find_default_artifacts("org/m", root=tmp_path) == [
        tmp_path / "org--m" / "truthfulness",
        tmp_path / "org--m" / "truthfulness-qa",
    ]
    assert find_default_artifacts("org/other", root=tmp_path) == []


def test_layer_lookup(tiny_model):
    assert len(decoder_layers(tiny_model)) == 2
    assert attention_output_projections(tiny_model)[1] is tiny_model.model.layers[1].self_attn.o_proj
    assert len(attention_output_projections(tiny_model.model)) == 2  # a base model works too


def test_layer_lookup_errors_are_actionable(tiny_model):
    with pytest.raises(ValueError, match="set steering.layer_path"):
        decoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="set steering.o_proj_path"):
        attention_output_projections(tiny_model, o_proj_path="self_attn.out")
    assert attention_output_projections(tiny_model, layer_path="model.layers", o_proj_path="self_attn.q_proj")[0] is (
        tiny_model.model.layers[0].self_attn.q_proj
    )
