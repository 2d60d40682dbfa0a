"""Meta's own Llama 3.2 Vision layout (llama-models): params.json with `vision_*` keys,
tokenizer.model and consolidated.NN.pth (one per model-parallel rank), read into the Hugging Face
names and layouts our mllama model takes (what transformers' convert_mllama_weights_to_hf does):

- cross-attention layers, which Meta keeps apart (`text_model.cross_attention_layers.N`) and runs
  before self-attention layer `fusion_schedule[N]`, are interleaved into `language_model.model.layers`;
- the 8 rows of `learnable_embedding` (the image token 128256 and spares) follow the vocabulary in
  `embed_tokens`;
- self-attention q/k rows go from Meta's interleaved RoPE pairs to Hugging Face's halves;
- the patch convolution `conv1._linear` [D, 3*p*p] becomes [D, 3, p, p]; the tile and position
  embeddings per (rows, columns) become tables per aspect-ratio id; position embeddings trained for
  another chunk size are resized as the reference's load hooks do (bilinear, corners kept).

params.json does not describe the vision encoder: its shapes come from the tensors, its heads and
intermediate layers are the reference's constants (CrossAttentionTransformerVision).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..checkpoints.base import MAX_LAYERS, dtype_name, read_json
from ..checkpoints.meta import config_from_params, load_shards, merge_shards, positive_int
from ..errors import CheckpointError, ConfigError
from ..paths import resolve_inside
from .processor import supported_aspect_ratios

__all__ = ["IMAGE_CHAT_TEMPLATE", "META_LAYOUT", "META_VISION_TO_HF", "is_meta_vision_folder", "meta_mllama_config",
           "meta_weight_files", "read_meta_mllama", "vision_tokenizer", "write_meta_tokenizer"]

META_LAYOUT = "meta_layout"  # config key marking a config made from a Meta folder (never written out)

# The reference's fixed vision encoder (llama_models/llama3/multimodal/model.py, CrossAttentionTransformerVision).
VISION_HEADS = 16
VISION_INTERMEDIATE = (3, 7, 15, 23, 30)
MAX_TILES = 16
MAX_TILE_SIZE = 1792  # 128 x 128 patches of 14 (Meta's: 448, 560)

# Meta name -> Hugging Face name. `{n}`: a layer number kept; `{self}` / `{cross}`: a Meta self- /
# cross-attention layer number, replaced by its place among the interleaved layers.
_X = "language_model.model.layers.{cross}."
_S = "language_model.model.layers.{self}."
_V = "vision_model.vision_encoder."
META_VISION_TO_HF = {
    "text_model.tok_embeddings.weight": "language_model.model.embed_tokens.weight",
    "text_model.learnable_embedding.weight": "language_model.model.embed_tokens.weight",  # rows appended
    "text_model.norm.weight": "language_model.model.norm.weight",
    "text_model.output.weight": "language_model.lm_head.weight",
    "text_model.layers.{n}.attention.wq.weight": _S + "self_attn.q_proj.weight",
    "text_model.layers.{n}.attention.wk.weight": _S + "self_attn.k_proj.weight",
    "text_model.layers.{n}.attention.wv.weight": _S + "self_attn.v_proj.weight",
    "text_model.layers.{n}.attention.wo.weight": _S + "self_attn.o_proj.weight",
    "text_model.layers.{n}.feed_forward.w1.weight": _S + "mlp.gate_proj.weight",
    "text_model.layers.{n}.feed_forward.w2.weight": _S + "mlp.down_proj.weight",
    "text_model.layers.{n}.feed_forward.w3.weight": _S + "mlp.up_proj.weight",
    "text_model.layers.{n}.attention_norm.weight": _S + "input_layernorm.weight",
    "text_model.layers.{n}.ffn_norm.weight": _S + "post_attention_layernorm.weight",
    "text_model.cross_attention_layers.{n}.attention.wq.weight": _X + "cross_attn.q_proj.weight",
    "text_model.cross_attention_layers.{n}.attention.wk.weight": _X + "cross_attn.k_proj.weight",
    "text_model.cross_attention_layers.{n}.attention.wv.weight": _X + "cross_attn.v_proj.weight",
    "text_model.cross_attention_layers.{n}.attention.wo.weight": _X + "cross_attn.o_proj.weight",
    "text_model.cross_attention_layers.{n}.attention.q_norm.weight": _X + "cross_attn.q_norm.weight",
    "text_model.cross_attention_layers.{n}.attention.k_norm.weight": _X + "cross_attn.k_norm.weight",
    "text_model.cross_attention_layers.{n}.attention_norm.weight": _X + "input_layernorm.weight",
    "text_model.cross_attention_layers.{n}.ffn_norm.weight": _X + "post_attention_layernorm.weight",
    "text_model.cross_attention_layers.{n}.feed_forward.w1.weight": _X + "mlp.gate_proj.weight",
    "text_model.cross_attention_layers.{n}.feed_forward.w2.weight": _X + "mlp.down_proj.weight",
    "text_model.cross_attention_layers.{n}.feed_forward.w3.weight": _X + "mlp.up_proj.weight",
    "text_model.cross_attention_layers.{n}.gate_attn": _X + "cross_attn_attn_gate",
    "text_model.cross_attention_layers.{n}.gate_ffwd": _X + "cross_attn_mlp_gate",
    "vision_model.vision_projection.weight": "multi_modal_projector.weight",
    "vision_model.vision_projection.bias": "multi_modal_projector.bias",
    _V + "conv1._linear.weight": "vision_model.patch_embedding.weight",
    _V + "class_embedding": "vision_model.class_embedding",
    _V + "positional_embedding": "vision_model.gated_positional_embedding.embedding",
    _V + "gated_positional_embedding": "vision_model.gated_positional_embedding.tile_embedding.weight",
    _V + "gated_positional_embedding_gate": "vision_model.gated_positional_embedding.gate",
    _V + "pre_tile_pos_embed.embedding": "vision_model.pre_tile_positional_embedding.embedding.weight",
    _V + "pre_tile_pos_embed.gate": "vision_model.pre_tile_positional_embedding.gate",
    _V + "post_tile_pos_embed.embedding": "vision_model.post_tile_positional_embedding.embedding.weight",
    _V + "post_tile_pos_embed.gate": "vision_model.post_tile_positional_embedding.gate",
    _V + "ln_pre.weight": "vision_model.layernorm_pre.weight",
    _V + "ln_pre.bias": "vision_model.layernorm_pre.bias",
    _V + "ln_post.weight": "vision_model.layernorm_post.weight",
    _V + "ln_post.bias": "vision_model.layernorm_post.bias",
    **{_V + f"{enc}.resblocks.{{n}}.{meta}": f"vision_model.{enc}.layers.{{n}}.{hf}"
       for enc in ("transformer", "global_transformer")
       for meta, hf in (("attn.wq.weight", "self_attn.q_proj.weight"), ("attn.wk.weight", "self_attn.k_proj.weight"),
                        ("attn.wv.weight", "self_attn.v_proj.weight"), ("attn.wo.weight", "self_attn.o_proj.weight"),
                        ("mlp.c_fc.weight", "mlp.fc1.weight"), ("mlp.c_fc.bias", "mlp.fc1.bias"),
                        ("mlp.c_proj.weight", "mlp.fc2.weight"), ("mlp.c_proj.bias", "mlp.fc2.bias"),
                        ("ln_1.weight", "input_layernorm.weight"), ("ln_1.bias", "input_layernorm.bias"),
                        ("ln_2.weight", "post_attention_layernorm.weight"),
                        ("ln_2.bias", "post_attention_layernorm.bias"))},
    **{_V + f"global_transformer.resblocks.{{n}}.{g}": f"vision_model.global_transformer.layers.{{n}}.{g}"
       for g in ("gate_attn", "gate_ffn")},
}
IGNORED = {"text_model.rope.freqs"}
LEARNABLE = "text_model.learnable_embedding.weight"

# How model-parallel ranks split each Meta tensor (its last name parts): concatenation axis; the rest
# is replicated. ColumnParallelLinear / VocabParallelEmbedding: axis 0 (weight and bias);
# RowParallelLinear: axis 1 (llama-models' checkpoint.py, transformers' converter).
_AXIS_0 = re.compile(r"(\.w[qkv13]\.weight|\.output\.weight|tok_embeddings\.weight|learnable_embedding\.weight|"
                     r"c_fc\.(weight|bias)|conv1\._linear\.weight|vision_projection\.(weight|bias))$")
_AXIS_1 = re.compile(r"(\.wo\.weight|\.w2\.weight|c_proj\.weight)$")
_PATTERN = re.compile(r"\.(\d+)\.")


def _lookup(name: str) -> tuple[str | None, int | None]:
    """(the map's target, the layer number) of a Meta tensor name."""
    m = _PATTERN.search(name)
    if m is None:
        return META_VISION_TO_HF.get(name), None
    key = name[: m.start()] + ".{n}." + name[m.end():]
    return META_VISION_TO_HF.get(key), int(m.group(1))


def shard_axis(name: str) -> int | None:
    if _AXIS_0.search(name):
        return 0
    return 1 if _AXIS_1.search(name) else None


def meta_weight_files(folder: Path) -> list[Path]:
    """The consolidated.NN.pth files of a Meta folder, in rank order."""
    return sorted(folder.glob("consolidated.*.pth")) or sorted(folder.glob("consolidated.pth"))


def is_meta_vision_folder(folder: str | Path) -> bool:
    """Whether `folder` is Meta's Llama 3.2 Vision layout: params.json with vision keys and consolidated*.pth."""
    folder = Path(folder).expanduser()
    params = folder / "params.json"
    if not folder.is_dir() or not params.is_file() or not meta_weight_files(folder):
        return False
    try:
        text = params.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return '"vision_chunk_size"' in text or '"vision_num_cross_attention_layers"' in text


def _grid(rows: int) -> int | None:
    """n for a position table of 1 + n * n rows (class token, n x n patches), else None."""
    n = math.isqrt(max(rows - 1, 0))
    return n if n > 0 and n * n == rows - 1 else None


def _bilinear(n: int, m: int) -> np.ndarray:
    """[m, n] weights of 1-D linear interpolation from n to m points with the ends kept (torch's
    `F.interpolate(mode="bilinear", align_corners=True)` is this along each axis)."""
    w = np.zeros((m, n), np.float64)
    for i in range(m):
        x = i * (n - 1) / (m - 1) if m > 1 else 0.0
        lo = min(math.floor(x), n - 1)
        hi = min(lo + 1, n - 1)
        w[i, lo] += 1 - (x - lo)
        w[i, hi] += x - lo
    return w


def _resize_local(table: mx.array, grid: int) -> mx.array:
    """[1 + n * n, D] -> [1 + grid * grid, D] (the reference's `resize_local_position_embedding`)."""
    n = _grid(table.shape[0])
    if n == grid:
        return table
    a = np.array(table.astype(mx.float32))
    img = a[1:].reshape(n, n, -1)
    w = _bilinear(n, grid)
    out = np.einsum("ai,bj,ijd->abd", w, w, img).reshape(grid * grid, -1)
    return mx.array(np.concatenate([a[:1], out]).astype(np.float32)).astype(table.dtype)


def _resize_tiled(table: mx.array, grid: int) -> mx.array:
    """[T, T, 1 + n * n, D] -> [T, T, 1 + grid * grid, D]: the patches of all tiles as one grid, resized
    (the reference's `resize_global_position_embedding`; the class rows keep their tiles)."""
    T, _, rows, d = table.shape
    n = _grid(rows)
    if n == grid:
        return table
    a = np.array(table.astype(mx.float32))
    patches = a[:, :, 1:].reshape(T, T, n, n, d).transpose(0, 2, 1, 3, 4).reshape(T * n, T * n, d)
    w = _bilinear(T * n, T * grid)
    out = np.einsum("ai,bj,ijd->abd", w, w, patches).reshape(T, grid, T, grid, d).transpose(0, 2, 1, 3, 4)
    out = np.concatenate([a[:, :, :1], out.reshape(T, T, grid * grid, d)], axis=2)
    return mx.array(out.astype(np.float32)).astype(table.dtype)


def fusion_schedule(n_layers: int, n_cross: int) -> list[int]:
    """The self-attention layers a cross-attention layer runs before (the reference's `_init_fusion_schedule`)."""
    k = math.ceil(n_layers / n_cross)
    return list(range(n_layers))[::-1][::k][:n_cross][::-1]


def _read(folder: Path):
    params_file = resolve_inside(folder, "params.json", what="params.json", error=ConfigError)
    params = read_json(params_file, "params.json")
    params = params.get("model", params) if isinstance(params.get("model"), dict) else params
    # Validated before any shard is read.
    n_layers = positive_int(params, "n_layers", params_file, limit=MAX_LAYERS)
    n_cross = positive_int(params, "vision_num_cross_attention_layers", params_file, limit=n_layers)
    tile = positive_int(params, "vision_chunk_size", params_file, limit=MAX_TILE_SIZE)
    tiles = positive_int(params, "vision_max_num_chunks", params_file, 4, limit=MAX_TILES)
    files = [resolve_inside(folder, f.name, what="weight file") for f in meta_weight_files(folder)]
    if not files:
        raise CheckpointError(f"{folder}: no consolidated.NN.pth weight files")
    shards = load_shards(files)
    for name in shards[0]:
        if name not in IGNORED and _lookup(name)[0] is None:
            raise CheckpointError(f"{files[0]}: unexpected tensor {name!r} in a Llama 3.2 Vision checkpoint")
    return params, params_file, (n_layers, n_cross, tile, tiles), files, shards


def _tensor(name: str, shards: list[dict], files: list[Path]):
    """A tensor's shards as one lazy tensor (shapes checked, nothing read)."""
    if name not in shards[0]:
        raise CheckpointError(f"{files[0]}: missing tensor {name!r}")
    return merge_shards(name, [s[name] for s in shards], files, shard_axis(name))


def _shape(name: str, shards: list[dict], files: list[Path]) -> list[int]:
    return list(_tensor(name, shards, files).shape)


def _config(params: dict, file: Path, sizes, shards: list[dict], files: list[Path]) -> dict:
    n_layers, n_cross, tile, tiles = sizes
    v = "vision_model.vision_encoder."
    emb = _shape("text_model.tok_embeddings.weight", shards, files)
    text = config_from_params(params, file, vocab_size=emb[0], tied=False)
    if text["vocab_size"] != emb[0]:
        raise CheckpointError(f"{files[0]}: 'text_model.tok_embeddings.weight' has {emb[0]} rows, "
                              f"params.json says vocab_size {text['vocab_size']}")
    width = _shape(v + "class_embedding", shards, files)[0]
    conv = _shape(v + "conv1._linear.weight", shards, files)
    patch = math.isqrt(conv[1] // 3) if len(conv) == 2 else 0
    if len(conv) != 2 or conv[0] != width or 3 * patch * patch != conv[1] or tile % patch:
        raise CheckpointError(f"{files[0]}: 'conv1._linear.weight' has shape {conv}: not 3 x p x p patches of "
                              f"width {width} tiling {tile}-pixel chunks")
    # Position embeddings trained for another chunk size are resized as the reference's load hooks do;
    # the tile tables must have params.json's tile count.
    local, pre, post = (_shape(v + n, shards, files) for n in ("positional_embedding", "pre_tile_pos_embed.embedding",
                                                               "post_tile_pos_embed.embedding"))
    tiled = _shape(v + "gated_positional_embedding", shards, files)
    if len(local) != 2 or local[1] != width or _grid(local[0]) is None:
        raise CheckpointError(f"{files[0]}: {v + 'positional_embedding'!r} has shape {local}: not a class row and "
                              f"a square grid of patches of width {width}")
    if len(tiled) != 4 or tiled[:2] != [tiles, tiles] or tiled[3] != width or _grid(tiled[2]) is None:
        raise CheckpointError(f"{files[0]}: {v + 'gated_positional_embedding'!r} has shape {tiled}, params.json's "
                              f"vision_max_num_chunks {tiles} needs [{tiles}, {tiles}, 1 + n * n, {width}]")
    for name, shape in (("pre_tile_pos_embed.embedding", pre), ("post_tile_pos_embed.embedding", post)):
        if shape != [tiles, tiles, 1, width]:
            raise CheckpointError(f"{files[0]}: {v + name!r} has shape {shape}, params.json's vision_max_num_chunks "
                                  f"{tiles} needs {[tiles, tiles, 1, width]}")
    names = shards[0].keys()

    def count(prefix: str) -> int:
        found = {int(m.group(1)) for k in names if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        if found != set(range(len(found))):
            raise CheckpointError(f"{files[0]}: the layers {prefix}N are not numbered 0..{len(found) - 1}")
        return len(found)

    layers, global_layers = count(v + "transformer.resblocks."), count(v + "global_transformer.resblocks.")
    if count("text_model.layers.") != n_layers or count("text_model.cross_attention_layers.") != n_cross:
        raise CheckpointError(f"{files[0]}: the checkpoint's layers do not match params.json's n_layers {n_layers} "
                              f"and vision_num_cross_attention_layers {n_cross}")
    if width % VISION_HEADS or layers <= max(VISION_INTERMEDIATE) or not global_layers:
        raise CheckpointError(f"{files[0]}: a vision encoder of width {width} with {layers} + {global_layers} "
                              f"layers is not Llama 3.2 Vision's ({VISION_HEADS} heads, intermediate layers "
                              f"{list(VISION_INTERMEDIATE)})")
    output_dim = width * (len(VISION_INTERMEDIATE) + 1)
    projection = _shape("vision_model.vision_projection.weight", shards, files)
    if projection != [text["hidden_size"], output_dim]:
        raise CheckpointError(f"{files[0]}: 'vision_model.vision_projection.weight' has shape {projection}, "
                              f"expected {[text['hidden_size'], output_dim]}")
    schedule = fusion_schedule(n_layers, n_cross)
    text_config = {k: text[k] for k in ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                        "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
                                        "max_position_embeddings")}
    text_config.update(model_type="mllama_text_model", num_hidden_layers=n_layers + n_cross,
                       cross_attention_layers=[s + j for j, s in enumerate(schedule)], tie_word_embeddings=False)
    first = text_config["vocab_size"] - 256  # Meta's 256 special tokens end the vocabulary (128000 on)
    text_config.update(bos_token_id=first, eos_token_id=[first + 1, first + 8, first + 9], pad_token_id=first + 4)
    vision_config = {"model_type": "mllama_vision_model", "hidden_size": width, "num_hidden_layers": layers,
                     "num_global_layers": global_layers, "attention_heads": VISION_HEADS,
                     "num_attention_heads": VISION_HEADS, "num_channels": 3,
                     "intermediate_size": _shape(v + "transformer.resblocks.0.mlp.c_fc.weight", shards, files)[0],
                     "vision_output_dim": output_dim, "image_size": tile, "patch_size": patch, "norm_eps": 1e-5,
                     "max_num_tiles": tiles, "intermediate_layers_indices": list(VISION_INTERMEDIATE),
                     "supported_aspect_ratios": [list(g) for g in supported_aspect_ratios(tiles)]}
    return {"architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
            "image_token_index": text_config["vocab_size"], "text_config": text_config,
            "vision_config": vision_config,
            "torch_dtype": dtype_name(shards[0]["text_model.tok_embeddings.weight"].mx_dtype)}


def meta_mllama_config(folder: str | Path) -> dict:
    """The Hugging Face config.json dict of a Meta Llama 3.2 Vision folder (params.json and the
    shards' shapes, no tensor data read), marked `meta_layout` for `load_mllama`."""
    folder = Path(folder).expanduser()
    params, file, sizes, files, shards = _read(folder)
    return {**_config(params, file, sizes, shards, files), META_LAYOUT: True}


def _rope_halves(w: mx.array, heads: int) -> mx.array:
    """q/k rows from Meta's interleaved RoPE pairs to Hugging Face's halves (transformers' permute_for_rope)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _per_aspect_ratio(table: mx.array, tiles: int) -> mx.array:
    """[T, T, n, D] per (rows, columns) -> [ids + 1, T * n * D] per aspect-ratio id (id 0: padding)."""
    n, d = table.shape[2], table.shape[3]
    rows = [mx.zeros((tiles, n, d), table.dtype)]
    for h, w in supported_aspect_ratios(tiles):
        grid = table[:h, :w].reshape(h * w, n, d)
        rows.append(mx.concatenate([grid, mx.zeros((tiles - h * w, n, d), table.dtype)]) if h * w < tiles else grid)
    return mx.stack(rows).reshape(len(rows), -1)


def read_meta_mllama(folder: str | Path, config: dict, model=None) -> dict[str, mx.array]:
    """The weights of a Meta Llama 3.2 Vision folder under Hugging Face's names and layouts
    (`config`: `meta_mllama_config(folder)`), model-parallel shards merged; with `model` (a
    `vision.model.Model` of `config`), each checked against its parameter's shape."""
    from mlx.utils import tree_flatten

    folder = Path(folder).expanduser()
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())} if model is not None else {}
    _, _, sizes, files, shards = _read(folder)
    n_layers, n_cross = sizes[0], sizes[1]
    text, tiles = config["text_config"], config["vision_config"]["max_num_tiles"]
    grid = config["vision_config"]["image_size"] // config["vision_config"]["patch_size"]
    cross_at = text["cross_attention_layers"]
    self_at = [i for i in range(n_layers + n_cross) if i not in cross_at]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    out: dict[str, mx.array] = {}
    for name in shards[0]:
        if name in IGNORED or name == LEARNABLE:  # the latter: appended to the vocabulary below
            continue
        target, n = _lookup(name)
        target = target.replace("{n}", str(n))
        if "{self}" in target:
            target = target.replace("{self}", str(self_at[n]))  # n < n_layers: `_config` counted them
        if "{cross}" in target:
            if n >= n_cross:
                raise CheckpointError(f"{files[0]}: {name!r}: there are {n_cross} cross-attention layers")
            target = target.replace("{cross}", str(cross_at[n]))
        tensor = _tensor(name, shards, files)
        shape, w = list(tensor.shape), tensor.read()
        try:
            if name.startswith("text_model.layers.") and name.endswith((".wq.weight", ".wk.weight")):
                w = _rope_halves(w, heads if ".wq." in name else kv_heads)
            elif name.endswith("conv1._linear.weight"):  # channels last, as our convolution takes it
                p = config["vision_config"]["patch_size"]
                w = w.reshape(w.shape[0], 3, p, p).transpose(0, 2, 3, 1)
            elif name.endswith("vision_encoder.positional_embedding"):
                w = _resize_local(w, grid)
            elif name.endswith("gated_positional_embedding"):
                w = _per_aspect_ratio(_resize_tiled(w, grid), tiles)
            elif name.endswith("tile_pos_embed.embedding"):
                w = _per_aspect_ratio(w, tiles)
        except ValueError:
            w = None
        want = expected.get(target)
        if want is not None and name == "text_model.tok_embeddings.weight":
            want = (want[0] - 8, *want[1:])  # the 8 learnable rows follow
        if w is None or (expected and tuple(w.shape) != want):
            raise CheckpointError(f"{files[0]}: {name!r} has shape {shape}, which does not give the model's "
                                  f"{target} ({'shape ' + str(list(want)) if want else 'no such parameter'})")
        out[target] = w
    if _shape(LEARNABLE, shards, files)[0] != 8:
        raise CheckpointError(f"{files[0]}: {LEARNABLE!r} must hold the 8 rows past the vocabulary (the image "
                              "token first)")
    key = "language_model.model.embed_tokens.weight"
    out[key] = mx.concatenate([out[key], _tensor(LEARNABLE, shards, files).read().astype(out[key].dtype)])
    if expected and (tuple(out[key].shape) != expected[key] or set(out) != set(expected)):
        name = next(iter(sorted(set(expected) - set(out))), key)
        raise CheckpointError(f"{files[0]}: no tensor gives the model's {name} (shape {list(expected[name])})")
    return out


# Llama 3.2 Vision's prompt with images (transformers' converter's template; string contents trimmed as
# our Meta chat format strips them): an image part is `<|image|>` where it stands in the message.
IMAGE_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] | trim }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def vision_tokenizer(tokenizer, image_token_id: int):
    """Meta's tiktoken tokenizer taught image parts in chat messages: `{"type": "image"}` becomes the
    model's image token (128256, where Meta's `<|image|>` 128011 goes before the model, as the
    reference's ChatFormat does), text parts their text as is (string contents stay stripped)."""
    from ..tokenizer.chat_format import ChatFormat

    class VisionChatFormat(ChatFormat):
        def encode_message(self, message):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                return super().encode_message(message)
            tokens = self.encode_header(message)
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    tokens.append(image_token_id)
                elif kind == "text" and isinstance(part.get("text"), str):  # as is, as llama-models does
                    tokens.extend(self.tokenizer.encode(part["text"], bos=False, eos=False))
                else:
                    raise ValueError(f"a message part must be text or an image, got {part!r:.80}")
            tokens.append(self._special("<|eot_id|>"))
            return tokens

    tokenizer.chat_format = VisionChatFormat(tokenizer)
    return tokenizer


def write_meta_tokenizer(tokenizer, out: Path, image_token_id: int) -> None:
    """Hugging Face tokenizer files for a converted Meta folder, laid out as the Hub's Llama 3.2 Vision:
    `<|image|>` an added token at `image_token_id`, 128011 a reserved token, the image chat template (in
    tokenizer_config.json and chat_template.json), Meta's stop tokens in generation_config.json."""
    from ..checkpoints.writer import write_json
    from ..tokenizer.bpe import tiktoken_to_hf_json
    from ..tokenizer.llama3 import special_token_names

    # transformers' converter's list: Llama 3.1's names (128011 `<|reserved_special_token_2|>`), then the image.
    base = len(tokenizer.mergeable_ranks)
    names = [n for n in special_token_names(len(tokenizer.special_tokens) + 1) if n != "<|image|>"]
    special = {name: base + i for i, name in enumerate(names)}
    if base + len(names) != image_token_id:
        raise CheckpointError(f"{out}: the tokenizer's {base + len(names)} ids do not end where the image token "
                              f"{image_token_id} goes")
    special["<|image|>"] = image_token_id
    bos, eos = "<|begin_of_text|>", "<|eot_id|>"
    write_json(out / "tokenizer.json", tiktoken_to_hf_json(tokenizer.mergeable_ranks, special, tokenizer.pat_str,
                                                           bos_token=bos))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token":
        "<|finetune_right_pad_id|>", "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072, "chat_template": IMAGE_CHAT_TEMPLATE})
    write_json(out / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos})
    write_json(out / "chat_template.json", {"chat_template": IMAGE_CHAT_TEMPLATE})  # the processor's
    write_json(out / "generation_config.json", {  # Meta's stop tokens: end of text, of message, of turn
        "bos_token_id": special[bos], "pad_token_id": special["<|finetune_right_pad_id|>"],
        "eos_token_id": [special[n] for n in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]})
