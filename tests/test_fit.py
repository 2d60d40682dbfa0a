"""Context sized to a memory budget (`llama_mlx.fit`): the context it picks is what real KV caches
of the model, filled by its own forward, take in the budget beside the weights."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from llama_mlx.cache import KVCache, QuantizedKVCache
from llama_mlx.errors import LlamaMLXError, MemoryFitError
from llama_mlx.fit import HEADROOM, fit_model
from oracles import TINY_META_PARAMS, tiny_random_model


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model(dict(TINY_META_PARAMS, dim=128))


@pytest.mark.parametrize("kv_bits", [None, 4])
def test_fitted_context_is_what_real_caches_take(tiny, kv_bits):
    """A budget for about 3,000 positions: the fitted context's caches (measured on 512 real
    positions) fit in what the weights and the headroom leave, 1% more would not; a budget the
    weights alone fill is a named error."""
    probe = [QuantizedKVCache(kv_bits, 32) if kv_bits else KVCache() for _ in tiny.layers]
    tiny(mx.array([[1] * 512]), probe)
    held = sum(a.nbytes for c in probe for a in (c.keys + c.values if kv_bits else (c.keys, c.values)))
    per_token = held / 512
    weights = sum(v.nbytes for _, v in tree_flatten(tiny.parameters()))
    budget = int((weights + 3000 * per_token) / (1 - HEADROOM))
    fit = fit_model(tiny, budget, kv_bits=kv_bits, kv_group_size=32)
    room = budget * (1 - HEADROOM) - weights
    assert fit.context * per_token <= room < fit.context * 1.01 * per_token
    assert fit.limited and fit.context < tiny.args.max_position_embeddings and "fits in memory" in fit.describe()
    assert fit_model(tiny, 1 << 40, kv_bits=kv_bits, kv_group_size=32).context == tiny.args.max_position_embeddings
    with pytest.raises(MemoryFitError) as err:
        fit_model(tiny, weights, kv_bits=kv_bits, kv_group_size=32)
    assert isinstance(err.value, LlamaMLXError) and "leave no room" in str(err.value)
