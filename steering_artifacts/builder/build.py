"""The build pipeline: dataset -> prompts -> activations -> split -> probes -> artifact + report."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from server.engine.loader import load_model
from server.steering.artifact import SteeringArtifact, artifacts_root, model_fingerprint, model_slug, save_artifact
from steering_artifacts.builder import on_policy, probes
from steering_artifacts.builder.calibration import expected_calibration_error, plot_reliability
from steering_artifacts.builder.collect import cache_key, cached_activations, collect_activations
from steering_artifacts.builder.datasets import Dataset, load_dataset, load_jsonl
from steering_artifacts.builder.generate import Sampling
from steering_artifacts.builder.positions import BUCKETS, answer_starts, bucket, read_plan
from steering_artifacts.builder.prompts import encode
from steering_artifacts.builder.split import Split, fold_split, split_by_group

log = logging.getLogger(__name__)

REPORT_HEAD_COUNTS = (1, 4, 8, 16, 24, 32, 48)
ACTIVATION_POSITION = {
    "qa": "last token of 'Q: {question} A: {answer}'",
    "chat": "last token of the answer in the assistant turn (the template's end-of-turn token is not included)",
}
SIGMA_SOURCE = "train+validation activations of the build dataset, in the artifact's prompt format"
RELIABILITY_PNG = "reliability.png"


def _position_text(config: "BuildConfig") -> str:
    if not config.answer_positions:
        return ACTIVATION_POSITION[config.prompt_format]
    return (f"answer-prefix positions ({config.prompt_format} format): answer tokens t >= min({config.first_position}, "
            f"answer length) (1-based), up to {config.answer_positions} per answer evenly spaced, always the last; "
            "each labelled with the answer's label")


@dataclass
class BuildConfig:
    behavior: str
    dataset: str  # "truthfulqa", a multiple-choice set (copa, snli, mmlu, winogrande) or a .jsonl path
    data_dir: str | None = None
    max_items: int | None = None  # multiple-choice sets: subsample to this many items (None: the set's default)
    model: str = "default"
    prompt_format: str = "chat"
    out: str | None = None  # default: steering_artifacts/<model-slug>/<behavior>
    num_heads: int = 24
    direction: str = "mass_mean"
    C: float = 1.0  # inverse L2 strength of the probes, on standardised activations
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0
    folds: int | None = None  # k-fold cross-validation: `fold` of `folds` is the test set, val is split[1] of all
    fold: int | str | None = None  # a fold number, or 'all' for `build_folds`
    alpha: float = 5.0
    threshold: float = 0.5
    backtrack_tokens: int = 10
    eval_formats: tuple[str, ...] = ()  # extra prompt formats to report held-out accuracy in
    answer_positions: int = 0  # >0: read up to this many answer-prefix positions per answer (0: last token only)
    positions_from: int | None = None  # first answer token read (1-based; default backtrack_tokens, as the monitor)
    false_alarm_set: str | None = "default"  # correct answers the monitor should not fire on; None: skip
    extra_train: str | None = None  # a JSONL dataset added to the training split only (never validated/tested on)
    on_policy: bool = False  # add the model's own answers to the training questions, labelled by the judge
    on_policy_samples: int = 2  # sampled answers per training question, besides the greedy one
    on_policy_max_tokens: int = 48
    on_policy_temperature: float = 0.7
    batch_tokens: int = 2048
    max_pack_tokens: int = 1024
    cache_dir: str | None = None  # default: steering_artifacts/.activations (git-ignored)
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    progress: bool = True
    command: str | None = None  # the command line, recorded in the manifest
    description: str | None = None  # for clients (GET /v1/models): what the probes watch and steering does

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.on_policy_samples, self.on_policy_max_tokens, self.on_policy_temperature, self.seed)

    @property
    def first_position(self) -> int:
        return self.positions_from if self.positions_from is not None else self.backtrack_tokens


def make_split(config: BuildConfig, groups: list[str]) -> Split:
    """The default held-out split by fractions, or one fold of a k-fold split (val fraction: the middle one)."""
    if config.folds:
        return fold_split(groups, config.folds, config.fold, config.split[1], config.seed)
    return split_by_group(groups, config.split, config.seed)


def _fold_record(config: BuildConfig) -> dict:
    """Manifest keys that tell eval this artifact is one fold (eval/truthfulqa/folds.py pools the folds)."""
    return {"folds": config.folds, "fold": config.fold} if config.folds else {}


@dataclass
class Activations:
    """Head activations [M, L, H, D] (float16) of one dataset in one prompt format: one row per read
    position; `example[m]` is the example it belongs to, `position[m]` its 0-based answer position
    and `length[m]` the answer's length in tokens."""

    values: np.ndarray
    seconds: float
    cpu_seconds: float
    from_cache: bool
    example: np.ndarray
    position: np.ndarray
    length: np.ndarray

    def rows(self, examples: np.ndarray, last_only: bool = False) -> np.ndarray:
        """Row indices of these examples (only each answer's last token with `last_only`)."""
        chosen = np.isin(self.example, examples)
        if last_only:
            chosen &= self.position == self.length - 1
        return np.flatnonzero(chosen)

    def buckets(self, rows: np.ndarray) -> np.ndarray:
        return np.array([bucket(int(j), int(n)) for j, n in zip(self.position[rows], self.length[rows])])

    def select(self, rows: np.ndarray, heads: list[tuple[int, int]] | None = None) -> np.ndarray:
        chosen = self.values[rows]
        if heads is None:
            return chosen.astype(np.float32)
        layers, head_ids = zip(*heads)
        return chosen[:, list(layers), list(head_ids)].astype(np.float32)


@dataclass
class BuildResult:
    artifact: SteeringArtifact
    out: Path
    report: dict = field(default_factory=dict)


def _collect(config: BuildConfig, loaded, dataset: Dataset, prompt_format: str,
             answer_positions: int = 0) -> Activations:
    model = loaded.model
    token_ids = encode(dataset.examples, prompt_format, loaded.tokenizer)
    starts = answer_starts(dataset.examples, token_ids, prompt_format, loaded.tokenizer)
    if answer_positions:
        reads, example, position, length = read_plan(token_ids, starts, config.first_position, answer_positions)
    else:  # the last token only: what earlier builds did, and the same cache entries
        reads = None
        example = np.arange(len(token_ids))
        length = np.array([len(ids) - start for ids, start in zip(token_ids, starts)])
        position = length - 1
    cfg = model.config.get_text_config()
    num_heads, head_dim = (
        cfg.num_attention_heads,
        getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
    )
    model_hash = model_fingerprint(model, range(cfg.num_hidden_layers))["o_proj_sha256"]
    cache_dir = Path(config.cache_dir) if config.cache_dir else artifacts_root() / ".activations"
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    start, cpu_start = time.perf_counter(), time.process_time()
    computed = []

    def compute() -> np.ndarray:
        computed.append(True)
        return collect_activations(
            model,
            token_ids,
            dataset.groups(),
            pad_id,
            config.batch_tokens,
            config.max_pack_tokens,
            progress=config.progress,
            reads=reads,
        )

    flat = cached_activations(cache_dir, cache_key(model_hash, token_ids, reads), compute)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    log.info(
        "activations (%s): %d prompts, %d positions read, %d tokens, %.1fs wall, %.1fs CPU%s",
        prompt_format,
        len(token_ids),
        len(example),
        sum(map(len, token_ids)),
        seconds,
        cpu_seconds,
        "" if computed else " (cache)",
    )
    values = flat.reshape(len(example), cfg.num_hidden_layers, num_heads, head_dim)
    return Activations(values, seconds, cpu_seconds, not computed, example, position, length)


def _with_extra(acts: Activations, extra: Activations, num_examples: int) -> Activations:
    """Append the extra training examples' rows; their example indices follow the main dataset's."""
    return Activations(
        np.concatenate([acts.values, extra.values]), acts.seconds + extra.seconds,
        acts.cpu_seconds + extra.cpu_seconds, acts.from_cache and extra.from_cache,
        np.concatenate([acts.example, extra.example + num_examples]),
        np.concatenate([acts.position, extra.position]), np.concatenate([acts.length, extra.length]),
    )


def _add_training_data(config: BuildConfig, loaded, acts: Activations, labels: np.ndarray, split: Split,
                       data: Dataset) -> tuple[Activations, np.ndarray, Split]:
    """Append examples that only ever train: the split (and the held-out ids evaluation reads) stays the dataset's."""
    data_acts = _collect(config, loaded, data, config.prompt_format, config.answer_positions)
    ids = np.arange(len(labels), len(labels) + len(data.examples))
    split = Split(np.concatenate([split.train, ids]), split.val, split.test, split.test_groups, split.val_groups)
    log.info("training-only data %s: %d examples, %.1f%% desired", data.source, len(data.examples),
             100 * np.mean(data.labels()))
    return _with_extra(acts, data_acts, len(labels)), np.concatenate([labels, data.labels()]), split


def _row_split(acts: Activations, split: Split, last_only: bool = False) -> Split:
    """The example split carried over to activation rows (an answer's positions stay in its split)."""
    return Split(acts.rows(split.train, last_only), acts.rows(split.val, last_only), acts.rows(split.test, last_only),
                 split.test_groups, split.val_groups)


def _select_heads(acts: Activations, labels: np.ndarray, split: Split, config: BuildConfig):
    """Probes for all heads on train; returns (top heads, their weights [K, D], biases [K], head val acc [L, H])."""
    if len(set(labels[split.train].tolist())) < 2:
        raise ValueError(
            "the training split holds only one label; the dataset needs both desired (1) and undesired (0) examples"
        )
    start = time.perf_counter()
    weights, biases = probes.fit_head_probes(
        acts.select(split.train), labels[split.train], config.C, config.seed, config.progress
    )
    val_accuracy = probes.head_accuracy(acts.select(split.val), labels[split.val], weights, biases)
    top = probes.rank_heads(val_accuracy, config.num_heads)
    log.info(
        "probes: fitted %d heads in %.1fs; best validation accuracy %.3f",
        weights.shape[0] * weights.shape[1],
        time.perf_counter() - start,
        val_accuracy.max(),
    )
    layer_ids, head_ids = zip(*top)
    return top, weights[list(layer_ids), list(head_ids)], biases[list(layer_ids), list(head_ids)], val_accuracy


def _accuracy_report(acts: Activations, labels, split: Split, top, weights, biases, val_accuracy) -> dict:
    test_x, test_y = acts.select(split.test, top), labels[split.test]
    val_x, val_y = acts.select(split.val, top), labels[split.val]
    test_head_acc = (((np.einsum("nkd,kd->nk", test_x, weights) + biases) > 0) == test_y[:, None]).mean(axis=0)
    counts = [n for n in REPORT_HEAD_COUNTS if n < len(top)] + [len(top)]
    return {
        "ensemble_test": probes.ensemble_accuracy(test_x, test_y, weights, biases),
        "ensemble_val": probes.ensemble_accuracy(val_x, val_y, weights, biases),
        "ensemble_test_by_num_heads": {
            str(n): probes.ensemble_accuracy(test_x[:, :n], test_y, weights[:n], biases[:n]) for n in counts
        },
        "majority_class_test": float(max(test_y.mean(), 1 - test_y.mean())),
        "top_heads": [
            {"layer": layer, "head": head, "val": float(val_accuracy[layer, head]), "test": float(test_head_acc[k])}
            for k, (layer, head) in enumerate(top)
        ],
    }


def _held_out_scores(acts: Activations, labels, split: Split, top, weights, biases) -> dict:
    """Ensemble accuracy on the test questions, and its mean P(desired) per class (what a threshold sees)."""
    p = probes.ensemble_probability(acts.select(split.test, top), weights, biases)
    y = labels[split.test]
    return {
        "accuracy": float(((p > 0.5) == y.astype(bool)).mean()),
        "mean_p_desired": float(p[y == 1].mean()),
        "mean_p_undesired": float(p[y == 0].mean()),
    }


def _position_report(acts: Activations, labels, rows: Split, top, weights, biases) -> tuple[dict, dict]:
    """Held-out (test questions) accuracy, AUROC, ECE and mean P(desired) per class, per position bucket."""
    from steering_artifacts.builder.false_alarm import auroc

    test = rows.test
    p = probes.ensemble_probability(acts.select(test, top), weights, biases)
    y, names = labels[test], acts.buckets(test)
    report, curves = {}, {}
    for name in ("all", *BUCKETS):
        members = np.ones(len(test), bool) if name == "all" else names == name
        if not members.any():
            continue
        pm, ym = p[members], y[members]
        report[name] = {
            "rows": int(members.sum()),
            "accuracy": float(((pm > 0.5) == ym.astype(bool)).mean()),
            "auroc": auroc(pm[ym == 1], pm[ym == 0]) if 0 < ym.sum() < len(ym) else None,
            "ece": expected_calibration_error(pm, ym),
            "mean_p_desired": float(pm[ym == 1].mean()) if (ym == 1).any() else None,
            "mean_p_undesired": float(pm[ym == 0].mean()) if (ym == 0).any() else None,
        }
        if name != "all":
            curves[name] = (pm, ym)
    return report, curves


def _false_alarm(config: BuildConfig, loaded, artifact: SteeringArtifact) -> dict:
    """Monitor firing rate on the committed correct answers, at the builder's (provisional) threshold."""
    from steering_artifacts.builder.false_alarm import DEFAULT_SET, false_alarm_report, load_pairs, score_answers

    source = DEFAULT_SET if config.false_alarm_set == "default" else Path(config.false_alarm_set)
    scored = score_answers(loaded.model, loaded.tokenizer, artifact, load_pairs(source), config.backtrack_tokens,
                           progress=config.progress)
    return false_alarm_report(scored, config.threshold, config.backtrack_tokens, source)


def _manifest(config: BuildConfig, loaded, dataset: Dataset, split: Split, top, report: dict) -> dict:
    examples = {"train": len(split.train), "val": len(split.val), "test": len(split.test)}
    test_questions = sorted({dataset.examples[i].question for i in split.test if dataset.examples[i].question})
    return {
        "format_version": 1,
        "behavior": config.behavior,
        **({"description": config.description} if config.description else {}),
        "model_id": loaded.model_id,
        "fingerprint": model_fingerprint(loaded.model, [layer for layer, _ in top]),
        "prompt_format": config.prompt_format,
        "activation_position": _position_text(config),
        "direction_method": config.direction,
        "sigma_source": SIGMA_SOURCE,
        "dataset": {
            "name": dataset.name,
            "source": dataset.source,
            "sha256": dataset.sha256,
            "num_examples": len(dataset.examples),
            "num_groups": len(set(dataset.groups())),
        }
        | ({"selection": dataset.selection} if dataset.selection else {}),
        "split": {
            "unit": "group (question)",
            "seed": config.seed,
            "fractions": dict(zip(("train", "val", "test"), config.split)),
            **_fold_record(config),
            "num_examples": examples,
            "test_ids": split.test_groups,
            "val_ids": split.val_groups,
            "test_questions": test_questions,
        },
        "builder": {key: value for key, value in asdict(config).items()
                    if key not in ("progress", "command", "description")}
        | {"command": config.command},
        "seed": config.seed,
        "accuracy": report,
        "recommended": {
            "alpha": config.alpha,
            "threshold": config.threshold,
            "backtrack_tokens": config.backtrack_tokens,
            "provisional": True,
            "note": "builder flags, not yet tuned; the FASB decoding sweep on validation questions rewrites them",
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def build(config: BuildConfig) -> BuildResult:
    """Run the whole pipeline and write the artifact; returns it with its report."""
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    loaded = load_model(config.model, device=config.device, dtype=config.dtype)
    dataset = load_dataset(config.dataset, config.data_dir, config.max_items, config.seed)
    labels = np.array(dataset.labels())
    log.info(
        "dataset %s: %d examples in %d groups, %.1f%% desired",
        dataset.name,
        len(labels),
        len(set(dataset.groups())),
        100 * labels.mean(),
    )
    acts = _collect(config, loaded, dataset, config.prompt_format, config.answer_positions)
    split = make_split(config, dataset.groups())
    out = Path(config.out) if config.out else artifacts_root() / model_slug(loaded.model_id) / config.behavior
    added = {}
    if config.on_policy:  # before the extra data is appended: only the dataset's own training questions
        records = on_policy.on_policy_records(loaded, dataset, split, config.sampling, out, config.progress)
        policy = on_policy.as_dataset(records, out)
        acts, labels, split = _add_training_data(config, loaded, acts, labels, split, policy)
        added["on_policy"] = on_policy.summary(records, config.sampling) | {"sha256": policy.sha256}
    extra = load_jsonl(config.extra_train) if config.extra_train else None
    if extra is not None:
        acts, labels, split = _add_training_data(config, loaded, acts, labels, split, extra)
        added["extra_train"] = {"source": extra.source, "sha256": extra.sha256, "num_examples": len(extra.examples),
                                "used_for": "training only (probes, directions, sigma); never validation or test"}
    rows, ends = _row_split(acts, split), _row_split(acts, split, last_only=True)
    row_labels = labels[acts.example]
    log.info(
        "split by group: %d/%d/%d examples, %d/%d/%d activation rows (train/val/test)",
        len(split.train), len(split.val), len(split.test), len(rows.train), len(rows.val), len(rows.test),
    )
    top, weights, biases, val_accuracy = _select_heads(acts, row_labels, rows, config)
    fit_rows = np.concatenate([rows.train, rows.val])
    fit_x = acts.select(fit_rows, top)
    unit = probes.directions(fit_x, row_labels[fit_rows], weights, config.direction)
    # The headline accuracies stay those of each answer's last token, comparable with earlier builds;
    # `test_by_position` has every read position.
    report = _accuracy_report(acts, row_labels, ends, top, weights, biases, val_accuracy)
    report["test_by_position"], curves = _position_report(acts, row_labels, rows, top, weights, biases)
    report["test_ensemble_by_format"] = {
        config.prompt_format: _held_out_scores(acts, row_labels, ends, top, weights, biases)
    }
    for prompt_format in config.eval_formats:
        if prompt_format != config.prompt_format:
            other = _collect(config, loaded, dataset, prompt_format)
            report["test_ensemble_by_format"][prompt_format] = _held_out_scores(
                other, labels[other.example], _row_split(other, split, True), top, weights, biases
            )
    timings = {
        "collection": round(acts.seconds, 1),
        "collection_cpu": round(acts.cpu_seconds, 1),
        "collection_cached": acts.from_cache,
        "total": round(time.perf_counter() - started, 1),
    }
    artifact = SteeringArtifact(
        behavior=config.behavior,
        layers=torch.tensor([layer for layer, _ in top], dtype=torch.int64),
        heads=torch.tensor([head for _, head in top], dtype=torch.int64),
        probe_weight=torch.tensor(weights, dtype=torch.float32),
        probe_bias=torch.tensor(biases, dtype=torch.float32),
        direction=torch.tensor(unit, dtype=torch.float32),
        sigma=torch.tensor(probes.projection_std(fit_x, unit), dtype=torch.float32),
        val_accuracy=torch.tensor([val_accuracy[layer, head] for layer, head in top], dtype=torch.float32),
        manifest=_manifest(config, loaded, dataset, split, top, report) | {"build_seconds": timings} | added,
    )
    false_alarm = {}
    if config.false_alarm_set and config.prompt_format == "chat":
        false_alarm = {"false_alarm": _false_alarm(config, loaded, artifact)}
        artifact.manifest.update(false_alarm)
    save_artifact(artifact, out)
    artifact.path = out
    png = plot_reliability(curves, out / RELIABILITY_PNG, f"{config.behavior}: held-out test answers by position\n"
                           f"(answer tokens from the {config.first_position}th, up to {config.answer_positions} each)"
                           if config.answer_positions else f"{config.behavior}: held-out test answers, last token")
    report = report | false_alarm | {"timings_s": timings, "reliability_png": str(png) if png else None}
    log_report(report, out)
    return BuildResult(artifact, out, report)


def log_report(report: dict, out: Path) -> None:
    log.info("top heads (layer, head): validation / test accuracy")
    for rank, head in enumerate(report["top_heads"][:10], start=1):
        log.info("  %2d. L%-2d H%-2d  %.3f / %.3f", rank, head["layer"], head["head"], head["val"], head["test"])
    by_n = ", ".join(f"{n}: {acc:.3f}" for n, acc in report["ensemble_test_by_num_heads"].items())
    log.info(
        "ensemble held-out test accuracy by number of heads: %s (majority class %.3f)",
        by_n,
        report["majority_class_test"],
    )
    for name, scores in report.get("test_by_position", {}).items():
        log.info(
            "held-out by position, %s: %d rows, accuracy %.3f, ECE %.3f; mean P(desired) %.2f / %.2f (desired / not)",
            name, scores["rows"], scores["accuracy"], scores["ece"],
            scores["mean_p_desired"] or float("nan"), scores["mean_p_undesired"] or float("nan"),
        )
    if "false_alarm" in report:
        fa = report["false_alarm"]
        log.info("false alarms: fires on %d of %d correct answers at threshold %.2f (s = %d); <= 5%% up to %.3f",
                 fa["fired"], fa["answers"], fa["threshold"], fa["backtrack_tokens"], fa["max_threshold_at_5pct"])
    if report.get("reliability_png"):
        log.info("reliability diagram: %s", report["reliability_png"])
    for prompt_format, scores in report["test_ensemble_by_format"].items():
        log.info(
            "held-out ensemble, %s prompts: accuracy %.3f; mean P(desired) %.2f on desired, %.2f on undesired",
            prompt_format,
            scores["accuracy"],
            scores["mean_p_desired"],
            scores["mean_p_undesired"],
        )
    log.info("wrote %s in %.1fs", out, report["timings_s"]["total"])


def build_folds(config: BuildConfig) -> list[BuildResult]:
    """All `config.folds` folds, fold i into `<out>/fold-i`. The activation cache is keyed by model and
    token ids, not by split, so only the first fold collects; the others refit probes
    (steering_artifacts/README.md, "Folds for cross-validation")."""
    started, results = time.perf_counter(), []
    for fold in range(config.folds):
        log.info("fold %d/%d: building into %s/fold-%d", fold + 1, config.folds, config.out, fold)
        results.append(build(replace(config, fold=fold, out=str(Path(config.out) / f"fold-{fold}"))))
        elapsed = time.perf_counter() - started
        log.info("fold %d/%d done; %.0fs so far, ~%.0fs to go", fold + 1, config.folds, elapsed,
                 elapsed / (fold + 1) * (config.folds - fold - 1))
    return results
