"""Sampler: penalties and logit bias, greedy, top-k, top-p, seeded determinism, argument checks."""

from __future__ import annotations

import pytest
import torch

from mdi_mpi.sampling import (
    SamplingParams,
    adjust_logits,
    filter_logits,
    parse_logit_bias,
    request_generator,
    sample,
    shown_length,
    to_sampling_params,
)

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.5, -1.0])


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(temperature=0.0), request_generator(0, 0)) == 1


@pytest.mark.parametrize("k, kept", [(1, {1}), (2, {1, 4}), (3, {1, 4, 2}), (0, set(range(6))), (10, set(range(6)))])
def test_top_k_keeps_k(k, kept):
    out = filter_logits(LOGITS, k, 1.0)
    assert set(torch.isfinite(out).nonzero().flatten().tolist()) == kept


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.8, 0.95, 0.999])
def test_top_p_keeps_smallest_set_reaching_p(p):
    probs = LOGITS.softmax(-1)
    out = filter_logits(LOGITS, 0, p)
    kept = torch.isfinite(out)
    order = probs.argsort(descending=True)
    n = int(kept.sum())
    assert set(order[:n].tolist()) == set(kept.nonzero().flatten().tolist())  # the most likely ones
    assert probs[kept].sum() >= p - 1e-6  # they reach p
    assert n == 1 or probs[order[: n - 1]].sum() < p  # and one fewer would not


def test_seeded_sampling_is_deterministic_and_seed_dependent():
    params = SamplingParams(temperature=1.0)
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))

    def draw(seed: int, index: int) -> list[int]:
        g = request_generator(seed, index)
        return [sample(logits, params, g) for _ in range(40)]

    assert draw(3, 7) == draw(3, 7)
    assert draw(3, 7) != draw(3, 8)
    assert draw(3, 7) != draw(4, 7)


def test_sampling_respects_filters():
    g = request_generator(0, 0)
    params = SamplingParams(temperature=2.0, top_k=2)
    assert {sample(LOGITS, params, g) for _ in range(200)} == {1, 4}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1.0),
        dict(temperature=float("nan")),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(max_new_tokens=0),
        dict(seed=-3),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-2.01),
        dict(frequency_penalty=float("nan")),
    ],
)
def test_bad_arguments_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "presence, frequency, bias, generated, expected",
    [
        (0.0, 0.0, (), [1, 1, 2], [1.0, 3.0, 2.0, 0.5, 2.5, -1.0]),  # nothing asked: unchanged
        (0.5, 0.0, (), [1, 1, 2], [1.0, 2.5, 1.5, 0.5, 2.5, -1.0]),  # once per token seen
        (0.0, 0.5, (), [1, 1, 2], [1.0, 2.0, 1.5, 0.5, 2.5, -1.0]),  # once per time seen
        (0.5, 1.0, (), [1, 1, 2], [1.0, 0.5, 0.5, 0.5, 2.5, -1.0]),
        (-1.0, 0.0, (), [5], [1.0, 3.0, 2.0, 0.5, 2.5, 0.0]),  # a negative penalty favours repeats
        (1.0, 1.0, (), [], [1.0, 3.0, 2.0, 0.5, 2.5, -1.0]),  # nothing generated yet: unchanged
        (0.0, 0.0, ((0, 100.0), (3, -2.5)), [], [101.0, 3.0, 2.0, -2.0, 2.5, -1.0]),
        (0.5, 0.0, ((1, 1.0),), [1], [1.0, 3.5, 2.0, 0.5, 2.5, -1.0]),  # both
    ],
)
def test_adjust_logits_is_openais_formula(presence, frequency, bias, generated, expected):
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias)
    before = LOGITS.clone()
    assert adjust_logits(LOGITS, params, generated).tolist() == expected
    assert torch.equal(LOGITS, before)  # the caller's logits are left alone


def test_greedy_follows_the_bias_and_the_penalties():
    g = request_generator(0, 0)
    assert sample(LOGITS, SamplingParams(logit_bias=((5, 100.0),)), g) == 5
    assert sample(LOGITS, SamplingParams(logit_bias=((1, -100.0),)), g) == 4
    assert sample(LOGITS, SamplingParams(frequency_penalty=1.0), g, [1]) == 4  # 3 - 1 < 2.5
    assert sample(LOGITS, SamplingParams(frequency_penalty=0.2), g, [1]) == 1  # 3 - 0.2 > 2.5


@pytest.mark.parametrize(
    "obj, pairs",
    [
        ({}, ()),
        ({"7": 1, "2": -100, "30": 100}, ((2, -100.0), (7, 1.0), (30, 100.0))),
        ({5: 0.5}, ((5, 0.5),)),
    ],
)
def test_parse_logit_bias(obj, pairs):
    assert parse_logit_bias(obj) == pairs


@pytest.mark.parametrize(
    "obj, says",
    [
        ([1, 2], "must be an object"),
        ({"x": 1}, "keys must be token ids"),
        ({"-1": 1}, "keys must be token ids >= 0"),
        ({"1": 101}, "values must be numbers from -100 to 100"),
        ({"1": "5"}, "values must be numbers"),
        ({"1": True}, "values must be numbers"),
        ({str(i): 1 for i in range(301)}, "at most 300"),
    ],
)
def test_parse_logit_bias_refuses(obj, says):
    with pytest.raises(ValueError, match=says):
        parse_logit_bias(obj)


@pytest.mark.parametrize(
    "text, stops, shown",
    [
        ("hello world", [], 11),
        ("hello world", ["xyz"], 11),
        ("hello wor", ["world"], 6),  # "wor" may begin "world": held back
        ("hello world and more", ["world"], 6),
        ("say STO", ["STOP", "TO"], 4),  # "TO" is whole at 5, and "STO" may begin "STOP": held back from 4
        ("abc", ["c", "bcd"], 1),
        ("", ["x"], 0),
    ],
)
def test_shown_length_never_shows_a_stop_string(text, stops, shown):
    assert shown_length(text, stops) == shown


@pytest.mark.parametrize(
    "given, expected",
    [
        ({}, SamplingParams()),
        ({"temperature": None, "seed": None}, SamplingParams()),  # None keeps the default
        ({"temperature": 1}, SamplingParams(temperature=1.0)),  # an integer is a number
        ({"max_new_tokens": 5, "top_k": 3, "top_p": 0.5}, SamplingParams(max_new_tokens=5, top_k=3, top_p=0.5)),
        ({"stop": "x"}, SamplingParams(stop=("x",))),
        ({"stop": ["x", "yz"]}, SamplingParams(stop=("x", "yz"))),
        ({"stop": []}, SamplingParams()),
        ({"ignore_eos": True, "logprobs": 0}, SamplingParams(ignore_eos=True, logprobs=0)),
        ({"presence_penalty": -2, "frequency_penalty": 1.5}, SamplingParams(presence_penalty=-2.0, frequency_penalty=1.5)),
        ({"logit_bias": {"7": 1, 2: -100}}, SamplingParams(logit_bias=((2, -100.0), (7, 1.0)))),
    ],
)
def test_to_sampling_params_applies_fields(given, expected):
    assert to_sampling_params(**given) == expected


def test_to_sampling_params_keeps_the_defaults_it_is_not_given():
    defaults = SamplingParams(max_new_tokens=9, temperature=0.5, seed=4, stop=("a",))
    got = to_sampling_params(defaults, temperature=None, seed=5)
    assert got == SamplingParams(max_new_tokens=9, temperature=0.5, seed=5, stop=("a",))


@pytest.mark.parametrize(
    "given, message",
    [
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"temperature": True}, "temperature must be a number"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
        ({"max_new_tokens": 2.0}, "max_new_tokens must be an integer"),
        ({"top_k": -1}, "top_k must be an integer >= 0"),
        ({"seed": False}, "seed must be an integer"),
        ({"logprobs": 21}, "top logprobs must be an integer from 0 to 20"),
        ({"ignore_eos": 1}, "ignore_eos must be a boolean"),
        ({"stop": ""}, "stop must be a non-empty string or a list of them"),
        ({"stop": ["a", 3]}, "stop must be a non-empty string or a list of them"),
        ({"presence_penalty": 2.5}, "presence_penalty must be a number from -2 to 2"),
        ({"logit_bias": [1]}, "logit_bias must be an object"),
        ({"logit_bias": {"x": 1}}, "logit_bias keys must be token ids"),
        ({"colour": 1}, "colour is not a sampling parameter"),
    ],
)
def test_to_sampling_params_names_the_bad_field(given, message):
    with pytest.raises(ValueError, match=message):
        to_sampling_params(**given)
