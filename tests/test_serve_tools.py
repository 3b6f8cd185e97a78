"""Tools, reasoning and structured output over HTTP, through the official ``openai`` client: servers
of tiny random-weight models with the real chat templates of Qwen3, Llama 3.1, gpt-oss and Mistral."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from support.chat_models import CLOCK, WEATHER, chat_model, chat_tokenizer
from support.servers import Server

pytestmark = [pytest.mark.server, pytest.mark.mpi]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}, "member": {"type": "boolean"}},
    "required": ["name", "age", "tags", "member"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def _serve(tmp_path_factory, family: str, ranks: int, *flags: str) -> Server:
    path = chat_model(family, tmp_path_factory.mktemp(family) / "model")
    return Server(ranks, "--model", str(path), "--threads", "1", "--max-seq-len", "4096", *flags,
                  tag=tmp_path_factory.mktemp("srv").name)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Qwen3 with random weights, 2 ranks, 4 slots in 2 groups."""
    s = _serve(tmp_path_factory, "qwen3", 2, "--slots", "4", "--max-waiting", "40")
    yield s
    s.kill()


@pytest.fixture(scope="module", params=["qwen3", "llama3", "gpt-oss", "mistral"])
def family_server(request, tmp_path_factory, qwen3):
    if request.param == "qwen3":
        yield request.param, qwen3
        return
    s = _serve(tmp_path_factory, request.param, 1, "--slots", "2")
    yield request.param, s
    s.kill()


def _message(server: Server, **kw):
    return server.client().chat.completions.create(model=server.model, messages=kw.pop("messages", ASK), **kw)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_round_trip(family_server, stream):
    """The model is asked, returns a call (forced by naming the tool), gets the tool's result back,
    and answers; streamed and not."""
    family, server = family_server
    client = server.client()
    ask = dict(model=server.model, messages=ASK, tools=[WEATHER, CLOCK], max_tokens=200, temperature=0.8, seed=3,
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in client.chat.completions.create(stream=True, **ask):
            choice = chunk.choices[0]
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
                call["name"] += d.function.name or ""
                call["arguments"] += d.function.arguments or ""
            finish = choice.finish_reason or finish
        (call,) = calls.values()
        name, arguments, ident = call["name"], call["arguments"], call["id"]
    else:
        choice = client.chat.completions.create(**ask).choices[0]
        finish = choice.finish_reason
        (call,) = choice.message.tool_calls
        assert choice.message.content is None
        name, arguments, ident = call.function.name, call.function.arguments, call.id
    assert finish == "tool_calls" and name == "get_weather"
    assert len(ident) == 9 if family == "mistral" else ident.startswith("call_")  # Mistral's templates want 9
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": ident, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": ident, "content": "sunny, 21 C"}]
    answer = client.chat.completions.create(model=server.model, messages=messages, tools=[WEATHER, CLOCK],
                                            tool_choice="none", max_tokens=8, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.tool_calls is None
    assert answer.usage.prompt_tokens > len(chat_tokenizer(family).apply_chat_template(ASK, tools=[WEATHER, CLOCK]))


@pytest.mark.timeout(300)
def test_strict_json_schema_outputs_validate(qwen3):
    """A random model writes valid JSON only if the constraint holds: 20 samples, 2 requests of 10."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in (1, 2):
        r = _message(qwen3, response_format=fmt, n=10, max_tokens=300, temperature=1.0, seed=seed)
        for choice in r.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), PERSON)


@pytest.mark.timeout(300)
def test_json_object_and_seeded_constraints_are_the_same_for_any_layout(qwen3, tmp_path_factory):
    """json_object gives JSON objects; seeded constrained choices are identical on 2 ranks with 4
    slots and on 1 rank with 1 slot, streamed or not."""
    ask = dict(response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}},
               n=3, max_tokens=300, temperature=1.0, seed=11)
    wide = _message(qwen3, **ask)
    one = _serve(tmp_path_factory, "qwen3", 1, "--slots", "1")
    try:
        narrow = _message(one, **ask)
        texts: dict[int, str] = {}
        for chunk in one.client().chat.completions.create(model=one.model, messages=ASK, stream=True, **ask):
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    finally:
        one.kill()
    got = [c.message.content for c in sorted(wide.choices, key=lambda c: c.index)]
    assert got == [c.message.content for c in sorted(narrow.choices, key=lambda c: c.index)]
    assert got == [texts[i] for i in range(3)]
    assert len(set(got)) == 3
    objects = _message(qwen3, response_format={"type": "json_object"}, n=8, max_tokens=400, temperature=0.7, seed=5)
    ended = [c for c in objects.choices if c.finish_reason == "stop"]
    assert len(ended) >= 4
    for c in ended:
        assert isinstance(json.loads(c.message.content), dict)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("body, param, text", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "invalid JSON schema: Invalid type: objekt"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "needs"),
    ({"response_format": {"type": "yaml"}}, "response_format", "response_format.type"),
    ({"tool_choice": "required"}, "tool_choice", "'required' needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", "tools[0].function.name"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", "cannot be set"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "f", "parameters": {"type": "objekt"}}}],
      "tool_choice": "required"}, "tools", "Invalid type: objekt"),
])
def test_bad_tools_and_formats_get_400(qwen3, body, param, text):
    r = httpx.post(qwen3.url + "/v1/chat/completions", json={"messages": ASK, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and text in error["message"]
    with pytest.raises(openai.BadRequestError):
        _message(qwen3, max_tokens=4, extra_body=body)


@pytest.mark.timeout(300)
def test_constrained_and_free_requests_at_once(qwen3):
    """8 constrained and 8 free requests in flight together all complete, each as it should."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}

    def constrained(i: int):
        return _message(qwen3, response_format=fmt, max_tokens=300, temperature=1.0, seed=100 + i).choices[0]

    def free(i: int):
        return _message(qwen3, max_tokens=12, temperature=1.0, seed=200 + i, stream=False).choices[0]

    with ThreadPoolExecutor(16) as pool:
        shaped = [pool.submit(constrained, i) for i in range(8)]
        loose = [pool.submit(free, i) for i in range(8)]
        for f in shaped:
            jsonschema.validate(json.loads(f.result().message.content), PERSON)
        for f in loose:
            assert f.result().finish_reason in ("stop", "length")
    alone = _message(qwen3, response_format=fmt, max_tokens=300, temperature=1.0, seed=100).choices[0]
    assert alone.message.content == shaped[0].result().message.content


@pytest.fixture(scope="module")
def flat_qwen3(tmp_path_factory):
    """Qwen3 whose final norm is zero, so every logit is 0 and logit_bias alone picks the tokens."""
    path = chat_model("qwen3", tmp_path_factory.mktemp("flat") / "model")
    (weights,) = path.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["model.norm.weight"] = torch.zeros_like(tensors["model.norm.weight"])
    save_file(tensors, weights, metadata={"format": "pt"})
    s = Server(1, "--model", str(path), "--threads", "1", "--max-seq-len", "4096", tag=tmp_path_factory.mktemp("f").name)
    yield s
    s.kill()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_content_is_split_from_content(flat_qwen3, stream):
    """Logit bias and penalties make the answer "<think>old</think>the" (every logit is 0 otherwise):
    "old" is the reasoning, "the" the content."""
    tok = chat_tokenizer("qwen3")
    hmm, ok = tok.encode("old", add_special_tokens=False), tok.encode("the", add_special_tokens=False)
    assert len(hmm) == len(ok) == 1
    think, unthink = tok.convert_tokens_to_ids(["<think>", "</think>"])
    # each use costs a token 4 (presence 2, frequency 2): 100 <think>, then 99 old, 98 </think>, 97 the
    bias = {think: 100, hmm[0]: 99, unthink: 98, ok[0]: 97}
    ask = dict(logit_bias=bias, presence_penalty=2.0, frequency_penalty=2.0, max_tokens=4, temperature=0)
    if stream:
        reasoning = content = ""
        for chunk in flat_qwen3.client().chat.completions.create(model=flat_qwen3.model, messages=ASK, stream=True, **ask):
            for c in chunk.choices:
                reasoning += getattr(c.delta, "reasoning_content", None) or ""
                content += c.delta.content or ""
    else:
        message = _message(flat_qwen3, **ask).choices[0].message
        reasoning, content = message.reasoning_content, message.content
    assert (reasoning, content) == ("old", "the")
