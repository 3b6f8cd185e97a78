"""Quantized weights: int8 per output channel, int4 per group of input columns, on torch's CPU kernels.

- ``int8``: symmetric, one scale per output channel; ``torch.ops.aten._weight_int8pack_mm``.
- ``int4``: asymmetric, one scale and one zero per group of G input columns (values 0..15, weight =
  (q - 8) * scale + zero); packed at load for this CPU with ``_convert_weight_to_int4pack_for_cpu``
  (the packed layout depends on the instruction set, so it is never stored) and multiplied with
  ``_weight_int4pack_mm_for_cpu``.

Weights are quantized on load, one tensor at a time, so a rank's peak memory is its quantized share
plus one tensor in the file's dtype. These kernels reduce each output row in one in-order pass, so a
row's result does not depend on the other rows of the call (checked at start-up, ``rows_independent``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTS = ("int8", "int4")
GROUPS = (32, 64, 128, 256)


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
    with a ``scale`` and ``zero`` per group of input columns (packed here for this CPU)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.kind = "int8" if zero is None else "int4"
        self.group = self.in_features // scale.shape[1] if zero is not None else 0
        self.per_row = False  # set where the kernel's rows turn out to depend on each other
        self.pad = 0  # zero input columns added for the kernel (int8)
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

    def forward(self, x: torch.Tensor, rows: range | None = None) -> torch.Tensor:
        """x [m, in] -> [m, out] in x's dtype (with ``rows``, an int8 weight's rows ``rows`` only: [m, len(rows)])."""
        if self.per_row and x.shape[0] > 1:
            return torch.cat([self._mm(r, rows) for r in x.split(1)])
        return self._mm(x, rows)

    def _mm(self, x: torch.Tensor, rows: range | None = None) -> torch.Tensor:
        x = x.contiguous()
        if self.kind == "int8":
            if self.pad:
                x = torch.nn.functional.pad(x, (0, self.pad))
            if rows is not None:
                return torch.ops.aten._weight_int8pack_mm(x, self.q[rows.start : rows.stop], self.scale[rows.start : rows.stop])
            return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.q, self.group, self.scale_zero)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of the dequantized weight (an int8 embedding lookup) -> [T, in]."""
        return self.q[ids, : self.in_features].to(dtype) * self.scale[ids, None]

    def dequantized(self) -> torch.Tensor:
        """The float32 weight these integers stand for (for checks against a reference)."""
        if self.kind == "int8":
            return dequantize_int8(self.q[:, : self.in_features], self.scale.float())
        eye = torch.eye(self.in_features, dtype=self.scale_zero.dtype)
        return self.forward(eye).float().t().contiguous()


def rows_independent(qw: QuantWeight, dtype: torch.dtype, counts: tuple[int, ...] = (1, 3, 8, 64)) -> bool:
    """Whether each row's result is the same bits at every row count in ``counts``, and whatever
    its place among the rows."""
    x = torch.randn(max(counts), qw.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    full = qw._mm(x)
    shifted = qw._mm(x.roll(1, 0)).roll(-1, 0)
    return torch.equal(shifted, full) and all(torch.equal(qw._mm(x[:m]), full[:m]) for m in counts)


def check_rows(weights: list[QuantWeight], dtype: torch.dtype) -> int:
    """Make each kernel in ``weights`` row-invariant: one whose rows depend on each other (checked
    once per shape and kind) computes row by row. Returns how many shapes needed that."""
    verdict: dict[tuple, bool] = {}
    for qw in weights:
        key = (qw.kind, qw.out_features, qw.in_features)
        if key not in verdict:
            verdict[key] = rows_independent(qw, dtype)
        qw.per_row = not verdict[key]
    return sum(not v for v in verdict.values())
