"""``python -m mdi_mpi.serve`` end to end: a real server under mpiexec, driven by the official
``openai`` client (sync and async), raw httpx and curl."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from support.launch import ranks_of, run_cli
from support.servers import Server

pytestmark = [pytest.mark.server, pytest.mark.mpi]
PROMPTS = ["def main(", "import os\n", "class Foo:", "for i in range(", "return self.", "if __name__ ==",
           "x = [", "try:\n    "]
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """2 ranks, the demo model, 4 slots in 2 groups."""
    s = Server(2, "--slots", "4", "--threads", "1", "--max-waiting", "40", tag=tmp_path_factory.mktemp("srv").name)
    yield s
    s.kill()


@pytest.fixture(scope="module")
def alone(server) -> dict[str, str]:
    """Each prompt's greedy completion, run on its own."""
    c = server.client()
    return {p: c.completions.create(model="mdi-mpi-demo", prompt=p, max_tokens=24, temperature=0).choices[0].text
            for p in PROMPTS}


@pytest.mark.timeout(120)
def test_models_list(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["mdi-mpi-demo"]


@pytest.mark.timeout(180)
def test_completion_equals_generate_for_greedy_and_seeded_choices(server, demo_dir, tmp_path):
    c = server.client()
    greedy = c.completions.create(model="mdi-mpi-demo", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    sampled = c.completions.create(model="mdi-mpi-demo", prompt=PROMPTS[1], max_tokens=16, temperature=0.9,
                                   seed=7, n=2)
    out = tmp_path / "g.jsonl"
    run = run_cli(["--threads", "1", "--prompt", PROMPTS[0], "--max-new-tokens", "24", "--output", str(out), "--quiet"])
    assert run.returncode == 0, run.stderr
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert greedy.choices[0].text == record["text"] and greedy.choices[0].text
    assert greedy.usage.completion_tokens == len(record["tokens"]) == 24
    assert greedy.usage.prompt_tokens == len(record["input_ids"])
    out2 = tmp_path / "s.jsonl"
    run = run_cli(["--threads", "1", "--prompt", PROMPTS[1], "--max-new-tokens", "16", "--temperature", "0.9", "--seed", "7",
                   "--n-samples", "2", "--output", str(out2), "--quiet"], ranks=2)
    assert run.returncode == 0, run.stderr
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in out2.read_text().splitlines()}
    assert [ch.text for ch in sorted(sampled.choices, key=lambda ch: ch.index)] == [texts["0-0"], texts["0-1"]]
    assert texts["0-0"] != texts["0-1"]  # choice i samples from its own generator, seeded with (seed, i)


@pytest.mark.timeout(180)
def test_penalties_and_logit_bias_equal_generate(server, alone, tmp_path):
    def generate(line: dict) -> dict:
        file, out = tmp_path / "p.jsonl", tmp_path / "g.jsonl"
        file.write_text(json.dumps(line) + "\n")
        out.unlink(missing_ok=True)
        run = run_cli(["--threads", "1", "--prompts-file", str(file), "--max-new-tokens", "24", "--output", str(out), "--quiet"])
        assert run.returncode == 0, run.stderr
        return json.loads(out.read_text())

    first = generate({"prompt": PROMPTS[2]})["tokens"][0]  # what greedy picks first, unbiased
    asks = {"frequency_penalty": 0.8, "presence_penalty": 0.4, "logit_bias": {str(first): -100, "30": 3.0}}
    got = server.client().completions.create(model="mdi-mpi-demo", prompt=PROMPTS[2], max_tokens=24, temperature=0, **asks)
    assert got.choices[0].text != alone[PROMPTS[2]]
    record = generate({"prompt": PROMPTS[2], **asks})
    assert got.choices[0].text == record["text"]
    assert first not in record["tokens"]


@pytest.mark.timeout(120)
def test_chat_streaming_equals_non_streaming_with_usage(server, demo_dir):
    c = server.client()
    messages = [{"role": "user", "content": "def parse(self, text):"}]
    whole = c.chat.completions.create(model="mdi-mpi-demo", messages=messages, max_tokens=20, temperature=0)
    chunks = list(c.chat.completions.create(model="mdi-mpi-demo", messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-2])
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
    assert streamed == whole.choices[0].message.content and streamed
    # The prompt went through the chat template.
    from mdi_mpi.requests import load_tokenizer

    tok = load_tokenizer(demo_dir)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert whole.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.timeout(120)
def test_logprobs_are_those_of_the_chosen_tokens(server):
    c = server.client()
    r = c.chat.completions.create(model="mdi-mpi-demo", messages=[{"role": "user", "content": "import sys"}],
                                  max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy takes the most likely token
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert e.logprob <= 0
    comp = c.completions.create(model="mdi-mpi-demo", prompt="import sys", max_tokens=4, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs)


@pytest.mark.timeout(120)
def test_a_stop_string_never_appears(server, alone):
    c = server.client()
    full = alone[PROMPTS[0]]
    stop = full.strip().split()[2]  # a word from the middle of the greedy output
    cut = full[: full.index(stop)]
    r = c.completions.create(model="mdi-mpi-demo", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    parts = [ch.choices[0].text for ch in c.completions.create(model="mdi-mpi-demo", prompt=PROMPTS[0], max_tokens=24,
                                                               temperature=0, stop=stop, stream=True)]
    assert "".join(parts) == cut and all(stop not in p for p in parts)


@pytest.mark.timeout(180)
def test_concurrent_requests_equal_each_request_alone(server, alone):
    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        prompts = PROMPTS * 4  # 32 requests on 4 slots

        async def one(p: str, stream: bool) -> str:
            if not stream:
                r = await c.completions.create(model="mdi-mpi-demo", prompt=p, max_tokens=24, temperature=0)
                return r.choices[0].text
            parts = []
            async for ch in await c.completions.create(model="mdi-mpi-demo", prompt=p, max_tokens=24, temperature=0,
                                                       stream=True):
                parts.append(ch.choices[0].text if ch.choices else "")
            return "".join(parts)

        return prompts, await asyncio.gather(*(one(p, i % 2 == 1) for i, p in enumerate(prompts)))

    prompts, texts = asyncio.run(main())
    assert [alone[p] for p in prompts] == texts


@pytest.mark.timeout(120)
def test_a_closed_stream_frees_its_slot(server, alone):
    c = server.client()
    stream = c.completions.create(model="mdi-mpi-demo", prompt="while True:", max_tokens=400, temperature=0,
                                  stream=True, extra_body={"ignore_eos": True})
    for _, _ in zip(range(3), stream):
        pass
    assert server.metric("mdi_mpi_requests_running") == 1
    stream.close()
    deadline = time.time() + 2  # a few pipeline steps; the request alone would run for seconds more
    while server.metric("mdi_mpi_requests_running") and time.time() < deadline:
        time.sleep(0.05)
    assert server.metric("mdi_mpi_requests_running") == 0
    assert 'finish_reason="cancelled"' in httpx.get(server.url + "/metrics").text
    r = c.completions.create(model="mdi-mpi-demo", prompt=PROMPTS[3], max_tokens=24, temperature=0)
    assert r.choices[0].text == alone[PROMPTS[3]]  # the slot's next occupant is right


@pytest.mark.timeout(120)
def test_a_client_that_gives_up_on_a_non_streaming_request_frees_its_slot(server):
    cancelled = _cancelled(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=0.3,
                   json={"prompt": "while True:", "max_tokens": 480, "temperature": 0, "ignore_eos": True})
    deadline = time.time() + 2  # the server notices at once; the request alone would run on for most of a second
    while _cancelled(server) == cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert _cancelled(server) == cancelled + 1
    assert server.metric("mdi_mpi_requests_running") == 0


def _cancelled(server) -> float:
    m = re.search(r'^mdi_mpi_request_finished_total\{finish_reason="cancelled"\} (\S+)$',
                  httpx.get(server.url + "/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.timeout(120)
def test_bad_requests_get_openai_errors(server):
    url = server.url
    cases = [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", json.dumps({"prompt": "x", "temperature": -1}).encode(), 400),
        ("/v1/completions", json.dumps({"prompt": "x", "n": 99}).encode(), 400),
        ("/v1/completions", json.dumps({"prompt": "x " * 3000}).encode(), 400),  # longer than the context
        ("/v1/completions", json.dumps({"prompt": [1.5]}).encode(), 400),
        ("/v1/completions", json.dumps({"prompt": "x", "logprobs": 21}).encode(), 400),
        ("/v1/completions", json.dumps({"prompt": "x", "presence_penalty": 2.5}).encode(), 400),
        ("/v1/completions", json.dumps({"prompt": "x", "logit_bias": {"5": 101}}).encode(), 400),
        ("/v1/completions", json.dumps({"prompt": "x", "logit_bias": {"99999999": 1}}).encode(), 400),  # past the vocabulary
        ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400),
        ("/v1/completions", json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404),
        ("/v1/nowhere", b"{}", 404),
        ("/v1/completions", b" " * (5 << 20), 413),
    ]
    for path, body, status in cases:
        r = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (path, body[:40], r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client().completions.create(model="mdi-mpi-demo", prompt="x " * 3000)


@pytest.mark.timeout(60)
def test_sse_framing_on_the_wire(server):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"prompt": "def f(", "max_tokens": 5, "temperature": 0, "stream": True})
    raw = subprocess.run(["curl", "-sN", server.url + "/v1/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=30).stdout
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2]) and len(events) >= 4
    assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.timeout(300)
def test_memory_stays_flat_over_1000_requests(server):
    """The soak test: rank 0 keeps no record of finished requests."""
    def rss() -> dict[int, int]:
        out = {}
        for rank, pid in ranks_of(server.tag).items():
            status = open(f"/proc/{pid}/status").read()
            out[rank] = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
        return out

    async def burst(n: int) -> None:
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        sem = asyncio.Semaphore(8)

        async def one(i: int) -> None:
            async with sem:
                r = await c.completions.create(model="mdi-mpi-demo", prompt=PROMPTS[i % 8], max_tokens=2,
                                               temperature=0.5, seed=i)
                assert r.usage.completion_tokens >= 1

        await asyncio.gather(*(one(i) for i in range(n)))

    asyncio.run(burst(200))  # warm up: allocator pools, caches
    before = rss()
    asyncio.run(burst(800))
    after = rss()
    assert set(before) == {0, 1}
    for rank in before:
        assert after[rank] - before[rank] < 8 * 1024, (rank, before, after)  # KiB


@pytest.mark.timeout(120)
def test_sigterm_drains_streams_then_every_rank_exits_0(server):
    """Last in this module: it stops the shared server."""
    c = server.client()
    stream = c.completions.create(model="mdi-mpi-demo", prompt="class A:", max_tokens=60, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    parts = [next(iter(stream))]
    server.proc.send_signal(signal.SIGTERM)
    parts += list(stream)
    assert parts[-1].choices[0].finish_reason == "length"
    assert sum(1 for p in parts if p.choices[0].text) >= 50  # the stream finished (a few tokens may merge)
    assert server.proc.wait(30) == 0, "".join(server.stderr)
    deadline = time.time() + 5
    while ranks_of(server.tag) and time.time() < deadline:
        time.sleep(0.1)
    assert not ranks_of(server.tag)
    assert any("draining" in line for line in server.stderr)


@pytest.mark.timeout(180)
def test_small_server_limits_keys_and_an_idle_ring_longer_than_the_timeout(tmp_path):
    """One rank with a key, one slot and one waiting place; three ranks idle past --timeout."""
    s = Server(1, "--slots", "1", "--max-waiting", "1", "--api-key", "sekret", tag=tmp_path.name + "a")
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        assert httpx.get(s.url + "/v1/models").status_code == 401
        c = s.client(api_key="sekret")
        assert c.models.list().data[0].id == "mdi-mpi-demo"
        long = dict(model="mdi-mpi-demo", prompt="x = 1", max_tokens=300, stream=True, extra_body={"ignore_eos": True})
        first = c.completions.create(**long)  # takes the slot
        next(iter(first))
        second = c.completions.create(**long)  # waits
        deadline = time.time() + 5
        while s.metric("mdi_mpi_requests_waiting", headers={"Authorization": "Bearer sekret"}) < 1 and time.time() < deadline:
            time.sleep(0.05)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "y"}, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["type"] == "unavailable_error"
        first.close()
        second.close()
        assert s.stop() == 0
    finally:
        s.kill()
    refused = subprocess.run([sys.executable, "-m", "mdi_mpi.serve", "--host", "0.0.0.0"], capture_output=True,
                             text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "MDI_MPI_API_KEY"})
    assert refused.returncode == 2 and "lets other machines in" in refused.stderr and "Traceback" not in refused.stderr
    three = Server(3, "--timeout", "2", tag=tmp_path.name + "b")
    try:
        time.sleep(5)  # more than twice --timeout with no request: heartbeats keep the ring alive
        r = three.client().completions.create(model="mdi-mpi-demo", prompt=PROMPTS[2], max_tokens=8, temperature=0)
        assert r.usage.completion_tokens == 8
        assert three.stop() == 0, "".join(three.stderr)
    finally:
        three.kill()
