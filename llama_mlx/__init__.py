"""llama-mlx: Meta's Llama 3 family on Apple silicon with MLX.

    model, tokenizer = llama_mlx.load()          # the default model, or a path / name
    print(llama_mlx.generate(model, tokenizer, "Why is the sky blue?"))
"""

from .batch import BatchEngine, BatchResult, batch_generate
from .cache import PromptCache
from .chat import ChatSession
from .embed import embed
from .errors import LlamaMLXError
from .generate import GenerationResponse, generate, generate_step, stream_generate
from .sample import SamplingParams, make_logits_processors, make_sampler

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


def __getattr__(name):
    # Loading and conversion pull in the checkpoint readers: only import them when asked.
    if name == "load":
        from .loading import load

        return load
    if name == "convert":
        from .convert import convert

        return convert
    raise AttributeError(f"module 'llama_mlx' has no attribute {name!r}")
