"""GGUF quant types against llama.cpp's reference (`gguf.quants.dequantize`), written with `gguf.GGUFWriter`.

Random blocks (every bit pattern, finite float16 scales) go through our reader; the exact types must
dequantize bit-equal with float32 scales and within float16 rounding with float16 scales; Q2_K and
Q6_K within half an 8-bit step of each group's range. A whole model mixing every type must give the
logits of Meta's reference holding gguf's dequantized weights, and a GGUF converts in bounded memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import test_checkpoints_support as S
from llama_mlx import load
from llama_mlx.checkpoints import read_checkpoint
from llama_mlx.checkpoints.gguf import read_gguf
from llama_mlx.checkpoints.gguf_lazy import conversion_summary, track_conversion_error
from llama_mlx.checkpoints.gguf_quants import TARGET_BITS, conversion_error

# Byte offsets of each block's float16 fields (d, and dmin / m where the type has one).
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}
EXACT = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q3_K", "Q4_K", "Q5_K", "IQ4_NL", "IQ4_XS"]
REGRIDDED = ["Q2_K", "Q6_K"]
ALL = EXACT + REGRIDDED
MODULES = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def random_blocks(kind: str, rows: int, cols: int, rng, scale: float = 0.01) -> np.ndarray:
    """(rows, bytes per row) uint8: uniform random bits, float16 fields replaced by finite N(0, scale)."""
    qtype = getattr(T, kind)
    per, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // per, nbytes), dtype=np.uint8)
    for at in F16_FIELDS[kind]:
        raw[:, at:at + 2] = (rng.standard_normal(raw.shape[0]) * scale).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def reference(kind: str, raw: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(raw, getattr(T, kind)).astype(np.float32)


def _writer(path: Path, dim: int, ffn: int, layers: int, heads: int, kv_heads: int, vocab: int):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(8192)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(dim // heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    return w


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_one_tensor(path: Path, kind: str, raw: np.ndarray, cols: int) -> None:
    """A header-valid llama GGUF holding one quantized tensor (blk.0.ffn_up) of raw blocks."""
    w = _writer(path, dim=cols, ffn=raw.shape[0], layers=1, heads=4, kv_heads=4, vocab=256)
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_shape=raw.shape, raw_dtype=getattr(T, kind))
    _finish(w)


def _group_stats(ref: np.ndarray):
    g = ref.reshape(-1, 32)
    return g.min(axis=1), g.max(axis=1)


@pytest.mark.parametrize("kind", ALL)
def test_random_blocks_match_gguf_reference(tmp_path, kind):
    rng = np.random.default_rng(sum(map(ord, kind)))
    rows, cols = 24, 512
    raw = random_blocks(kind, rows, cols, rng)
    write_one_tensor(tmp_path / "t.gguf", kind, raw, cols)
    ref = reference(kind, raw)
    bits = TARGET_BITS[kind]
    name = "model.layers.0.mlp.up_proj"

    def ours(scale_dtype):
        ckpt = read_gguf(tmp_path / "t.gguf", scale_dtype=scale_dtype)
        w, s, b = (ckpt.tensors[f"{name}.{p}"].read() for p in ("weight", "scales", "biases"))
        assert w.dtype == mx.uint32 and s.dtype == scale_dtype and s.shape == (rows, cols // 32)
        assert ckpt.config["quantization"] == {"group_size": 32, "bits": bits}
        deq = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=bits)
        return np.array(deq), np.array(s.astype(mx.float32)), np.array(b.astype(mx.float32))

    got32, s32, b32 = ours(mx.float32)
    got16, s16, b16 = ours(mx.float16)
    lo, hi = _group_stats(ref)
    err32 = np.abs(got32 - ref).reshape(-1, 32).max(axis=1)
    err16 = np.abs(got16 - ref).reshape(-1, 32).max(axis=1)
    if kind in EXACT:
        np.testing.assert_array_equal(got32, ref)
        # float16 scales: each value is off by at most the rounding of its scale and bias
        bound = 2.0 ** -11 * ((2 ** bits - 1) * np.abs(s32).ravel() + np.abs(b32).ravel()) + 2.0 ** -24
        assert (err16 <= bound).all()
    else:
        # half an 8-bit step of the group's range (plus the rounding of scale and bias to float16)
        step = (hi - lo) / 255
        assert (err32 <= step / 2 * (1 + 1e-5) + 1e-6 * np.abs(ref).reshape(-1, 32).max(axis=1)).all()
        assert (err16 <= step / 2 + 2.0 ** -10 * (np.abs(lo) + (hi - lo)) + 2.0 ** -24).all()
    e = conversion_error(kind, raw, rows)  # the figures convert reports: float16 scales
    assert e.elements == ref.size and e.groups == rows * cols // 32
    assert e.max_abs == pytest.approx(err16.max(), rel=1e-6, abs=1e-12)
    assert e.rel_rms == pytest.approx(np.sqrt(((got16 - ref) ** 2).sum() / (ref.astype(np.float64) ** 2).sum()),
                                      rel=1e-4, abs=1e-12)
    if kind in EXACT:
        assert e.exact_groups == e.groups
    else:
        assert 0 < e.exact_groups < e.groups  # random sub-block scales: some groups share a grid


def test_regridded_types_keep_shared_grids_exact(tmp_path):
    # Q6_K sub-blocks with equal scales and Q2_K ones with equal mins: one 8-bit grid, so exact
    rng = np.random.default_rng(7)
    q6 = random_blocks("Q6_K", 8, 256, rng)
    q6[:, 192:208] = rng.integers(-128, 128, (8, 1)).astype(np.int8).view(np.uint8)
    q2 = random_blocks("Q2_K", 8, 256, rng)
    q2[:, :16] = (q2[:, :16] & 15) | (rng.integers(0, 16, (8, 1)).astype(np.uint8) << 4)
    for kind, raw in (("Q6_K", q6), ("Q2_K", q2)):
        e = conversion_error(kind, raw, 8, mx.float32)
        assert e.exact_groups == e.groups and e.max_abs == 0.0, kind


def _meta_name(gname: str) -> str:
    inverse = {v: k for k, v in S.GGUF_NAMES.items()}
    module = gname[: -len(".weight")]
    if module.startswith("blk."):
        _, i, rest = module.split(".", 2)
        return f"layers.{i}.{inverse[rest]}.weight"
    return inverse[module] + ".weight"


def write_mixed_model(path: Path, params: dict, ffn: int, types: dict[str, str], rng, *, keep: bool = True,
                      target_std: float = 0.05) -> dict:
    """A llama GGUF whose matrices are random raw blocks of the given types; returns the Meta state dict of
    gguf's dequantized values (q/k rows as stored: Meta's interleaved layout). keep=False: no dict, and the
    blocks are left at their random scales (for size, not for a forward pass)."""
    d, v, layers = params["dim"], params["vocab_size"], params["n_layers"]
    hd = d // params["n_heads"]
    kv = params["n_kv_heads"] * hd
    shapes = {"token_embd": (v, d), "output": (v, d), "attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d),
              "attn_output": (d, d), "ffn_gate": (ffn, d), "ffn_up": (ffn, d), "ffn_down": (d, ffn)}
    w = _writer(path, d, ffn, layers, params["n_heads"], params["n_kv_heads"], v)
    S.add_smollm2_tokenizer(w)
    held = {}
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(layers):
        names += [f"blk.{i}.{m}.weight" for m in MODULES] + [f"blk.{i}.attn_norm.weight", f"blk.{i}.ffn_norm.weight"]
    for gname in names:
        module = gname[: -len(".weight")]
        short = module.rpartition(".")[2] if module.startswith("blk.") else module
        if short.endswith("norm"):
            x = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
            w.add_tensor(gname, x)
            held[_meta_name(gname)] = torch.from_numpy(x)
            continue
        kind = types.get(f"{module}", types.get(short))
        rows, cols = shapes[short]
        raw = random_blocks(kind, rows, cols, rng)
        if not keep:
            w.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=getattr(T, kind))
            continue
        ref = reference(kind, raw)
        # rescale the float16 fields once so the weights have a sane size for a forward pass
        factor = target_std / max(float(ref.std()), 1e-12)
        b = raw.reshape(-1, gguf.GGML_QUANT_SIZES[getattr(T, kind)][1])
        for at in F16_FIELDS[kind]:
            f = np.ascontiguousarray(b[:, at:at + 2]).view(np.float16).astype(np.float32) * factor
            b[:, at:at + 2] = f.astype(np.float16).view(np.uint8)
        w.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=getattr(T, kind))
        held[_meta_name(gname)] = torch.from_numpy(reference(kind, raw).reshape(rows, cols))
    _finish(w)
    return held


MIXED_PARAMS = {**S.TINY_PARAMS, "dim": 256, "multiple_of": 256}  # SwiGLU width 768: whole 256-blocks
MIXED_FFN = 768
MIXED_TYPES = {  # every listed type, as llama.cpp's Q*_K_M mixtures place them and more
    "token_embd": "Q4_K", "output": "Q6_K",
    "blk.0.attn_q": "Q2_K", "blk.0.attn_k": "Q5_K", "blk.0.attn_v": "Q6_K", "blk.0.attn_output": "Q5_0",
    "blk.0.ffn_gate": "IQ4_XS", "blk.0.ffn_up": "IQ4_NL", "blk.0.ffn_down": "Q5_1",
    "blk.1.attn_q": "Q3_K", "blk.1.attn_k": "Q4_0", "blk.1.attn_v": "Q8_0", "blk.1.attn_output": "Q4_1",
    "blk.1.ffn_gate": "Q2_K", "blk.1.ffn_up": "Q4_K", "blk.1.ffn_down": "Q6_K",
}


def test_mixed_model_matches_meta_reference_on_dequantized_weights(tmp_path):
    rng = np.random.default_rng(11)
    held = write_mixed_model(tmp_path / "mixed.gguf", MIXED_PARAMS, MIXED_FFN, MIXED_TYPES, rng)
    want = S.meta_reference_logits(held, MIXED_PARAMS)
    ckpt = read_checkpoint(tmp_path / "mixed.gguf")
    q = ckpt.config["quantization"]
    assert q["group_size"] == 32 and q["model.layers.0.self_attn.o_proj"] == {"group_size": 32, "bits": 5}
    assert q["bits"] == 8 and "model.layers.0.self_attn.q_proj" not in q  # the commonest width
    assert q["model.embed_tokens"] == q["model.layers.1.mlp.up_proj"] == {"group_size": 32, "bits": 4}
    model, tokenizer = load(tmp_path / "mixed.gguf", dtype="float32", allow_vocab_mismatch=True)  # tiny vocab, SmolLM2 tokenizer
    assert model.args.rope_traditional and tokenizer.vocab_size == 49152
    got = S.our_logits(model)
    # float16 scales and the re-gridded Q2_K / Q6_K tensors: close, not equal
    assert np.abs(got - want).max() < 2e-2 * np.abs(want).max()
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9999
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_convert_records_conversion_errors(tmp_path):
    from llama_mlx.checkpoints.plan import plan
    from llama_mlx.checkpoints.writer import write_weights

    rng = np.random.default_rng(12)
    write_mixed_model(tmp_path / "mixed.gguf", MIXED_PARAMS, MIXED_FFN, MIXED_TYPES, rng)
    ckpt = read_checkpoint(tmp_path / "mixed.gguf")
    items, _ = plan(ckpt)
    items = track_conversion_error(ckpt, items)
    (tmp_path / "out").mkdir()
    write_weights(tmp_path / "out", items)
    summary = conversion_summary(ckpt)
    assert {kind for kind, _ in summary} == set(MIXED_TYPES.values())
    for (kind, target), e in summary.items():
        assert e.target == target
        assert e.elements > 0 and e.target.startswith(f"{TARGET_BITS[kind]}-bit group 32 (float16")
        if kind in ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "Q3_K"):  # scales and biases are f16 values already
            assert e.max_abs == 0.0, kind
        assert e.rel_rms < (5e-3 if kind in REGRIDDED else 1e-3), (kind, e.rel_rms)


_CHILD = r"""
import json, resource, sys
from llama_mlx.convert import convert
convert(sys.argv[1], sys.argv[2])
print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _convert_peak_mb(*jobs: tuple[Path, Path]) -> list[float]:
    """Each (src, dst) converted in its own process, all at once (each reports its own peak)."""
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(dst)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for src, dst in jobs]
    peaks = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        kb = json.loads(out.strip().splitlines()[-1])["maxrss_kb"]
        peaks.append(kb / 1024 / (1024 if sys.platform == "darwin" else 1))  # macOS reports bytes
    return peaks


def test_convert_holds_one_tensor_at_a_time_not_the_file(tmp_path):
    rng = np.random.default_rng(13)
    small = {**S.TINY_PARAMS, "dim": 256, "n_layers": 1}
    big = {**S.TINY_PARAMS, "dim": 1024, "n_layers": 10, "n_heads": 8, "n_kv_heads": 8}
    write_mixed_model(tmp_path / "small.gguf", small, 768, {"token_embd": "Q4_K", "output": "Q6_K",
                      **{m: "Q4_K" for m in MODULES}}, rng, keep=False)
    write_mixed_model(tmp_path / "big.gguf", big, 2816, {"token_embd": "Q4_K", "output": "Q6_K",
                      **{m: "Q4_K" for m in MODULES}}, rng, keep=False)
    size_mb = (tmp_path / "big.gguf").stat().st_size / 2**20
    assert size_mb > 60
    baseline, peak = _convert_peak_mb((tmp_path / "small.gguf", tmp_path / "small-mlx"),
                                      (tmp_path / "big.gguf", tmp_path / "big-mlx"))
    # reading the file whole would add at least its size; one tensor at a time adds a few MB
    assert peak - baseline < 0.25 * size_mb, (peak, baseline, size_mb)
    assert read_checkpoint(tmp_path / "big-mlx").config["quantization"]["bits"] == 4


def test_loading_decodes_each_quantized_tensor_once(monkeypatch, smollm2_gguf_path):
    """Loading the SmolLM2 GGUF decodes each of its quantized tensors (counted by the `gguf`
    package) exactly once: swapping in quantized modules reads shapes, not data."""
    from llama_mlx.checkpoints import gguf_quants

    floats = {T.F32, T.F16, T.BF16}
    quantized = sum(t.tensor_type not in floats for t in gguf.GGUFReader(smollm2_gguf_path).tensors)
    calls = []
    decode = gguf_quants.to_affine

    def counted(kind, *args, **kw):
        calls.append(kind)
        return decode(kind, *args, **kw)

    monkeypatch.setattr(gguf_quants, "to_affine", counted)
    load(smollm2_gguf_path)
    assert quantized > 100 and len(calls) == quantized
