"""The committed prebuilt artifacts for the default model load, validate and meet the acceptance bar."""

from server.steering.artifact import find_default_artifacts, load_artifact

TRUTHFULNESS = ["truthfulness", "truthfulness-qa"]
MULTIPLE_CHOICE = ["copa", "mmlu", "nli", "winogrande"]  # the paper's multiple-choice tasks
GUARDS = ["insults", "repetition", "tone"]  # trained on the model's own answers, judged independently


def test_prebuilt_default_artifacts_load():
    folders = find_default_artifacts("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert [f.name for f in folders] == sorted(TRUTHFULNESS + MULTIPLE_CHOICE + GUARDS)
    for folder in folders:
        artifact = load_artifact(folder)
        assert artifact.behavior == folder.name
        assert artifact.num_heads == 24 and artifact.head_dim == 64
        if folder.name in TRUTHFULNESS:  # the MC tasks' probes are near chance on the 135M model
            assert artifact.manifest["accuracy"]["ensemble_test"] >= 0.75
        elif folder.name in GUARDS:
            assert artifact.description and artifact.quality["heldout_auroc"] >= 0.75
            recommended = artifact.manifest["recommended"]
            assert "provisional" not in recommended and recommended["false_alarm_rate"] <= 0.05
        else:
            assert artifact.manifest["split"]["val_ids"] and artifact.manifest["dataset"]["selection"]
