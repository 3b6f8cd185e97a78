"""Traces (write, read back, summary, plot) and the benchmark in a tiny configuration."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from support.launch import run_cli

from mdi_mpi.trace import read_trace, utilization


@pytest.fixture(scope="module")
def trace_file(demo_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "run.h5"
    out = path.with_suffix(".jsonl")
    res = run_cli(["--prompt", "a", "--prompt", "bb", "--prompt", "ccc", "--max-new-tokens", "6", "--slots", "3",
                   "--micro-batch", "1", "--trace", str(path), "--output", str(out), "--quiet", "--ignore-eos"], ranks=2)
    assert res.returncode == 0, res.stderr
    return path


@pytest.mark.mpi
def test_trace_round_trip(trace_file):
    trace = read_trace(str(trace_file))
    assert trace.summary["ranks"] == 2 and len(trace.events) == 2
    assert trace.groups == [[0], [1], [2]]
    assert trace.kinds[:3] == ["recv-wait", "compute", "prefill"]
    for ev in trace.events:
        assert len(ev) > 0
        assert np.all(ev["end"] >= ev["start"])
        assert np.all(np.diff(ev["start"]) >= 0)  # one rank does one thing at a time, in order
        assert np.all(ev["start"][1:] >= ev["end"][:-1] - 1e-9)
    # Every generated token is one sampling step of its group on rank 0: 3 requests x 6 tokens.
    sample = trace.kinds.index("sample")
    rank0 = trace.events[0]
    assert sorted(np.bincount(rank0[rank0["kind"] == sample]["group"]).tolist()) == [6, 6, 6]
    rows = utilization(trace)
    assert all(0 < r["busy"] <= 1.0 + 1e-6 for r in rows)


@pytest.mark.mpi
def test_trace_summary_and_plot(trace_file, tmp_path):
    res = subprocess.run([sys.executable, "-m", "mdi_mpi.trace", "summary", str(trace_file)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    trace = read_trace(str(trace_file))
    rows = utilization(trace)
    lines = res.stdout.splitlines()
    assert lines[0].startswith("2 ranks, 3 slots in 3 groups")
    for r, row in enumerate(rows):  # one line per rank, with its layers and its measured busy share
        a, b = trace.summary["per_rank"][r]["layers"]
        assert lines[2 + r].split()[:3] == [str(r), f"{a}-{b - 1}", f"{100 * row['busy']:.1f}%"], lines
    bubble = sum(1 - row["busy"] for row in rows) / len(rows)
    assert f"bubble fraction (mean idle share of the ranks): {100 * bubble:.1f}%" in res.stdout
    png = tmp_path / "pipeline.png"
    res = subprocess.run([sys.executable, "-m", "mdi_mpi.trace", "plot", str(trace_file), "-o", str(png)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.mpi
def test_plot_window_draws_only_its_first_seconds(trace_file, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from mdi_mpi.trace import plot

    made = []
    subplots = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: made.append(subplots(*a, **k)) or made[-1])
    trace = read_trace(str(trace_file))
    start = min(float(ev["start"].min()) for ev in trace.events if len(ev))
    end = max(float(ev["end"].max()) for ev in trace.events if len(ev))
    plot(trace, str(tmp_path / "all.png"))
    plot(trace, str(tmp_path / "window.png"), window=(end - start) / 4)
    assert made[0][1].get_xlim() == pytest.approx((start, end))
    assert made[1][1].get_xlim() == pytest.approx((start, start + (end - start) / 4))
    res = subprocess.run([sys.executable, "-m", "mdi_mpi.trace", "plot", str(trace_file), "-o", str(tmp_path / "x.png"),
                          "--window", "0"], capture_output=True, text=True)
    assert res.returncode == 2 and "--window must be a positive number of seconds" in res.stderr


@pytest.mark.subprocess
def test_trace_of_a_non_trace_file(tmp_path):
    bad = tmp_path / "x.h5"
    bad.write_text("nope")
    res = subprocess.run([sys.executable, "-m", "mdi_mpi.trace", "summary", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and "not an mdi-mpi trace" in res.stderr


@pytest.mark.timeout(300)
@pytest.mark.mpi
def test_bench_tiny_end_to_end(demo_dir, tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, "-m", "mdi_mpi.bench", "--tiny", "--ranks", "1,2", "--slots", "1,N",
                          "--hf-threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr
    table = json.loads(out.read_text())
    assert table["read_bandwidth_bytes_per_s"] > 1e8
    kinds = {(r["engine"], r.get("ranks"), r.get("slots"), r.get("batch")) for r in table["rows"]}
    assert kinds == {("transformers", None, None, 1), ("mdi-mpi", 1, 1, None), ("mdi-mpi", 2, 1, None),
                     ("mdi-mpi", 2, 2, None)}
    for r in table["rows"]:
        assert r["tokens_per_s"] > 0 and r["ttft_s"] > 0 and all(b > 0 for b in r["peak_rss_bytes"])
        if r["engine"] == "mdi-mpi":
            assert len(r["peak_rss_bytes"]) == len(r["fractions"]) == r["ranks"]
            assert r["generated_tokens"] == r["slots"] * table["new_tokens"]
            assert set(r["fractions"][0]) == {"compute", "prefill", "recv_wait", "send", "sample"}
            if r["ranks"] == 1:
                assert r["bytes_sent_per_token"] == 0  # one process: nothing crosses MPI
            else:  # each token's activations cross every link once: (N hops) x D x 2 bytes (bf16) at least
                assert r["bytes_sent_per_token"] >= r["ranks"] * 256 * 2


@pytest.mark.timeout(300)
@pytest.mark.server
@pytest.mark.mpi
def test_bench_serve_conversation_with_the_cache_on_and_off_keeps_the_model(demo_dir, tmp_path):
    model = tmp_path / "model"  # a copy with a tokenizer: bench --serve once removed the model it served
    shutil.copytree(demo_dir, model)
    out = tmp_path / "conv.json"
    res = subprocess.run([sys.executable, "-m", "mdi_mpi.bench", "--model", str(model), "--tiny", "--serve", "1",
                          "--scenario", "conversation", "--ranks", "2", "--json", str(out)],
                         capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr
    assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
    on, off = json.loads(out.read_text())["rows"]
    assert on["cache"] and not off["cache"]
    assert on["cached_tokens_per_turn"][0] == 0 and all(n > 0 for n in on["cached_tokens_per_turn"][1:])
    assert off["cached_tokens_per_turn"] == [0, 0, 0, 0]
    assert all(t > 0 for t in on["ttft_s_per_turn"] + off["ttft_s_per_turn"])


@pytest.mark.parametrize("cap, flags, ok", [
    ("none", set(), True),
    ("avx2", {"avx2"}, True),
    ("avx2", set(), False),
    ("avx512", {"avx2", "avx512f"}, True),
    ("avx512", {"avx2"}, False),  # an AVX2 CPU would die of SIGILL under an AVX-512 cap
])
def test_a_cap_above_the_cpu_is_refused(monkeypatch, cap, flags, ok):
    from mdi_mpi import bench
    from mdi_mpi.errors import UserError

    monkeypatch.setattr(bench, "cpu_features", lambda: ("test CPU", flags))
    if ok:
        bench.check_cap(cap)
    else:
        with pytest.raises(UserError, match=f"--cap {cap} emulates a CPU with"):
            bench.check_cap(cap)


def test_bench_reports_the_best_and_the_median_of_each_configuration_over_rounds():
    from mdi_mpi.bench import best_and_median

    def row(engine, tps, rnd, **kw):
        return {"engine": engine, "dtype": "bfloat16", "threads": 1, "tokens_per_s": tps, "round": rnd, **kw}

    mdi = {"ranks": 2, "slots": 4, "micro_batch": 2}
    rows = [row("mdi-int4", 10.0, 1, **mdi), row("transformers", 5.0, 1, batch=1), row("mdi-int4", 12.0, 2, **mdi),
            row("transformers", 4.0, 2, batch=1), row("mdi-int4", 11.0, 3, **mdi), row("transformers", 6.0, 3, batch=1),
            row("mdi-int4", 30.0, 1, ranks=2, slots=8, micro_batch=4)]
    out = best_and_median(rows)
    assert [(s["engine"], s.get("slots"), s["best_tokens_per_s"], s["median_tokens_per_s"], s["tokens_per_s"]) for s in out] == [
        ("mdi-int4", 4, 12.0, 11.0, [10.0, 12.0, 11.0]), ("transformers", None, 6.0, 5.0, [5.0, 4.0, 6.0]),
        ("mdi-int4", 8, 30.0, 30.0, [30.0])]
    assert best_and_median(rows[:4])[0]["median_tokens_per_s"] == 11.0  # an even count: the mean of the middle two
