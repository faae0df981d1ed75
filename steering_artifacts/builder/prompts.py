"""Turn examples into the token ids whose last position the probes read.

Two formats:
- `qa`: the reference text "Q: {question} A: {answer}" (honest_llama / FASB), tokenised with
  the tokenizer's default special tokens, as the reference does; prompt-only examples are used
  verbatim.
- `chat`: the question as the user turn and the answer as the assistant turn, through the
  model's chat template (with whatever default system prompt the template inserts). The text
  ends with the answer's last token: the template's closing end-of-turn token (ChatML
  `<|im_end|>`) and what follows are *not* included, because while generating, the server's
  monitor scores each newly generated answer token before any end-of-turn exists.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from steering_artifacts.builder.datasets import Example

PROMPT_FORMATS = ("qa", "chat")


def qa_text(example: Example) -> str:
    if example.prompt is not None:
        return example.prompt
    return f"Q: {example.question} A: {example.answer}"


def chat_text(example: Example, tokenizer: PreTrainedTokenizerBase) -> str:
    if example.question is None or example.answer is None:
        raise ValueError(
            "the chat format needs 'question' and 'answer' in every example; use --format qa for 'prompt' data"
        )
    if not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template; use --format qa")
    turn = [{"role": "user", "content": example.question}]
    # Rendering the user turn with the generation prompt and appending the answer gives exactly
    # the text of the full two-turn conversation, cut before the assistant's end-of-turn.
    return tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False) + example.answer


def encode(examples: list[Example], prompt_format: str, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids per example; the probe reads the activation at the last one."""
    if prompt_format == "qa":
        return [tokenizer(qa_text(e)).input_ids for e in examples]
    if prompt_format == "chat":
        # The template writes its own special tokens; don't let the tokenizer add a second BOS.
        return [tokenizer(chat_text(e, tokenizer), add_special_tokens=False).input_ids for e in examples]
    raise ValueError(f"unknown prompt format {prompt_format!r}; use one of {PROMPT_FORMATS}")
