"""The prefix cache through the server and the official ``openai`` client: conversations, a shared
system prompt and more conversations than slots give the same text as a server without the cache,
and the cache's counters say what it saved."""

from __future__ import annotations

import asyncio

import openai
import pytest
from support.servers import Server

pytestmark = [pytest.mark.server, pytest.mark.mpi]
MODEL = "mdi-mpi-demo"
SYSTEM = "You write short Python functions. " * 6
QUESTIONS = ["def parse(line):", "class Node:", "import json\n", "for key in sorted("]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The same small chunks, 2 slots: 3 ranks with the cache, 1 rank without it."""
    flags = ("--slots", "2", "--prefill-chunk", "16", "--threads", "1", "--max-waiting", "40")
    on = Server(3, *flags, tag=tmp_path_factory.mktemp("on").name)
    try:
        off = Server(1, *flags, "--no-prefix-cache", tag=tmp_path_factory.mktemp("off").name)
    except BaseException:
        on.kill()
        raise
    yield on, off
    on.kill()
    off.kill()


def conversation(client, opening: str, turns: int) -> list[tuple[str, int]]:
    """A seeded conversation of ``turns`` turns: each answer and the prompt tokens found in the cache."""
    messages = [{"role": "system", "content": SYSTEM + opening}]
    out = []
    for q in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": q})
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0.8, seed=11)
        answer = r.choices[0].message.content
        out.append((answer, r.usage.prompt_tokens_details.cached_tokens))
        messages.append({"role": "assistant", "content": answer})
    return out


@pytest.mark.timeout(300)
def test_a_conversation_gives_the_same_text_with_the_cache_and_counts_it(servers):
    on, off = servers
    before = on.metric("mdi_mpi_prompt_tokens_cached_total")
    cached = conversation(on.client(), "", 4)
    plain = conversation(off.client(), "", 4)
    assert [a for a, _ in cached] == [a for a, _ in plain]
    assert cached[0][1] == 0 and all(n >= 16 and n % 16 == 0 for _, n in cached[1:])
    assert all(n == 0 for _, n in plain)
    assert on.metric("mdi_mpi_prompt_tokens_cached_total") - before == sum(n for _, n in cached)
    assert off.metric("mdi_mpi_prompt_tokens_cached_total") == 0
    assert on.metric("mdi_mpi_prompt_tokens_computed_total") > 0


@pytest.mark.timeout(300)
def test_more_conversations_than_slots_still_give_the_same_text(servers):
    on, off = servers
    openings = ["Be brief.", "Use type hints.", "Name things well."]  # 3 conversations, 2 slots
    results = {}
    for server in servers:
        c = server.client()
        turns = [[] for _ in openings]
        messages = [[{"role": "system", "content": SYSTEM + o}] for o in openings]
        for q in QUESTIONS[:3]:
            for i in range(len(openings)):  # interleaved: each turn finds its slot taken by another
                messages[i].append({"role": "user", "content": q})
                r = c.chat.completions.create(model=MODEL, messages=messages[i], max_tokens=12, temperature=0)
                turns[i].append(r.choices[0].message.content)
                messages[i].append({"role": "assistant", "content": turns[i][-1]})
        results[server] = turns
    assert results[on] == results[off]


@pytest.mark.timeout(300)
def test_concurrent_clients_share_a_system_prompt(servers):
    on, off = servers

    async def ask(server) -> list:
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        calls = [ac.chat.completions.create(model=MODEL, max_tokens=10, temperature=0,
                                            messages=[{"role": "system", "content": SYSTEM + " Shared."},
                                                      {"role": "user", "content": q}])
                 for q in QUESTIONS * 2]
        return await asyncio.gather(*calls)

    with_cache, without = asyncio.run(ask(on)), asyncio.run(ask(off))
    assert [r.choices[0].message.content for r in with_cache] == [r.choices[0].message.content for r in without]
    shared = [r.usage.prompt_tokens_details.cached_tokens for r in with_cache]
    assert sum(n > 0 for n in shared) >= len(shared) - 2  # at most one computes it per slot; the rest copy or reuse
