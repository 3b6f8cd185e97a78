"""Chat answers read into reasoning, content and tool calls, and the grammars that force a call or
JSON, with the real chat templates of Qwen3, Llama 3.1 and gpt-oss (support.chat_models)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from support.chat_models import CLOCK, FAMILIES, WEATHER, chat_tokenizer
from support.stages import scheduler

from mdi_mpi.chat import ChatFormat
from mdi_mpi.grammar import Grammars, json_grammar
from mdi_mpi.requests import Prompt, build_requests
from mdi_mpi.sampling import SamplingParams, request_generator, sample

VOCAB = 384
# Each family's answer: reasoning "let me see", content "Checking." (where the format has any), one call.
ANSWERS = {
    "qwen3": ("<think>\nlet me see\n</think>\n\nChecking.\n<tool_call>\n"
              '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call><|im_end|>'),
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}<|eot_id|>',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}]</s>',
    "gpt-oss": ("<|channel|>analysis<|message|>let me see<|end|><|start|>assistant<|channel|>commentary "
                "to=functions.get_weather <|constrain|>json<|message|>"
                '{"city": "Paris", "days": 2}<|call|>'),
}
EXPECTED = {"qwen3": ("let me see\n", "Checking.\n"), "llama3": ("", ""), "gpt-oss": ("let me see", ""),
            "mistral": ("", "")}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param, chat_tokenizer(request.param)


def drive(sched, answer: list[int]) -> list:
    """Feed ``answer``'s tokens as the sampled ones (one-hot logits); the steps the listener saw."""
    steps, i = [], 0
    sched.listener.token = steps.append
    while (work := sched.next_work(range(len(sched.active)))) is not None:
        logits = torch.full((len(work.sampled_segs), VOCAB), -1e9)
        for row in range(len(work.sampled_segs)):
            logits[row, answer[i]] = 0.0
            i += 1
        sched.complete(work, logits)
    return steps


def chat_request(tok, tools: list[dict] | None = None, max_new_tokens: int = 200, **template):
    prompt = Prompt(None, None, None, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
                    template_kwargs=template)
    (req,) = build_requests([prompt], SamplingParams(max_new_tokens=max_new_tokens), tok, VOCAB, 4096, chat=True)
    return req


def test_each_family_is_told_apart_by_its_template(family):
    name, tok = family
    fmt = ChatFormat.of(tok)
    assert fmt.tools == {"qwen3": "hermes", "llama3": "llama3", "gpt-oss": "harmony", "mistral": "mistral"}[name]
    assert fmt.think == (name == "qwen3")


def test_an_answer_splits_into_reasoning_content_and_calls_whole_and_streamed(family):
    name, tok = family
    req = chat_request(tok, [WEATHER, CLOCK])
    assert req.tools and not req.thinking
    answer = tok.encode(ANSWERS[name], add_special_tokens=False)
    eos = tok.convert_tokens_to_ids([tok.eos_token, "<|call|>"])
    sched = scheduler([req], 1, 4096, 64, eos_ids=[i for i in eos if i is not None], tokenizer=tok)
    steps = drive(sched, answer)
    (res,) = sched.listener.results
    reasoning, content = EXPECTED[name]
    assert res.finish_reason == "tool_calls"
    assert (res.reasoning or "", res.text) == (reasoning, content)
    assert "".join(s.reasoning for s in steps) == reasoning and "".join(s.text for s in steps) == content
    (call,) = [c for s in steps for c in s.calls]
    assert res.tool_calls == [call.to_openai()]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris", "days": 2}
    assert len(call.id) == 9 if name == "mistral" else call.id.startswith("call_")  # Mistral's templates want 9


def test_without_tools_no_call_is_read(family):
    """Without tools a call-shaped answer is content; gpt-oss's message to a function is not shown."""
    name, tok = family
    req = chat_request(tok)
    answer = tok.encode(ANSWERS[name], add_special_tokens=False)
    sched = scheduler([req], 1, 4096, 64, eos_ids=tok.convert_tokens_to_ids([tok.eos_token, "<|call|>"]), tokenizer=tok)
    drive(sched, answer)
    (res,) = sched.listener.results
    assert res.finish_reason == "stop" and res.tool_calls is None
    assert ("get_weather" in res.text) == (name != "gpt-oss")
    assert "Paris" not in res.text or name != "gpt-oss"


def test_a_call_and_its_result_go_back_through_the_template(family):
    """The round trip's second turn: the assistant's call and the tool's answer are rendered."""
    name, tok = family
    from mdi_mpi.protocol import ChatMessage

    messages = [ChatMessage.model_validate(m).for_template() for m in (
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abcDEF123", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "sunny, 21 C"})]
    text = tok.apply_chat_template(messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert "sunny, 21 C" in text and "Paris" in text.split("sunny")[0].rsplit("Weather in Paris?", 1)[1]


def test_qwen3_thinking_off_and_a_prompt_that_opens_the_reasoning():
    tok = chat_tokenizer("qwen3")
    off = chat_request(tok, enable_thinking=False)
    assert not off.thinking and tok.decode(off.input_ids).endswith("<think>\n\n</think>\n\n")
    sched = scheduler([off], 1, 4096, 64, eos_ids=[tok.eos_token_id], tokenizer=tok)
    off.thinking = True  # as with a template that ends its prompt with <think>
    drive(sched, tok.encode("mull it</think>\n\nHello<|im_end|>", add_special_tokens=False))
    (res,) = sched.listener.results
    assert (res.reasoning, res.text) == ("mull it", "Hello")


def sample_constrained(grammars: Grammars, grammar: str, seed: int, limit: int = 400) -> list[int] | None:
    """Tokens sampled from random logits (temperature 1) under ``grammar``, up to its end or EOS
    (None if it goes on past ``limit`` tokens)."""
    matcher = grammars.matcher(grammar)
    gen, out = request_generator(seed, 0), []
    logits_gen = torch.Generator().manual_seed(seed)
    for _ in range(limit):
        logits = torch.randn(VOCAB, generator=logits_gen) * 4
        token = sample(logits, SamplingParams(temperature=1.0), gen, out, matcher.allowed())
        out.append(token)
        if matcher.consume(token) or token in grammars.eos_ids:
            return out
    return None


@pytest.mark.parametrize("named", [True, False])
def test_a_forced_call_is_always_a_valid_call_of_a_given_tool(family, named):
    """Random logits under each family's call grammar: every answer parses into calls whose
    arguments validate against the tool's schema."""
    name, tok = family
    fmt = ChatFormat.of(tok)
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    grammars = Grammars(tok, VOCAB, [eos])
    grammar = fmt.call_grammar([WEATHER, CLOCK], "get_weather" if named else None, parallel=not named)
    grammars.check(grammar)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for seed in range(5):
        answer = sample_constrained(grammars, grammar, seed)
        if answer[-1] not in grammars.eos_ids:  # the grammar ended (gpt-oss's <|call|>): so does the scheduler
            answer.append(eos)
        req = chat_request(tok, [WEATHER, CLOCK])
        sched = scheduler([req], 1, 4096, 64, eos_ids=[eos, *tok.convert_tokens_to_ids(["<|call|>"])], tokenizer=tok)
        drive(sched, answer)
        (res,) = sched.listener.results
        assert res.finish_reason == "tool_calls", tok.decode(answer)
        assert res.tool_calls and (len(res.tool_calls) == 1 or not named)
        for call in res.tool_calls:
            assert call["function"]["name"] in (["get_weather"] if named else schemas)
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def test_json_grammars_hold_random_logits_to_the_schema():
    tok = chat_tokenizer("qwen3")
    grammars = Grammars(tok, VOCAB, [tok.eos_token_id])
    schema = WEATHER["function"]["parameters"]
    for seed in range(10):
        answer = sample_constrained(grammars, json_grammar(schema), seed)
        jsonschema.validate(json.loads(tok.decode(answer, skip_special_tokens=True)), schema)
    ended = [a for a in (sample_constrained(grammars, json_grammar(None), seed) for seed in range(20)) if a]
    assert len(ended) >= 5  # any object: random logits may nest on and on, but most close
    for answer in ended:
        assert isinstance(json.loads(tok.decode(answer, skip_special_tokens=True)), dict)


@pytest.mark.parametrize("schema, reason", [({"type": "objekt"}, "Invalid type: objekt"),
                                            ({"$ref": "#/nowhere"}, "/nowhere"),
                                            ({"type": "string", "pattern": "(("}, "unclosed group")])
def test_an_invalid_schema_is_refused_with_the_reason(schema, reason):
    tok = chat_tokenizer("qwen3")
    with pytest.raises(ValueError, match=f"(?s)invalid JSON schema: .*{reason}"):
        Grammars(tok, VOCAB, [tok.eos_token_id]).check(json_grammar(schema), "JSON schema")


def test_a_grammar_that_allows_nothing_more_ends_the_sequence():
    """A matcher whose mask is empty (llguidance's state after an error) ends its sequence with
    stop; sampling from no token at all would crash rank 0, and with it the server."""
    from mdi_mpi.requests import Request

    tok = chat_tokenizer("qwen3")
    grammars = Grammars(tok, VOCAB, [tok.eos_token_id])
    req = Request("a", 0, None, [5, 6, 7], SamplingParams(max_new_tokens=8, temperature=1.0))
    req.grammar = json_grammar(None)
    sched = scheduler([req], 1, 64, 8, eos_ids=[tok.eos_token_id], tokenizer=tok)
    sched.grammars = grammars
    work = sched.next_work([0])
    sched.active[0].matcher.allowed = lambda: torch.zeros(VOCAB, dtype=torch.bool)
    sched.complete(work, torch.zeros(1, VOCAB))
    (res,) = sched.listener.results
    assert res.finish_reason == "stop" and res.tokens == []
