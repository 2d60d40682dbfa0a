"""llama-mlx: Meta's Llama 3 family on Apple silicon with MLX.

    model, tokenizer = llama_mlx.load()          # the default model, or a path / name
    print(llama_mlx.generate(model, tokenizer, "Why is the sky blue?"))
"""

import importlib
import sys
import types

__version__ = "0.1.0"

__all__ = [
    "BatchEngine",
    "BatchResult",
    "ChatSession",
    "GenerationResponse",
    "LlamaMLXError",
    "PromptCache",
    "SamplingParams",
    "batch_generate",
    "convert",
    "embed",
    "generate",
    "generate_step",
    "load",
    "make_logits_processors",
    "make_sampler",
    "stream_generate",
]

# Every public name is imported on first use (PEP 562): each CLI process would otherwise pay
# for MLX, numpy, jinja2 and the model code (~0.4 s) before parsing its arguments.
_SOURCES = {
    "BatchEngine": "batch",
    "BatchResult": "batch",
    "batch_generate": "batch",
    "PromptCache": "cache",
    "ChatSession": "chat",
    "embed": "embed",
    "LlamaMLXError": "errors",
    "GenerationResponse": "generate",
    "generate": "generate",
    "generate_step": "generate",
    "stream_generate": "generate",
    "SamplingParams": "sample",
    "make_logits_processors": "sample",
    "make_sampler": "sample",
    "load": "loading",
    "convert": "convert",
}


def __getattr__(name):
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'llama_mlx' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{source}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    # Importing a submodule binds it on its package; `generate` and `embed` name both a submodule and
    # its function, and were imported eagerly: the package's name stays the function, as it was then.
    # (`convert` was lazy already: its submodule, once imported, is what the name gives, as before.)
    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and name in ("generate", "embed"):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
