"""Tiny random Llama 3.2 Vision (mllama) models built with transformers (float32), the oracle of the vision tests.

Where transformers 5.x departs from Meta's reference (`llama-models`), `meta_semantics()` gives the
oracle Meta's behaviour, nothing else: its MllamaVisionEncoder collects the *outputs* of the local layers
as intermediate states, where Meta (and transformers 4.x, huggingface/transformers#39785) takes each listed
layer's *input*; and a text token with no image before it (BOS, the first header) still adds
cross-attention output, where Meta multiplies it by `full_text_row_masked_out_mask`.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import torch

IMAGE_TOKEN = 300  # vocab_size, as in Llama 3.2 Vision (128256)

TINY_CONFIG = dict(
    vision_config=dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4,
                       intermediate_size=64, vision_output_dim=32 * 3, image_size=28, patch_size=14,
                       max_num_tiles=4, intermediate_layers_indices=[1, 3], norm_eps=1e-5),
    text_config=dict(vocab_size=300, hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=128, cross_attention_layers=[1, 3],
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64},
                     max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    image_token_index=IMAGE_TOKEN,
)


def tiny_mllama(seed: int = 0, scale: float = 0.2):
    """A random MllamaForConditionalGeneration (float32, eval), gates and embeddings far from their zero init."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(MllamaConfig(**TINY_CONFIG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "gate" in name:
                p.copy_(torch.empty_like(p).uniform_(-1.2, 1.2))
            else:
                p.copy_(scale * torch.randn_like(p))
    return model


@contextlib.contextmanager
def meta_semantics(rows: bool = True):
    """transformers' mllama with Meta's intermediate states and, with `rows`, Meta's rows without an image:
    a text token with no image before it gets no cross-attention output (Meta multiplies the attention
    output by `full_text_row_masked_out_mask`; transformers zeroes only the feed-forward)."""
    from transformers.modeling_outputs import BaseModelOutput
    from transformers.models.mllama import modeling_mllama as mm

    encoder, layer = mm.MllamaVisionEncoder.forward, mm.MllamaCrossAttentionDecoderLayer.forward

    def encoder_forward(self, hidden_states, attention_mask=None, **kwargs):
        states = ()
        for block in self.layers:
            states = states + (hidden_states,)
            hidden_states = block(hidden_states=hidden_states, attention_mask=attention_mask)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=states)

    def layer_forward(self, hidden_states, cross_attention_states, cross_attention_mask, attention_mask,
                      full_text_row_masked_out_mask, position_ids=None, cache=None, use_cache=False,
                      position_embeddings=None, **kwargs):
        residual = hidden_states
        h, _ = self.cross_attn(hidden_states=self.input_layernorm(hidden_states), attention_mask=cross_attention_mask,
                               cross_attention_states=cross_attention_states, cache=cache, **kwargs)
        if full_text_row_masked_out_mask is not None:
            h = full_text_row_masked_out_mask[:, 0] * h  # per row, so before or after o_proj alike
        h = residual + self.cross_attn_attn_gate.tanh() * h
        residual = h
        h = self.mlp(self.post_attention_layernorm(h))
        if full_text_row_masked_out_mask is not None:
            h = full_text_row_masked_out_mask[:, 0] * h
        return residual + self.cross_attn_mlp_gate.tanh() * h

    mm.MllamaVisionEncoder.forward = encoder_forward
    if rows:
        mm.MllamaCrossAttentionDecoderLayer.forward = layer_forward
    try:
        yield
    finally:
        mm.MllamaVisionEncoder.forward, mm.MllamaCrossAttentionDecoderLayer.forward = encoder, layer


def cross_attention_mask(ids: list[int], num_tiles: int, max_tiles: int = 4) -> torch.Tensor:
    """The processor's mask for one image: every token from the image token on sees its tiles."""
    mask = torch.zeros(1, len(ids), 1, max_tiles, dtype=torch.long)
    if IMAGE_TOKEN in ids:
        mask[0, ids.index(IMAGE_TOKEN):, 0, :num_tiles] = 1
    return mask


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    """Parameters under the names save_pretrained writes (language_model.model.*, vision_model.*)."""
    out = {}
    for name, p in model.state_dict().items():
        name = name.replace("model.language_model.", "language_model.model.").replace(
            "model.vision_model.", "vision_model.").replace("model.multi_modal_projector.", "multi_modal_projector.")
        if name == "lm_head.weight":
            name = "language_model.lm_head.weight"
        out[name] = p.detach().numpy().copy()
    return out


SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<|eom_id|>", "<|python_tag|>"]
CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def write_tokenizer(folder) -> None:
    """A byte-level tokenizer: ids 0-255 the bytes, Llama 3's special tokens from 256, `<|image|>` at 300."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    vocab = _byte_chars()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(300 - 256 - len(SPECIALS))] + ["<|image|>"]
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
        ("<|begin_of_text|>", 256)])
    assert tok.token_to_id("<|image|>") == IMAGE_TOKEN and tok.token_to_id("<|eot_id|>") == 260
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}))


def _byte_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def write_tiny_folder(folder, seed: int = 0):
    """A Hugging Face Llama 3.2 Vision folder (save_pretrained) with the byte-level tokenizer and a
    preprocessor_config.json; the head only ever picks printable ASCII bytes. Returns the transformers model."""
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_mllama(seed)
    with torch.no_grad():
        head = model.lm_head.weight
        printable = torch.zeros(head.shape[0], dtype=torch.bool)
        printable[32:127] = True
        head[~printable] = 0
    model.generation_config.bos_token_id = 256
    model.generation_config.eos_token_id = [257, 260]
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    write_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "MllamaImageProcessor", "size": {"height": 28, "width": 28}, "max_image_tiles": 4,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 0.00392156862745098, "do_resize": True, "do_pad": True, "do_rescale": True,
        "do_normalize": True, "do_convert_rgb": True, "resample": 2}))
    return model


def meta_vision_encoder(seed: int = 0, scale: float = 0.2):
    """Meta's reference VisionEncoder (llama-models 0.3.0, unpacked into tests/.assets, float32, CPU) at the
    tiny vision config, random; and the same weights under our names and layouts (HF's tables per
    aspect-ratio id, built from Meta's per-(rows, columns) tables)."""
    import sys
    import types

    from oracles import _init_fairscale

    v = TINY_CONFIG["vision_config"]
    # The encoder never touches the image transform, whose module imports torchvision (not installed).
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        sys.modules.setdefault(name, types.ModuleType(name))
    from llama_models.llama3.multimodal.model import VisionEncoder

    _init_fairscale()
    torch.manual_seed(seed)
    T, D, p = v["max_num_tiles"], v["hidden_size"], v["patch_size"]
    meta = VisionEncoder(max_num_tiles=T, image_size=v["image_size"], patch_size=p, width=D,
                         layers=v["num_hidden_layers"], heads=v["attention_heads"],
                         mlp_ratio=v["intermediate_size"] / D, n_global_layers=v["num_global_layers"],
                         global_model=True, return_intermediate=v["intermediate_layers_indices"]).eval()
    with torch.no_grad():
        for name, param in meta.named_parameters():
            if "gate" in name:
                param.copy_(torch.empty_like(param).uniform_(-1.2, 1.2))
            elif ".ln" in "." + name:
                param.copy_((1 if name.endswith("weight") else 0) + 0.1 * torch.randn_like(param))
            else:
                param.copy_(scale * torch.randn_like(param))
    sd = {k: t.detach().numpy().copy() for k, t in meta.state_dict().items()}
    grids = [(a, b) for a in range(1, T + 1) for b in range(1, T + 1) if a * b <= T]

    def table(grid_table):  # [T, T, n, D] per (rows, columns) -> [ids + 1, T * n * D] per aspect-ratio id
        n = grid_table.shape[2]
        rows = np.zeros((len(grids) + 1, T, n, D), np.float32)
        for i, (h, w) in enumerate(grids, start=1):
            rows[i, : h * w] = grid_table[:h, :w].reshape(h * w, n, D)
        return rows.reshape(len(grids) + 1, -1)

    ours = {
        "patch_embedding.weight": sd["conv1._linear.weight"].reshape(D, -1, p, p).transpose(0, 2, 3, 1),
        "class_embedding": sd["class_embedding"],
        "gated_positional_embedding.embedding": sd["positional_embedding"],
        "gated_positional_embedding.gate": sd["gated_positional_embedding_gate"],
        "gated_positional_embedding.tile_embedding.weight": table(sd["gated_positional_embedding"]),
        "layernorm_pre.weight": sd["ln_pre.weight"], "layernorm_pre.bias": sd["ln_pre.bias"],
        "layernorm_post.weight": sd["ln_post.weight"], "layernorm_post.bias": sd["ln_post.bias"],
    }
    for which in ("pre", "post"):
        ours[f"{which}_tile_positional_embedding.embedding.weight"] = table(sd[f"{which}_tile_pos_embed.embedding"])
        ours[f"{which}_tile_positional_embedding.gate"] = sd[f"{which}_tile_pos_embed.gate"]
    names = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
             "attn.wo": "self_attn.o_proj", "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "gate_attn": "gate_attn", "gate_ffn": "gate_ffn"}
    for key, value in sd.items():
        if ".resblocks." in key:
            encoder, _, rest = key.partition(".resblocks.")
            index, _, leaf = rest.partition(".")
            module, _, kind = leaf.rpartition(".")
            mapped = names[module] + "." + kind if module else names[leaf]
            ours[f"{encoder}.layers.{index}.{mapped}"] = value
    return meta, ours, grids


META_TEXT = dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32,
                 ffn_dim_multiplier=0.75, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=64,
                 vision_chunk_size=28, vision_max_num_chunks=4, vision_num_cross_attention_layers=2)


def meta_reference_mllama(seed: int = 0, scale: float = 0.2):
    """Meta's reference Llama 3.2 Vision at a tiny size: its VisionEncoder (`meta_vision_encoder`), a vision
    projection, and its CrossAttentionTransformerText (float32, CPU, random). Returns (run, config,
    weights, grids): `run(tokens, pixels, grid, image_at, chunks)` gives Meta's logits for a prompt whose
    image token is at `image_at` (Meta's mask: from there to the end); `config` and `weights` describe the same
    model under Hugging Face's names (cross-attention layers interleaved where Meta's fusion schedule
    runs them, before its self-attention layer; Meta's interleaved-pair RoPE as rope_traditional)."""
    vision, vision_weights, grids = meta_vision_encoder(seed, scale)  # (sets up the imports below)
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.multimodal.model import CrossAttentionTransformerText, _pad_masks

    from llama_mlx.config import ffn_hidden_dim

    v = TINY_CONFIG["vision_config"]
    torch.manual_seed(seed + 1)
    args = ModelArgs(**META_TEXT)
    text = CrossAttentionTransformerText(args).eval()
    projection = torch.nn.Linear(v["vision_output_dim"], args.dim)
    with torch.no_grad():
        for name, param in [*text.named_parameters(), *projection.named_parameters()]:
            if "gate" in name:
                param.copy_(torch.empty_like(param).uniform_(-1.2, 1.2))
            elif "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(scale * torch.randn_like(param))
    text.setup_cache(1, torch.device("cpu"), torch.float32)
    schedule = text.fusion_schedule

    def run(tokens: list[int], pixels: np.ndarray, grid: tuple[int, int], image_at: int,
            chunks: tuple[int, ...] = ()) -> list[np.ndarray]:
        """Logits of each chunk of `tokens` (one chunk: all), run in turn through Meta's KV cache."""
        with torch.no_grad():
            states = projection(vision(torch.tensor(pixels), torch.tensor([list(grid)])))
            B, I, T, P, D = states.shape
            caches = torch.stack([layer.compute_xattn_kv_cache(states.view(B, -1, D))
                                  for layer in text.cross_attention_layers])
            masks = _pad_masks([[[image_at, -1]]], [[grid[0] * grid[1]]], len(tokens), T)
            xattn_mask, rows = text._get_xattn_mask(len(tokens), "cpu", torch.float32, states, masks)
            ids, out, start = torch.tensor([tokens]), [], 0
            for n in chunks or (len(tokens),):
                positions = torch.arange(start, start + n)
                h = text.get_partially_trainable_embedding(ids[:, positions])
                out.append(text.forward(positions, h, xattn_mask[:, :, positions], rows[:, :, positions],
                                        caches).numpy())
                start += n
            return out

    sd = {k: t.detach().numpy().copy() for k, t in text.state_dict().items()}
    self_names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                  "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                  "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                  "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                  "ffn_norm": "post_attention_layernorm"}
    cross_names = {**{k: v.replace("self_attn", "cross_attn") for k, v in self_names.items()},
                   "attention.q_norm": "cross_attn.q_norm", "attention.k_norm": "cross_attn.k_norm"}
    order, cross_at = [], []  # HF layer index of each Meta layer
    for i in range(args.n_layers):
        if i in schedule:
            cross_at.append(len(order))
            order.append(("cross_attention_layers", schedule.index(i)))
        order.append(("layers", i))
    weights = {"language_model.model.embed_tokens.weight": np.concatenate(
                   [sd["tok_embeddings.weight"], sd["learnable_embedding.weight"]]),
               "language_model.model.norm.weight": sd["norm.weight"],
               "language_model.lm_head.weight": sd["output.weight"],
               "multi_modal_projector.weight": projection.weight.detach().numpy().copy(),
               "multi_modal_projector.bias": projection.bias.detach().numpy().copy(),
               **{f"vision_model.{k}": val for k, val in vision_weights.items()}}
    for hf_index, (group, meta_index) in enumerate(order):
        names = cross_names if group == "cross_attention_layers" else self_names
        prefix = f"{group}.{meta_index}."
        for key, value in sd.items():
            if not key.startswith(prefix):
                continue
            leaf = key[len(prefix):]
            module, _, kind = leaf.rpartition(".")
            if leaf in ("gate_attn", "gate_ffwd"):
                mapped = {"gate_attn": "cross_attn_attn_gate", "gate_ffwd": "cross_attn_mlp_gate"}[leaf]
            else:
                mapped = names[module] + "." + kind
            weights[f"language_model.model.layers.{hf_index}.{mapped}"] = value
    config = {"model_type": "mllama", "image_token_index": args.vocab_size, "vision_config": v,
              "text_config": {"vocab_size": args.vocab_size, "hidden_size": args.dim, "num_hidden_layers": len(order),
                              "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
                              "intermediate_size": ffn_hidden_dim(args.dim, args.multiple_of,
                                                                  args.ffn_dim_multiplier),
                              "cross_attention_layers": cross_at, "rms_norm_eps": args.norm_eps,
                              "rope_theta": args.rope_theta, "rope_traditional": True,
                              "max_position_embeddings": args.max_seq_len}}
    return run, config, weights, grids
