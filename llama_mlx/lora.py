"""LoRA and DoRA adapters as mlx-lm's trainer writes them (`mlx_lm.lora --train`): read, apply, fuse.

An adapter folder holds `adapter_config.json` (fine_tune_type "lora" or "dora", num_layers,
lora_parameters {rank, scale, dropout, keys}) and `adapters.safetensors` (`<module>.lora_a`
[in, rank], `<module>.lora_b` [rank, out], DoRA's `<module>.m` [out]). As in mlx-lm, the adapted
projections are the linears named by `keys` (paths inside a layer such as "self_attn.q_proj", or a
model path such as "lm_head"; unset: every linear of a layer) in the LAST `num_layers` layers
(0 or negative: all of them), and an adapted linear computes

    y = base(x) + scale * (x @ lora_a) @ lora_b          (dropout is training's only)

DoRA then rescales each output row by m / ||W + scale * (lora_a @ lora_b).T||. A config with
`alpha` and no `scale` (other trainers' convention) takes scale = alpha / rank.

    adapter = read_adapter("adapters")       # config and header checked; nothing allocated
    apply_adapter(model, adapter)            # wraps the targeted linears (plain or quantized)
    fuse(model)                              # folds them into the weights, as mlx_lm.fuse does
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .errors import AdapterError
from .safetensors_file import check_safetensors

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "Adapter", "DoRALinear", "LoRALinear", "apply_adapter", "check_adapter",
           "check_against", "check_fits", "fuse", "load_tensors", "read_adapter", "targets", "weight_updater"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapters.safetensors"
_MAX_CONFIG_BYTES = 1 << 20  # mlx-lm writes about 2 KB
_FLOAT_DTYPES = {"F16", "BF16", "F32"}
_LEAVES = {"lora": ("lora_a", "lora_b"), "dora": ("lora_a", "lora_b", "m")}


@dataclass(frozen=True)
class Adapter:
    """An adapter folder, checked: its config and the tensors its header declares (none read yet)."""

    path: Path
    kind: str  # "lora" or "dora"
    num_layers: int
    rank: int
    scale: float
    keys: Optional[tuple[str, ...]]  # None: every linear of the adapted layers
    tensors: dict  # name -> (shape tuple, safetensors dtype), from the header

    @property
    def modules(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """Module path -> {leaf ("lora_a", "lora_b", "m"): shape} of the tensors in the file."""
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, (shape, _) in self.tensors.items():
            module, _, leaf = name.rpartition(".")
            out.setdefault(module, {})[leaf] = shape
        return out


def _inside(folder: Path, name: str, max_bytes: Optional[int] = None) -> Path:
    """`folder/name` as a regular file whose real path is inside the folder (no link out, no FIFO)."""
    path = folder / name
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise AdapterError(f"{path}: missing (an mlx-lm adapter folder has {CONFIG_FILE} and {WEIGHTS_FILE})") from None
    except (OSError, RuntimeError) as e:
        raise AdapterError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    if not real.is_relative_to(folder.resolve()):
        raise AdapterError(f"{path}: resolves outside the adapter folder ({real})")
    st = real.stat()
    if not stat.S_ISREG(st.st_mode):
        raise AdapterError(f"{path}: not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise AdapterError(f"{path}: {st.st_size} bytes, more than an adapter config can be ({max_bytes})")
    return real


def _number(value, what: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(f"{path}: {what} must be a finite number, not {value!r:.60}")
    return float(value)


def _integer(value, what: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapterError(f"{path}: {what} must be an integer, not {value!r:.60}")
    return value


def read_adapter(path: str | Path) -> "Adapter":
    """Read and check an mlx-lm adapter folder: its config and its tensors' header (no tensor is read).
    Raises AdapterError naming the file and the key at fault."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder" if not folder.exists() else
                           f"{folder}: not a folder (an mlx-lm adapter folder has {CONFIG_FILE} and {WEIGHTS_FILE})")
    config_path = _inside(folder, CONFIG_FILE, _MAX_CONFIG_BYTES)
    cfg_name = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_bytes())
    except RecursionError:
        raise AdapterError(f"{cfg_name}: JSON nested too deeply") from None
    except (ValueError, OSError) as e:
        raise AdapterError(f"{cfg_name}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_name}: not a JSON object")
    kind = config.get("fine_tune_type", "lora")
    if kind == "full":
        raise AdapterError(f"{cfg_name}: fine_tune_type 'full' holds whole weights, not an adapter: "
                           "not supported (load the fine-tuned model itself)")
    if kind not in _LEAVES:
        raise AdapterError(f"{cfg_name}: unknown fine_tune_type {kind!r:.60} (lora or dora)")
    if "num_layers" not in config:
        raise AdapterError(f"{cfg_name}: num_layers is missing")
    num_layers = _integer(config["num_layers"], "num_layers", cfg_name)
    params = config.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapterError(f"{cfg_name}: lora_parameters must be an object, not {params!r:.60}")
    rank = _integer(params.get("rank"), "lora_parameters.rank", cfg_name)
    if rank < 1:
        raise AdapterError(f"{cfg_name}: lora_parameters.rank must be at least 1, not {rank}")
    if "scale" in params:
        scale = _number(params["scale"], "lora_parameters.scale", cfg_name)
    elif "alpha" in params:  # PEFT's convention; mlx-lm writes scale
        scale = _number(params["alpha"], "lora_parameters.alpha", cfg_name) / rank
    else:
        raise AdapterError(f"{cfg_name}: lora_parameters.scale is missing")
    dropout = _number(params.get("dropout", 0.0), "lora_parameters.dropout", cfg_name)
    if not 0 <= dropout < 1:
        raise AdapterError(f"{cfg_name}: lora_parameters.dropout must be in [0, 1), not {dropout}")
    keys = params.get("keys")
    if keys is not None:
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise AdapterError(f"{cfg_name}: lora_parameters.keys must be a list of module names, not {keys!r:.80}")
        keys = tuple(keys)

    weights_path = _inside(folder, WEIGHTS_FILE)
    header = check_safetensors(weights_path, error=AdapterError)
    leaves = _LEAVES[kind]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        module, _, leaf = name.rpartition(".")
        if not module or leaf not in leaves:
            raise AdapterError(f"{folder / WEIGHTS_FILE}: {name!r:.80} is not a {kind} tensor "
                               f"(<module>.{', <module>.'.join(leaves)})")
        if entry["dtype"] not in _FLOAT_DTYPES:
            raise AdapterError(f"{folder / WEIGHTS_FILE}: {name!r:.80} is {entry['dtype']}, not a float tensor")
        tensors[name] = (tuple(entry["shape"]), entry["dtype"])
    adapter = Adapter(folder, kind, num_layers, rank, scale, keys, tensors)
    for module, leaf_shapes in adapter.modules.items():
        missing = [leaf for leaf in ("lora_a", "lora_b") if leaf not in leaf_shapes]
        if missing:
            raise AdapterError(f"{folder / WEIGHTS_FILE}: {module}.{missing[0]} is missing "
                               f"({module} has {', '.join(sorted(leaf_shapes))})")
    return adapter


def _in_out(linear: nn.Module) -> tuple[int, int]:
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


def targets(adapter: Adapter, model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> linear the adapter's config points at in `model` (mlx-lm's choice of modules)."""
    linear = (nn.Linear, nn.QuantizedLinear)
    layers = model.layers
    chosen = range(len(layers))[-max(adapter.num_layers, 0):]  # mlx-lm: layers[-max(num_layers, 0):]
    prefix = next(name for name, m in model.named_modules() if m is layers[0]).rpartition(".")[0]
    found: dict[str, nn.Module] = {}
    cfg = adapter.path / CONFIG_FILE
    if adapter.keys is None:
        for i in chosen:
            for name, m in layers[i].named_modules():
                if isinstance(m, linear):
                    found[f"{prefix}.{i}.{name}"] = m
        return found
    top = dict(model.named_modules())
    per_layer = [dict(layers[i].named_modules()) for i in chosen]
    first = dict(layers[0].named_modules())
    for key in dict.fromkeys(adapter.keys):  # (each once, however often listed)
        inner = first.get(key)
        module = inner if inner is not None else top.get(key)
        if module is None:
            raise AdapterError(f"{cfg}: lora_parameters.keys names {key!r:.80}, which the model lacks")
        if not isinstance(module, linear):
            raise AdapterError(f"{cfg}: lora_parameters.keys names {key!r:.80}, a {type(module).__name__}: "
                               "only linear layers take an adapter here")
        if inner is None:
            found[key] = module
            continue
        for i, modules in zip(chosen, per_layer):
            found[f"{prefix}.{i}.{key}"] = modules[key]
    return found


def check_against(adapter: Adapter, modules: dict[str, tuple[int, int]]) -> None:
    """Raise AdapterError unless every tensor belongs to a targeted module (path -> (in, out)) and fits it."""
    file = adapter.path / WEIGHTS_FILE
    for module, leaves in adapter.modules.items():
        if module not in modules:
            raise AdapterError(f"{file}: {module}.{next(iter(leaves))} names a module the model lacks or "
                               f"the adapter's config does not adapt (num_layers {adapter.num_layers}, "
                               f"keys {str(list(adapter.keys))[:120] if adapter.keys is not None else 'unset'})")
        in_dims, out_dims = modules[module]
        want = {"lora_a": (in_dims, adapter.rank), "lora_b": (adapter.rank, out_dims), "m": (out_dims,)}
        for leaf, shape in leaves.items():
            if shape != want[leaf]:
                raise AdapterError(f"{file}: {module}.{leaf} has shape {list(shape)}; the model's {module} "
                                   f"({in_dims} -> {out_dims}) at rank {adapter.rank} needs {list(want[leaf])}")


def check_fits(adapter: Adapter, config: dict) -> None:
    """Raise AdapterError unless `adapter` fits a model of Hugging Face `config` (no weight is read)."""
    from .model import Model, ModelArgs

    model = Model(ModelArgs.from_dict(config))  # lazily initialised: only shapes are read
    check_against(adapter, {name: _in_out(m) for name, m in targets(adapter, model).items()})


def check_adapter(adapter_path: str | Path, model_path: Path) -> Adapter:
    """The adapter folder, checked against the model at `model_path` (`resolve.resolve_model`'s) from its
    config and headers alone: a server refuses a bad one before it starts."""
    from .checkpoints import read_checkpoint
    from .vision.loading import mllama_config

    adapter = read_adapter(adapter_path)
    if mllama_config(model_path) is not None:
        raise AdapterError(f"{model_path}: adapters apply to Llama 3 text models, not Llama 3.2 Vision")
    check_fits(adapter, read_checkpoint(model_path).config)
    return adapter


def load_tensors(adapter: Adapter) -> dict[str, mx.array]:
    """The adapter's tensors (checked: only after `check_against`), all finite, or AdapterError."""
    file = adapter.path / WEIGHTS_FILE
    try:
        tensors = mx.load(str(_inside(adapter.path, WEIGHTS_FILE)))
    except (ValueError, RuntimeError, OSError) as e:
        raise AdapterError(f"{file}: cannot read: {e}") from None
    if {n: tuple(t.shape) for n, t in tensors.items()} != {n: shape for n, (shape, _) in adapter.tensors.items()}:
        raise AdapterError(f"{file}: changed while being read")
    for name, t in tensors.items():
        if not mx.all(mx.isfinite(t)).item():
            raise AdapterError(f"{file}: {name} holds NaN or infinite values")
    return tensors


class LoRALinear(nn.Module):
    """A linear (plain or quantized) plus mlx-lm's low-rank update: base(x) + scale * (x @ a) @ b."""

    def __init__(self, linear: nn.Module, lora_a: mx.array, lora_b: mx.array, scale: float):
        super().__init__()
        self.linear, self.lora_a, self.lora_b, self.scale = linear, lora_a, lora_b, scale

    def delta(self) -> mx.array:
        """The update to the weight, [out, in], in the adapter's dtype."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def __call__(self, x: mx.array) -> mx.array:
        z = (x @ self.lora_a) @ self.lora_b
        return self.linear(x) + (self.scale * z).astype(x.dtype)


class DoRALinear(LoRALinear):
    """mlx-lm's DoRA: the LoRA output (without bias) times m / ||W + delta|| per output row, plus the bias."""

    def __init__(self, linear: nn.Module, lora_a: mx.array, lora_b: mx.array, scale: float,
                 m: Optional[mx.array]):
        super().__init__(linear, lora_a, lora_b, scale)
        w = _dense(linear)
        if m is None:  # as mlx-lm, whose DoRA layer starts from the base weight's row norms
            m = mx.linalg.norm(w.astype(mx.float32), axis=1)
        self.m = m
        # Weights are fixed here (no training): the row gains are computed once, not per call.
        self._gain = m / mx.linalg.norm(w + self.delta(), axis=1)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        if "bias" in self.linear:
            y = y - self.linear.bias
        out = self._gain.astype(x.dtype) * (y + (self.scale * ((x @ self.lora_a) @ self.lora_b)).astype(x.dtype))
        return out + self.linear.bias if "bias" in self.linear else out


def _dense(linear: nn.Module) -> mx.array:
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.get("biases"), group_size=linear.group_size,
                             bits=linear.bits, mode=getattr(linear, "mode", "affine"))
    return linear.weight


def apply_adapter(model: nn.Module, adapter: Adapter | str | Path) -> nn.Module:
    """Wrap the linears `adapter` adapts (those it has tensors for) in `LoRALinear`/`DoRALinear`, in
    place; returns the model. Everything is checked before a tensor is read: AdapterError otherwise."""
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    found = targets(adapter, model)
    check_against(adapter, {name: _in_out(m) for name, m in found.items()})
    tensors = load_tensors(adapter)
    wrapped = []
    for module, leaves in adapter.modules.items():
        base = found[module]
        a, b = tensors[f"{module}.lora_a"], tensors[f"{module}.lora_b"]
        if adapter.kind == "dora":
            layer = DoRALinear(base, a, b, adapter.scale, tensors.get(f"{module}.m"))
        else:
            layer = LoRALinear(base, a, b, adapter.scale)
        wrapped.append((module, layer))
    digest = hashlib.sha256(json.dumps([adapter.kind, adapter.rank, adapter.scale]).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(memoryview(mx.contiguous(tensors[name].astype(mx.float32))).cast("B"))
    # Saved prompt caches name the model they belong to (`cache.model_fingerprint`): an adapted one is another.
    model.adapter_fingerprint = digest.hexdigest()[:32]
    if wrapped:
        model.update_modules(tree_unflatten(wrapped))
        mx.eval([layer.parameters() for _, layer in wrapped if isinstance(layer, DoRALinear)],
                [layer._gain for _, layer in wrapped if isinstance(layer, DoRALinear)])
    return model


def _fused_weight(kind: str, w: mx.array, delta: mx.array, m: Optional[mx.array]) -> mx.array:
    """The adapted weight, with mlx_lm.fuse's arithmetic (in the weight's dtype, so that a re-quantized
    weight gets the codes mlx-lm's does): W + delta, DoRA's rows rescaled to m."""
    fused = w + delta.astype(w.dtype)
    if kind == "dora":
        fused = (m / mx.linalg.norm(fused, axis=1))[:, None] * fused
    return fused


def fuse(model: nn.Module, *, dequantize: bool = False) -> nn.Module:
    """Fold every adapted linear of `model` into its weight, in place, as `mlx_lm.fuse` does: a
    quantized base is dequantized, updated and quantized again with its own bits and group size
    (floats in the model's dtype with `dequantize`). Returns the model."""
    fused = []
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        base = module.linear
        w = _dense(base)
        m = module.m if isinstance(module, DoRALinear) else None
        linear = nn.Linear(1, 1, bias="bias" in base)
        linear.weight = _fused_weight("dora" if m is not None else "lora", w, module.delta(), m).astype(w.dtype)
        if "bias" in base:
            linear.bias = base.bias
        if isinstance(base, nn.QuantizedLinear) and not dequantize:
            linear = nn.QuantizedLinear.from_linear(linear, base.group_size, base.bits,
                                                    mode=getattr(base, "mode", "affine"))
        fused.append((name, linear))
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def weight_updater(adapter: Adapter, config: dict) -> tuple[set[str], Callable[[str, mx.array], mx.array]]:
    """For a conversion: (the modules whose weights change, update(module, float weight) -> fused weight),
    for a model of Hugging Face `config`. Checked against the model's shapes first."""
    check_fits(adapter, config)
    tensors = load_tensors(adapter)
    changed = set(adapter.modules)

    def update(module: str, w: mx.array) -> mx.array:
        a, b = tensors[f"{module}.lora_a"], tensors[f"{module}.lora_b"]
        delta = (adapter.scale * b.T) @ a.T
        m = tensors.get(f"{module}.m")
        if adapter.kind == "dora" and m is None:
            m = mx.linalg.norm(w.astype(mx.float32), axis=1)
        return _fused_weight(adapter.kind, w, delta, m)

    return changed, update
