import pytest

from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder with a tiny random Llama and its tokenizer (see tests/tiny_model.py)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
