"""Rank 0's scheduler alone, driven with made-up logits: stop strings, EOS, and the end of the context."""

from __future__ import annotations

import pytest
import torch
from support.stages import scheduler

from mdi_mpi.requests import Request
from mdi_mpi.sampling import SamplingParams
from mdi_mpi.scheduler import Scheduler

VOCAB = 2048


def drive(sched: Scheduler, next_tokens: list[int], max_seq_len: int, vocab: int = VOCAB) -> int:
    """Run the scheduler with one slot group, answering every sampled row with the next of
    ``next_tokens`` (greedy: a one-hot logit); returns the highest position ever fed."""
    highest, i = -1, 0
    while True:
        work = sched.next_work(range(len(sched.active)))
        if work is None:
            return highest
        highest = max(highest, int(work.batch.positions.max()))
        assert highest < max_seq_len, "a position past the KV cache was fed"
        logits = torch.full((len(work.sampled_segs), vocab), -1e9)
        for row in range(len(work.sampled_segs)):
            logits[row, next_tokens[i % len(next_tokens)]] = 0.0
            i += 1
        sched.complete(work, logits)


@pytest.fixture(scope="module")
def tokenizer():
    from mdi_mpi.demo import demo_model
    from mdi_mpi.requests import load_tokenizer

    return load_tokenizer(demo_model())


def test_a_stop_string_cuts_the_text_and_ends_with_stop(tokenizer):
    ids = tokenizer.encode("return self.value # done here", add_special_tokens=False)
    req = Request("a", 0, None, [5, 6], SamplingParams(max_new_tokens=len(ids) + 5, stop=("# done",)))
    sched = scheduler([req], 1, 64, 8, eos_ids=(2,), tokenizer=tokenizer)
    drive(sched, ids, 64)
    (res,) = sched.listener.results
    assert res.finish_reason == "stop" and res.text == "return self.value "
    assert "# done" in tokenizer.decode(res.tokens)  # generation stopped once the string was complete


@pytest.mark.parametrize("eos_ids, reason, n", [((2,), "stop", 3), ((), "length", 6)])
def test_eos_ends_a_sequence_unless_eos_ids_is_empty(eos_ids, reason, n):
    req = Request("a", 0, None, [5, 6, 7], SamplingParams(max_new_tokens=6))
    sched = scheduler([req], 1, 64, 8, eos_ids=eos_ids)
    drive(sched, [10, 11, 2], 64)
    (res,) = sched.listener.results
    assert res.finish_reason == reason and len(res.tokens) == n
    assert res.tokens[:3] == [10, 11, 2]


def test_a_prompt_near_the_context_gets_exactly_what_fits():
    length = 16
    req = Request("a", 0, None, list(range(3, 3 + length - 2)), SamplingParams(max_new_tokens=50))
    sched = scheduler([req], 1, length, 4, eos_ids=())
    highest = drive(sched, [9], length)
    (res,) = sched.listener.results
    # Positions 0..L-1 hold the prompt and the first two generated tokens; the third is sampled from
    # the last position's logits, and nothing more can be fed.
    assert res.finish_reason == "context" and res.tokens == [9, 9, 9]
    assert highest == length - 1


@pytest.fixture(scope="module")
def harmony_tokenizer(tokenizer):
    """The demo tokenizer with gpt-oss's harmony marks as special tokens."""
    import copy

    from mdi_mpi.chat import HARMONY_MARKS

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": list(HARMONY_MARKS)})
    return tok


@pytest.mark.parametrize("chat", [True, False])
def test_a_harmony_chat_answer_shows_its_final_channel_only(harmony_tokenizer, chat):
    """gpt-oss answers in channels: a chat answer's text (whole and streamed) is the final channel's
    message, without the analysis or the marks; a plain completion shows every channel's words."""
    tok = harmony_tokenizer

    def ids(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    answer = ids("<|channel|>analysis<|message|>think it over<|end|><|start|>assistant<|channel|>final<|message|>"
                 "return self.value<|return|>")
    ret = tok.convert_tokens_to_ids("<|return|>")
    req = Request("a", 0, None, ids("<|start|>user<|message|>hi<|end|><|start|>assistant"),
                  SamplingParams(max_new_tokens=len(answer) + 5), chat=chat)
    sched = scheduler([req], 1, 128, 8, eos_ids=(ret,), tokenizer=tok)
    streamed = []
    sched.listener.token = lambda step: streamed.append(step.text)
    drive(sched, answer, 128, vocab=len(tok))
    (res,) = sched.listener.results
    assert res.tokens == answer and res.finish_reason == "stop"
    if chat:
        assert res.text == "".join(streamed) == "return self.value"
    else:
        assert res.text == "".join(streamed) == tok.decode(answer, skip_special_tokens=True)
        assert "think it over" in res.text and "return self.value" in res.text

