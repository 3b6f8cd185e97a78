"""Quantized weights: int8 per output channel, int4 per group of input columns, and their kernels.

- ``int8``: symmetric, one scale per output channel. Two kernels (``KERNELS``):
  - ``w8``: torch's ``_weight_int8pack_mm``, activations in the model's dtype;
  - ``w8a8``: each activation row rounded to int8 with a scale of its own (its largest magnitude
    over 127), integer dot products by oneDNN (VNNI or AMX on x86) on a weight repacked for it, and
    the int32 sums scaled back in float32. Integer sums are exact whatever their order, so a row's
    bits depend on nothing else in the call, on any CPU whose products do not saturate (without
    VNNI, x86's 8-bit products saturate in 16 bits: ``integer_products_exact`` finds out).
- ``int4``: asymmetric, one scale and one zero per group of G input columns (values 0..15, weight =
  (q - 8) * scale + zero); packed at load for this CPU with ``_convert_weight_to_int4pack_for_cpu``
  (the packed layout depends on the instruction set, so it is never stored) and multiplied with
  ``_weight_int4pack_mm_for_cpu`` (``w4``).

Each rank times the kernels of each int8 weight shape at start-up over decode and prompt row counts
and keeps the faster (``choose_quant_kernels``, cached beside the matmul kernels' measurements), so
one weight is held in one layout. Weights are quantized on load, one tensor at a time, so a rank's
peak memory is its quantized share plus one tensor in the file's dtype. A kernel whose rows turn out
to depend on each other (``rows_independent``, checked at every start-up) computes row by row.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mdi_mpi.kernels import best_ms, machine_entries

QUANTS = ("int8", "int4")
GROUPS = (32, 64, 128, 256)
KERNELS = {"int8": ("w8", "w8a8"), "int4": ("w4",)}  # by weight kind; the first is the fallback
COUNTS = (1, 2, 4, 8, 16, 64, 128)  # rows per call that rank the kernels: decode rows, then prompt rows


@dataclass(frozen=True)
class Quant:
    """A quantization scheme for a stage's weights."""

    kind: str  # int8 or int4
    group: int = 128  # int4: input columns per scale and zero

    def __post_init__(self):
        if self.kind not in QUANTS:
            raise ValueError(f"--quant must be one of {', '.join(QUANTS)}, got {self.kind!r}")
        if self.group not in GROUPS:
            raise ValueError(f"--quant-group must be one of {', '.join(map(str, GROUPS))}, got {self.group}")

    def bytes_per_weight(self, element_size: int) -> float:
        """Stored bytes per decoder-layer weight: int8 (plus a scale per row, negligible), or half a
        byte plus a scale and a zero per group for int4."""
        return 1.0 if self.kind == "int8" else 0.5 + 2 * element_size / self.group


def _row_blocks(shape: tuple[int, ...]) -> range:
    """Row starts of blocks of about 8M elements, so that float32 temporaries stay near 32 MB
    however large the tensor (a 128k-token embedding table included)."""
    return range(0, shape[0], max(1, 2**23 // shape[1]))


def quantize_int8(w: torch.Tensor | tuple[int, int], rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in], scale float32 [out]) with w ~ q * scale[:, None]. Instead
    of ``w``, its shape and ``rows(a, b)`` giving rows a..b-1: a block at a time, so that a large
    table is never whole in full precision."""
    shape = tuple(w) if rows is not None else tuple(w.shape)
    if rows is None:
        rows = lambda a, b: w[a:b]  # noqa: E731
    q = torch.empty(shape, dtype=torch.int8)
    scale = torch.empty(shape[0], dtype=torch.float32)
    blocks = _row_blocks(shape)
    for i in blocks:
        blk = rows(i, min(i + blocks.step, shape[0])).to(torch.float32, copy=True)  # worked on in place
        s = (blk.abs().amax(dim=1) / 127).clamp_(min=1e-12)
        q[i : i + blocks.step] = blk.div_(s[:, None]).round_().clamp_(-127, 127)
        scale[i : i + blocks.step] = s
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q uint8 [out, in] in 0..15, scale, zero float32 [out, in/G]) with
    w ~ (q - 8) * scale + zero per group of ``group`` input columns."""
    out_f, in_f = w.shape
    q = torch.empty(w.shape, dtype=torch.uint8)
    scale = torch.empty(out_f, in_f // group)
    zero = torch.empty(out_f, in_f // group)
    blocks = _row_blocks(w.shape)
    for i in blocks:
        g = w[i : i + blocks.step].to(torch.float32, copy=True).reshape(-1, in_f // group, group)  # [rows, in/G, G]
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        s = ((hi - lo) / 15).clamp_(min=1e-6)
        q[i : i + blocks.step] = g.sub_(lo[..., None]).div_(s[..., None]).round_().clamp_(0, 15).reshape(-1, in_f)
        scale[i : i + blocks.step], zero[i : i + blocks.step] = s, lo + 8 * s
    return q, scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    out_f, in_f = q.shape
    g = q.float().reshape(out_f, in_f // group, group)
    return ((g - 8) * scale[..., None] + zero[..., None]).reshape(out_f, in_f)


def int4_fits(shape: tuple[int, int], group: int) -> bool:
    """Whether the int4 kernel takes a weight of ``shape`` [out, in]."""
    out_f, in_f = shape
    return in_f % group == 0 and out_f % 16 == 0 and in_f % 32 == 0


def quantize(w: torch.Tensor, quant: Quant) -> dict[str, torch.Tensor]:
    """The portable stored form of ``w`` [out, in] under ``quant`` (int4 falls back to int8 where the
    kernel cannot take the shape): ``q`` (int8, or uint8 0..15 for int4, unpacked), ``scale`` and,
    for int4, ``zero`` (float32). The integer dtype of ``q`` tells the scheme. Experts [E, out, in]
    are quantized each on its own, and stacked."""
    if w.dim() == 3:
        parts = [quantize(x, quant) for x in w]
        return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
    if quant.kind == "int4" and int4_fits(tuple(w.shape), quant.group):
        q, scale, zero = quantize_int4(w, quant.group)
        return {"q": q, "scale": scale, "zero": zero}
    q, scale = quantize_int8(w)
    return {"q": q, "scale": scale}


_INT8_K_MULTIPLE = 16  # in-features torch's int8 kernel takes: multiples of 16 (others crash or read garbage)
_PACK_ROWS = 64  # rows per packing call: the packed layout is row-local in blocks of 16 (checked once)
_pack_blocks_ok: bool | None = None


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values q [out, in] (0..15, any integer dtype) for this CPU's kernel, in row blocks
    where that gives the same layout (so the int32 copy the packer needs is one block at a time)."""
    global _pack_blocks_ok

    def pack(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(x.to(torch.int32), 1)

    if _pack_blocks_ok is None:
        probe = torch.randint(0, 16, (2 * _PACK_ROWS, 64), generator=torch.Generator().manual_seed(0))
        _pack_blocks_ok = torch.equal(pack(probe), torch.cat([pack(probe[:_PACK_ROWS]), pack(probe[_PACK_ROWS:])]))
    if not _pack_blocks_ok or q.shape[0] % _PACK_ROWS:
        return pack(q)
    step = max(_PACK_ROWS, (2**22 // q.shape[1]) // _PACK_ROWS * _PACK_ROWS)
    return torch.cat([pack(q[i : i + step]) for i in range(0, q.shape[0], step)])


class QuantWeight(torch.nn.Module):
    """A quantized weight [out, in], ready for this CPU's kernel: ``x @ W.T`` for x [m, in]. Built
    from the stored form (``quantize``): int8 ``q`` with a ``scale`` per row, or int4 values 0..15
    with a ``scale`` and ``zero`` per group of input columns (packed here for this CPU). It computes
    with ``kernel`` (one of ``KERNELS[kind]``; ``use`` changes it)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.kind = "int8" if zero is None else "int4"
        self.dtype = dtype  # of the activations and scales
        self.kernel = KERNELS[self.kind][0]
        self.group = self.in_features // scale.shape[1] if zero is not None else 0
        self.per_row = False  # set where the kernel's rows turn out to depend on each other
        self.pad = 0  # zero input columns added for the kernel (int8)
        self.packed: torch.Tensor | None = None  # w8a8: oneDNN's layout of the int8 weight, in place of q
        if zero is None:
            # torch's int8 kernel reads past the end of rows (wrong values, or a segfault) unless the
            # in-features are a multiple of 16: pad the weight with zero columns, and x at each call.
            self.pad = -self.in_features % _INT8_K_MULTIPLE
            self.register_buffer("q", torch.nn.functional.pad(q.to(torch.int8), (0, self.pad)))
            self.register_buffer("scale", scale.to(dtype))
        else:
            self.register_buffer("q", pack_int4(q))
            sz = torch.stack([scale.float().t(), zero.float().t()], dim=2).contiguous()  # [in/G, out, 2]
            self.register_buffer("scale_zero", sz.to(dtype))

    @classmethod
    def of(cls, w: torch.Tensor, quant: Quant, dtype: torch.dtype) -> QuantWeight:
        """Quantize ``w`` [out, in] under ``quant`` (int4 falls back to int8 where the kernel cannot
        take the shape)."""
        if quant.kind == "int4" and int4_fits(tuple(w.shape), quant.group):
            return cls(*quantize_int4(w, quant.group), dtype)
        return cls(*quantize_int8(w), None, dtype)

    def use(self, kernel: str) -> None:
        """Compute with ``kernel`` from now on, holding the weight in its layout only (int8: torch's
        or oneDNN's, reordered from one to the other)."""
        if kernel not in KERNELS[self.kind]:
            raise ValueError(f"{kernel} is not a kernel of {self.kind} weights")
        if kernel == "w8a8" and self.packed is None:
            self.packed = torch.ops.onednn.qlinear_prepack(self.q[:, : self.in_features].contiguous(), None)
            self.q = None
            self.scale_f32 = self.scale.float()  # the same (model-dtype) scales as w8's
            self.zero_points = torch.zeros(self.out_features, dtype=torch.long)
        elif kernel == "w8" and self.packed is not None:
            self.q = torch.nn.functional.pad(self.packed.to_dense().t(), (0, self.pad)).contiguous()
            self.packed = None
        self.kernel = kernel

    def nbytes(self) -> int:
        """Bytes of this weight's integers, scales and zeros."""
        return sum(t.nbytes for t in self.buffers()) + (self.packed.nbytes if self.packed is not None else 0)

    def forward(self, x: torch.Tensor, rows: range | None = None) -> torch.Tensor:
        """x [m, in] -> [m, out] in x's dtype (with ``rows``, a ``w8`` weight's rows ``rows`` only: [m, len(rows)])."""
        if self.per_row and x.shape[0] > 1:
            return torch.cat([self._mm(r, rows) for r in x.split(1)])
        return self._mm(x, rows)

    def _mm(self, x: torch.Tensor, rows: range | None = None) -> torch.Tensor:
        x = x.contiguous()
        if self.kernel == "w8":
            if self.pad:
                x = torch.nn.functional.pad(x, (0, self.pad))
            if rows is not None:
                return torch.ops.aten._weight_int8pack_mm(x, self.q[rows.start : rows.stop], self.scale[rows.start : rows.stop])
            return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        if self.kernel == "w8a8":
            xq, xs = _rounded(x)
            y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 128, self.packed, self.scale_f32, self.zero_points, None,
                                                   1.0, 0, torch.float32, "none", [], "")  # [m, out]: float(sum) * scale
            return y.mul_(xs).to(x.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q, self.group, self.scale_zero)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of the dequantized weight (an int8 embedding lookup, ``w8``) -> [T, in]."""
        return self.q[ids, : self.in_features].to(dtype) * self.scale[ids, None]

    def dequantized(self) -> torch.Tensor:
        """The float32 weight these integers stand for (for checks against a reference)."""
        if self.kind == "int8":
            q = self.q[:, : self.in_features] if self.packed is None else self.packed.to_dense().t()
            return dequantize_int8(q, self.scale.float())
        eye = torch.eye(self.in_features, dtype=self.scale_zero.dtype)
        return self.forward(eye).float().t().contiguous()


_shared: dict[int, tuple] | None = None  # within ``one_rounding``: id(x) -> (x, its int8 rows, their scales)


@contextmanager
def one_rounding() -> Iterator[None]:
    """Within it, the int8 weights that read one activations tensor (q, k and v; gate and up) round
    it to int8 once, not once each."""
    global _shared
    _shared = {}
    try:
        yield
    finally:
        _shared = None


def _rounded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _shared is None:
        return quantize_rows(x)
    hit = _shared.get(id(x))
    if hit is None or hit[0] is not x:
        hit = _shared[id(x)] = (x, *quantize_rows(x))
    return hit[1], hit[2]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations x [m, in] -> (uint8 [m, in], the int8 values plus 128; float32 scales [m, 1]) with
    x ~ (xq - 128) * scale, each row scaled by its own largest magnitude over 127."""
    xs = x.abs().amax(dim=1, keepdim=True).float().div_(127).clamp_(min=torch.finfo(torch.float32).tiny)  # [m, 1]
    return x.div(xs).round_().add_(128).to(torch.uint8), xs  # x / xs in float32


def integer_products_exact(in_features: int, counts: tuple[int, ...] = COUNTS) -> bool:
    """Whether oneDNN's int8 products are exact here at these in-features and row counts: the largest
    values everywhere, where 16-bit intermediate sums (x86 without VNNI) saturate."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_prepack"):
        return False
    qw = QuantWeight(torch.full((64, in_features), 127, dtype=torch.int8), torch.ones(64), None, torch.float32)
    try:
        qw.use("w8a8")
        for m in counts:
            xq = torch.full((m, in_features), 255, dtype=torch.uint8)  # int8 127
            y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 128, qw.packed, qw.scale_f32, qw.zero_points, None,
                                                   1.0, 0, torch.float32, "none", [], "")
            if not torch.equal(y, torch.full_like(y, float(127 * 127 * in_features))):
                return False
    except RuntimeError:  # no int8 matmul in this build of oneDNN (some arm64 wheels)
        return False
    return True


def _matches_integer_reference(qw: QuantWeight, rows: int = 3, cols: int = 64) -> bool:
    """Whether a ``w8a8`` weight gives exactly the float64 integer product, scaled, on heavy-tailed
    rows (in its first ``cols`` outputs: a float64 copy of a whole LM head would take gigabytes)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, qw.in_features, generator=g) * torch.exp(2 * torch.randn(rows, qw.in_features, generator=g))
    xq, xs = quantize_rows(x)
    acc = (xq.double() - 128) @ qw.packed.to_dense()[:, :cols].double()  # [rows, cols], exact: |sums| < 2**53
    return torch.equal(qw._mm(x)[:, :cols], acc.float().mul_(qw.scale[:cols].float()).mul_(xs))
def rows_independent(qw: QuantWeight, counts: tuple[int, ...] = (1, 3, 8, 64)) -> bool:
    """Whether each row's result is the same bits at every row count in ``counts``, and whatever
    its place among the rows."""
    x = torch.randn(max(counts), qw.in_features, generator=torch.Generator().manual_seed(0)).to(qw.dtype)
    full = qw._mm(x)
    shifted = qw._mm(x.roll(1, 0)).roll(-1, 0)
    return torch.equal(shifted, full) and all(torch.equal(qw._mm(x[:m]), full[:m]) for m in counts)


def rank_kernels(times: dict[str, dict[int, float]]) -> str:
    """The kernel least slower, on average over the row counts, than the fastest at each count
    (``times``: ms per call by kernel, then row count; the first listed wins a tie). Pure."""
    counts = list(next(iter(times.values())))
    best = {m: min(t[m] for t in times.values()) for m in counts}
    return min(times, key=lambda k: (sum(times[k][m] / best[m] for m in counts), list(times).index(k)))


def _time(qw: QuantWeight) -> dict[int, float]:
    x = torch.randn(max(COUNTS), qw.in_features).to(qw.dtype)
    return {m: best_ms(lambda: qw(x[:m]), 10.0) for m in COUNTS}  # noqa: B023 - called at once


@dataclass
class QuantChoice:
    """The kernel of one quantized weight shape: its name, whether it runs row by row, and its
    measured ms per call by row count (those of each candidate)."""

    kernel: str
    per_row: bool
    times: dict[str, dict[int, float]]

    def describe(self) -> dict:
        return {"kernel": self.kernel, "row_by_row": self.per_row,
                "ms": {k: {str(m): round(v, 4) for m, v in t.items()} for k, t in self.times.items()}}


def _measure(qw: QuantWeight) -> dict:
    """Each kernel available for ``qw``'s kind, checked and timed on it: ``{"times": {kernel: {rows:
    ms}}, "row_by_row": [...]}``; ``qw`` is left computing with the first kernel."""
    names = [k for k in KERNELS[qw.kind] if k != "w8a8" or integer_products_exact(qw.in_features)]
    times, per_row = {}, []
    for name in names:
        qw.use(name)
        if name == "w8a8" and not _matches_integer_reference(qw):
            continue
        qw.per_row = not rows_independent(qw)
        if qw.per_row:
            per_row.append(name)
        times[name] = _time(qw)
    qw.use(names[0])
    return {"times": {k: {str(m): v for m, v in t.items()} for k, t in times.items()}, "row_by_row": per_row}


def choose_quant_kernels(weights: list[QuantWeight], forced: str | None, cache: Path | None) -> dict[str, QuantChoice]:
    """Choose, for each shape of ``weights``, the kernel that is fastest on this CPU over ``COUNTS``
    (measured on its first weight, or read from ``cache``), or the one ``forced`` (for int8 weights),
    and make every weight of the shape use it. Every start-up checks the choice on the real weights:
    rows independent of each other (else row by row), and ``w8a8`` exact. Returns the choices by shape."""
    from mdi_mpi.errors import UserError

    shapes: dict[str, list[QuantWeight]] = {}
    for qw in weights:
        key = f"{qw.kind}|{qw.out_features}x{qw.in_features}|g{qw.group}|{str(qw.dtype).removeprefix('torch.')}|quant"
        shapes.setdefault(key, []).append(qw)
    chosen: dict[str, QuantChoice] = {}
    with machine_entries(cache) as entries, torch.inference_mode():
        for key, group in shapes.items():
            first = group[0]
            measured = entries.get(key)
            if measured is None:
                measured = entries[key] = _measure(first)
            times = {k: {int(m): v for m, v in t.items()} for k, t in measured["times"].items()}
            if forced is not None and first.kind == "int8":
                if forced not in times:
                    raise UserError(f"--quant-kernel {forced}: this CPU's int8 products are not exact (as on x86 without "
                                    f"VNNI) or oneDNN has no int8 matmul here; use w8 or auto")
                name = forced
            else:
                name = rank_kernels(times)
            first.use(name)
            if name == "w8a8" and not _matches_integer_reference(first):  # never seen: the measurement checked it
                if forced is not None:
                    raise UserError("--quant-kernel w8a8 gave inexact integer products on these weights; use w8")
                name = KERNELS["int8"][0]
                first.use(name)
            first.per_row = not rows_independent(first)
            chosen[key] = QuantChoice(name, first.per_row, times)
    for key, group in shapes.items():  # repacking the rest needs no lock: the other ranks of the node go on meanwhile
        for qw in group[1:]:
            qw.use(chosen[key].kernel)
            qw.per_row = chosen[key].per_row
    return chosen
