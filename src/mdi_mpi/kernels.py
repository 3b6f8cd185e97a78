"""Batch-invariant matmul kernels for the linear layers, chosen on the machine that runs them.

A matmul library picks its kernel, and so its summation order, by the number of rows it is given;
left alone, a token's result would change with the other tokens that share its forward call, and
output would change with the number of ranks, slots and micro-batches. So every row goes through a
computation of a fixed shape, one of these *kernels*:

- ``mv``: ``torch.mv`` on one row;
- ``row``: ``F.linear`` on one row;
- ``tileT``: ``F.linear`` on a tile of exactly T rows (zero-padded), T in 2, 4, ... 256.

Which is fastest differs between CPUs several times over (AMX, AVX-512 BF16, AVX2, NEON), so each
rank measures them at start-up for each distinct weight shape and dtype. Kernels whose rows agree bit
for bit (and, for tiles, whatever a row's place in the tile and whatever its neighbours) form a
*family*: rows may be spread over any members of one family without changing a bit. For decode rows
and for prompt rows separately, the family that is fastest over a fixed set of row counts wins
(``select``), and m rows are covered by the cheapest mix of its members (``Choice.plan``): a lone
row may ride in a tile of 2 where that is faster than any one-row kernel, and 16 prompt rows use a
tile of 16, not 64. The row counts that rank the families are fixed, never the job's slots or
micro-batch, so that the choice, and with it every token, is the same for every rank and slot count.

Measurements are cached per machine (CPU, ISA caps, torch version, threads, shape, dtype) in
``kernels.json`` in the cache directory; the chosen families are checked bit for bit again on the
real weights at every start-up.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mdi_mpi.probes import cache_dir

ROWS: dict[str, int] = {"mv": 1, "row": 1, **{f"tile{t}": t for t in (2, 4, 8, 16, 32, 64, 128, 256)}}
DECODE_KERNELS = ("mv", "row", "tile2", "tile4", "tile8", "tile16")  # a head or decode rows never need more
DECODE_COUNTS = (1, 2, 4, 8)  # decode rows per call that rank the families
PREFILL_COUNTS = (16, 64, 128)  # prompt rows per call that rank the families
CACHE_VERSION = 4
# The bit-for-bit probe: kernels that sum in another order disagree only in rare rows for some shapes
# (F.linear's 128-row tile against its one-row call on a bf16 [256, 768] weight: 1 row in 256 of
# normal inputs, 8 with heavy-tailed ones; on a Cortex-A76, torch.mv against F.linear on a bf16
# [64, 96] weight: 1 value in 4096, unseen in 257 heavy-tailed rows), so it feeds heavy-tailed rows,
# as many as reading the weight about 2**30 bytes' worth of times allows, between 32 and 1024 (plus
# one, so that tiles pad): small weights, cheap to probe, get the most rows.
_PROBE_BYTES = 2**30
_PROBE_MIN, _PROBE_MAX = 32, 1024


def default_cache() -> Path:
    """``kernels.json`` in mdi-mpi's cache directory (``$MDI_MPI_CACHE``, else ``~/.cache/mdi-mpi``)."""
    return cache_dir() / "kernels.json"


def call(name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One call of kernel ``name`` on ``x`` [r, in] (r <= its rows; one row for mv and row) -> [r, out]."""
    if name == "mv":
        return (torch.mv(weight, x[0]) if bias is None else torch.addmv(bias, weight, x[0])).unsqueeze(0)
    r, t = x.shape[0], ROWS[name]
    if r < t:
        return F.linear(F.pad(x, (0, 0, 0, t - r)), weight, bias)[:r]
    return F.linear(x, weight, bias)


def cover(times: dict[str, float], m: int) -> tuple[str, ...]:
    """The cheapest sequence of kernels (from ``times``: ms per call) that covers ``m`` rows."""
    cost = [0.0] + [float("inf")] * m
    pick = [""] * (m + 1)
    for i in range(1, m + 1):
        for name, t in times.items():
            c = t + cost[max(0, i - ROWS[name])]
            if c < cost[i]:
                cost[i], pick[i] = c, name
    plan, i = [], m
    while i > 0:
        plan.append(pick[i])
        i = max(0, i - ROWS[pick[i]])
    return tuple(sorted(plan, key=lambda k: -ROWS[k]))


def plan_ms(times: dict[str, float], plan: Iterable[str]) -> float:
    return sum(times[k] for k in plan)


def select(families: list[tuple[str, ...]], times: dict[str, float], counts: tuple[int, ...]) -> tuple[str, ...]:
    """The family whose cheapest cover is, on average over row counts ``counts``, the least slower
    than the best any family offers at that count. Pure: ``times`` are ms per call."""

    def ms(family: tuple[str, ...], m: int) -> float:
        sub = {k: times[k] for k in family}
        return plan_ms(sub, cover(sub, m))

    best = {m: min(ms(f, m) for f in families) for m in counts}
    return min(families, key=lambda f: (sum(ms(f, m) / best[m] for m in counts), families.index(f)))


def probe_rows(weight: torch.Tensor) -> int:
    """Rows of the bit-for-bit probe of ``weight`` (see ``_PROBE_BYTES``)."""
    return min(_PROBE_MAX, max(_PROBE_MIN, _PROBE_BYTES // max(1, weight.nbytes))) + 1


def probe(weight: torch.Tensor, bias: torch.Tensor | None, names: Iterable[str], rows: int | None = None,
          compare: int | None = None) -> dict[str, torch.Tensor | None]:
    """Each kernel's output for the same first ``compare`` (default: all) of ``rows`` (default:
    ``probe_rows``) heavy-tailed random rows, or None for a tile whose rows change with their place
    in the tile (all rows shifted by one place give other bits)."""
    rows = rows or probe_rows(weight)
    compare = compare or rows
    g = torch.Generator().manual_seed(0)
    scale = torch.exp(2 * torch.randn(rows, weight.shape[1], generator=g))  # magnitudes over e^±6: order matters
    x = (torch.randn(rows, weight.shape[1], generator=g) * scale).to(weight.dtype)  # [P, in]

    def run(name: str, xs: torch.Tensor) -> torch.Tensor:
        step = ROWS[name]
        return torch.cat([call(name, xs[i : i + step], weight, bias) for i in range(0, xs.shape[0], step)])

    out: dict[str, torch.Tensor | None] = {}
    for name in names:
        if ROWS[name] == 1:  # one row per call: nothing shares it
            out[name] = run(name, x[:compare])
            continue
        y = run(name, x)
        out[name] = y[:compare] if torch.equal(run(name, x.roll(1, 0)).roll(-1, 0), y) else None
    return out


def families_of(outputs: dict[str, torch.Tensor | None]) -> list[tuple[str, ...]]:
    """Group kernels whose outputs agree bit for bit; position-dependent tiles are left out."""
    groups: list[list[str]] = []
    for name, y in outputs.items():
        if y is None:
            continue
        for g in groups:
            if torch.equal(outputs[g[0]], y):
                g.append(name)
                break
        else:
            groups.append([name])
    return [tuple(g) for g in groups]


def best_ms(run: Callable[[], object], budget_ms: float = 25.0) -> float:
    """Milliseconds of the fastest of a few calls of ``run`` after a warm-up: at least 2, at most 5,
    no more once ``budget_ms`` is spent."""
    run()
    best, spent, n = float("inf"), 0.0, 0
    while n < 2 or (n < 5 and spent < budget_ms):
        t0 = time.perf_counter()
        run()
        dt = (time.perf_counter() - t0) * 1e3
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best


def measure(weight: torch.Tensor, bias: torch.Tensor | None, names: Iterable[str], budget_ms: float = 25.0) -> dict[str, float]:
    """Milliseconds per call of each kernel on ``weight`` (the best of a few calls after a warm-up).
    Tiles are timed in growing sizes and no further once two in a row are no cheaper per row than
    the best so far (as where the CPU has no fast matmul for this dtype): larger ones would only
    cost start-up time."""
    x = torch.randn(max(ROWS[n] for n in names), weight.shape[1]).to(weight.dtype)
    times: dict[str, float] = {}
    best_per_row, strikes = float("inf"), 0
    for name in sorted(names, key=lambda n: ROWS[n]):
        if strikes >= 2 and ROWS[name] > 1:
            continue
        xs = x[: ROWS[name]]
        best = times[name] = best_ms(lambda: call(name, xs, weight, bias), budget_ms)  # noqa: B023 - called at once
        per_row = best / ROWS[name]
        if ROWS[name] > 1:
            strikes = strikes + 1 if per_row > 0.95 * best_per_row else 0
        best_per_row = min(best_per_row, per_row)
    return times


@dataclass
class Choice:
    """The kernels one weight shape uses for one kind of rows: a family and its timings."""

    times: dict[str, float]  # ms per call of each member of the family
    _plans: dict[int, tuple[str, ...]] = field(default_factory=dict, repr=False)

    @property
    def family(self) -> tuple[str, ...]:
        return tuple(self.times)

    def plan(self, m: int) -> tuple[str, ...]:
        """Kernels, one per call, that cover ``m`` rows (memoized)."""
        p = self._plans.get(m)
        if p is None:
            p = self._plans[m] = cover(self.times, m)
        return p

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x`` [m, in] @ weight.T (+ bias) -> [m, out], each row as its kernel computes it alone."""
        plan = self.plan(x.shape[0])
        if len(plan) == 1:
            return call(plan[0], x, weight, bias)
        outs, off = [], 0
        for name in plan:
            r = ROWS[name]
            outs.append(call(name, x[off : off + r], weight, bias))
            off += r
        return torch.cat(outs)


@dataclass
class ShapeKernels:
    """What one weight shape uses for decode rows and for prompt rows."""

    decode: Choice
    prefill: Choice

    def describe(self) -> dict:
        """The kernels used for typical row counts, e.g. ``{"decode": {"8": "tile8", ...}}``."""
        return {
            "decode": {str(m): _spell(self.decode.plan(m)) for m in DECODE_COUNTS},
            "prefill": {str(m): _spell(self.prefill.plan(m)) for m in PREFILL_COUNTS},
            "decode_family": list(self.decode.family),
            "prefill_family": list(self.prefill.family),
        }


def _spell(plan: tuple[str, ...]) -> str:
    """``("tile8", "row", "row")`` -> ``"tile8+2xrow"``."""
    counts = {k: plan.count(k) for k in dict.fromkeys(plan)}
    return "+".join(k if n == 1 else f"{n}x{k}" for k, n in counts.items())


def choose(measured: dict, forced: str | None, decode_only: bool) -> ShapeKernels | None:
    """Pick the decode and prefill families from a shape's measurements (``families``, ``times``),
    or use the one kernel ``forced`` (None if it was not measured)."""
    times, fams = measured["times"], [tuple(f) for f in measured["families"]]
    if forced is not None:
        if forced not in times:
            return None
        only = Choice({forced: times[forced]})
        return ShapeKernels(only, only)
    decode_fams = [f2 for f in fams if (f2 := tuple(k for k in f if k in DECODE_KERNELS))]
    dec = select(decode_fams, times, DECODE_COUNTS)
    pre = dec if decode_only else select(fams, times, PREFILL_COUNTS)
    return ShapeKernels(Choice({k: times[k] for k in dec}), Choice({k: times[k] for k in pre}))


def machine_key(threads: int) -> str:
    """What a measurement depends on besides the weight: CPU, ISA caps, torch version, threads."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(("model name", "Model"))), "")
        flags = next((ln.split(":", 1)[1] for ln in info.splitlines() if ln.startswith(("flags", "Features"))), "")
    except OSError:
        model = platform.processor()
    caps = ",".join(os.environ.get(v, "") for v in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"))
    digest = hashlib.sha1(flags.encode()).hexdigest()[:10]
    return f"v{CACHE_VERSION}|{platform.machine()}|{model}|{digest}|{caps}|{torch.backends.cpu.get_cpu_capability()}|torch {torch.__version__}|{threads} threads"


def shape_key(weight: torch.Tensor, bias: torch.Tensor | None, decode_only: bool) -> str:
    kind = "head" if decode_only else "layer"
    return f"{weight.shape[0]}x{weight.shape[1]}|{str(weight.dtype).removeprefix('torch.')}|{'bias' if bias is not None else 'nobias'}|{kind}"


def _agrees(k: ShapeKernels, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the chosen families still agree bit for bit on these (real) weights."""
    for choice in (k.decode, k.prefill):
        outs = probe(weight, bias, choice.family, rows=9, compare=3)
        if any(y is None for y in outs.values()) or len(families_of(outs)) != 1:
            return False
    return True


@dataclass
class Selection:
    """The outcome of choosing kernels for one stage."""

    kernels: dict[str, ShapeKernels]  # by shape key
    seconds: float
    cached: int  # shapes whose measurements came from the cache
    measured: int  # shapes measured now
    quant: dict = field(default_factory=dict)  # quantized weight shapes' kernels: quant.QuantChoice by shape key

    def describe(self) -> dict:
        return {"seconds": round(self.seconds, 3), "cached": self.cached, "measured": self.measured,
                "shapes": {key: k.describe() for key, k in self.kernels.items()},
                "quant": {key: c.describe() for key, c in self.quant.items()}}


@contextmanager
def machine_entries(cache: Path | None) -> Iterator[dict]:
    """This machine's measurements (``machine_key``) in ``cache``, a JSON file, as a dict to read and
    add to: the file is locked meanwhile, so that the ranks of one node measure once, and written
    back if the dict changed. Without a cache, an empty dict."""
    if cache is None:
        yield {}
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(str(cache) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = json.loads(cache.read_text()) if cache.exists() else {}
        entries = store.setdefault(machine_key(torch.get_num_threads()), {})
        before = json.dumps(entries, sort_keys=True)
        yield entries
        if json.dumps(entries, sort_keys=True) != before:
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(store, indent=1))
            tmp.replace(cache)


def choose_kernels(
    weights: list[tuple[torch.Tensor, torch.Tensor | None, bool]], forced: str | None, cache: Path | None
) -> tuple[Selection, list[ShapeKernels]]:
    """Kernels for each (weight, bias, decode_only) in ``weights``, measured or read from ``cache``
    (a JSON file, locked while in use so that the ranks of one node measure once). ``forced`` names
    one kernel to use everywhere; a kernel whose rows are not independent of each other is refused."""
    from mdi_mpi.errors import UserError

    t0 = time.perf_counter()
    keys = [shape_key(w, b, d) for w, b, d in weights]
    chosen: dict[str, ShapeKernels] = {}
    n_cached = n_measured = 0
    with machine_entries(cache) as entries:
        with torch.inference_mode():
            for (w, b, decode_only), key in zip(weights, keys):
                if key in chosen:
                    continue
                measured = entries.get(key)
                k = choose(measured, forced, decode_only) if measured else None
                if k is None or not _agrees(k, w, b):
                    names = DECODE_KERNELS if decode_only else tuple(ROWS)
                    names += (forced,) if forced is not None and forced not in names else ()
                    times = measure(w, b, names)
                    outs = probe(w, b, [n for n in names if n in times or n == forced])
                    if forced is not None and forced not in times:
                        times.update(measure(w, b, [forced]))
                    measured = {"families": families_of(outs), "times": times}
                    entries[key] = measured
                    n_measured += 1
                    if forced is not None and outs.get(forced) is None:
                        raise UserError(f"--kernel {forced}: on this CPU its rows change with their place in "
                                        f"the tile, so tokens would depend on the batch; choose another")
                    k = choose(measured, forced, decode_only)
                else:
                    n_cached += 1
                chosen[key] = k
    sel = Selection(chosen, time.perf_counter() - t0, n_cached, n_measured)
    return sel, [chosen[k] for k in keys]


def decode_row_ms(shape: tuple[int, int], dtype: torch.dtype, cache: Path | None) -> float:
    """Milliseconds to decode one row through a random weight of ``shape`` in ``dtype`` with the
    kernels this machine would choose (for ``--dtype auto``)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    _, (k,) = choose_kernels([(w, None, False)], None, cache)
    return plan_ms(k.decode.times, k.decode.plan(1))
