"""The real SmolLM2 GGUF re-encoded to Q4_K blocks, converted by `llama-mlx convert`, against `gguf.quants`.

gguf-py dequantizes K-quants but cannot quantize them, so a small Q4_K encoder lives here, checked
first against `gguf.quants.dequantize` (llama.cpp's reference). The convert summary's "From Q4_K"
figures must equal the error measured here from the output folder's own tensors; the converted
model must still answer. Then the rules for quantized sources: -q needs --requantize, -d writes floats,
and the summary names what was written (re-quantized, floats, or rounded scales) with its measured error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import assets
from llama_mlx.checkpoints.keymap import gguf_to_hf
from test_checkpoints_support import FFN, TINY_PARAMS

CLI = Path(sys.executable).with_name("llama-mlx")
ROOT = Path(__file__).resolve().parent.parent
QK_K = 256


def encode_q4_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n*256,) floats -> (n, 144) block_q4_K bytes, and the float32 values those blocks decode to.

    Per 32-element sub-block min-max with the offset clamped to <= 0 (value = d*sc*q - dmin*m,
    all of d, dmin, sc, m non-negative); 6-bit sc/m relative to the block's float16 d/dmin.
    """
    x = np.asarray(x, np.float32).reshape(-1, 8, 32)
    n = x.shape[0]
    lo = np.minimum(x.min(axis=2), 0)
    step = (x.max(axis=2) - lo) / 15
    d = (step.max(axis=1) / 63).astype(np.float16)
    dmin = (-lo.min(axis=1) / 63).astype(np.float16)
    df, mf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.clip(np.rint(step / df), 0, 63), 0).astype(np.uint8)
        m = np.where(mf > 0, np.clip(np.rint(-lo / mf), 0, 63), 0).astype(np.uint8)
        scale, offset = (df * sc)[:, :, None], (mf * m)[:, :, None]
        q = np.where(scale > 0, np.clip(np.rint((x + offset) / scale), 0, 15), 0).astype(np.uint8)
    # get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) / 4-7 (mins); 4-7 split
    # into a low nibble in bytes 8-11 (scale low, min high) and their top 2 bits in bits 6-7 of bytes 0-7
    packed = np.empty((n, 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    # 64 values per 32 bytes: sub-block 2j in the low nibbles, 2j+1 in the high ones
    pairs = q.reshape(n, 4, 2, 32)
    nibbles = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    raw = np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8), packed, nibbles],
                         axis=1)
    return raw, (scale * q - offset).reshape(-1)


def test_q4_k_encoder_matches_gguf_reference():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((12, 2 * QK_K)).astype(np.float32) * rng.uniform(0.001, 0.1, (12, 1))
    x[0] = np.abs(x[0])  # all-positive rows: zero mins
    x[1, :QK_K] = 0.0  # an all-zero block
    x[2] = x[2] * (np.arange(2 * QK_K) % 7 == 0)  # mostly zeros
    raw, decoded = encode_q4_k(x)
    assert raw.shape == (24, 144) and raw.dtype == np.uint8
    ref = gguf.quants.dequantize(raw.reshape(12, -1), T.Q4_K)
    assert ref.shape == x.shape
    np.testing.assert_array_equal(ref.ravel(), decoded)
    # a real quantizer, not just a consistent one: within a 6-bit-rounded 4-bit step of the input
    sub = x.reshape(-1, 32)
    span = sub.max(axis=1) - np.minimum(sub.min(axis=1), 0)
    err = np.abs(ref.reshape(-1, 32) - sub).max(axis=1)
    assert (err <= span / 15 * 0.75 + 1e-7).all()
    assert np.all(ref[1, :QK_K] == 0)


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":  # the writer writes these itself
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def write_q4_k_smollm2(path: Path) -> dict[str, np.ndarray]:
    """SmolLM2 with every tensor whose rows are whole 256-blocks re-encoded to Q4_K from gguf's own
    dequantization of it; the rest copied byte for byte. Returns {GGUF name: Q4_K raw bytes}."""
    reader = gguf.GGUFReader(str(assets.SMOLLM2_GGUF))
    writer = gguf.GGUFWriter(str(path), "llama")
    _copy_metadata(reader, writer)
    encoded = {}
    for t in reader.tensors:
        row = int(t.shape[0])  # GGUF shapes are innermost first: shape[0] is the row length
        if t.tensor_type not in (T.F32, T.F16) and row % QK_K == 0:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            raw = encode_q4_k(values)[0].reshape(values.shape[0], -1)
            encoded[t.name] = raw
            writer.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=T.Q4_K)
        else:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return encoded


def run_convert(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "240"}
    return subprocess.run([str(CLI), "convert", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def load_output(folder: Path) -> dict[str, mx.array]:
    weights = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    return weights


def summary_rows(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^From (\S+)\s+(.*?)\s*$", stdout, re.M))


@pytest.fixture(scope="module")
def q4k(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("q4k")
    encoded = write_q4_k_smollm2(tmp / "smol-q4k.gguf")
    done = run_convert(tmp / "smol-q4k.gguf", tmp / "out")
    assert done.returncode == 0, done.stderr
    return tmp, encoded, done.stdout


def test_convert_summary_reports_the_q4_k_error_measured_from_the_output(q4k):
    tmp, encoded, stdout = q4k
    # SmolLM2: hidden 576 is not whole 256-blocks, the 30 down projections' 1536 inputs are
    assert sorted(encoded) == sorted(f"blk.{i}.ffn_down.weight" for i in range(30))
    rows = summary_rows(stdout)
    assert set(rows) == {"Q4_1", "Q4_K", "Q8_0"}, stdout
    assert rows["Q4_1"] == "4-bit group 32 (float16 scales): exact"
    assert rows["Q8_0"] == "8-bit group 32 (float16 scales): exact"

    out = load_output(tmp / "out")
    config = json.loads((tmp / "out" / "config.json").read_text())
    max_abs, sq_err, sq_ref, on_grid, bit_exact, groups = 0.0, 0.0, 0.0, 0, 0, 0
    for gname, raw in encoded.items():
        module = gguf_to_hf(gname)[: -len(".weight")]
        assert config["quantization"].get(module, config["quantization"])["bits"] == 4
        w, s, b = (out[f"{module}.{p}"] for p in ("weight", "scales", "biases"))
        assert s.dtype == mx.float16 and s.shape == (576, 1536 // 32)
        s, b = s.astype(mx.float32), b.astype(mx.float32)
        ours = np.array(mx.dequantize(w, s, b, group_size=32, bits=4))
        ref = gguf.quants.dequantize(raw, T.Q4_K).astype(np.float32)
        diff = (ours.astype(np.float64) - ref).reshape(-1, 32)
        max_abs = max(max_abs, float(np.abs(diff).max()))
        sq_err += float((diff ** 2).sum())
        sq_ref += float((ref.astype(np.float64) ** 2).sum())
        # the summary's "exact" group: the source's grid held, off only by the float16 rounding of its
        # scale and bias (the row names the scale dtype); bit-exact groups are counted apart
        bound = 2.0 ** -11 * (15 * np.abs(np.array(s)) + np.abs(np.array(b))).reshape(-1) + 2.0 ** -24
        on_grid += int((np.abs(diff).max(axis=1) <= bound).sum())
        bit_exact += int((diff == 0).all(axis=1).sum())
        groups += diff.shape[0]
    rel_rms = (sq_err / sq_ref) ** 0.5
    print(f"independent: max {max_abs!r}, relative RMS {rel_rms!r}, {on_grid}/{groups} groups on the grid, "
          f"{bit_exact} bit-exact")
    assert groups == 30 * 576 * 1536 // 32 and 0 < bit_exact < groups
    assert 0 < max_abs < 2.0 ** -11 * float(np.abs(ref).max()) * 20  # float16 scales: small, not zero
    want = (f"4-bit group 32 (float16 scales): max error {max_abs:.2g}, relative RMS {rel_rms:.2g}, "
            f"{on_grid}/{groups} groups exact")
    assert rows["Q4_K"] == want, (rows["Q4_K"], want)


def test_q4_k_converted_smollm2_still_answers(q4k):
    from llama_mlx import generate, load

    tmp, _, _ = q4k
    model, tokenizer = load(tmp / "out")
    answer = generate(model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                      max_tokens=8)
    assert "Paris" in answer, answer


def test_quantizing_a_quantized_gguf_needs_requantize(tiny_quantized_gguf, converted, tmp_path):
    src = tiny_quantized_gguf  # (Q4_1 and Q8_0 blocks as SmolLM2's, a few hundred KB)
    refused = run_convert(src, tmp_path / "q", "-q")
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and str(src) in lines[0] and "--requantize" in lines[0], refused.stderr
    assert not (tmp_path / "q").exists()

    done, folder = converted("-q", "--requantize")
    assert done.returncode == 0, done.stderr
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4}
    out = load_output(folder)
    assert out["model.layers.0.mlp.down_proj.scales"].shape == (TINY_PARAMS["dim"], FFN // 64)


def test_dequantize_writes_gguf_reference_values(tiny_source, converted):
    done, folder = converted("-d")
    assert done.returncode == 0, done.stderr
    config = json.loads((folder / "config.json").read_text())
    assert "quantization" not in config and config["torch_dtype"] == "float16"
    out = load_output(folder)
    assert not [n for n in out if n.endswith((".scales", ".biases"))]
    assert len(out) == len(tiny_source) >= 3 + 9 * TINY_PARAMS["n_layers"]
    assert {t.tensor_type for t in tiny_source} >= {T.Q4_1, T.Q8_0}
    for t in tiny_source:
        name = gguf_to_hf(t.name)
        got = out[name]
        assert got.dtype == mx.float16, name
        # q/k rows stay in Meta's layout (the reader marks rope_traditional): values compare directly
        want = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float16)
        assert got.shape == want.shape == tuple(int(n) for n in reversed(t.shape)), name
        np.testing.assert_array_equal(np.array(got), want, err_msg=name)


@pytest.fixture(scope="module")
def tiny_quantized_gguf(tmp_path_factory):
    import test_checkpoints_support as S

    path = tmp_path_factory.mktemp("tinyq") / "tiny.gguf"
    S.write_gguf(path, S.meta_state_dict(seed=31), S.TINY_PARAMS,
                 {"token_embd": "Q4_1", "attn_q": "Q4_1", "attn_k": "Q4_1", "ffn_down": "Q8_0"})
    return path


@pytest.fixture(scope="module")
def tiny_source(tiny_quantized_gguf):
    """gguf-py's reading of the tiny GGUF's tensors, copied out: its SmolLM2 vocabulary makes a read
    take seconds, so the tests share one."""
    return [types.SimpleNamespace(name=t.name, tensor_type=t.tensor_type, shape=[int(n) for n in t.shape],
                                  data=np.array(t.data))
            for t in gguf.GGUFReader(str(tiny_quantized_gguf)).tensors]


@pytest.fixture(scope="module")
def converted(tiny_quantized_gguf, tmp_path_factory):
    """`llama-mlx convert TINY OUT *args`, run once per distinct args for the whole module."""
    runs = {}

    def run(*args: str) -> tuple[subprocess.CompletedProcess, Path]:
        if args not in runs:
            out = tmp_path_factory.mktemp("converted") / "out"
            runs[args] = (run_convert(tiny_quantized_gguf, out, *args), out)
        return runs[args]

    return run


@pytest.mark.parametrize("args, written", [
    (["-q", "--requantize"], "4-bit group 64 (float16 scales)"),
    (["-d"], "float16 weights"),
    (["--dtype", "bfloat16"], None),  # carried over, its float16 scales rounded to bfloat16
])
def test_summary_describes_what_was_written(tiny_source, converted, args, written):
    done, folder = converted(*args)
    assert done.returncode == 0, done.stderr
    rows = summary_rows(done.stdout)
    assert set(rows) == {"Q4_1", "Q8_0"}, done.stdout

    # Independently: gguf-py's dequantization of each source tensor against the written tensor.
    out = load_output(folder)
    q = json.loads((folder / "config.json").read_text()).get("quantization")
    per_type: dict[str, list] = {}
    for t in tiny_source:
        if t.tensor_type not in (T.Q4_1, T.Q8_0):
            continue
        module = gguf_to_hf(t.name)[: -len(".weight")]
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        w = out[f"{module}.weight"]
        if f"{module}.scales" in out:
            p = q.get(module, q)
            s, b = (out[f"{module}.{x}"] for x in ("scales", "biases"))
            got = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=p["group_size"],
                                bits=p["bits"])
            what = f"{p['bits']}-bit group {p['group_size']} ({str(s.dtype).rpartition('.')[2]} scales)"
        else:
            got, what = w.astype(mx.float32), f"{str(w.dtype).rpartition('.')[2]} weights"
        diff = np.array(got).astype(np.float64) - ref
        acc = per_type.setdefault(t.tensor_type.name, [what, 0.0, 0.0, 0.0])
        assert acc[0] == what
        acc[1] = max(acc[1], float(np.abs(diff).max()))
        acc[2] += float((diff ** 2).sum())
        acc[3] += float((ref ** 2).sum())
    for kind, (what, max_abs, sq_err, sq_ref) in per_type.items():
        assert written is None or what == written
        assert max_abs > 0  # none of these writes holds the source exactly
        assert rows[kind] == f"{what}: max error {max_abs:.2g}, relative RMS {(sq_err / sq_ref) ** 0.5:.2g}", \
            (rows[kind], kind)
