"""Steering artifacts on disk: read, write, validate, and match them to a loaded model.

An artifact is a folder with `artifact.safetensors` (the per-head probes and steering directions)
and `manifest.json` (what it was built from and for). No pickle anywhere.

Head activation convention: for selected head k at (layer l_k, head h_k), `a_k` is the slice
`[h_k*D:(h_k+1)*D]` of the input of layer l_k's attention output projection at one position.
The probe reads `sigmoid(probe_weight[k] @ a_k + probe_bias[k])` = P(desired behaviour);
steering adds `c * sigma[k] * direction[k]` to that slice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from server.steering.layers import attention_output_projections

FORMAT_VERSION = 1
TENSORS_FILE = "artifact.safetensors"
MANIFEST_FILE = "manifest.json"
PROMPT_FORMATS = ("qa", "chat")
_INT_TENSORS = ("layers", "heads")
_FLOAT_TENSORS = ("probe_weight", "probe_bias", "direction", "sigma", "val_accuracy")
_REQUIRED_MANIFEST_KEYS = ("format_version", "behavior", "model_id", "fingerprint", "prompt_format", "recommended")
_RECOMMENDED_KEYS = ("alpha", "threshold", "backtrack_tokens")


class ArtifactMismatchError(ValueError):
    """The artifact was built for a model other than the one loaded."""


@dataclass(eq=False)
class SteeringArtifact:
    behavior: str  # e.g. "truthfulness"
    layers: torch.Tensor  # [K] int64, layer of each selected head, best validation accuracy first
    heads: torch.Tensor  # [K] int64, head index within its layer
    probe_weight: torch.Tensor  # [K, D] float32, exact on raw (unstandardised) activations
    probe_bias: torch.Tensor  # [K] float32
    direction: torch.Tensor  # [K, D] float32, unit rows
    sigma: torch.Tensor  # [K] float32, std of activations projected on `direction`
    val_accuracy: torch.Tensor  # [K] float32
    manifest: dict
    path: Path | None = None

    @property
    def num_heads(self) -> int:
        return int(self.layers.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.probe_weight.shape[1])

    @property
    def prompt_format(self) -> str:
        return self.manifest["prompt_format"]

    @property
    def alpha(self) -> float:
        return float(self.manifest["recommended"]["alpha"])

    @property
    def iti_alpha(self) -> float:
        """The fixed strength of `always` (ITI): steering every token needs a weaker push than FASB's
        few corrections (manifests without one: `alpha`)."""
        return float(self.manifest["recommended"].get("iti_alpha", self.alpha))

    @property
    def threshold(self) -> float:
        return float(self.manifest["recommended"]["threshold"])

    @property
    def backtrack_tokens(self) -> int:
        return int(self.manifest["recommended"]["backtrack_tokens"])

    @property
    def description(self) -> str | None:
        return self.manifest.get("description")

    @property
    def quality(self) -> dict[str, float | None]:
        """What the build measured on held-out data, for clients to judge the monitor by."""
        accuracy = self.manifest.get("accuracy", {})
        held_out = accuracy.get("test_by_position", {}).get("all", {})
        return {
            "heldout_auroc": held_out.get("auroc"),
            "heldout_accuracy": held_out.get("accuracy", accuracy.get("ensemble_test")),
            "false_alarm_rate": self.manifest["recommended"].get("false_alarm_rate"),
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _INT_TENSORS + _FLOAT_TENSORS}

    def __eq__(self, other: object) -> bool:  # `path` says where it was read from, not what it is
        if not isinstance(other, SteeringArtifact):
            return NotImplemented
        mine, theirs = self.tensors(), other.tensors()
        return (
            self.behavior == other.behavior
            and self.manifest == other.manifest
            and all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine)
        )


def save_artifact(artifact: SteeringArtifact, folder: str | Path) -> None:
    """Write `artifact.safetensors` and `manifest.json` into `folder` (created if needed)."""
    _validate(artifact, source="artifact to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in artifact.tensors().items()}
    save_file(tensors, str(folder / TENSORS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    manifest = {**artifact.manifest, "behavior": artifact.behavior, "format_version": FORMAT_VERSION}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")


def load_artifact(folder: str | Path) -> SteeringArtifact:
    """Read and validate an artifact folder; ValueError says what is wrong with it."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    try:
        tensors = load_file(str(folder / TENSORS_FILE))
    except FileNotFoundError as exc:
        raise ValueError(f"steering artifact {folder}: {TENSORS_FILE} is missing") from exc
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"steering artifact {folder}: cannot read {TENSORS_FILE}: {exc}") from exc
    missing = [name for name in _INT_TENSORS + _FLOAT_TENSORS if name not in tensors]
    if missing:
        raise ValueError(f"steering artifact {folder}: {TENSORS_FILE} lacks tensors {missing}")
    artifact = SteeringArtifact(
        behavior=manifest["behavior"],
        **{name: tensors[name] for name in _INT_TENSORS + _FLOAT_TENSORS},
        manifest=manifest,
        path=folder,
    )
    _validate(artifact, source=f"steering artifact {folder}")
    return artifact


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"steering artifact {folder}: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"steering artifact {folder}: {MANIFEST_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"steering artifact {folder}: {MANIFEST_FILE} must hold a JSON object")
    missing = [key for key in _REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"steering artifact {folder}: {MANIFEST_FILE} lacks keys {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"steering artifact {folder}: format_version {manifest['format_version']!r} is not supported "
            f"(this server reads version {FORMAT_VERSION}); rebuild it with `python -m steering_artifacts build`"
        )
    return manifest


def _validate(artifact: SteeringArtifact, source: str) -> None:
    """Shapes, dtypes and invariants the server relies on; raises ValueError naming the problem."""
    problems = []
    k = artifact.layers.shape[0] if artifact.layers.dim() == 1 else -1
    for name in _INT_TENSORS:
        t = getattr(artifact, name)
        if t.dtype != torch.int64 or tuple(t.shape) != (k,):
            problems.append(f"{name} must be int64 of shape [K]; got {t.dtype} {tuple(t.shape)}")
    for name in _FLOAT_TENSORS:
        t = getattr(artifact, name)
        want_dims = 2 if name in ("probe_weight", "direction") else 1
        if t.dtype != torch.float32 or t.dim() != want_dims or t.shape[0] != k:
            problems.append(
                f"{name} must be float32 with {want_dims} dims and K={k} rows; got {t.dtype} {tuple(t.shape)}"
            )
    if not problems:
        if artifact.probe_weight.shape != artifact.direction.shape:
            problems.append(
                f"probe_weight {tuple(artifact.probe_weight.shape)} and "
                f"direction {tuple(artifact.direction.shape)} differ"
            )
        elif k and not torch.allclose(artifact.direction.norm(dim=1), torch.ones(k), atol=1e-4):
            problems.append("direction rows must be unit vectors")
        if k == 0:
            problems.append("an artifact needs at least one head")
        if (artifact.layers < 0).any() or (artifact.heads < 0).any():
            problems.append("layers and heads must be non-negative")
    if artifact.manifest.get("prompt_format") not in PROMPT_FORMATS:
        problems.append(
            f"prompt_format must be one of {PROMPT_FORMATS}; got {artifact.manifest.get('prompt_format')!r}"
        )
    recommended = artifact.manifest.get("recommended")
    if not isinstance(recommended, dict) or any(key not in recommended for key in _RECOMMENDED_KEYS):
        problems.append(f"manifest 'recommended' must hold {list(_RECOMMENDED_KEYS)}")
    if problems:
        raise ValueError(f"{source} is malformed: " + "; ".join(problems))


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_fingerprint(model: nn.Module, layers: Iterable[int]) -> dict:
    """What must match between the model an artifact was built on and the model it steers.

    `o_proj_sha256` hashes the attention output projection weights of `layers` after rounding
    them to bfloat16 on CPU: an fp32 load and a bf16 load of the same checkpoint (on CPU or GPU)
    then hash alike, while any other model differs. An fp16 load may not match (fp16 -> bf16
    rounds twice); rebuild or load in fp32/bf16.
    """
    config = _text_config(model)
    layer_ids = sorted({int(layer) for layer in layers})
    projections = attention_output_projections(model)
    digest = hashlib.sha256()
    for layer in layer_ids:
        if layer >= len(projections):  # an artifact of a deeper model: num_layers differs, say that
            digest.update(f"{layer}:missing".encode())
            continue
        weight = projections[layer].weight.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        digest.update(f"{layer}:{tuple(weight.shape)}".encode())
        digest.update(weight.view(torch.int16).numpy().tobytes())
    num_heads = config.num_attention_heads
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return {
        "architecture": architectures[0],
        "num_layers": config.num_hidden_layers,
        "num_heads": num_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "o_proj_layers": layer_ids,
        "o_proj_sha256": digest.hexdigest(),
    }


def check_compatible(artifact: SteeringArtifact, model: nn.Module) -> None:
    """Raise ArtifactMismatchError naming every fingerprint field that differs from `model`."""
    expected = artifact.manifest["fingerprint"]
    found = model_fingerprint(model, artifact.layers.tolist())
    differences = [
        f"{key}: expected {expected.get(key)!r}, found {found[key]!r}"
        for key in found
        if key != "o_proj_layers" and expected.get(key) != found[key]
    ]
    if differences:
        where = f" ({artifact.path})" if artifact.path else ""
        raise ArtifactMismatchError(
            f"steering artifact '{artifact.behavior}'{where} was built for model "
            f"{artifact.manifest.get('model_id')!r}, not the loaded one: " + "; ".join(differences)
        )


def model_slug(model_id: str) -> str:
    """Folder name for a model id: "HuggingFaceTB/SmolLM2-135M-Instruct" -> "huggingfacetb--smollm2-135m-instruct"."""
    return re.sub(r"[^a-z0-9._-]+", "--", model_id.strip("/").lower())


def artifacts_root() -> Path:
    """The `steering_artifacts` folder that ships the prebuilt artifacts."""
    # find_spec locates the package without importing (and so without running) it.
    spec = importlib.util.find_spec("steering_artifacts")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "steering_artifacts"


def find_default_artifacts(model_id: str, root: str | Path | None = None) -> list[Path]:
    """Prebuilt artifact folders for `model_id` (`<root>/<model-slug>/*/manifest.json`), sorted by name."""
    model_dir = Path(root or artifacts_root()) / model_slug(model_id)
    if not model_dir.is_dir():
        return []
    return sorted(p.parent for p in model_dir.glob(f"*/{MANIFEST_FILE}"))
