"""`llama-mlx info` on Llama 3.2 Vision 11B and 90B at 4 bits with an image in context: parameters
counted by transformers (a meta-device MllamaForConditionalGeneration of the real configs), weight
bytes summed over its modules, the caches by their shapes."""

import json

import pytest
import torch

from test_cli_generate import run

VISION = dict(hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16, intermediate_size=5120,
              vision_output_dim=7680, image_size=560, patch_size=14, max_num_tiles=4, norm_eps=1e-5,
              intermediate_layers_indices=[3, 7, 15, 23, 30])
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CONFIGS = {
    "11B": dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, cross_attention_layers=list(range(3, 40, 5))),
    "90B": dict(hidden_size=8192, num_hidden_layers=100, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672, cross_attention_layers=list(range(3, 100, 5))),
}
CONTEXT = 8192


def _config(size):
    return {"model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"], "image_token_index": 128256,
            "dtype": "bfloat16", "quantization": {"group_size": 64, "bits": 4},
            "text_config": {**CONFIGS[size], "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_parameters": ROPE,
                            "max_position_embeddings": 131072, "model_type": "mllama_text_model"},
            "vision_config": VISION}


def _oracle(config):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    hf_config = {k: v for k, v in config.items() if k not in ("quantization", "dtype")}
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(MllamaConfig(**hf_config))
    language = {id(p) for p in [*model.model.language_model.parameters(), *model.lm_head.parameters()]}
    quantized, nbytes = set(), 0
    for module in [*model.model.language_model.modules(), model.lm_head]:
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and module.weight.shape[1] % 64 == 0:
            out_f, in_f = module.weight.shape
            nbytes += out_f * in_f // 2 + 2 * out_f * (in_f // 64) * 2
            quantized.add(id(module.weight))
    params = 0
    for p in model.parameters():
        params += p.numel()
        if id(p) not in quantized:
            nbytes += p.numel() * 2
    assert language  # the language model was found
    return params, nbytes


@pytest.mark.parametrize("size", ["11B", "90B"])
def test_info_estimates_vision_models_at_4_bits_with_an_image(tmp_path, size):
    config = _config(size)
    folder = tmp_path / f"Llama-3.2-{size}-Vision-Instruct-4bit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    r = run("info", "-M", str(folder), "--json", "--context", str(CONTEXT))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    params, nbytes = _oracle(config)
    text = CONFIGS[size]
    cross = len(text["cross_attention_layers"])
    kv = 2 * (text["num_hidden_layers"] - cross) * 8 * 128 * CONTEXT * 2
    image = 2 * cross * 8 * 128 * 4 * ((560 // 14) ** 2 + 1) * 2
    mem = d["memory"]
    assert d["parameters"] == params
    assert (mem["weights"], mem["kv_cache"], mem["image_cache"]) == (nbytes, kv, image)
    assert mem["total"] == nbytes + kv + image and mem["weights_estimated"]
    gb = mem["total"] / 1e9
    assert (6 < gb < 9) if size == "11B" else (45 < gb < 60), gb
    r = run("info", "-M", str(folder), "--context", str(CONTEXT))
    assert r.returncode == 0 and "image cache" in r.stdout and "cross-attention at layers 3, 8" in r.stdout, r.stderr
