"""The model's own chat answers to questions: greedy and sampled, batched `generate` on the builder's model.

Prompts are the chat format's user turn with the generation prompt, built by the server's own
`chat_token_ids` (server/engine/hf_compat.py; the system prompt the template inserts by default),
so these are the answers the monitor sees at serving time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.engine.hf_compat import chat_token_ids


@dataclass(frozen=True)
class Sampling:
    samples: int = 2  # sampled answers per question, besides the greedy one
    max_tokens: int = 48
    temperature: float = 0.7
    seed: int = 0
    batch_size: int = 32  # questions per generate call


@dataclass(frozen=True)
class Answer:
    question_index: int
    kind: str  # "greedy" or "sample"
    text: str


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.inference_mode()
def _generate_batch(model: PreTrainedModel, tokenizer, prompts: list[list[int]], sampling: Sampling,
                    sample: bool) -> list[list[str]]:
    """Per prompt: one greedy answer, or `sampling.samples` sampled ones."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = _left_padded(prompts, pad_id)
    per_prompt = sampling.samples if sample else 1
    extra = {"do_sample": True, "temperature": sampling.temperature, "top_p": 1.0, "top_k": 0} if sample else \
        {"do_sample": False}
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                         max_new_tokens=sampling.max_tokens, num_return_sequences=per_prompt,
                         pad_token_id=pad_id, **extra)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return [texts[i * per_prompt:(i + 1) * per_prompt] for i in range(len(prompts))]


def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: list[str],
                     sampling: Sampling, progress: bool = True) -> list[Answer]:
    """The greedy answer and `sampling.samples` sampled answers per question (stripped, empty and
    duplicate answers of a question dropped), in question order."""
    torch.manual_seed(sampling.seed)
    prompts = [chat_token_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    found: dict[int, list[Answer]] = {i: [] for i in range(len(prompts))}
    kinds = [("greedy", False)] + ([("sample", True)] if sampling.samples > 0 else [])
    steps = len(kinds) * ((len(order) + sampling.batch_size - 1) // sampling.batch_size)
    with tqdm(total=steps, desc="on-policy answers", unit="batch", disable=not progress) as bar:
        for kind, sample in kinds:
            for start in range(0, len(order), sampling.batch_size):
                chunk = order[start:start + sampling.batch_size]
                for index, texts in zip(chunk, _generate_batch(model, tokenizer, [prompts[i] for i in chunk],
                                                                sampling, sample)):
                    found[index] += [Answer(index, kind, t.strip()) for t in texts]
                bar.update()
    return [a for i in range(len(prompts)) for a in _distinct(found[i])]


def _distinct(answers: list[Answer]) -> list[Answer]:
    seen, kept = set(), []
    for answer in answers:
        if answer.text and answer.text not in seen:
            seen.add(answer.text)
            kept.append(answer)
    return kept
