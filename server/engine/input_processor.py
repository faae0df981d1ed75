"""Request input processing: text to token ids, and a request to a `Sequence` ready to queue.

Everything here runs on the event loop's thread before a request is queued, so every fault of a
request (too long for the context, token ids outside the vocabulary, a grammar that does not
compile, an unknown behaviour) is a 4xx before any byte is streamed. Nothing here runs torch.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from server.engine.grammar import GrammarCompiler
from server.engine.loader import LoadedModel
from server.engine.output import TextOutput
from server.engine.processors import DecodingState
from server.engine.sequence import Sequence
from server.engine.types import EngineEvent, GenerationRequest, SteeringParams, ToolPrompt
from server.errors import InvalidRequestError
from server.steering.policy import BehaviorDefaults, resolve_steering

log = logging.getLogger(__name__)


class InputProcessor:
    def __init__(self, loaded: LoadedModel, eos_ids: frozenset[int], steering_defaults: SteeringParams,
                 behavior_defaults: dict[str, BehaviorDefaults], default_max_tokens: int,
                 request_timeout: float | None):
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.vocab_size = loaded.model.config.vocab_size
        self.max_model_len = loaded.max_model_len
        self.eos_ids = eos_ids
        self.steering_defaults = steering_defaults
        self.behavior_defaults = behavior_defaults
        self.default_max_tokens = default_max_tokens
        self.request_timeout = request_timeout
        self.grammars = _grammar_compiler(loaded, eos_ids)  # None: this tokenizer cannot do structured output
        self.max_token_chars = _longest_token_chars(self.tokenizer)  # a prompt longer than this per token can't fit

    # -- tokenising
    def encode_chat(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        add_special_tokens: bool = False,
        tools: ToolPrompt | None = None,
    ) -> list[int]:
        """The chat template's prompt for `messages`, tokenised. The keyword arguments are /tokenize's
        (vLLM's): the defaults are what generation uses. `tools`: the same chat for a template that
        renders tools itself, used when it writes calls as the tool grammar does (`<tool_call>`)."""
        tokenizer = self.tokenizer
        template_tools = None
        if tools is not None and "<tool_call>" in str(getattr(tokenizer, "chat_template", None) or ""):
            messages, template_tools = tools.messages, tools.tools
        self._check_prompt_chars(sum(len(m.get("content") or "") for m in messages), "messages")
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        try:
            text = tokenizer.apply_chat_template(
                messages,
                tools=template_tools,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
            )
        except Exception as exc:  # template errors (e.g. role order) are the request's fault
            raise InvalidRequestError(f"the chat template rejected these messages: {exc}", param="messages") from exc
        # What apply_chat_template(tokenize=True) does, with the special tokens made a choice.
        return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def encode_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            self._check_prompt_chars(len(prompt), "prompt")
            return self.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
        self._check_token_ids(prompt, "prompt")
        return list(prompt)

    def decode_tokens(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens included (so /tokenize then /detokenize round-trips)."""
        self._check_token_ids(token_ids, "tokens")
        return self.tokenizer.decode(token_ids)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """Each token's vocabulary string (e.g. "Ġthe"), as /tokenize's `return_token_strs` gives them."""
        self._check_token_ids(token_ids, "tokens")
        return list(self.tokenizer.convert_ids_to_tokens(token_ids))

    # -- a request to a sequence
    def sequence(self, request: GenerationRequest, emit: Callable[[EngineEvent], None]) -> Sequence:
        """The request checked against the model and made a `Sequence` (raises InvalidRequestError)."""
        max_tokens = self._max_tokens(request)
        steering = resolve_steering(request.steering, self.steering_defaults, self.behavior_defaults)
        decoding = self._decoding_state(request, max_tokens)
        return Sequence(
            request=request,
            steering=steering,
            max_tokens=max_tokens,
            eos_ids=self.eos_ids,
            output=TextOutput(self.tokenizer, request.prompt_token_ids, request.sampling.stop, emit),
            emit=emit,
            generator=self._generator(request.sampling.seed),
            deadline=None if self.request_timeout is None else time.monotonic() + self.request_timeout,
            decoding=decoding,
        )

    def _max_tokens(self, request: GenerationRequest) -> int:
        prompt_len, context = len(request.prompt_token_ids), self.max_model_len
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        room = context - prompt_len
        if room < 1:
            raise InvalidRequestError(
                f"the prompt has {prompt_len} tokens; this model's context is {context} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        asked = request.sampling.max_tokens
        if asked is not None and asked > room:
            raise InvalidRequestError(
                f"max_tokens is {asked}, but only {room} tokens fit after the {prompt_len}-token prompt "
                f"in this model's {context}-token context",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked if asked is not None else min(self.default_max_tokens, room)

    def _decoding_state(self, request: GenerationRequest, max_tokens: int) -> DecodingState:
        """Check what needs the model (token ids, the context, the tokenizer) and compile the grammar."""
        s = request.sampling
        bad = sorted(t for t, _ in s.logit_bias if not 0 <= t < self.vocab_size)
        if bad:
            raise InvalidRequestError(
                f"logit_bias names token ids outside this model's vocabulary [0, {self.vocab_size}): {bad[:5]}",
                param="logit_bias",
            )
        if s.min_tokens > max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({s.min_tokens}) is larger than max_tokens ({max_tokens})", param="min_tokens"
            )
        matcher = None
        if s.response_format is not None:
            if self.grammars is None:
                raise InvalidRequestError(
                    "structured output is not available for this model's tokenizer", param="response_format"
                )
            matcher = self.grammars.matcher(s.response_format)
        return DecodingState(s, matcher)

    def _generator(self, seed: int | None) -> torch.Generator | None:
        if seed is None:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed % 2**64)  # torch takes [0, 2**64); n choices use seed + i, which may pass 2**63
        return gen

    def _check_token_ids(self, token_ids: list[int], param: str) -> None:
        if any(not 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequestError(f"{param} token ids must be in [0, {self.vocab_size})", param=param)

    def _check_prompt_chars(self, chars: int, param: str) -> None:
        """Refuse, before tokenising, text that needs more tokens than the context has: no token is
        longer than `max_token_chars` characters, so `chars` characters take at least chars / that
        many tokens. (Twice the bound: a Unicode normaliser may first merge pairs of characters.)"""
        if self.max_token_chars and chars > 2 * self.max_model_len * self.max_token_chars:
            raise InvalidRequestError(
                f"the prompt has {chars} characters, more than fit in this model's {self.max_model_len}-token context",
                param=param,
                code="context_length_exceeded",
            )


def _longest_token_chars(tokenizer) -> int:
    """Characters in the vocabulary's longest token (0 if the tokenizer cannot say)."""
    try:
        return max(len(tokenizer.convert_tokens_to_string([token])) for token in tokenizer.get_vocab())
    except Exception:  # an exotic tokenizer: skip the character pre-check, the token count still applies
        log.warning("could not measure the vocabulary's longest token; prompts are only checked after tokenising")
        return 0


def _grammar_compiler(loaded: LoadedModel, eos_ids: frozenset[int]) -> GrammarCompiler | None:
    tokenizer = loaded.tokenizer
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(eos_ids, default=0)
    try:
        return GrammarCompiler(tokenizer, loaded.model.config.vocab_size, eos)
    except Exception:  # an exotic tokenizer: serve everything else, refuse response_format with a 400
        log.warning("structured output is off: the grammar engine cannot use this tokenizer", exc_info=True)
        return None
