"""The runtimes the comparison measures: llama-mlx's own (from the library) and mlx-lm's.

`MlxLm` is measured exactly as `llama_mlx.benchmark.LlamaMLX` is: the same `Runtime` interface,
fed to the same `run_trial` / `curve_trial`. It needs mlx-lm (and transformers, which mlx-lm's
loader uses): the `bench` or `test` extra, never the library's runtime dependencies.
"""

from __future__ import annotations

import mlx.core as mx

from llama_mlx.benchmark import LlamaMLX, Runtime, device_summary

__all__ = ["RUNTIMES", "MlxLm", "get_runtime", "versions"]


class MlxLm(Runtime):
    name = "mlx-lm"

    def version(self) -> str:
        import mlx_lm

        return mlx_lm.__version__

    def prepare(self):
        import mlx_lm.generate  # noqa: F401
        import mlx_lm.models.cache  # noqa: F401
        import mlx_lm.models.llama  # noqa: F401
        import mlx_lm.tokenizer_utils  # noqa: F401
        import mlx_lm.utils  # noqa: F401
        from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    def load(self, path, dtype=None):
        import mlx_lm

        if dtype is not None:
            raise ValueError("mlx-lm loads weights in their stored dtype; write the folder in the dtype wanted")
        model, tokenizer = mlx_lm.load(str(path))  # lazy=False: weights evaluated before it returns
        mx.eval(model.parameters())
        return model, tokenizer

    def make_cache(self, model):
        from mlx_lm.models.cache import make_prompt_cache

        return make_prompt_cache(model)

    def steps(self, model, prompt, max_tokens, cache=None, prefill_step_size=None):
        from mlx_lm.generate import generate_step

        kwargs = {"prefill_step_size": prefill_step_size} if prefill_step_size else {}
        gen = generate_step(prompt, model, max_tokens=max_tokens, sampler=None, prompt_cache=cache, **kwargs)
        return (token for token, _ in gen)  # sampler None: mlx-lm's greedy argmax

    def synchronize(self) -> None:
        from mlx_lm.generate import generation_stream

        mx.synchronize(generation_stream)  # its decode runs ahead on a stream of its own
        mx.synchronize()


RUNTIMES = {LlamaMLX.name: LlamaMLX, MlxLm.name: MlxLm}


def get_runtime(name: str) -> Runtime:
    """A runtime by name ("llama-mlx" or "mlx-lm"), its modules imported."""
    try:
        runtime = RUNTIMES[name]()
    except KeyError:
        raise ValueError(f"unknown runtime {name!r}: choose {', '.join(RUNTIMES)}") from None
    runtime.prepare()
    return runtime


def versions() -> dict:
    """`llama_mlx.benchmark.device_summary()` with mlx-lm's version added."""
    import mlx_lm

    return {**device_summary(), "mlx_lm": mlx_lm.__version__}
