"""Token sampling (pure functions): penalties and logit bias, greedy, temperature, top-k, top-p.

Each request owns a generator seeded from (seed, request index), so its output does not depend on
how many ranks or slots run it, nor on the order in which requests are scheduled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

MAX_LOGPROBS = 20
MAX_PENALTY = 2.0  # OpenAI's range for presence and frequency penalties: [-2, 2]
MAX_BIAS = 100.0  # and for a logit bias: [-100, 100]
MAX_BIASED_TOKENS = 300  # OpenAI's limit on the entries of one logit_bias


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1 keeps all
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings, matched on the decoded text
    ignore_eos: bool = False  # go on past the end-of-sequence tokens (for benchmarks)
    logprobs: int | None = None  # report each token's log-probability and this many top ones; None: none
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted from a token's logit once per time it was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), ids in increasing order

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"top logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and -MAX_PENALTY <= value <= MAX_PENALTY):
                raise ValueError(f"{name} must be a number from {-MAX_PENALTY:g} to {MAX_PENALTY:g}, got {value!r}")


def parse_logit_bias(obj: object) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` (an object from token ids, as strings or integers, to a bias from
    -100 to 100) as sorted (id, bias) pairs; ValueError when it is not one."""
    if not isinstance(obj, dict):
        raise ValueError("logit_bias must be an object from token ids to numbers")
    if len(obj) > MAX_BIASED_TOKENS:
        raise ValueError(f"logit_bias may hold at most {MAX_BIASED_TOKENS} tokens, got {len(obj)}")
    pairs = {}
    for key, bias in obj.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
        if token < 0:
            raise ValueError(f"logit_bias keys must be token ids >= 0, got {key!r}")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -MAX_BIAS <= bias <= MAX_BIAS:
            raise ValueError(f"logit_bias values must be numbers from {-MAX_BIAS:g} to {MAX_BIAS:g}, got {bias!r}")
        pairs[token] = float(bias)
    return tuple(sorted(pairs.items()))


def to_sampling_params(defaults: SamplingParams | None = None, **given: object) -> SamplingParams:
    """``defaults`` (``SamplingParams()`` if None) with the ``given`` fields, as a user gives them:
    numbers and integers (no booleans), ``ignore_eos`` a boolean, ``stop`` a string or a list of
    non-empty strings, ``logit_bias`` OpenAI's object. A field given as None keeps its default. The
    one place where the API, ``generate``'s flags and JSONL prompts turn into ``SamplingParams``;
    ValueError naming the field when one is unknown or out of range."""
    names = {f.name for f in fields(SamplingParams)}
    values = {}
    for name, value in given.items():
        if name not in names:
            raise ValueError(f"{name} is not a sampling parameter")
        if value is None:
            continue
        if name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            value = float(value)
        elif name in ("max_new_tokens", "top_k", "seed", "logprobs"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        elif name == "ignore_eos":
            if not isinstance(value, bool):
                raise ValueError(f"ignore_eos must be a boolean, got {value!r}")
        elif name == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
                raise ValueError(f"stop must be a non-empty string or a list of them, got {value!r}")
            value = tuple(stops)
        elif name == "logit_bias":
            value = parse_logit_bias(value)
        values[name] = value
    return replace(defaults or SamplingParams(), **values)


def request_generator(seed: int, index: int) -> torch.Generator:
    """The generator of request ``index`` in a run seeded with ``seed``."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) every token outside the top-k and outside the top-p nucleus of ``logits`` [V]."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def adjust_logits(logits: torch.Tensor, params: SamplingParams, generated: Sequence[int]) -> torch.Tensor:
    """``logits`` [V] with OpenAI's penalties and bias, given the tokens generated so far:
    logit[j] - count[j] * frequency_penalty - (count[j] > 0) * presence_penalty + bias[j]."""
    penalised = generated and (params.presence_penalty or params.frequency_penalty)
    if not (penalised or params.logit_bias):
        return logits
    logits = logits.clone()
    if penalised:
        tokens, counts = torch.unique(torch.tensor(generated), return_counts=True)  # [U], [U]
        logits[tokens] -= counts.to(logits.dtype) * params.frequency_penalty + params.presence_penalty
    if params.logit_bias:
        tokens, biases = zip(*params.logit_bias)
        logits[list(tokens)] += torch.tensor(biases, dtype=logits.dtype)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, generated: Sequence[int] = (),
           allowed: torch.Tensor | None = None) -> int:
    """Pick the next token from float32 ``logits`` [V], after the penalties for ``generated`` (the
    tokens this sequence has generated so far) and the logit bias, among the ``allowed`` tokens
    ([V] bool, a grammar's mask; None: all)."""
    logits = adjust_logits(logits, params, generated)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if params.temperature == 0:
        return int(torch.argmax(logits))
    filtered = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    return int(torch.multinomial(filtered.softmax(-1), 1, generator=generator))


def shown_length(text: str, stops: Sequence[str]) -> int:
    """How much of ``text`` (a stream's text so far) can be shown without ever showing a stop
    string: up to the first stop string, less any tail that could be the start of one."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at >= 0:
            cut = min(cut, at)
        for k in range(min(len(stop) - 1, len(text)), 0, -1):  # the longest tail that begins ``stop``
            if text.endswith(stop[:k]):
                cut = min(cut, len(text) - k)
                break
    return cut
