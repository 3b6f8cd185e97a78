"""Constrained sampling: a request's grammar (a JSON schema, any JSON object, or a tool call in its
family's format) and, for each sequence, the matcher that masks the tokens its grammar forbids at
rank 0's sampler. The engine is llguidance (in the ``serve`` extra): a grammar is its JSON or Lark
text, checked against the tokenizer before the request is admitted.

Only rank 0 imports this module, and only once a request asks for a constraint: a request without
one pays nothing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import torch

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: no run of spaces or newlines to wander into


def _engine():
    try:
        import llguidance
    except ImportError:
        raise ValueError("constrained output needs llguidance: pip install 'mdi-mpi[serve]'") from None
    return llguidance


def _engine_torch():
    import llguidance.torch

    return llguidance.torch


def json_grammar(schema: dict | None) -> str:
    """The grammar of the JSON values that ``schema`` allows (None: any JSON object); a schema's
    faults are found by ``Grammars.check``."""
    engine = _engine()
    try:
        return engine.LLMatcher.grammar_from_json_schema({"type": "object"} if schema is None else schema,
                                                         overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise ValueError(f"invalid JSON schema: {e}") from None


def lark_json(schema: dict) -> str:
    """``schema`` as a Lark rule body (``%json{...}``), compact."""
    return "%json" + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def lark_string(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text)


class Grammars:
    """The grammars of one tokenizer: checks each, and makes each sequence's ``Matcher``. The
    tokenizer is converted for llguidance on first use (by either of the server's threads)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int]):
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = [i for i in eos_ids if i < vocab_size] or None
        self.lock = threading.Lock()
        self.converted = None

    def _tokenizer(self):
        with self.lock:
            if self.converted is None:
                _engine()
                import llguidance.hf

                self.converted = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                              eos_token=self.eos_ids)
            return self.converted

    def check(self, grammar: str, what: str = "grammar") -> None:
        """ValueError (``invalid <what>: <llguidance's reason>``) when ``grammar`` is not one that
        can be enforced with this tokenizer, e.g. from a JSON schema that is not valid."""
        is_error, messages = _engine().LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer())
        if is_error:
            raise ValueError(f"invalid {what}: {'; '.join(messages)}")

    def matcher(self, grammar: str) -> Matcher:
        """A new sequence's matcher, at the start of ``grammar``."""
        return Matcher(_engine().LLMatcher(self._tokenizer(), grammar), self.vocab_size)


class Matcher:
    """One sequence's place in its grammar: ``prepare`` computes the mask of the tokens allowed next
    (rank 0 does it while the sequence's step travels round the ring), ``allowed`` hands it to the
    sampler, ``consume`` moves on by the sampled token."""

    def __init__(self, matcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.words = _engine_torch().allocate_token_bitmask(1, vocab_size)  # [1, ceil(V / 32)] int32 bits
        self.ready = False

    def prepare(self) -> None:
        """Compute the next mask, unless it is ready."""
        if not self.ready:
            _engine_torch().fill_next_token_bitmask(self.matcher, self.words, 0)
            self.ready = True

    def allowed(self) -> torch.Tensor:
        """[V] bool: the tokens the grammar allows next."""
        self.prepare()
        bits = (self.words.view(-1, 1) >> torch.arange(32, dtype=torch.int32)) & 1  # [V / 32, 32]
        return bits.view(-1)[: self.vocab_size].bool()

    def consume(self, token: int) -> bool:
        """Move on by ``token``; True when the grammar is now complete (nothing may follow)."""
        self.ready = False
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        return self.matcher.is_stopped()
