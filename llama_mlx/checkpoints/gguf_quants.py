"""GGUF (llama.cpp) block formats, decoded with numpy into MLX affine quantization or floats.

MLX's affine format stores, per group of 32 inputs, `value = scale * code + bias` with `bits`-bit codes
packed little-endian into uint32 words. Where a GGUF block fits that form, the conversion is exact
(with float32 scales; a float16 scale dtype rounds only the scales and biases):

    Q4_0 Q4_1 Q4_K -> 4-bit     Q5_0 Q5_1 Q5_K -> 5-bit     Q8_0 -> 8-bit
    Q3_K -> 8-bit: a group's values are d*n with n = (sc-32)*(q-4) in [-124, 128]
    IQ4_NL IQ4_XS -> 8-bit: the codebook values are integers in [-127, 113]

Q2_K and Q6_K scale 16-element sub-blocks, two to a group of 32: a group whose two sub-blocks share
one integer grid of at most 256 steps is kept exact at 8 bits; the others are re-gridded min-max at
8 bits (error at most half an 8-bit step of the group's range), measured by `conversion_error`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

__all__ = ["BLOCKS", "GROUP_SIZE", "TARGET_BITS", "EXACT_TYPES", "ConversionError", "NonFiniteScaleError",
           "affine_bits", "compare", "conversion_error", "dequantize", "to_affine"]

GROUP_SIZE = 32
# (elements, bytes) per block
BLOCKS = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "IQ4_NL": (32, 18), "IQ4_XS": (256, 136),
}
TARGET_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q8_0": 8,
               "Q3_K": 8, "IQ4_NL": 8, "IQ4_XS": 8, "Q2_K": 8, "Q6_K": 8}
EXACT_TYPES = frozenset(TARGET_BITS) - {"Q2_K", "Q6_K"}  # every block kept exact
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int16)
_CHUNK_BLOCKS = 1 << 14  # blocks decoded at a time: bounds the temporaries to a few tens of MB


class NonFiniteScaleError(ValueError):
    """A block's scale or min is NaN or infinite (the reader names the tensor)."""


def affine_bits(kind: str) -> int:
    """MLX bit width a GGUF quant type is converted to (group size GROUP_SIZE)."""
    return TARGET_BITS[kind]


# -- field access -------------------------------------------------------------------------------

def _f16(b: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(b[:, at:at + 2]).view(np.float16)[:, 0].astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) codes: low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _bits_of(word: np.ndarray, n: int) -> np.ndarray:
    return ((word[:, None] >> np.arange(n, dtype=word.dtype)) & 1).astype(np.uint8)


def _per_group(x: np.ndarray, k: int) -> np.ndarray:
    return np.repeat(x, k)


def _two_bit_planes(qs: np.ndarray) -> np.ndarray:
    """K-quant 2-bit planes: (n, 64) bytes -> (n, 256); element 128h + 32j + l is bits 2j of byte 32h + l."""
    n = qs.shape[0]
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    return ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 256)


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins."""
    sc = np.empty((s.shape[0], 8), np.uint8)
    m = np.empty_like(sc)
    sc[:, :4], m[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), m.astype(np.float32)


# -- exact decoders: (codes (G, 32) uint8, scale (G,) f32, bias (G,) f32), value = scale*code + bias --

def _q4_0(b):
    d = _f16(b, 0)
    return _nibbles32(b[:, 2:18]), d, -8 * d


def _q4_1(b):
    return _nibbles32(b[:, 4:20]), _f16(b, 0), _f16(b, 2)


def _q5(b, at):
    qh = np.ascontiguousarray(b[:, at:at + 4]).view("<u4")[:, 0]
    return _nibbles32(b[:, at + 4:at + 20]) | (_bits_of(qh, 32) << 4)


def _q5_0(b):
    d = _f16(b, 0)
    return _q5(b, 2), d, -16 * d


def _q5_1(b):
    return _q5(b, 4), _f16(b, 0), _f16(b, 2)


def _q8_0(b):
    d = _f16(b, 0)
    codes = (b[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, d, -128 * d


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k_scale_min(b[:, 4:16])
    qs = b[:, 16:144].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    codes = (qs & 15).reshape(n * 8, 32)
    return codes, (d[:, None] * sc).ravel(), -(dmin[:, None] * m).ravel()


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _k_scale_min(b[:, 4:16])
    qs = b[:, 48:176].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    high = (b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    codes = (qs & 15).reshape(n, 8, 32) | (high << 4)
    return codes.reshape(n * 8, 32), (d[:, None] * sc).ravel(), -(dmin[:, None] * m).ravel()


def _q3_k_ints(b):
    """Q3_K as integers: (n, 16) signed sub-block scales and (n, 256) values q - 4 in [-4, 3]."""
    n = b.shape[0]
    s = b[:, 96:108]
    low4 = np.concatenate([s[:, :8] & 15, s[:, :8] >> 4], axis=1)
    high2 = np.concatenate([(s[:, 8:12] >> k) & 3 for k in (0, 2, 4, 6)], axis=1)
    sc = (low4 | (high2 << 4)).astype(np.int16) - 32
    low = _two_bit_planes(b[:, 32:96]).astype(np.int16)
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)  # bit 4h + j of hmask byte l
    high = ((b[:, 0:32].reshape(n, 1, 1, 32) >> shifts) & 1).reshape(n, 256).astype(np.int16)
    return sc, low - 4 * (1 - high)


def _q3_k(b):
    n = b.shape[0]
    d = _f16(b, 108)
    sc, q = _q3_k_ints(b)
    ints = (sc[:, :, None] * q.reshape(n, 16, 16)).reshape(n * 8, 32)  # in [-124, 128]
    dd = _per_group(d, 8)
    return (128 - ints).astype(np.uint8), -dd, 128 * dd


def _iq4_nl(b):
    d = _f16(b, 0)
    return (IQ4_VALUES[_nibbles32(b[:, 2:18])] + 128).astype(np.uint8), d, -128 * d


def _iq4_xs(b):
    n = b.shape[0]
    d = _f16(b, 0)
    sh = np.ascontiguousarray(b[:, 2:4]).view("<u2")[:, 0]
    sl = b[:, 4:8]
    j = np.arange(8)
    low = (sl[:, j // 2] >> (4 * (j % 2)).astype(np.uint8)) & 15
    high = (sh[:, None] >> (2 * j).astype(np.uint16)) & 3
    ls = (low.astype(np.int16) | (high.astype(np.int16) << 4)) - 32
    dl = (d[:, None] * ls.astype(np.float32)).ravel()
    idx = _nibbles32(b[:, 8:136].reshape(n * 8, 16))
    return (IQ4_VALUES[idx] + 128).astype(np.uint8), dl, -128 * dl


_EXACT = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q4_K": _q4_k,
          "Q5_K": _q5_k, "Q3_K": _q3_k, "IQ4_NL": _iq4_nl, "IQ4_XS": _iq4_xs}


# -- Q2_K / Q6_K: float values, plus an exact 8-bit candidate per group of 32 ---------------------

def _q2_k(b):
    """-> values (G, 32) f32, candidate (codes, scale, bias), candidate valid (G,)."""
    n = b.shape[0]
    d, dmin = _f16(b, 80), _f16(b, 82)
    sc, m = (b[:, :16] & 15), (b[:, :16] >> 4)
    q = _two_bit_planes(b[:, 16:80]).reshape(n, 16, 16)
    dl = d[:, None] * sc.astype(np.float32)
    ml = dmin[:, None] * m.astype(np.float32)
    values = (dl[:, :, None] * q.astype(np.float32) - ml[:, :, None]).reshape(n * 8, 32)
    # a group is d*g*code - ml when its two sub-blocks share the min
    sc2, ml2 = sc.reshape(n * 8, 2).astype(np.int32), ml.reshape(n * 8, 2)
    g = np.maximum(np.gcd(sc2[:, 0], sc2[:, 1]), 1)
    codes = ((sc2 // g[:, None])[:, :, None] * q.reshape(n * 8, 2, 16)).reshape(n * 8, 32)
    valid = ml2[:, 0] == ml2[:, 1]
    return values, (codes, _per_group(d, 8) * g, -ml2[:, 0]), valid


def _q6_k(b):
    n = b.shape[0]
    d = _f16(b, 208)
    sc = b[:, 192:208].view(np.int8).astype(np.int32)
    ql = b[:, :128].reshape(n, 2, 2, 32)
    low = np.stack([ql[:, :, 0] & 15, ql[:, :, 1] & 15, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    shifts = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)
    high = (b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3
    q = ((low | (high << 4)).astype(np.int32) - 32).reshape(n, 16, 16)
    dl = d[:, None] * sc.astype(np.float32)
    values = (dl[:, :, None] * q.astype(np.float32)).reshape(n * 8, 32)
    sc2 = sc.reshape(n * 8, 2)
    g = np.maximum(np.gcd(np.abs(sc2[:, 0]), np.abs(sc2[:, 1])), 1)
    ints = ((sc2 // g[:, None])[:, :, None] * q.reshape(n * 8, 2, 16)).reshape(n * 8, 32)
    lo = ints.min(axis=1)
    valid = ints.max(axis=1) - lo <= 255
    step = _per_group(d, 8) * g.astype(np.float32)
    return values, (ints - lo[:, None], step, step * lo.astype(np.float32)), valid


_GRIDDED = {"Q2_K": _q2_k, "Q6_K": _q6_k}


def _round_to(x: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    if dtype == mx.float32:
        return x
    return np.array(mx.array(x).astype(dtype).astype(mx.float32))


def _minmax8(values: np.ndarray, dtype: mx.Dtype):
    """8-bit min-max affine grid per row, its scale and bias already rounded to `dtype`."""
    lo, hi = values.min(axis=1), values.max(axis=1)
    bias = _round_to(lo, dtype)
    scale = _round_to((hi - bias) / 255, dtype)
    scale = np.where(scale > 0, scale, 1).astype(np.float32)
    codes = np.clip(np.rint((values - bias[:, None]) / scale[:, None]), 0, 255).astype(np.uint8)
    return codes, scale, bias


def _gridded(kind: str, b: np.ndarray, dtype: mx.Dtype):
    values, (codes, scale, bias), valid = _GRIDDED[kind](b)
    codes = np.clip(codes, 0, 255)
    c32, s32, b32 = codes.astype(np.float32), scale.astype(np.float32), bias.astype(np.float32)
    prod = s32[:, None] * c32
    exact = prod.astype(np.float64) == s32[:, None].astype(np.float64) * c32  # product exact in f32
    valid &= exact.all(axis=1) & ((prod + b32[:, None]) == values).all(axis=1)
    out_codes = codes.astype(np.uint8)
    out_s, out_b = s32.copy(), b32.copy()
    redo = ~valid
    if redo.any():
        out_codes[redo], out_s[redo], out_b[redo] = _minmax8(values[redo], dtype)
    return out_codes, out_s, out_b, valid


# -- packing and public conversions ----------------------------------------------------------------

def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, n) codes -> (rows, n * bits / 32) uint32 in MLX's layout (a little-endian bit stream)."""
    rows = codes.shape[0]
    if bits == 8:
        return np.ascontiguousarray(codes).view(np.uint32)
    if bits == 4:
        return np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.uint32)
    c = codes.reshape(-1, 8).astype(np.uint64)
    word = np.zeros(c.shape[0], np.uint64)
    for k in range(8):
        word |= c[:, k] << np.uint64(k * bits)
    packed = word.view(np.uint8).reshape(-1, 8)[:, :bits]
    return np.ascontiguousarray(packed).reshape(rows, -1).view(np.uint32)


def _blocks(raw: np.ndarray, kind: str) -> np.ndarray:
    return np.asarray(raw, dtype=np.uint8).reshape(-1, BLOCKS[kind][1])


def to_affine(kind: str, raw: np.ndarray, rows: int, scale_dtype: mx.Dtype = mx.float16, *,
              with_exact: bool = False):
    """Raw GGUF blocks of a (rows, n) tensor -> (packed uint32, scales, biases) as mx arrays.

    Decoded a chunk of blocks at a time. with_exact: also return a (rows, n/32) bool numpy array,
    True where the group holds the source values exactly (before rounding to scale_dtype).
    """
    per, nbytes = BLOCKS[kind]
    bits = TARGET_BITS[kind]
    b = _blocks(raw, kind)
    groups = b.shape[0] * per // GROUP_SIZE
    packed = np.empty((groups, bits), np.uint32)
    scales = np.empty(groups, np.float32)
    biases = np.empty(groups, np.float32)
    exact = np.ones(groups, bool)
    gpb = per // GROUP_SIZE
    for start in range(0, b.shape[0], _CHUNK_BLOCKS):
        chunk = np.asarray(b[start:start + _CHUNK_BLOCKS])
        g0, g1 = start * gpb, (start + chunk.shape[0]) * gpb
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite scales are refused just below
            if kind in _EXACT:
                codes, s, bias = _EXACT[kind](chunk)
            else:
                codes, s, bias, exact[g0:g1] = _gridded(kind, chunk, scale_dtype)
        if not (np.isfinite(s).all() and np.isfinite(bias).all()):
            block = start + int(np.flatnonzero(~(np.isfinite(s) & np.isfinite(bias)))[0]) // gpb
            raise NonFiniteScaleError(f"block {block} of its {kind} blocks has a NaN or infinite scale")
        packed[g0:g1] = _pack(codes, bits)
        scales[g0:g1], biases[g0:g1] = s, bias
    shape = (rows, groups // rows)
    out = (mx.array(packed.reshape(rows, -1)), mx.array(scales.reshape(shape)).astype(scale_dtype),
           mx.array(biases.reshape(shape)).astype(scale_dtype))
    return (*out, exact.reshape(shape)) if with_exact else out


def dequantize(kind: str, raw: np.ndarray) -> np.ndarray:
    """Raw GGUF blocks -> float32 values (flat), as llama.cpp computes them."""
    b = _blocks(raw, kind)
    out = []
    for start in range(0, b.shape[0], _CHUNK_BLOCKS):
        chunk = np.asarray(b[start:start + _CHUNK_BLOCKS])
        if kind in _EXACT:
            codes, s, bias = _EXACT[kind](chunk)
            out.append((s[:, None] * codes.astype(np.float32) + bias[:, None]).ravel())
        else:
            out.append(_GRIDDED[kind](chunk)[0].ravel())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


@dataclass
class ConversionError:
    """Error of GGUF -> MLX conversions against the dequantized source, accumulated over tensors."""

    source: str  # GGUF type
    target: str  # e.g. "8-bit group 32 (float16 scales)"
    elements: int = 0
    groups: int = 0
    exact_groups: int = 0  # groups held exactly before the scales are rounded to their dtype
    # (not counted, groups 0, for tensors measured from what was written: re-quantized or floats)
    max_abs: float = 0.0
    sq_error: float = 0.0
    sq_source: float = 0.0

    @property
    def rel_rms(self) -> float:
        """RMS error over RMS of the source values."""
        return float(np.sqrt(self.sq_error / self.sq_source)) if self.sq_source else 0.0

    def add(self, other: "ConversionError") -> None:
        self.elements += other.elements
        self.groups += other.groups
        self.exact_groups += other.exact_groups
        self.max_abs = max(self.max_abs, other.max_abs)
        self.sq_error += other.sq_error
        self.sq_source += other.sq_source


def measure(kind: str, source: np.ndarray, triple, exact: np.ndarray, scale_dtype: mx.Dtype) -> ConversionError:
    """Compare an affine triple (dequantized in float32) with the source's float32 values."""
    w, s, b = triple
    ours = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=GROUP_SIZE,
                         bits=TARGET_BITS[kind])
    # float64 as before, but each array made once and the difference taken in place: this runs on
    # every tensor of every GGUF conversion
    src = source.astype(np.float64)
    diff = np.array(ours).ravel().astype(np.float64)
    diff -= src
    max_abs = max(float(diff.max(initial=0.0)), -float(diff.min(initial=0.0)))
    target = f"{TARGET_BITS[kind]}-bit group {GROUP_SIZE} ({str(scale_dtype).rpartition('.')[2]} scales)"
    return ConversionError(kind, target, elements=diff.size, groups=int(exact.size),
                           exact_groups=int(exact.sum()), max_abs=max_abs,
                           sq_error=float(diff @ diff), sq_source=float(src @ src))


def compare(kind: str, target: str, source: np.ndarray, ours: mx.array) -> ConversionError:
    """Error of `ours` (rows, n; any float or affine output, dequantized) against the source's float32
    values (flat, row-major), a few million elements at a time."""
    rows = ours.shape[0]
    n = ours.size // max(rows, 1)
    step = max(1, (1 << 22) // max(n, 1))
    err = ConversionError(kind, target, elements=int(ours.size))
    for r in range(0, rows, step):
        a = np.array(ours[r:r + step].astype(mx.float32)).ravel().astype(np.float64)
        ref = source[r * n:r * n + a.size].astype(np.float64)
        diff = a - ref
        err.max_abs = max(err.max_abs, float(np.abs(diff).max(initial=0.0)))
        err.sq_error += float(diff @ diff)
        err.sq_source += float(ref @ ref)
    return err


def conversion_error(kind: str, raw: np.ndarray, rows: int,
                     scale_dtype: mx.Dtype = mx.float16) -> ConversionError:
    """Max abs and relative RMS error of `to_affine` on raw blocks of a (rows, n) tensor."""
    *triple, exact = to_affine(kind, raw, rows, scale_dtype, with_exact=True)
    return measure(kind, dequantize(kind, raw), triple, exact, scale_dtype)
