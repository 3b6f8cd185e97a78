"""Requests: reading prompts (flags, plain lines, JSONL, stdin), tokenizing them, and result records."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdi_mpi.errors import UserError
from mdi_mpi.sampling import SamplingParams, to_sampling_params

PER_REQUEST_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "presence_penalty",
                    "frequency_penalty", "logit_bias")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(eq=False)
class Request:
    """One generation request; ``index`` is its place in the run (or its choice number in a
    server request) and seeds its generator with the request's seed."""

    id: str
    index: int
    prompt: str | None
    input_ids: list[int]
    params: SamplingParams
    arrival: float | None = None  # perf_counter() when it arrived; times to first token count from here
    chat: bool = False  # rendered by the chat template (its answer is read by chat.Answer)
    tools: bool = False  # the template was given tools: tool calls are parsed out of the answer
    thinking: bool = False  # the prompt opened a <think> block: the answer starts in its reasoning
    grammar: str | None = None  # the grammar its tokens must follow (grammar.py), checked when it was built


@dataclass
class Prompt:
    """A prompt as the user gave it, before tokenization."""

    id: str | None
    text: str | None
    input_ids: list[int] | None
    overrides: dict[str, Any] = field(default_factory=dict)  # sampling fields as given (to_sampling_params)
    messages: list[dict] | None = None  # a whole conversation for the chat template (instead of ``text``)
    tools: list[dict] | None = None  # OpenAI's function tools, for the chat template
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # more variables for the chat template


def parse_prompt_lines(lines: list[str], source: str) -> list[Prompt]:
    """Parse prompt lines: JSONL objects (``id``, ``prompt`` or ``input_ids``, per-request sampling
    keys) or plain text, one prompt per line. Blank lines are skipped."""
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            prompts.append(Prompt(None, line.rstrip("\n"), None))
            continue
        where = f"{source} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON ({e.msg})") from None
        unknown = set(obj) - {"id", "prompt", "input_ids", *PER_REQUEST_KEYS}
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        text, ids = obj.get("prompt"), obj.get("input_ids")
        if (text is None) == (ids is None):
            raise UserError(f"{where}: give exactly one of 'prompt' or 'input_ids'")
        if text is not None and not isinstance(text, str):
            raise UserError(f"{where}: 'prompt' must be a string")
        if ids is not None and not (
            isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise UserError(f"{where}: 'input_ids' must be a non-empty list of integers")
        overrides = {k: obj[k] for k in PER_REQUEST_KEYS if k in obj}
        try:
            to_sampling_params(**overrides)  # checked now, so that a bad value names its line
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
        ident = obj.get("id")
        prompts.append(Prompt(None if ident is None else str(ident), text, ids, overrides))
    if not prompts:
        raise UserError(f"{source} holds no prompts")
    return prompts


def read_prompts_file(path: str) -> list[Prompt]:
    """Read prompts from a file (``-`` for standard input)."""
    import sys

    if path == "-":
        return parse_prompt_lines(sys.stdin.readlines(), "standard input")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"prompts file {path} does not exist")
    try:
        lines = file.read_text().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"prompts file {path} is not UTF-8 text") from None
    return parse_prompt_lines(lines, path)


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's tokenizer, or None when it ships none."""
    if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is a broken checkpoint for the user
        raise UserError(f"cannot load the tokenizer in {model_dir}: {e}") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:  # text is decoded incrementally with it
        raise UserError(f"the tokenizer in {model_dir} has no fast (tokenizers library) form")
    return tokenizer


def build_requests(
    prompts: list[Prompt],
    defaults: SamplingParams,
    tokenizer,
    vocab_size: int,
    max_seq_len: int,
    chat: bool = False,
    n_samples: int = 1,
) -> list[Request]:
    """Tokenize prompts, apply per-request overrides and expand ``n_samples`` samples of each."""
    if n_samples < 1:
        raise UserError(f"--n-samples must be at least 1, got {n_samples}")
    if chat and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise UserError("this tokenizer has no chat template")
    requests = []
    for number, p in enumerate(prompts):
        label = p.id if p.id is not None else str(number)
        thinking = False
        if p.input_ids is not None:
            ids = list(p.input_ids)
        elif tokenizer is None:
            raise UserError(f"prompt {label}: the checkpoint has no tokenizer, so give prompts as input_ids (JSONL)")
        elif chat:
            messages = p.messages or [{"role": "user", "content": p.text}]
            try:
                text = tokenizer.apply_chat_template(messages, tools=p.tools, tokenize=False, add_generation_prompt=True,
                                                     **p.template_kwargs)
            except Exception as e:  # noqa: BLE001 - a template's own error (e.g. roles that must alternate)
                raise UserError(f"prompt {label}: the chat template failed: {e}") from None
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            thinking = text.rstrip().endswith("<think>")
        else:
            ids = tokenizer(p.text)["input_ids"]
        if not ids:
            raise UserError(f"prompt {label} is empty")
        if max(ids) >= vocab_size or min(ids) < 0:
            raise UserError(f"prompt {label}: token ids must lie in [0, {vocab_size})")
        if len(ids) > max_seq_len:
            raise UserError(
                f"prompt {label} has {len(ids)} tokens, longer than the context (--max-seq-len {max_seq_len})"
            )
        try:
            params = to_sampling_params(defaults, **p.overrides)
        except ValueError as e:
            raise UserError(f"prompt {label}: {e}") from None
        if params.logit_bias and params.logit_bias[-1][0] >= vocab_size:
            raise UserError(f"prompt {label}: logit_bias token ids must lie in [0, {vocab_size})")
        for k in range(n_samples):
            ident = label if n_samples == 1 else f"{label}-{k}"
            requests.append(Request(ident, len(requests), p.text, ids, params, chat=chat and p.input_ids is None,
                                    tools=bool(p.tools), thinking=thinking))
    return requests


def finished_ids(path: str | Path) -> set[str]:
    """The ids of the records already in the JSONL output ``path`` (none if it does not exist), for
    ``--resume``. A torn last line, from a crash mid-write, is cut off the file, so its request is
    done again; a broken line before the last is an error."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    lines = data.split(b"\n")
    done, good = set(), 0  # ids, and the bytes of whole records
    for number, line in enumerate(lines, 1):
        last = number == len(lines)
        if not line.strip():
            good += len(line) + (0 if last else 1)
            continue
        try:
            record = json.loads(line)
            if last:
                raise ValueError("no newline at the end")
            done.add(str(record["id"]))
        except (ValueError, KeyError, TypeError) as e:
            if last or number == len(lines) - 1 and not lines[-1]:
                with open(path, "r+b") as f:  # torn by a crash mid-write: drop it, redo that request
                    f.truncate(good)
                break
            raise UserError(f"{path} line {number} is not a finished record ({e}); fix or move the file") from None
        good += len(line) + 1
    return done


@dataclass
class Result:
    """A finished request, written as one JSONL record."""

    id: str
    prompt: str | None
    input_ids: list[int]
    tokens: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS, stop string, grammar done), "tool_calls", "length" (max_new_tokens),
    # "context" (cache full) or "cancelled"
    ttft_s: float | None  # from its arrival (queueing included) to its first token; None if it had none
    duration_s: float  # from its arrival to its end
    cached_tokens: int = 0  # prompt tokens whose KV it found in the cache (not computed again)
    reasoning: str | None = None  # a chat answer's reasoning, kept out of ``text``
    tool_calls: list[dict] | None = None  # a chat answer's tool calls (OpenAI's objects); finish_reason tool_calls

    def to_json(self) -> str:
        """The JSONL record; ``reasoning`` and ``tool_calls`` only where a chat answer had them."""
        record = {k: v for k, v in self.__dict__.items() if v is not None or k not in ("reasoning", "tool_calls")}
        return json.dumps(record, ensure_ascii=False)


def stop_token_ids(config_eos: tuple[int, ...], tokenizer_dir: str | Path, tokenizer) -> tuple[int, ...]:
    """The tokens that end a sequence: the config's EOS ids, those in ``generation_config.json``
    and the tokenizer's EOS token."""
    ids = set(config_eos)
    file = Path(tokenizer_dir) / "generation_config.json"
    if file.is_file():
        try:
            eos = json.loads(file.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise UserError(f"{file} is not a JSON object: {e}") from None
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(int(i) for i in ids))
