import pytest
import torch

from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder with a tiny random Llama and its tokenizer (see tests/tiny_model.py)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def one_thread():
    """Tiny-model forwards are all overhead: on a shared CPU, two spinning threads make them ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
