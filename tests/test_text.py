"""Incremental decoding: the pieces a stream shows add up to the whole decode, never show a stop
string, and cost time in proportion to the length."""

from __future__ import annotations

import pytest

from mdi_mpi.text import TextStream


@pytest.fixture(scope="module")
def tokenizer():
    from mdi_mpi.demo import demo_model
    from mdi_mpi.requests import load_tokenizer

    return load_tokenizer(demo_model())


TEXTS = ["def main(argv):\n    return 0\n", "  leading spaces and   runs", "naïve café — 東京 🙂 done", "x"]


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_whole_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer)
    pieces = [stream.push(t).content for t in ids] + [stream.rest().content]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == stream.text
    assert not any(p.endswith("\ufffd") for p in pieces)  # a character split across tokens waits for its end


@pytest.mark.parametrize("stops, shown", [(["return"], "def main(argv):\n    "), (["argv", "main"], "def "),
                                          (["\n"], "def main(argv):"), (["nowhere"], None)])
def test_a_stop_string_is_never_shown(tokenizer, stops, shown):
    text = "def main(argv):\n    return 0\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(tokenizer, stops)
    pieces = []
    for t in ids:
        pieces.append(stream.push(t).content)
        assert not any(s in "".join(pieces) for s in stops)
        if stream.stopped:
            break
    pieces.append(stream.rest().content)
    assert "".join(pieces) == stream.text == (text if shown is None else shown)
    assert stream.stopped == (shown is not None)


def test_text_that_may_begin_a_stop_string_is_held_back(tokenizer):
    stream = TextStream(tokenizer, ["abcd"])
    ids = tokenizer.encode("xx abc", add_special_tokens=False)
    shown = "".join(stream.push(t).content for t in ids)
    assert shown == "xx " and stream.text == "xx abc"  # "abc" may begin "abcd"
    assert stream.rest().content == "abc"  # the sequence ended without it: shown at the end
