"""A labelled example for probe training and a dataset of them (every loader returns a Dataset)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Example:
    group: str  # split unit: all examples of one group land in the same split (e.g. one question)
    label: int  # 1 = desired behaviour, 0 = undesired
    question: str | None = None
    answer: str | None = None
    prompt: str | None = None  # verbatim text, for datasets without a question/answer structure


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str
    examples: list[Example]
    selection: str | None = None  # how a subset was chosen (multiple-choice sets), for the manifest

    @property
    def sha256(self) -> str:
        canonical = json.dumps([asdict(e) for e in self.examples], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def groups(self) -> list[str]:
        return [e.group for e in self.examples]

    def labels(self) -> list[int]:
        return [e.label for e in self.examples]
