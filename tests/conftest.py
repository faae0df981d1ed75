import json
import shutil

import pytest
import torch

from tests.tiny_model import build_tiny_model

LONG_CONTEXT = 4096  # positions of `long_model_dir`: room for generations only a cancel or deadline ends


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder with a tiny random Llama and its tokenizer (see tests/tiny_model.py)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def long_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with 4096 positions (RoPE has no learned positions: only the limit changes)."""
    folder = tmp_path_factory.mktemp("tiny-long") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "max_position_embeddings": LONG_CONTEXT}))
    return folder


@pytest.fixture
def one_thread():
    """Tiny-model forwards are all overhead: on a shared CPU, two spinning threads make them ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
