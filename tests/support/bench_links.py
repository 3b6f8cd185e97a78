"""The ring over real TCP links at Pi Ethernet and Wi-Fi speeds: test hosts on this machine
(``scripts/testhosts.sh``), one rank per host launched over SSH by ``jobs/hostfile-run.sh``, the links
between them either a plain bridge (``bridge``) or emulated by ``scripts/linkemu.py`` (``none``: the
emulator with no shaping, then ``gigabit``, ``fast-ethernet``, ``wifi``); MPICH's UCX netmod, or
its OFI one (what ``jobs/run.sh`` uses under srun) with ``--netmods ucx,ofi``. Needs root.

For each profile, N in --ranks and T in --tp (ranks per stage) that divides N: K (--slots: N and
2N by default) requests of 16 random prompt ids, each generating --new-tokens greedy tokens (EOS
ignored): decode tokens/s, time to first token, bytes on the wire per token; and one 512-token
prompt alone: its time to first token.

    sudo env PYTHONPATH=tests .venv/bin/python -m support.bench_links [--model DIR] [--json docs/bench-links.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from support.hosts import NETMODS, Hosts

PROFILES = ("bridge", "none", "gigabit", "fast-ethernet", "wifi")


def run(hosts: Hosts, work: Path, model: str, ranks: int, prompts: list[list[int]], new_tokens: int,
        netmod: str, tp: int = 1, quant: str | None = None) -> dict:
    """One generate job on hosts h1..h``ranks`` with MPICH's ``netmod`` (stages of ``tp`` ranks,
    weights ``quant``); returns its summary."""
    hostfile, file, stats = work / f"hosts-{ranks}.txt", work / "prompts.jsonl", work / "stats.json"
    hostfile.write_text("".join(f"h{i}\n" for i in range(1, ranks + 1)))
    file.write_text("".join(json.dumps({"id": str(i), "input_ids": p}) + "\n" for i, p in enumerate(prompts)))
    job = hosts.launch(["--model", model, "--dtype", "bfloat16", "--prompts-file", str(file), "--slots", str(len(prompts)),
                        "--max-new-tokens", str(new_tokens), "--ignore-eos", "--quiet", "--stats-json", str(stats),
                        "--max-seq-len", "600", "--tp", str(tp), *(["--quant", quant] if quant else [])],
                       env={"HOSTS": str(hostfile), **NETMODS[netmod]})
    _, err = job.communicate(timeout=900)
    if job.returncode:
        raise RuntimeError(f"the job failed:\n{err[-3000:]}")
    return json.loads(stats.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint (default: the TinyLlama-1.1B-shaped random model of mdi_mpi.bench)")
    p.add_argument("--profiles", default=",".join(PROFILES))
    p.add_argument("--ranks", default="2,3")
    p.add_argument("--netmods", default="ucx", help="ucx, ofi or both (ucx,ofi)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tp", default="1", help="ranks per stage, each with every N it divides (default: 1)")
    p.add_argument("--slots", default="N,2N", help="request counts K; N means the rank count (default: N,2N)")
    p.add_argument("--quant", help="int8 or int4 weights (default: none)")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    import torch

    from mdi_mpi.demo import tinyllama_model
    from mdi_mpi.probes import cpu_flags

    model = args.model or str(tinyllama_model())
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    short = [torch.randint(3, vocab, (16,), generator=g).tolist() for _ in range(8)]
    long = [torch.randint(3, vocab, (512,), generator=g).tolist()]
    ranks = [int(n) for n in args.ranks.split(",")]
    print(f"model {model}; {cpu_flags()}; 1 thread per rank; prompts of 16 ids, {args.new_tokens} new tokens", flush=True)
    print("profile        netmod  N  T   K  tokens/s  TTFT 16   TTFT 512  bytes/token", flush=True)
    tps = [int(t) for t in args.tp.split(",")]
    rows = []
    for profile in args.profiles.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            hosts = Hosts(Path(tmp), "mdib", max(ranks), None if profile == "bridge" else profile)
            try:
                for netmod in args.netmods.split(","):
                    for n, tp in [(n, t) for n in ranks for t in tps if n % t == 0]:
                        ttft512 = run(hosts, Path(tmp), model, n, long, 1, netmod, tp, args.quant)["mean_ttft_s"]
                        for k in sorted({int(x[:-1] or 1) * n if x.endswith("N") else int(x) for x in args.slots.split(",")}):
                            s = run(hosts, Path(tmp), model, n, short[:k], args.new_tokens, netmod, tp, args.quant)
                            row = {"profile": profile, "netmod": netmod, "ranks": n, "tp": tp, "slots": k,
                                   "tokens_per_s": s["tokens_per_s"], "ttft16_s": s["mean_ttft_s"], "ttft512_s": ttft512,
                                   "bytes_per_token": s["bytes_sent_per_token"]}
                            rows.append(row)
                            print(f"{profile:<14} {netmod:<6} {n:>2} {tp:>2} {k:>3} {row['tokens_per_s']:>9.2f} "
                                  f"{row['ttft16_s']:>8.3f}s {ttft512:>8.3f}s {row['bytes_per_token']:>11.0f}", flush=True)
            finally:
                hosts.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "cpu": cpu_flags(), "new_tokens": args.new_tokens,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
