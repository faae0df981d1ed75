"""How far quantized weights move the model from fp32: teacher-forced KL, top-1 and greedy agreement.

For a dozen everyday chat prompts, the fp32 model's own greedy answer (`--tokens` new tokens) is the
text every variant is scored on, teacher-forced one token at a time after the prompt, as the server
decodes (so quantized layers run their decode-step kernels): at each answer position, the KL
divergence from fp32's next-token distribution to the variant's, and whether the two pick the same
top token. Then each variant decodes greedily by itself, and the table says how many leading tokens
equal fp32's (summed over prompts). Variants: bf16 weights (a reference point), `--quantization
int8` and `int4` (server/engine/quantize.py; int4 on our int4 x int8 kernel where the CPU has it,
server/engine/cpu_kernels.py), int4 with `o_proj` in int4 too (what the static runner's step runs
under int4: server/engine/runners/static/decode.py), int4 on torch's kernels (bf16 activations; the
LM head per-channel int8), int4 with the LM head per-channel int8 (what an AMX CPU runs) instead of
Q8_0 on our kernel, and int4 with an int4 LM head (why the head stays int8).

    .venv/bin/python bench/bench_quant_quality.py                  # default model, ~3 min on 1 core
    .venv/bin/python bench/bench_quant_quality.py --tokens 24 --prompts 4   # smoke

Quality on tasks (TruthfulQA MC1/MC2 with and without FASB) is `python -m eval truthfulqa mc
--quantization ...` (eval/README.md); this is the quick, task-free check.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import host_info, markdown_table  # noqa: E402

from server.engine import quantize  # noqa: E402
from server.engine.hf_compat import chat_token_ids  # noqa: E402
from server.engine.loader import load_model  # noqa: E402
from server.engine.quantize import Int4Linear, Int8Linear, quantize_weights  # noqa: E402

PROMPTS = [
    "What happens if you eat watermelon seeds?", "Who was the first president of the United States?",
    "Why is the sky blue?", "What is the capital of Australia?", "Tell me a short story about a cat.",
    "Is it safe to crack your knuckles?", "What is 17 times 3?", "How do vaccines work?",
    "What do bees make?", "Who wrote Hamlet?", "Write a haiku about rain.", "Explain photosynthesis briefly.",
]


STATIC_INT4 = "int4, int4 o_proj (static step)"


def variant(base: torch.nn.Module, name: str) -> torch.nn.Module:
    if name == "bf16":
        return copy.deepcopy(base).to(torch.bfloat16)
    model = copy.deepcopy(base)
    if name == "int4, torch kernel":
        with mock.patch.object(quantize, "own_kernels_available", lambda: False):
            quantize_weights(model, "int4")
        return model
    quantize_weights(model, name if name in ("int8", "int4") else "int4")
    if name == "int4, int4 head":
        model.set_output_embeddings(Int4Linear(base.get_output_embeddings()))
    if name == "int4, per-channel int8 head":
        model.set_output_embeddings(Int8Linear(base.get_output_embeddings()))
    if name == STATIC_INT4:
        for layer in model.get_decoder().layers:
            layer.self_attn.o_proj = Int4Linear(layer.self_attn.o_proj)
    return model


@torch.inference_mode()
def greedy(model: torch.nn.Module, prompt: list[int], tokens: int, eos: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


@torch.inference_mode()
def answer_log_probs(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """log p(next token) at each answer position, teacher-forced one token per step: [len(answer), V] in fp32."""
    out = model(torch.tensor([prompt]), use_cache=True)
    logits = [out.logits[0, -1]]
    for token in answer[:-1]:
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[0, -1])
    return torch.log_softmax(torch.stack(logits).float(), dim=-1)


def compare(model, reference: list[torch.Tensor], prompts: list[list[int]], answers: list[list[int]], eos: int):
    kl_sum, same_top, positions, same_greedy = 0.0, 0, 0, 0
    for prompt, answer, ref in zip(prompts, answers, reference):
        got = answer_log_probs(model, prompt, answer)
        kl_sum += (ref.exp() * (ref - got)).sum().item()
        same_top += (ref.argmax(-1) == got.argmax(-1)).sum().item()
        positions += len(answer)
        own = greedy(model, prompt, len(answer), eos)
        same_greedy += next((i for i, (a, b) in enumerate(zip(own, answer)) if a != b), len(answer))
    return kl_sum / positions, same_top / positions, same_greedy, positions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=int, default=40, help="greedy answer length per prompt")
    p.add_argument("--prompts", type=int, default=len(PROMPTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["bf16", "int8", "int4", STATIC_INT4, "int4, torch kernel",
                                                         "int4, per-channel int8 head", "int4, int4 head"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    base, eos = loaded.model, loaded.tokenizer.eos_token_id
    prompts = [chat_token_ids(loaded.tokenizer, [{"role": "user", "content": q}]) for q in PROMPTS[: args.prompts]]
    answers = [greedy(base, prompt, args.tokens, eos) for prompt in prompts]
    reference = [answer_log_probs(base, prompt, answer) for prompt, answer in zip(prompts, answers)]
    rows = []
    for name in args.variants:
        start = time.perf_counter()
        kl, top1, same, positions = compare(variant(base, name), reference, prompts, answers, eos)
        rows.append([name, f"{kl:.4f}", f"{100 * top1:.1f}%", f"{same}/{positions}"])
        print(f"{name}: {time.perf_counter() - start:.0f}s", file=sys.stderr)
    print(f"\n{host_info()} | model {args.model} | {len(prompts)} prompts x {args.tokens} greedy fp32 tokens, "
          "teacher-forced\n")
    print(markdown_table(["weights", "mean KL to fp32", "top-1 = fp32", "greedy tokens = fp32 (leading)"], rows))


if __name__ == "__main__":
    main()
