"""Decode kernels for MLX's CUDA backend (`mx.fast.cuda_kernel`): one token, or a few rows.

On CUDA, MLX spends about 4-5 microseconds of host time per graph node when it evaluates a
decode step, whatever the node does; a Llama decode step of ~15 nodes per layer is therefore
bound by the host, not by the GPU. These kernels fold a layer into eight nodes, each fusing
what the MLX graph would run as several:

- `fused_matvec`: a 4-bit affine matrix-vector product whose prologue stages x in shared memory
  as one of: x itself; `rms_norm(a + b) * weight` (also writing the residual `a + b`); or
  `silu(gate) * up`. Its epilogue can apply RoPE to the q/k rows and split the output into
  q, k and v. Each lane loads its share of a weight row as 16-byte words before the prologue,
  so the row is in flight while x is staged.
- `decode_attention`: attention of one query token per row over the first `offset[b] + 1`
  positions of that row's fixed-capacity K/V buffers, `offset` being an array: a compiled step
  never retraces per token and never reads unwritten positions. Each warp scores 32 positions at a time (a lane each),
  with an online softmax; blocks of 128 positions are merged by a second kernel. With `shared`,
  the rows are positions of one sequence over one buffer (a speculative check).
- `rows_matmul`: `fused_matvec` for up to 16 rows (a batch's step, a check's positions), with
  the same prologues and epilogue, on the tensor cores: `mma.sync` m16n8k16 of raw 4-bit codes
  (exact in 16-bit floats) against the staged rows, scales and biases applied per 32 inputs.
  Wide inputs without rms_norm split over blocks, summed by a second kernel.

Every function here needs the CUDA backend (`cuda_available()`); callers fall back to MLX ops.
"""

from __future__ import annotations

import struct
from typing import Optional

import mlx.core as mx

__all__ = [
    "attention_supported",
    "cuda_available",
    "decode_attention",
    "fused_matvec",
    "matvec_supported",
    "rows_matmul",
    "rows_matmul_supported",
    "ROWS_MAX",
]

ROWS_PER_BLOCK = 16  # one warp per output row
ATTN_CHUNK = 128  # positions per attention block (a warp each 32); blocks are merged in a second pass
ATTN_WARPS = 4
# Buffers of this many positions and more would be attended by MLX's scaled_dot_product_attention
# (masked to each row's positions) instead of the kernel. Never: on an H100 the kernel won at every
# length measured, 1024-8192 positions, 1 and 8 rows, 1B and 8B heads (benchmarks/attention_probe.py,
# results/attention_probe-gpu-nvidia-h100.json: 33-280 us vs 72-608 us a call), and decoding at
# position 4096 took 0.80x (1B) and 0.77x (8B) of mlx-lm's time a token (results/gpu-nvidia-h100-2026-12-08.md).
SDPA_FROM = 1 << 30

_HEADER = r"""
#define NEG_INF __int_as_float(0xff800000u)
constexpr float LOG2E = 1.4426950408889634f;
// A masked nibble q * 16^j (j < 4) as float: 2^23 + q * 16^j in float bits, minus 2^23, exactly;
// x is stored premultiplied by 16^-j, so no shift or int-to-float conversion is needed.
__device__ __forceinline__ float nib(uint32_t masked) {
  return __int_as_float(0x4B000000u | masked) - 8388608.0f;
}
// N consecutive values as floats, in one load where they make 4, 8 or 16 bytes.
template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float* o) {
  if constexpr (sizeof(T) * N == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&u);
    #pragma unroll
    for (int i = 0; i < N; i++) o[i] = static_cast<float>(h[i]);
  } else if constexpr (sizeof(T) * N == 8) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const T* h = reinterpret_cast<const T*>(&u);
    #pragma unroll
    for (int i = 0; i < N; i++) o[i] = static_cast<float>(h[i]);
  } else if constexpr (sizeof(T) * N == 4) {
    const uint32_t u = *reinterpret_cast<const uint32_t*>(p);
    const T* h = reinterpret_cast<const T*>(&u);
    #pragma unroll
    for (int i = 0; i < N; i++) o[i] = static_cast<float>(h[i]);
  } else {
    #pragma unroll
    for (int i = 0; i < N; i++) o[i] = static_cast<float>(p[i]);
  }
}
__device__ __forceinline__ float warp_sum(float v) {
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
"""

# Template constants: T (activations), S (scales), K (input width), N (rows), G (group size),
# PRO (0 x, 1 rms_norm(a + b), 2 swiglu), EPI (0 out, 1 RoPE + q/k/v split), EPS_BITS,
# and for EPI 1: NQ, NKV, D, TRAD (interleaved RoPE pairs).
_MATVEC = r"""
  constexpr int CHUNKS = K / 32;              // 32 weights = one 16-byte word
  constexpr int PER_LANE = (CHUNKS + 31) / 32;
  constexpr int PAD = 36;                     // floats per chunk in shared memory: no bank conflicts
  extern __shared__ float smem[];
  float* xs = smem;                           // [CHUNKS][PAD]
  float* xsum = xs + CHUNKS * PAD;            // [CHUNKS]
  float* red = xsum + CHUNKS;                 // [32]
  float* res = red + 32;                      // [ROWS]

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  int row = blockIdx.x * ROWS + warp;
{ROWMAP}  const bool live = row < N;
  const size_t r = live ? row : 0;
  const uint4* wr = reinterpret_cast<const uint4*>(w) + r * CHUNKS;
  const S* sr = scales + r * (K / G);
  const S* br = biases + r * (K / G);

  uint4 wv[PER_LANE];
  #pragma unroll
  for (int i = 0; i < PER_LANE; i++) {
    const int c = lane + 32 * i;
    if (c < CHUNKS) wv[i] = wr[c];
  }

  // Stage x: thread t owns 32-element chunks t, t + blockDim.x, ... and their sums. Element e of
  // each group of 4 is stored times 16^-e, to meet nibble e of a weight word unshifted.
  constexpr bool PRE = PRO != 1;  // rms_norm scales first, then premultiplies
  static_assert(sizeof(T) == 2, "16-bit activations");
  float ss = 0.0f;
  for (int c = tid; c < CHUNKS; c += blockDim.x) {
    float s = 0.0f;
    #pragma unroll
    for (int j = 0; j < 4; j++) {
      const int i0 = c * 32 + j * 8;
      float xv[8];
{STAGE}
      #pragma unroll
      for (int t = 0; t < 8; t++) s += xv[t];
      float4* dst = reinterpret_cast<float4*>(xs + c * PAD + j * 8);
      const float k1 = PRE ? 0.0625f : 1.0f, k2 = PRE ? 0.00390625f : 1.0f, k3 = PRE ? 0.000244140625f : 1.0f;
      dst[0] = make_float4(xv[0], xv[1] * k1, xv[2] * k2, xv[3] * k3);
      dst[1] = make_float4(xv[4], xv[5] * k1, xv[6] * k2, xv[7] * k3);
    }
    xsum[c] = s;
  }
{NORM}
  __syncthreads();

  float acc = 0.0f;
  if (live) {
    #pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
      const int c = lane + 32 * i;
      if (c < CHUNKS) {
        const float4* xp = reinterpret_cast<const float4*>(xs + c * PAD);
        const uint32_t words[4] = {wv[i].x, wv[i].y, wv[i].z, wv[i].w};
        float qx = 0.0f;
        #pragma unroll
        for (int j = 0; j < 4; j++) {
          const float4 u = xp[2 * j], v = xp[2 * j + 1];
          const uint32_t lo = words[j], hi = words[j] >> 16;
          qx = fmaf(nib(lo & 0xFu), u.x, qx);
          qx = fmaf(nib(lo & 0xF0u), u.y, qx);
          qx = fmaf(nib(lo & 0xF00u), u.z, qx);
          qx = fmaf(nib(lo & 0xF000u), u.w, qx);
          qx = fmaf(nib(hi & 0xFu), v.x, qx);
          qx = fmaf(nib(hi & 0xF0u), v.y, qx);
          qx = fmaf(nib(hi & 0xF00u), v.z, qx);
          qx = fmaf(nib(hi & 0xF000u), v.w, qx);
        }
        const int g = (c * 32) / G;
        acc = fmaf(static_cast<float>(sr[g]), qx, acc);
        acc = fmaf(static_cast<float>(br[g]), xsum[c], acc);
      }
    }
    acc = warp_sum(acc);
  }

{STORE}"""

_ROWMAP_ROPE = r"""
  constexpr int ROPE_ROWS = (NQ + NKV) * D;
  // Rotation pairs share a block: warps w and w + 8 hold the two rows of pair p.
  const bool rope = blockIdx.x * ROWS < ROPE_ROWS;
  const int pair = (blockIdx.x % (D / 16)) * 8 + (warp & 7);
  if (rope) row = (blockIdx.x / (D / 16)) * D + (TRAD ? 2 * pair + (warp >> 3) : pair + (warp >> 3) * (D / 2));
"""
_STAGE = {
    0: "      load_floats<T, 8>(x + i0, xv);\n",
    1: r"""      float av[8], bv[8];
      load_floats<T, 8>(a + i0, av);
      load_floats<T, 8>(b + i0, bv);
      alignas(16) T hv[8];
      #pragma unroll
      for (int t = 0; t < 8; t++) {
        hv[t] = static_cast<T>(av[t] + bv[t]);
        xv[t] = static_cast<float>(hv[t]);
        ss = fmaf(xv[t], xv[t], ss);
      }
      if (blockIdx.x == 0) *reinterpret_cast<uint4*>(h + i0) = *reinterpret_cast<const uint4*>(hv);
""",
    2: r"""      float gv[8], uv[8];
      load_floats<T, 8>(gu + i0, gv);
      load_floats<T, 8>(gu + K + i0, uv);
      #pragma unroll
      for (int t = 0; t < 8; t++) {
        const T act = static_cast<T>(gv[t] / (1.0f + __expf(-gv[t])));
        xv[t] = static_cast<float>(static_cast<T>(static_cast<float>(act) * uv[t]));
      }
""",
}
# rms_norm(a + b) * weight: the block's sum of squares, then each thread rescales its own chunks.
_NORM = r"""
  ss = warp_sum(ss);
  if (lane == 0) red[warp] = ss;
  __syncthreads();
  float total = 0.0f;
  #pragma unroll
  for (int i = 0; i < ROWS; i++) total += red[i];
  const float inv = rsqrtf(total / K + __int_as_float(EPS_BITS));
  for (int c = tid; c < CHUNKS; c += blockDim.x) {
    float s = 0.0f;
    #pragma unroll
    for (int j = 0; j < 4; j++) {
      float nv[8];
      load_floats<T, 8>(nw + c * 32 + j * 8, nv);
      float* xc = xs + c * PAD + j * 8;
      #pragma unroll
      for (int t = 0; t < 8; t++) {
        const float y = static_cast<float>(static_cast<T>(xc[t] * inv * nv[t]));
        s += y;
        xc[t] = y * (t % 4 == 0 ? 1.0f : t % 4 == 1 ? 0.0625f : t % 4 == 2 ? 0.00390625f : 0.000244140625f);
      }
    }
    xsum[c] = s;
  }
"""
_STORE = {
    0: "  if (live && lane == 0) out[row] = static_cast<T>(acc);\n",
    1: r"""
  if (rope) {
    if (lane == 0) res[warp] = static_cast<float>(static_cast<T>(acc));
    __syncthreads();
    if (lane == 0) {
      const float x0 = res[warp & 7], x1 = res[(warp & 7) + 8];
      float sn, cs;
      sincosf(static_cast<float>(offset[0]) * inv_freq[pair], &sn, &cs);
      acc = (warp >> 3) ? fmaf(x0, sn, x1 * cs) : fmaf(x0, cs, -x1 * sn);
    }
  }
  if (live && lane == 0) {
    const T val = static_cast<T>(acc);
    if (row < NQ * D) q[row] = val;
    else if (row < ROPE_ROWS) k[row - NQ * D] = val;
    else v[row - ROPE_ROWS] = val;
  }
""",
}


def _matvec_source(pro: int, epi: int) -> str:
    return (_MATVEC.replace("{ROWMAP}", _ROWMAP_ROPE if epi else "")
            .replace("{STAGE}", _STAGE[pro]).replace("{NORM}", _NORM if pro == 1 else "")
            .replace("{STORE}", _STORE[epi]))


_PROLOGUE_INPUTS = {0: ["x"], 1: ["a", "b", "nw"], 2: ["gu"]}
_kernels: dict[tuple, object] = {}


def _float_bits(x: float) -> int:
    # Template arguments are integers: floats travel as their float32 bit patterns.
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _smem_bytes(K: int) -> int:
    return ((K // 32) * 37 + 32 + ROWS_PER_BLOCK) * 4


def _matvec_kernel(pro: int, epi: int, K: int):
    # Dynamic shared memory is fixed per kernel object: one object per (prologue, epilogue, K).
    key = (pro, epi, K)
    if key not in _kernels:
        inputs = _PROLOGUE_INPUTS[pro] + ["w", "scales", "biases"] + (["offset", "inv_freq"] if epi else [])
        outputs = (["q", "k", "v"] if epi else ["out"]) + (["h"] if pro == 1 else [])
        _kernels[key] = mx.fast.cuda_kernel(
            name=f"llama_mlx_matvec_p{pro}_e{epi}", input_names=inputs, output_names=outputs,
            source=_matvec_source(pro, epi), header=_HEADER, shared_memory=_smem_bytes(K),
        )
    return _kernels[key]


def cuda_available() -> bool:
    """Whether MLX runs on its CUDA backend here, so these kernels can be launched."""
    try:
        return mx.default_device() == mx.gpu and mx.cuda.is_available()
    except AttributeError:
        return False


def matvec_supported(K: int, bits: int, group_size: int) -> bool:
    """Whether `fused_matvec` takes a 4-bit affine weight of input width K and this group size."""
    # 70B's down projection (K 28672, 133 KB of staged x) fails to launch inside a CUDA graph on an
    # H200 ("too many resources requested"); 8B's (K 14336, 66 KB) runs. Wider inputs take the plain graph.
    return bits == 4 and K % 32 == 0 and group_size % 32 == 0 and K % group_size == 0 and _smem_bytes(K) <= 100_000


def _prologue(x, residual, gate_up) -> tuple[int, list, mx.Dtype]:
    # (prologue number, its inputs, the activations' dtype) of the x / residual / gate_up argument.
    if x is not None:
        return 0, [x], x.dtype
    if residual is not None:
        a, b, nw, _ = residual
        return 1, [a, b, nw], a.dtype
    return 2, [gate_up], gate_up.dtype


def _rope_template(rope: Optional[dict]) -> list:
    if rope is None:
        return [("NQ", 0), ("NKV", 0), ("D", 0), ("TRAD", False)]
    return [("NQ", rope["n_heads"]), ("NKV", rope["n_kv_heads"]), ("D", rope["head_dim"]),
            ("TRAD", bool(rope["traditional"]))]


def fused_matvec(
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int,
    *,
    x: Optional[mx.array] = None,
    residual: Optional[tuple[mx.array, mx.array, mx.array, float]] = None,
    gate_up: Optional[mx.array] = None,
    rope: Optional[dict] = None,
):
    """One token's `x @ dequantize(w).T` for a 4-bit affine `w` [N, K/8], with x given as one of:

    x: [K];  residual=(a, b, norm_weight, eps): x = rms_norm(a + b) * norm_weight, and `a + b` is
    returned too;  gate_up: [2K] = [gate, up], x = silu(gate) * up.
    rope=dict(offset, inv_freq, n_heads, n_kv_heads, head_dim, traditional) rotates the q and k rows
    at position `offset` (int32 array, shape [1]) and returns q [1, Hq, 1, D], k and v [1, Hkv, 1, D].
    Returns the output ([N], or q, k, v), followed by `a + b` [K] with `residual`.
    """
    pro, inputs, dtype = _prologue(x, residual, gate_up)
    epi = 1 if rope is not None else 0
    N, K = w.shape[0], w.shape[1] * 8
    inputs += [w, scales, biases]
    template = [("T", dtype), ("S", scales.dtype), ("K", K), ("N", N), ("G", group_size), ("PRO", pro),
                ("EPI", epi), ("ROWS", ROWS_PER_BLOCK), ("EPS_BITS", _float_bits(residual[3]) if residual else 0)]
    template += _rope_template(rope)
    if epi:
        nq, nkv, D = rope["n_heads"], rope["n_kv_heads"], rope["head_dim"]
        inputs += [rope["offset"], rope["inv_freq"]]
        shapes = [(1, nq, 1, D), (1, nkv, 1, D), (1, nkv, 1, D)]
    else:
        shapes = [(N,)]
    if pro == 1:
        shapes.append((K,))
    outs = _matvec_kernel(pro, epi, K)(
        inputs=inputs, template=template,
        grid=(N * 32, 1, 1), threadgroup=(ROWS_PER_BLOCK * 32, 1, 1),
        output_shapes=shapes, output_dtypes=[dtype] * len(shapes),
    )
    return outs[0] if len(outs) == 1 else tuple(outs)


# q: [B*Hq*D], k/v: [B, Hkv, C, D], offset: [B] int32 (the position each row just wrote);
# row b is blockIdx.z.
# SINGLE: out [B*Hq*D]; otherwise o_part [B*Hq, S, D] and ml [B*Hq, S, 2] (float), merged below.
_ATTENTION = r"""
  constexpr int S = (C + CHUNK - 1) / CHUNK;
  constexpr int DL = D / 32;                        // output dims per lane
  __shared__ float qs[D];
  __shared__ float wm[WARPS], wl[WARPS];
  __shared__ float wacc[WARPS][D];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int hq = blockIdx.x, split = blockIdx.y, row = blockIdx.z;
  const int bh = row * HQ + hq;
  const int kvh = hq / (HQ / HKV);
  const size_t kv_row = SHARED ? 0 : (size_t)row * HKV * C * D;  // SHARED: rows of one sequence
  const int n = offset[row] + 1;
  for (int d = threadIdx.x; d < D; d += blockDim.x)
    qs[d] = static_cast<float>(q[bh * D + d]) * (__int_as_float(SCALE_BITS) * LOG2E);
  __syncthreads();

  float m = NEG_INF, l = 0.0f;
  float acc[DL];
  #pragma unroll
  for (int i = 0; i < DL; i++) acc[i] = 0.0f;
  const int end = min(n, (split + 1) * CHUNK);
  for (int p0 = split * CHUNK + warp * 32; p0 < end; p0 += WARPS * 32) {
    const int p = p0 + lane;
    float score = NEG_INF;
    if (p < end) {
      const uint4* kp = reinterpret_cast<const uint4*>(k + kv_row + ((size_t)kvh * C + p) * D);
      float s = 0.0f;
      #pragma unroll
      for (int j = 0; j < D / 8; j++) {
        const uint4 u = kp[j];
        const T* hv = reinterpret_cast<const T*>(&u);
        #pragma unroll
        for (int t = 0; t < 8; t++) s = fmaf(static_cast<float>(hv[t]), qs[j * 8 + t], s);
      }
      score = s;
    }
    const float m_new = fmaxf(m, warp_max(score));
    const float corr = (m == NEG_INF) ? 0.0f : exp2f(m - m_new);
    const float e = (p < end) ? exp2f(score - m_new) : 0.0f;
    l = l * corr + warp_sum(e);
    #pragma unroll
    for (int i = 0; i < DL; i++) acc[i] *= corr;
    // Lane owns DL consecutive output dims; eight positions' loads in flight at a time.
    const T* vb = v + kv_row + ((size_t)kvh * C + p0) * D + lane * DL;
    const int last = min(32, end - p0);
    #pragma unroll 8
    for (int j = 0; j < 32; j++) {
      if (j < last) {
        const float wj = __shfl_sync(0xffffffffu, e, j);
        float vals[DL];
        load_floats<T, DL>(vb + (size_t)j * D, vals);
        #pragma unroll
        for (int i = 0; i < DL; i++) acc[i] = fmaf(wj, vals[i], acc[i]);
      }
    }
    m = m_new;
  }
  if (lane == 0) { wm[warp] = m; wl[warp] = l; }
  #pragma unroll
  for (int i = 0; i < DL; i++) wacc[warp][lane * DL + i] = acc[i];
  __syncthreads();

  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float M = NEG_INF;
    for (int i = 0; i < WARPS; i++) M = fmaxf(M, wm[i]);
    float num = 0.0f, den = 0.0f;
    for (int i = 0; i < WARPS; i++) {
      if (wm[i] == NEG_INF) continue;
      const float c = exp2f(wm[i] - M);
      den = fmaf(c, wl[i], den);
      num = fmaf(c, wacc[i][d], num);
    }
{STORE}
  }
"""

_ATTN_STORE_SINGLE = "    out[bh * D + d] = static_cast<T>(num / den);\n"
_ATTN_STORE_SPLIT = r"""    o_part[((size_t)bh * S + split) * D + d] = num;
    if (d == 0) { ml[(bh * S + split) * 2] = M; ml[(bh * S + split) * 2 + 1] = den; }
"""

_MERGE = r"""
  const int hq = blockIdx.x, d = threadIdx.x;
  float M = NEG_INF;
  for (int s = 0; s < S; s++) M = fmaxf(M, ml[(hq * S + s) * 2]);
  float num = 0.0f, den = 0.0f;
  for (int s = 0; s < S; s++) {
    const float ms = ml[(hq * S + s) * 2];
    if (ms == NEG_INF) continue;
    const float c = exp2f(ms - M);
    den = fmaf(c, ml[(hq * S + s) * 2 + 1], den);
    num = fmaf(c, o_part[((size_t)hq * S + s) * D + d], num);
  }
  out[hq * D + d] = static_cast<T>(num / den);
"""


def _attention_kernel(name: str):
    if name not in _kernels:
        if name == "single":
            k = mx.fast.cuda_kernel(name="llama_mlx_attention", input_names=["q", "k", "v", "offset"],
                                    output_names=["out"], source=_ATTENTION.replace("{STORE}", _ATTN_STORE_SINGLE),
                                    header=_HEADER)
        elif name == "split":
            k = mx.fast.cuda_kernel(name="llama_mlx_attention_split", input_names=["q", "k", "v", "offset"],
                                    output_names=["o_part", "ml"],
                                    source=_ATTENTION.replace("{STORE}", _ATTN_STORE_SPLIT), header=_HEADER)
        else:
            k = mx.fast.cuda_kernel(name="llama_mlx_attention_merge", input_names=["o_part", "ml"],
                                    output_names=["out"], source=_MERGE, header=_HEADER)
        _kernels[name] = k
    return _kernels[name]


def attention_supported(q_heads: int, kv_heads: int, head_dim: int, dtype: mx.Dtype) -> bool:
    """Whether `decode_attention` handles this head layout and dtype."""
    return head_dim % 32 == 0 and q_heads % kv_heads == 0 and dtype in (mx.float16, mx.bfloat16)


def decode_attention(q: mx.array, keys: mx.array, values: mx.array, offset: mx.array, scale: float,
                     shared: bool = False) -> mx.array:
    """Attention of one token per row over that row's positions 0..offset[b] of K/V buffers, on CUDA.

    q: [B, Hq, 1, D]; keys/values: [B, Hkv, C, D] buffers in q's dtype; offset: int32 array of
    shape [B], the position each row's token was just written at. Returns [B * Hq * D].
    shared: the rows are positions of one sequence, all attending over buffers [1, Hkv, C, D]
    (a speculative check: row i at offset[i] sees itself and what precedes it). Buffers of
    `SDPA_FROM` positions or more (not shared) go to MLX's SDPA, masked the same way.
    """
    B, HQ, _, D = q.shape
    HKV, C = keys.shape[1], keys.shape[2]
    if C >= SDPA_FROM and not shared:
        mask = (mx.arange(C, dtype=mx.int32)[None] <= offset[:, None])[:, None, None]  # [B, 1, 1, C]
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask).reshape(-1)
    S = -(-C // ATTN_CHUNK)
    template = [("T", q.dtype), ("HQ", HQ), ("HKV", HKV), ("C", C), ("D", D), ("CHUNK", ATTN_CHUNK),
                ("WARPS", ATTN_WARPS), ("SCALE_BITS", _float_bits(scale)), ("SHARED", shared)]
    inputs = [q, keys, values, offset]
    launch = dict(grid=(HQ * ATTN_WARPS * 32, S, B), threadgroup=(ATTN_WARPS * 32, 1, 1))
    if S == 1:
        (out,) = _attention_kernel("single")(inputs=inputs, template=template, output_shapes=[(B * HQ * D,)],
                                            output_dtypes=[q.dtype], **launch)
        return out
    o_part, ml = _attention_kernel("split")(inputs=inputs, template=template,
                                            output_shapes=[(B * HQ, S, D), (B * HQ, S, 2)],
                                            output_dtypes=[mx.float32, mx.float32], **launch)
    (out,) = _attention_kernel("merge")(
        inputs=[o_part, ml], template=[("T", q.dtype), ("S", S), ("D", D)],
        grid=(B * HQ * D, 1, 1), threadgroup=(D, 1, 1), output_shapes=[(B * HQ * D,)], output_dtypes=[q.dtype],
    )
    return out


# Few-row matmuls (a batch's decode step, a speculative check): tensor-core mma.sync m16n8k16 on
# raw 4-bit codes, scales and biases applied per 32-input chunk. Helpers by activation type.
_ROWS_HEADER = r"""
// Staged position e of 8 inputs holds input perm8(e): 0 4 2 6 1 5 3 7 (e's bits reversed).
__device__ __forceinline__ constexpr int perm8(int e) { return ((e & 1) << 2) | (e & 2) | (e >> 2); }
// WL consecutive weight words (one 4- or 8-byte load), or zeros.
template <int WL>
__device__ __forceinline__ void load_words(const uint32_t* p, bool ok, uint32_t* out) {
  if (WL == 2) {
    const uint2 v = ok ? *reinterpret_cast<const uint2*>(p) : make_uint2(0u, 0u);
    out[0] = v.x;
    out[1] = v.y;
  } else {
    out[0] = ok ? p[0] : 0u;
  }
}
// Lane u holds the sum s of staged unit u (8 inputs); chunk h of a span of 4 * WL units is its
// units c * WL + h. Sums each chunk over its 4 lanes and stores it at sums[chunk].
template <int WL>
__device__ __forceinline__ void chunk_sums(float s, int u, int units, float* sums) {
  #pragma unroll
  for (int m = WL; m < 4 * WL; m <<= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
  if (u % (4 * WL) < WL && u < units) sums[(u / (4 * WL)) * WL + u % WL] = s;
}
// Two 4-bit codes (bits 0-3 and 16-19 of m) as a pair of exact 16-bit floats: OR-ing them into
// the mantissa of 1024 (half) or 128 (bfloat16), then subtracting that constant.
__device__ __forceinline__ uint32_t codes(uint32_t m, __half) {
  uint32_t u = m | 0x64006400u, c = 0x64006400u;
  __half2 h = __hsub2(*reinterpret_cast<__half2*>(&u), *reinterpret_cast<__half2*>(&c));
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t codes(uint32_t m, __nv_bfloat16) {
  uint32_t u = m | 0x43004300u, c = 0x43004300u;
  __nv_bfloat162 h = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&u), *reinterpret_cast<__nv_bfloat162*>(&c));
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ void mma(float* d, const uint32_t* a, uint32_t b0, uint32_t b1, __half) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(float* d, const uint32_t* a, uint32_t b0, uint32_t b1, __nv_bfloat16) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
"""

# Template constants: T, S, K, N, G, PRO, EPI, EPS_BITS, NQ, NKV, D, TRAD as for _MATVEC, and
# M (rows run: 8 or 16), KS (inputs per block: K, or K / SPLIT), SPLIT (blocks along K; above 1
# the output is float partial sums), XS (staged row stride, in elements), TPW (16-row tiles per
# warp), WL (weight words a lane loads at once: 1, or 2 where a group spans 64 inputs). The rows
# given, R, come as an array (`nrows`), so one kernel serves every R up to M.
#
# A warp computes TPW tiles of 16 output rows (weights: the mma's A, rows g and g + 8 per lane)
# for all M rows (x: B, from shared memory) over every fourth span of 32 * WL inputs of the block's
# slice; the block's 2 x 4 warps are 2 tile groups times 4 span phases, summed through shared
# memory. Lane (g, c) loads words c * WL .. c * WL + WL - 1 of a span (8 inputs a word): with
# WL = 2 the four lanes of a row read one whole 32-byte sector. Word c * WL + h is the lane's part
# of chunk h, the 32 inputs one pair of mmas takes; the mma's k order within a word is permuted to
# match its codes (0,4 | 2,6 for the first mma, 1,5 | 3,7 for the second), and x is staged in that
# order, so a lane's B registers for a chunk are one 16-byte load.
_ROWS = r"""
  const int R = nrows[0];
  constexpr int RT = 2, KW = 4, WARPS = RT * KW;
  constexpr int NT = M / 8;
  constexpr int CH = KS / 32;                 // chunks (xsum's columns)
  constexpr int SPAN = 4 * WL, SP = CH / WL;  // words a row's span holds; spans in the slice
  constexpr int BATCH = (TPW == 1 ? 8 : TPW == 2 ? 4 : 2) / WL;  // spans prefetched
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);                  // [M][XS]
  float* xsum = reinterpret_cast<float*>(xs + M * XS);     // [M][CH]
  float* red = xsum + M * CH;                              // [KW - 1][RT][32][TPW * NT * 4]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int rt = warp % RT, kw = warp / RT;
  const int k0 = blockIdx.y * KS;
  // Warp (rt, kw) computes tiles (blockIdx.x * RT + rt) * TPW + p. With RoPE, a tile's rows g and
  // g + 8 are the two halves of rotation pair pair[p] of one head.
  int row_a[TPW], row_b[TPW], pair[TPW];
  bool live[TPW];
  const uint32_t* wa[TPW];
  const uint32_t* wb[TPW];
  #pragma unroll
  for (int p = 0; p < TPW; p++) {
    const int tile = (blockIdx.x * RT + rt) * TPW + p;
    live[p] = tile < N / 16;
    row_a[p] = tile * 16 + g;
    row_b[p] = row_a[p] + 8;
    pair[p] = 0;
    if (EPI == 1) {
      const int head = tile / (D / 16);
      pair[p] = (tile % (D / 16)) * 8 + g;
      row_a[p] = head * D + (TRAD ? 2 * pair[p] : pair[p]);
      row_b[p] = head * D + (TRAD ? 2 * pair[p] + 1 : pair[p] + D / 2);
    }
    const size_t ra = live[p] ? row_a[p] : 0, rb = live[p] ? row_b[p] : 0;
    wa[p] = reinterpret_cast<const uint32_t*>(w) + ra * (K / 8) + k0 / 8 + c * WL;
    wb[p] = reinterpret_cast<const uint32_t*>(w) + rb * (K / 8) + k0 / 8 + c * WL;
  }

  uint32_t qa[TPW][BATCH][WL], qb[TPW][BATCH][WL];
  #pragma unroll
  for (int p = 0; p < TPW; p++)
    #pragma unroll
    for (int i = 0; i < BATCH; i++) {
      const int j = kw + KW * i;
      load_words<WL>(wa[p] + j * SPAN, live[p] && j < SP, qa[p][i]);
      load_words<WL>(wb[p] + j * SPAN, live[p] && j < SP, qb[p][i]);
    }

  // Stage x: warp t stages rows t, t + 8; lane takes units of 8 inputs (a chunk is 4 units).
  static_assert(sizeof(T) == 2, "16-bit activations");
  constexpr int UNITS = CH * 4;
  for (int t = warp; t < M; t += WARPS) {
    const bool real = t < R;
    float ss = 0.0f;
    for (int u0 = 0; u0 < UNITS; u0 += 32) {
      const int u = u0 + lane;
      const int i0 = k0 + u * 8;
      float s = 0.0f;
      if (u < UNITS) {
        float xv[8];
        if (real) {
{STAGE}
        } else {
          #pragma unroll
          for (int e = 0; e < 8; e++) xv[e] = 0.0f;
        }
        alignas(16) T hv[8];
        #pragma unroll
        for (int e = 0; e < 8; e++) {
          // rms_norm stages a + b in natural order and rescales below; the others stage permuted.
          hv[e] = static_cast<T>(xv[PRO == 1 ? e : perm8(e)]);
          s += xv[e];
        }
        *reinterpret_cast<uint4*>(xs + t * XS + u * 8) = *reinterpret_cast<const uint4*>(hv);
      }
      if (PRO != 1) chunk_sums<WL>(s, u, UNITS, xsum + t * CH);
    }
{NORM}
  }
  __syncthreads();

  float acc[TPW][NT][4];
  #pragma unroll
  for (int p = 0; p < TPW; p++)
    #pragma unroll
    for (int n = 0; n < NT; n++) acc[p][n][0] = acc[p][n][1] = acc[p][n][2] = acc[p][n][3] = 0.0f;
  for (int base = 0; kw + KW * base < SP; base += BATCH) {
    uint32_t ca[TPW][BATCH][WL], cb[TPW][BATCH][WL];
    #pragma unroll
    for (int p = 0; p < TPW; p++)
      #pragma unroll
      for (int i = 0; i < BATCH; i++) {
        #pragma unroll
        for (int h = 0; h < WL; h++) {
          ca[p][i][h] = qa[p][i][h];
          cb[p][i][h] = qb[p][i][h];
        }
        const int j = kw + KW * (base + BATCH + i);
        load_words<WL>(wa[p] + j * SPAN, live[p] && j < SP, qa[p][i]);
        load_words<WL>(wb[p] + j * SPAN, live[p] && j < SP, qb[p][i]);
      }
    #pragma unroll
    for (int i = 0; i < BATCH; i++) {
      const int j = kw + KW * (base + i);
      if (j >= SP) continue;
      const int grp = (k0 + 32 * WL * j) / G;  // a span lies in one group
      float s_a[TPW], s_b[TPW], b_a[TPW], b_b[TPW];
      #pragma unroll
      for (int p = 0; p < TPW; p++) {
        const size_t ga = (size_t)(live[p] ? row_a[p] : 0) * (K / G) + grp;
        const size_t gb = (size_t)(live[p] ? row_b[p] : 0) * (K / G) + grp;
        s_a[p] = static_cast<float>(scales[ga]);
        s_b[p] = static_cast<float>(scales[gb]);
        b_a[p] = static_cast<float>(biases[ga]);
        b_b[p] = static_cast<float>(biases[gb]);
      }
      #pragma unroll
      for (int h = 0; h < WL; h++) {
        const int ch = j * WL + h;
        uint4 xb[NT];
        float x0[NT], x1[NT];
        #pragma unroll
        for (int n = 0; n < NT; n++) {
          xb[n] = *reinterpret_cast<const uint4*>(xs + (n * 8 + g) * XS + (j * SPAN + c * WL + h) * 8);
          x0[n] = xsum[(n * 8 + 2 * c) * CH + ch];
          x1[n] = xsum[(n * 8 + 2 * c + 1) * CH + ch];
        }
        #pragma unroll
        for (int p = 0; p < TPW; p++) {
          if (!live[p]) continue;
          const uint32_t wa_ = ca[p][i][h], wb_ = cb[p][i][h];
          const uint32_t lo[4] = {codes(wa_ & 0x000F000Fu, T()), codes(wb_ & 0x000F000Fu, T()),
                                  codes((wa_ >> 8) & 0x000F000Fu, T()), codes((wb_ >> 8) & 0x000F000Fu, T())};
          const uint32_t hi[4] = {codes((wa_ >> 4) & 0x000F000Fu, T()), codes((wb_ >> 4) & 0x000F000Fu, T()),
                                  codes((wa_ >> 12) & 0x000F000Fu, T()), codes((wb_ >> 12) & 0x000F000Fu, T())};
          #pragma unroll
          for (int n = 0; n < NT; n++) {
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            mma(d, lo, xb[n].x, xb[n].y, T());
            mma(d, hi, xb[n].z, xb[n].w, T());
            acc[p][n][0] += fmaf(s_a[p], d[0], b_a[p] * x0[n]);
            acc[p][n][1] += fmaf(s_a[p], d[1], b_a[p] * x1[n]);
            acc[p][n][2] += fmaf(s_b[p], d[2], b_b[p] * x0[n]);
            acc[p][n][3] += fmaf(s_b[p], d[3], b_b[p] * x1[n]);
          }
        }
      }
    }
  }

  // The 4 chunk phases of a tile, summed in a fixed order.
  constexpr int PER = TPW * NT * 4;
  float* mine = red + (((kw > 0 ? kw - 1 : 0) * RT + rt) * 32 + lane) * PER;
  if (kw > 0) {
    #pragma unroll
    for (int p = 0; p < TPW; p++)
      #pragma unroll
      for (int n = 0; n < NT; n++)
        #pragma unroll
        for (int e = 0; e < 4; e++) mine[(p * NT + n) * 4 + e] = acc[p][n][e];
  }
  __syncthreads();
  if (kw > 0) return;
  #pragma unroll
  for (int q_ = 0; q_ < KW - 1; q_++) {
    const float* theirs = red + ((q_ * RT + rt) * 32 + lane) * PER;
    #pragma unroll
    for (int p = 0; p < TPW; p++)
      #pragma unroll
      for (int n = 0; n < NT; n++)
        #pragma unroll
        for (int e = 0; e < 4; e++) acc[p][n][e] += theirs[(p * NT + n) * 4 + e];
  }

  // acc[p][n][e]: output row (e < 2 ? row_a : row_b)[p] of input row n * 8 + 2c + (e & 1).
  #pragma unroll
  for (int p = 0; p < TPW; p++) {
    if (!live[p]) continue;
    #pragma unroll
    for (int n = 0; n < NT; n++) {
      #pragma unroll
      for (int e = 0; e < 2; e++) {
        const int t = n * 8 + 2 * c + e;
        if (t >= R) continue;
        float ya = acc[p][n][e], yb = acc[p][n][e + 2];
        const int ra = row_a[p], rb = row_b[p];
{STORE}
      }
    }
  }
"""

# x: [R, K];  a, b: [R, K] (h = a + b written by the first block);  gu: [R, 2K].
_ROWS_STAGE = {
    0: "          load_floats<T, 8>(x + (size_t)t * K + i0, xv);\n",
    1: r"""          float av[8], bv[8];
          load_floats<T, 8>(a + (size_t)t * K + i0, av);
          load_floats<T, 8>(b + (size_t)t * K + i0, bv);
          alignas(16) T sv[8];
          #pragma unroll
          for (int e = 0; e < 8; e++) {
            sv[e] = static_cast<T>(av[e] + bv[e]);
            xv[e] = static_cast<float>(sv[e]);
            ss = fmaf(xv[e], xv[e], ss);
          }
          if (blockIdx.x == 0) *reinterpret_cast<uint4*>(h + (size_t)t * K + i0) = *reinterpret_cast<const uint4*>(sv);
""",
    2: r"""          float gv[8], uv[8];
          load_floats<T, 8>(gu + (size_t)t * 2 * K + i0, gv);
          load_floats<T, 8>(gu + (size_t)t * 2 * K + K + i0, uv);
          #pragma unroll
          for (int e = 0; e < 8; e++) {
            const T act = static_cast<T>(gv[e] / (1.0f + __expf(-gv[e])));
            xv[e] = static_cast<float>(static_cast<T>(static_cast<float>(act) * uv[e]));
          }
""",
}
# rms_norm: row t's sum of squares (one warp's), then its staged a + b rescaled and permuted in place.
_ROWS_NORM = r"""
    if (PRO == 1) {
      const float inv = rsqrtf(warp_sum(ss) / K + __int_as_float(EPS_BITS));
      for (int u0 = 0; u0 < UNITS; u0 += 32) {
        const int u = u0 + lane;
        float s = 0.0f;
        if (u < UNITS) {
          float hv[8], nv[8];
          load_floats<T, 8>(xs + t * XS + u * 8, hv);
          load_floats<T, 8>(nw + k0 + u * 8, nv);
          float yv[8];
          #pragma unroll
          for (int e = 0; e < 8; e++) {
            yv[e] = static_cast<float>(static_cast<T>(hv[e] * inv * nv[e]));
            s += yv[e];
          }
          alignas(16) T pv[8];
          #pragma unroll
          for (int e = 0; e < 8; e++) pv[e] = static_cast<T>(yv[perm8(e)]);
          if (!real) s = 0.0f;
          *reinterpret_cast<uint4*>(xs + t * XS + u * 8) = *reinterpret_cast<const uint4*>(pv);
        }
        chunk_sums<WL>(s, u, UNITS, xsum + t * CH);
      }
    }
"""
_ROWS_STORE = {
    0: r"""        out[(size_t)t * N + ra] = static_cast<T>(ya);
        out[(size_t)t * N + rb] = static_cast<T>(yb);
""",
    "partial": r"""        part[((size_t)blockIdx.y * R + t) * N + ra] = ya;
        part[((size_t)blockIdx.y * R + t) * N + rb] = yb;
""",
    1: r"""        constexpr int QR = NQ * D, ROPE_ROWS = (NQ + NKV) * D;
        ya = static_cast<float>(static_cast<T>(ya));
        yb = static_cast<float>(static_cast<T>(yb));
        if (ra < ROPE_ROWS) {
          float sn, cs;
          sincosf(static_cast<float>(offset[t]) * inv_freq[pair[p]], &sn, &cs);
          const float x0 = ya, x1 = yb;
          ya = fmaf(x0, cs, -x1 * sn);
          yb = fmaf(x0, sn, x1 * cs);
        }
        const int rows[2] = {ra, rb};
        const float ys[2] = {ya, yb};
        #pragma unroll
        for (int f = 0; f < 2; f++) {
          const int r = rows[f];
          const T val = static_cast<T>(ys[f]);
          if (r < QR) q[(size_t)t * QR + r] = val;
          else if (r < ROPE_ROWS) k[(size_t)t * NKV * D + r - QR] = val;
          else v[(size_t)t * NKV * D + r - ROPE_ROWS] = val;
        }
""",
}
_ROWS_SUM = r"""
  const int R = nrows[0];
  const size_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)R * N) return;
  float s = 0.0f;
  for (int p = 0; p < SPLIT; p++) s += part[p * (size_t)R * N + i];
  out[i] = static_cast<T>(s);
"""

ROWS_MAX = 16  # rows_matmul runs 8 or 16 rows (padding with zeros)
_ROWS_SLICE = 4096  # inputs a block stages at most (wider inputs split over blocks, but rms_norm's)


_ROWS_WIDE = True  # 8-byte weight loads where the groups allow (the probe turns it off to compare)


def _rows_layout(K: int, pro: int, group_size: int) -> tuple[int, int, int, int]:
    """(split, inputs per block, staged row stride, weight words per lane load) for input width K."""
    split = 1
    if pro != 1:
        while K // split > _ROWS_SLICE or (K // split) % 32 or K % split:
            split += 1
            if split > K // 32:
                return 0, 0, 0, 0
    KS = K // split
    WL = 2 if _ROWS_WIDE and group_size % 64 == 0 and KS % 64 == 0 else 1
    # Row strides for conflict-free 16-byte reads of x: 64 (mod 128) bytes when a row's 4 lanes
    # read adjacent units, 16 when they read every other unit.
    XS = KS + ((32 - KS % 64) % 64 if WL == 1 else (8 - KS % 64) % 64)
    return split, KS, XS, WL


def _rows_smem(M: int, KS: int, XS: int, TPW: int) -> int:
    return M * XS * 2 + M * (KS // 32) * 4 + 3 * 2 * 32 * TPW * (M // 2) * 4


def _tiles_per_warp(N: int, split: int) -> int:
    # Each block stages its rows' x once: more tiles a warp means less staging per weight, as long
    # as there are blocks enough to keep every SM loading (about 256).
    for tpw in (4, 2):
        if -(-(N // 16) // (2 * tpw)) * split >= 256:
            return tpw
    return 1


def rows_matmul_supported(K: int, N: int, bits: int, group_size: int, norm: bool = False) -> bool:
    """Whether `rows_matmul` takes up to `ROWS_MAX` rows of a 4-bit affine weight [N, K] with this
    group size, with the rms_norm prologue (`norm`: the whole width staged) or another."""
    if not (bits == 4 and K % 32 == 0 and N % 16 == 0 and group_size % 32 == 0 and K % group_size == 0):
        return False
    split, KS, XS, _ = _rows_layout(K, 1 if norm else 0, group_size)
    return bool(split) and _rows_smem(ROWS_MAX, KS, XS, 4) <= 200_000


def rows_matmul(
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int,
    *,
    x: Optional[mx.array] = None,
    residual: Optional[tuple[mx.array, mx.array, mx.array, float]] = None,
    gate_up: Optional[mx.array] = None,
    rope: Optional[dict] = None,
):
    """`fused_matvec` for R <= 16 rows at once: `x @ dequantize(w).T` with x [R, K] given as one of
    x;  residual=(a, b, norm_weight, eps) ([R, K] each but the weight): x = rms_norm(a + b) * weight,
    `a + b` returned too;  gate_up [R, 2K]: x = silu(gate) * up.  rope=dict(offset ([R] int32: each
    row's position), inv_freq, n_heads, n_kv_heads, head_dim, traditional) rotates q and k and returns
    q [R, Hq, 1, D], k and v [R, Hkv, 1, D]. Returns the output ([R, N], or q, k, v), then `a + b`.
    """
    pro, inputs, dtype = _prologue(x, residual, gate_up)
    epi = 1 if rope is not None else 0
    N, K = w.shape[0], w.shape[1] * 8
    R = inputs[0].shape[0]
    M = 8 if R <= 8 else 16
    split, KS, XS, WL = _rows_layout(K, pro, group_size)
    inputs += [w, scales, biases]
    template = [("T", dtype), ("S", scales.dtype), ("K", K), ("N", N), ("G", group_size), ("M", M),
                ("PRO", pro), ("EPI", epi), ("KS", KS), ("SPLIT", split), ("XS", XS), ("WL", WL),
                ("EPS_BITS", _float_bits(residual[3]) if residual else 0)] + _rope_template(rope)
    if epi:
        nq, nkv, D = rope["n_heads"], rope["n_kv_heads"], rope["head_dim"]
        inputs += [rope["offset"], rope["inv_freq"]]
        shapes, dtypes = [(R, nq, 1, D), (R, nkv, 1, D), (R, nkv, 1, D)], [dtype] * 3
    else:
        shapes, dtypes = ([(split, R, N)], [mx.float32]) if split > 1 else ([(R, N)], [dtype])
    if pro == 1:
        shapes.append((R, K))
        dtypes.append(dtype)
    inputs.append(mx.array([R], dtype=mx.int32))
    tpw = _tiles_per_warp(N, split)
    template.append(("TPW", tpw))
    blocks = -(-(N // 16) // (2 * tpw))
    outs = _rows_kernel(pro, epi, split > 1, M, KS, XS, WL, tpw)(
        inputs=inputs, template=template, grid=(blocks * 256, split, 1), threadgroup=(256, 1, 1),
        output_shapes=shapes, output_dtypes=dtypes,
    )
    if split > 1:
        (out,) = _rows_sum_kernel()(inputs=[outs[0], inputs[-1]], template=[("T", dtype), ("N", N), ("SPLIT", split)],
                                    grid=(-(-R * N // 256) * 256, 1, 1), threadgroup=(256, 1, 1),
                                    output_shapes=[(R, N)], output_dtypes=[dtype])
        return out
    return outs[0] if len(outs) == 1 else tuple(outs)


def _rows_source(pro: int, epi: int, partial: bool) -> str:
    return (_ROWS.replace("{STAGE}", _ROWS_STAGE[pro]).replace("{NORM}", _ROWS_NORM if pro == 1 else "")
            .replace("{STORE}", _ROWS_STORE["partial" if partial else epi]))


def _rows_kernel(pro: int, epi: int, partial: bool, M: int, KS: int, XS: int, WL: int, tpw: int):
    key = ("rows", pro, epi, partial, M, KS, XS, WL, tpw)
    if key not in _kernels:
        inputs = _PROLOGUE_INPUTS[pro] + ["w", "scales", "biases"] + (["offset", "inv_freq"] if epi else []) + ["nrows"]
        outputs = (["q", "k", "v"] if epi else ["part" if partial else "out"]) + (["h"] if pro == 1 else [])
        _kernels[key] = mx.fast.cuda_kernel(
            name=f"llama_mlx_rows_p{pro}_e{epi}{'_split' if partial else ''}", input_names=inputs,
            output_names=outputs, source=_rows_source(pro, epi, partial), header=_HEADER + _ROWS_HEADER,
            shared_memory=_rows_smem(M, KS, XS, tpw),
        )
    return _kernels[key]


def _rows_sum_kernel():
    if "rows_sum" not in _kernels:
        _kernels["rows_sum"] = mx.fast.cuda_kernel(name="llama_mlx_rows_sum", input_names=["part", "nrows"],
                                                   output_names=["out"], source=_ROWS_SUM, header=_HEADER)
    return _kernels["rows_sum"]
