"""The committed prebuilt artifacts for the default model load, validate and meet the acceptance bar."""

from server.steering.artifact import find_default_artifacts, load_artifact


def test_prebuilt_default_artifacts_load():
    folders = find_default_artifacts("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert [f.name for f in folders] == ["truthfulness", "truthfulness-qa"]
    for folder in folders:
        artifact = load_artifact(folder)
        assert artifact.behavior == folder.name
        assert artifact.num_heads == 24 and artifact.head_dim == 64
        assert artifact.manifest["accuracy"]["ensemble_test"] >= 0.75
