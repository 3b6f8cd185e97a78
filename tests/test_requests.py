"""Prompt files and request building."""

from __future__ import annotations

import json

import pytest

from mdi_mpi.errors import UserError
from mdi_mpi.requests import Prompt, build_requests, parse_prompt_lines
from mdi_mpi.sampling import SamplingParams


def test_plain_and_jsonl_lines():
    prompts = parse_prompt_lines(
        ["hello there", "", '{"id": "a", "input_ids": [1, 2, 3], "temperature": 0.5, "max_new_tokens": 4}'], "f"
    )
    assert [p.text for p in prompts] == ["hello there", None]
    assert prompts[1].id == "a" and prompts[1].input_ids == [1, 2, 3]
    assert prompts[1].overrides == {"temperature": 0.5, "max_new_tokens": 4}


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x"', "f line 2: invalid JSON"),
        ('{"prompt": "x", "input_ids": [1]}', "f line 2: give exactly one"),
        ('{"input_ids": []}', "f line 2: 'input_ids' must be a non-empty list"),
        ('{"input_ids": [1, "a"]}', "f line 2: 'input_ids' must be a non-empty list"),
        ('{"prompt": "x", "colour": 1}', "f line 2: unknown key"),
        ('{"prompt": "x", "logit_bias": {"a": 1}}', "f line 2: logit_bias keys must be token ids"),
        ('{"prompt": "x", "logit_bias": [3]}', "f line 2: logit_bias must be an object"),
        ('{"prompt": "x", "temperature": -1}', "f line 2: temperature must be >= 0"),
        ('{"prompt": "x", "temperature": "hot"}', "f line 2: temperature must be a number"),
        ('{"prompt": "x", "max_new_tokens": 2.5}', "f line 2: max_new_tokens must be an integer"),
        ('{"prompt": "x", "seed": true}', "f line 2: seed must be an integer"),
        ('{"prompt": "x", "top_p": 0}', r"f line 2: top_p must be in \(0, 1\]"),
    ],
)
def test_malformed_lines_name_their_line(line, message):
    with pytest.raises(UserError, match=message):
        parse_prompt_lines(["ok", line], "f")


def test_empty_file():
    with pytest.raises(UserError, match="holds no prompts"):
        parse_prompt_lines(["", "  "], "f")


def test_build_requests_ids_samples_and_limits():
    prompts = [Prompt("x", None, [5, 6]), Prompt(None, None, [7], {"seed": 9})]
    reqs = build_requests(prompts, SamplingParams(), None, vocab_size=10, max_seq_len=8, n_samples=2)
    assert [r.id for r in reqs] == ["x-0", "x-1", "1-0", "1-1"]
    assert [r.index for r in reqs] == [0, 1, 2, 3]
    assert reqs[2].params.seed == 9 and reqs[0].params.seed == 0
    with pytest.raises(UserError, match="longer than the context"):
        build_requests([Prompt(None, None, list(range(9)))], SamplingParams(), None, 10, 8)
    with pytest.raises(UserError, match=r"must lie in \[0, 10\)"):
        build_requests([Prompt(None, None, [10])], SamplingParams(), None, 10, 8)
    with pytest.raises(UserError, match="no tokenizer"):
        build_requests([Prompt(None, "text", None)], SamplingParams(), None, 10, 8)
    with pytest.raises(UserError, match="temperature"):
        build_requests([Prompt(None, None, [1], {"temperature": -1})], SamplingParams(), None, 10, 8)
    with pytest.raises(UserError, match="presence_penalty must be a number from -2 to 2"):
        build_requests([Prompt(None, None, [1], {"presence_penalty": 3})], SamplingParams(), None, 10, 8)
    with pytest.raises(UserError, match=r"prompt 0: logit_bias token ids must lie in \[0, 10\)"):
        build_requests([Prompt(None, None, [1], {"logit_bias": {"2": 1, "10": 1}})], SamplingParams(), None, 10, 8)
    (biased,) = parse_prompt_lines(['{"input_ids": [1], "logit_bias": {"9": -5, "2": 1}}'], "f")
    assert build_requests([biased], SamplingParams(), None, 10, 8)[0].params.logit_bias == ((2, 1.0), (9, -5.0))


@pytest.mark.parametrize(
    "overrides, field, value",
    [
        ({}, "temperature", 0.7),  # the run's default
        ({"temperature": 0}, "temperature", 0.0),
        ({"temperature": None}, "temperature", 0.7),  # null keeps the default
        ({"max_new_tokens": 3}, "max_new_tokens", 3),
        ({"seed": 9}, "seed", 9),
        ({"logit_bias": {"3": -1}}, "logit_bias", ((3, -1.0),)),
    ],
)
def test_jsonl_overrides_apply_over_the_run_defaults(overrides, field, value):
    (prompt,) = parse_prompt_lines([json.dumps({"input_ids": [1], **overrides})], "f")
    (request,) = build_requests([prompt], SamplingParams(temperature=0.7, seed=1), None, 10, 8)
    assert getattr(request.params, field) == value
