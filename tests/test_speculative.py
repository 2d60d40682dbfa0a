"""Speculative decoding: greedy outputs equal plain greedy decoding token for token on the real
SmolLM2 (itself, an 8-bit requantized copy and prompt lookup as drafts); sampled outputs keep the
target's distribution (a bound derived below); caches stay consistent (on a tiny random model);
mismatched drafts refused."""

import math
import types
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import assets
import llama_mlx
import llama_mlx.speculative as spec
from llama_mlx.cache import PromptCache
from llama_mlx.errors import DraftModelError, LlamaMLXError, SpeculativeError
from llama_mlx.generate import generate_step, stream_generate
from llama_mlx.sample import make_sampler
from llama_mlx.speculative import lookup_draft, speculative_generate_step

SMOLLM2 = Path(__file__).resolve().parent.parent / "weights" / "SmolLM2-135M-Instruct"
BRIEF = {"role": "system", "content": "Be brief."}  # shorter than SmolLM2's default system prompt: less to prefill
CHAT = [BRIEF, {"role": "user", "content": "Give three short tips for writing clear emails."}]
CODE = "def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n"
COPY = [BRIEF, {"role": "user", "content": "Rewrite this Python code, renaming the functions to rect_area and "
                                           "rect_perimeter and changing nothing else:\n\n" + CODE}]


@pytest.fixture(scope="module")
def smollm2():
    return llama_mlx.load(SMOLLM2 if (SMOLLM2 / "config.json").is_file() else assets.SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def draft8(smollm2, tmp_path_factory):
    """SmolLM2 dequantized and requantized to 8 bits (group 64): a different model, the same tokenizer."""
    from llama_mlx.convert import convert

    src = SMOLLM2 if (SMOLLM2 / "config.json").is_file() else assets.SMOLLM2_GGUF
    dst = tmp_path_factory.mktemp("draft") / "smollm2-8bit"
    convert(src, dst, quantize=True, bits=8, group_size=64, requantize=True)
    return llama_mlx.load(dst)


def tokens_of(model, tokenizer, prompt, n, **kw):
    rs = list(stream_generate(model, tokenizer, prompt, n, **kw))
    return [r.token for r in rs], rs[-1]


@pytest.fixture(scope="module")
def plain(smollm2):
    model, tok = smollm2
    return {name: tokens_of(model, tok, p, n)[0] for name, p, n in (("chat", CHAT, 12), ("copy", COPY, 20))}


def test_same_model_draft_equals_plain_greedy(smollm2, plain):
    model, tok = smollm2
    out, last = tokens_of(model, tok, CHAT, 12, draft_model=model, draft_tokenizer=tok, num_draft_tokens=3,
                          adaptive=False)
    assert out == plain["chat"]
    # Its own draft agrees with itself: nearly every draft is accepted (so speculation really ran).
    assert last.draft_tokens >= 6 and last.accepted_tokens >= 0.9 * last.draft_tokens


def test_8bit_draft_equals_plain_greedy(smollm2, draft8, plain):
    model, tok = smollm2
    out, last = tokens_of(model, tok, CHAT, 12, draft_model=draft8[0], draft_tokenizer=draft8[1], num_draft_tokens=4,
                          adaptive=False)
    assert out == plain["chat"]
    assert last.draft_tokens > 0 and 0 < last.accepted_tokens <= last.draft_tokens


def test_prompt_lookup_equals_plain_greedy_on_a_copy_heavy_prompt(smollm2, plain):
    model, tok = smollm2
    out, last = tokens_of(model, tok, COPY, 20, prompt_lookup=3, num_draft_tokens=4, adaptive=False)
    assert out == plain["copy"]
    assert last.accepted_tokens >= 10  # the answer copies the code: most drafts hold


@pytest.fixture(scope="module")
def meta_tiny(tiny_meta_checkpoint):
    """The tiny random model with Meta's tokenizer and chat format: for the caches' bookkeeping, where
    the model's text does not matter."""
    return llama_mlx.load(tiny_meta_checkpoint)


def test_prompt_cache_stays_consistent_across_turns(meta_tiny):
    model, tok = meta_tiny
    follow = [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Now one more tip, briefly."}]

    def two_turns(**kw):
        pc = PromptCache(model)
        dpc = PromptCache(model) if "draft_model" in kw else None
        first = [r.token for r in stream_generate(model, tok, CHAT, 12, prompt_cache=pc,
                                                 **({"draft_cache": dpc} if dpc else {}), **kw)]
        messages = CHAT + [{"role": "assistant", "content": tok.decode(first)}] + follow[1:]
        second = [r.token for r in stream_generate(model, tok, messages, 12, prompt_cache=pc,
                                                  **({"draft_cache": dpc} if dpc else {}), **kw)]
        return first, second, pc, dpc

    want = two_turns()[:2]
    for kw in ({"draft_model": model, "draft_tokenizer": tok}, {"prompt_lookup": 2}):
        first, second, pc, dpc = two_turns(**kw)
        assert (first, second) == want
        for cache in [c for c in (pc, dpc) if c is not None]:
            assert cache.offset == len(cache.tokens)
            # What the cache holds is what a fresh prefill of its tokens gives: no rejected draft left.
            fresh = PromptCache(model)
            model(mx.array([cache.tokens]), fresh.cache)
            probe = mx.array([[tok.encode("Hi")[0]]])
            np.testing.assert_allclose(np.array(model(probe, cache.cache)), np.array(model(probe, fresh.cache)),
                                       atol=1e-3)


def test_closing_mid_round_leaves_only_handed_out_tokens_in_the_caches(meta_tiny):
    model, tok = meta_tiny
    prompt = tok.apply_chat_template(CHAT)
    want = [t for t, _ in generate_step(mx.array(prompt), model, max_tokens=8)]
    for take in (2, 5):
        cache, dcache = PromptCache(model).cache, PromptCache(model).cache
        steps = speculative_generate_step(mx.array(prompt), model, draft_model=model, num_draft_tokens=4,
                                          max_tokens=20, prompt_cache=cache, draft_cache=dcache, adaptive=False)
        got = [next(steps).token for _ in range(take)]
        steps.close()
        assert got == want[:take]
        for c in (cache, dcache):
            assert c[0].offset <= len(prompt) + take
        # Carrying on from what the target cache holds gives plain greedy's next tokens.
        held = (prompt + got)[: cache[0].offset]
        if len(held) == len(prompt) + take:  # it holds every token: step back one to carry on from it
            for c in cache:
                c.trim(1)
            held = held[:-1]
        rest = [t for t, _ in generate_step(mx.array((prompt + got)[len(held):]), model, max_tokens=8 - take,
                                            prompt_cache=cache)]
        assert got + rest == want


def test_lookup_draft_takes_the_most_recent_longest_match():
    # Last 3-gram (1, 2, 3) occurs at 0 and 5; the later one is followed by 9, 9.
    seq = [1, 2, 3, 4, 0, 1, 2, 3, 9, 9, 7, 1, 2, 3]
    assert lookup_draft(seq, 3, 2) == [9, 9]
    assert lookup_draft([5, 6, 7, 8, 6], 3, 4) == [7, 8, 6]  # falls back to the 1-gram (6)
    assert lookup_draft([1, 2, 3], 3, 4) == []


# --- the accept/reject rule, statistically ---------------------------------------------------


class Fixed:
    """A stand-in "model" whose next-token logits are `logits` whatever the context: then a
    correct rule makes every generated token an independent draw from the same distribution."""

    def __init__(self, logits):
        self.logits = mx.array(np.asarray(logits, np.float32))
        self.args = types.SimpleNamespace(vocab_size=len(logits), max_position_embeddings=1 << 30)
        self.layers = [None]

    def __call__(self, tokens, cache=None, mask=None):
        B, L = tokens.shape
        if cache is not None:  # keeps the cache's offset honest, so trims are exercised
            z = mx.zeros((B, 1, L, 1))
            cache[0].update_and_fetch(z, z)
        return mx.broadcast_to(self.logits, (B, L, self.logits.size))


V = 6
N = 1500
EPS = 0.08  # N eps^2 sets the bound below: 1500 draws at 0.08 bound more tightly than 12000 at 0.03
TARGET = np.log([0.30, 0.25, 0.2, 0.12, 0.08, 0.05])
DRAFT = np.log([0.05, 0.1, 0.15, 0.2, 0.25, 0.25])
TEMP, TOP_K = 0.8, 5


def expected_p():
    """What plain sampling with make_sampler(TEMP, top_k=TOP_K) draws from, by the definitions."""
    lp = TARGET - np.log(np.exp(TARGET).sum())
    keep = lp >= np.sort(lp)[-TOP_K]
    z = np.where(keep, np.exp(lp / TEMP), 0.0)
    return z / z.sum()


def tv(counts, p):
    return 0.5 * np.abs(counts / counts.sum() - p).sum()


def bound(categories, n, eps):
    return 2.0**categories * math.exp(-2 * n * eps**2)


def sampled_tokens(n, seed, **kw):
    # Drafting every round (adaptive=False): the rule judges N drafts, whatever they cost here.
    gen = speculative_generate_step(mx.array([0]), Fixed(TARGET), max_tokens=n + 1, num_draft_tokens=3,
                                    sampler=make_sampler(TEMP, top_k=TOP_K, seed=seed), adaptive=False, **kw)
    return np.array([t.token for t in gen][1:])  # the first token is plain sampling's, not the rule's


def always_accept(p, q, drafts, next_key=lambda: None):
    k = drafts.size
    return mx.array(k), mx.random.categorical(mx.log(p[k]), key=next_key())


RIGHT_RULE = spec.accept_drafts


def reject_to_p(p, q, drafts, next_key=lambda: None):
    # The right acceptance test, but a rejection redrawn from p instead of norm(max(0, p - q)).
    n, _ = RIGHT_RULE(p, q, drafts, next_key)
    return n, mx.random.categorical(mx.log(p[n]), key=next_key())


def test_speculative_sampling_keeps_the_target_distribution(monkeypatch):
    """With `Fixed` models the correct rule makes the N tokens after the first i.i.d. draws from
    p, the distribution plain sampling uses (filters and temperature applied). For any subset A of
    the V tokens, Hoeffding gives P(p_hat(A) - p(A) >= eps) <= exp(-2 N eps^2); the total-variation
    distance is max over A of p_hat(A) - p(A), so a union bound over the 2^V subsets gives
    P(TV(p_hat, p) >= eps) <= 2^V exp(-2 N eps^2). V = 6, N = 1500, eps = 0.08: 64 e^-19.2 =
    2.9e-7 < 1e-6, the chance this test fails on correct code. Both wrong rules below shift the
    distribution by at least 2 eps (by about 0.45 and 0.16; always accepting outputs q's transform
    for 3 tokens of 4), so the same bound, on the distance to the wrong rule's distribution, makes
    the chance a wrong rule passes under 2.9e-7 too."""
    assert bound(V, N, EPS) < 1e-6
    p = expected_p()
    draft = Fixed(DRAFT)
    counts = np.bincount(sampled_tokens(N, 1, draft_model=draft), minlength=V)
    assert tv(counts, p) < EPS, (counts / N, p)
    for wrong in (always_accept, reject_to_p):
        monkeypatch.setattr(spec, "accept_drafts", wrong)
        counts = np.bincount(sampled_tokens(N, 2, draft_model=draft), minlength=V)
        assert tv(counts, p) > EPS, wrong.__name__
    monkeypatch.undo()


class PositionedStep:
    """A step that takes its position on the device (as CUDA's fused ones do), over a `Fixed` model:
    speculative rounds are then queued, each before the previous one is read."""

    positioned = True

    def __init__(self, model, cache, every):
        self.model, self.cache, self.every = model, cache, every

    def __call__(self, tokens):
        logits = self.model(tokens, self.cache)
        return logits if self.every else logits[:, -1, :]

    def at(self, tokens, position):
        return self(tokens)


def test_queued_rounds_sampling_keeps_the_target_distribution(monkeypatch):
    """The previous test's bound (V = 6, N = 1500, eps = 0.08) on the queued rounds' sampling
    (draft tokens drawn and accepted on the device, read a round late); both wrong rules fail it."""
    monkeypatch.setattr(spec.backends, "decode_step", lambda m, c: PositionedStep(m, c, False))
    monkeypatch.setattr(spec.backends, "verify_step", lambda m, c: PositionedStep(m, c, True))
    monkeypatch.setattr(spec.backends, "read_ahead", lambda: 1)  # as the CUDA row reads
    pushed = []
    push = spec._Rounds.push
    monkeypatch.setattr(spec._Rounds, "push", lambda self, *a: pushed.append(1) or push(self, *a))
    p, draft = expected_p(), Fixed(DRAFT)
    counts = np.bincount(sampled_tokens(N, 5, draft_model=draft), minlength=V)
    assert len(pushed) > N // 4 and tv(counts, p) < EPS, (counts / N, p)
    for wrong in (always_accept, reject_to_p):
        monkeypatch.setattr(spec, "accept_drafts", wrong)
        counts = np.bincount(sampled_tokens(N, 6, draft_model=draft), minlength=V)
        assert tv(counts, p) > EPS, wrong.__name__


def test_prompt_lookup_sampling_keeps_the_target_distribution(monkeypatch):
    """Prompt lookup's drafts are copies of earlier tokens (q one-hot), so a wrong rule may keep
    the marginal and break independence instead: the test takes disjoint pairs of consecutive
    tokens, i.i.d. draws from p x p under the correct rule. Top-k keeps S = 5 tokens, and the rule
    never emits a token outside S (an accepted draft has p(d) > u q(d) >= 0; max(0, p - q) <= p),
    so the empirical and true pair distributions both live on S x S, 25 categories, and the
    union bound runs over its 2^25 subsets: P(TV >= eps) <= 2^25 exp(-2 P eps^2); P = 3300
    pairs, eps = 0.07: 3.4e7 e^-32.3 = 3.1e-7 < 1e-6. Always accepting copies the text's own
    continuation and fails it (a distance of about 0.11)."""
    pairs, eps = 3300, 0.07
    assert bound(TOP_K * TOP_K, pairs, eps) < 1e-6
    p = expected_p()
    pp = np.outer(p, p).ravel()

    def pair_counts(seed):
        t = sampled_tokens(2 * pairs, seed, prompt_lookup=2)
        return np.bincount(t[0::2] * V + t[1::2], minlength=V * V)

    counts = pair_counts(3)
    assert tv(counts, pp) < eps
    monkeypatch.setattr(spec, "accept_drafts", always_accept)
    assert tv(pair_counts(4), pp) > eps
    monkeypatch.undo()


def test_accept_drafts_follows_the_rule_on_certain_cases():
    p = mx.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    q = mx.array([[0.0, 1.0, 0.0]])
    n, t = spec.accept_drafts(p, q, mx.array([1]))
    assert int(n) == 1  # p(d) = q(d): always accepted
    p = mx.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    n, t = spec.accept_drafts(p, q, mx.array([1]))
    assert (int(n), int(t)) == (0, 2)  # p(d) = 0: rejected, and max(0, p - q) is all on token 2


# --- refusals --------------------------------------------------------------------------------


def test_a_draft_with_another_tokenizer_is_refused_in_one_line(smollm2):
    from llama_mlx.tokenizer import load_tokenizer

    model, tok = smollm2
    llama3 = load_tokenizer(assets.TOKENIZER_MODEL)
    with pytest.raises(DraftModelError) as e:
        list(stream_generate(model, tok, "Hi", 4, draft_model=model, draft_tokenizer=llama3))
    assert "\n" not in str(e.value) and "tokenizer" in str(e.value) and isinstance(e.value, LlamaMLXError)
    renamed = types.SimpleNamespace(**{k: getattr(tok, k) for k in ("vocab_size", "bos_id", "eos_id", "decode")},
                                    special_tokens={**tok.special_tokens, "<extra>": 7})
    with pytest.raises(DraftModelError, match="special tokens"):
        list(stream_generate(model, tok, "Hi", 4, draft_model=model, draft_tokenizer=renamed))
    with pytest.raises(DraftModelError, match="vocabulary has 6 tokens"):
        list(stream_generate(model, tok, "Hi", 4, draft_model=Fixed(TARGET)))


@pytest.mark.parametrize("kw, what", [
    ({}, "exactly one draft source"),
    ({"draft_model": "m", "prompt_lookup": 2}, "exactly one draft source"),
    ({"prompt_lookup": 2, "num_draft_tokens": 0}, "at least 1"),
    ({"prompt_lookup": 2, "max_kv_size": 64}, "rotating"),
    ({"prompt_lookup": 2, "sampler": lambda lp: mx.argmax(lp, axis=-1)}, "sampler's distribution"),
])
def test_unworkable_options_are_refused(kw, what):
    model = Fixed(TARGET)
    max_kv = kw.pop("max_kv_size", None)
    if kw.get("draft_model") == "m":
        kw["draft_model"] = model
    cache = None
    if max_kv:
        from llama_mlx.cache import make_prompt_cache

        cache = make_prompt_cache(1, max_kv_size=max_kv)
    with pytest.raises(SpeculativeError, match=what):
        list(speculative_generate_step(mx.array([0, 1]), model, prompt_cache=cache, **kw))


# --- logits processors, on a tiny random model -------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from oracles import TINY_META_PARAMS, tiny_random_model

    return tiny_random_model(dict(TINY_META_PARAMS, dim=128))


def test_greedy_with_logits_processors_equals_plain(tiny):
    from llama_mlx.sample import make_logits_processors

    prompt = mx.array([int(t) for t in np.random.default_rng(11).integers(0, 256, size=9)] * 3)
    procs = make_logits_processors(logit_bias={5: 2.0}, repetition_penalty=1.3)
    want = list(generate_step(prompt, tiny, max_tokens=40, logits_processors=procs))
    for kw in ({"draft_model": tiny}, {"prompt_lookup": 3}):
        got = list(speculative_generate_step(prompt, tiny, max_tokens=40, logits_processors=procs,
                                             num_draft_tokens=3, adaptive=False, **kw))
        assert [t.token for t in got] == [t for t, _ in want]
        if "draft_model" in kw:  # a random model copies nothing, so lookup's drafts fail: only equality there
            assert sum(t.from_draft for t in got) > 0
        for g, (_, lp) in zip(got, want):  # the log-probabilities handed out are plain decoding's too
            np.testing.assert_allclose(np.array(g.logprobs), np.array(lp), atol=1e-4)


# --- the adaptive draft length ------------------------------------------------------------------


@pytest.fixture(scope="module")
def stranger():
    """Another tiny random model on the same vocabulary: as a draft, it (almost) never agrees."""
    from oracles import TINY_META_PARAMS, tiny_random_model

    return tiny_random_model(dict(TINY_META_PARAMS, dim=128), seed=23)


def test_adaptive_greedy_equals_plain_greedy(tiny, stranger):
    """Whatever the controller picks (its own copy drafting, a stranger, lookup on text it does not
    copy), the tokens and log-probabilities are plain greedy decoding's."""
    prompt = mx.array([int(t) for t in np.random.default_rng(5).integers(0, 256, size=12)] * 2)
    want = list(generate_step(prompt, tiny, max_tokens=120))
    for kw in ({"draft_model": tiny}, {"draft_model": stranger}, {"prompt_lookup": 3}):
        got = list(speculative_generate_step(prompt, tiny, max_tokens=120, num_draft_tokens=4, **kw))
        assert [t.token for t in got] == [t for t, _ in want], kw
        assert got[-1].stats["rounds"] > 0
        for g, (_, lp) in zip(got, want):
            np.testing.assert_allclose(np.array(g.logprobs), np.array(lp), atol=1e-4)


def test_a_draft_model_catches_up_on_the_rounds_it_skipped(tiny, monkeypatch):
    """Drafting switched off and on (a fixed schedule in place of the controller's choice): the draft
    model runs the tokens it missed before drafting again, so the target as its own draft still has
    every draft accepted, and the tokens are plain greedy's."""
    schedule = iter([3, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 3, 0, 4] * 20)
    monkeypatch.setattr(spec._Adapt, "choose", lambda self, limit: min(next(schedule), limit))
    prompt = mx.array([int(t) for t in np.random.default_rng(6).integers(0, 256, size=10)])
    want = [t for t, _ in generate_step(prompt, tiny, max_tokens=60)]
    got = list(speculative_generate_step(prompt, tiny, draft_model=tiny, max_tokens=60, num_draft_tokens=4))
    assert [t.token for t in got] == want
    stats = got[-1].stats
    assert stats["drafted"] >= 20 and stats["accepted"] == stats["drafted"] and stats["rounds_off"] >= 10


def test_a_draft_that_never_agrees_is_switched_off_and_probed(tiny, stranger, monkeypatch):
    """A stranger's drafts fail: the controller stops drafting (plain steps) and probes now and then.
    The backend row's prior says a check costs little (as on GPUs), so drafting starts on and it is
    the measured acceptance that turns it off."""
    monkeypatch.setattr(spec.backends, "check_cost", lambda: 0.05)
    prompt = mx.array([int(t) for t in np.random.default_rng(7).integers(0, 256, size=16)])
    want = [t for t, _ in generate_step(prompt, tiny, max_tokens=200)]
    got = list(speculative_generate_step(prompt, tiny, draft_model=stranger, max_tokens=200, num_draft_tokens=3))
    assert [t.token for t in got] == want
    stats = got[-1].stats
    assert 0 < stats["drafted"] < 0.15 * 200  # drafting every round would propose ~3 a token
    assert stats["rounds_off"] > 0.8 * stats["rounds"]
    assert stats["k_max"] == 3  # it started on, at the most drafts
    assert got[-1].drafted > got[100].drafted  # and still probes, long after switching off
    assert stats["speedup"] is not None and stats["k"] == 0


class Cycle:
    """A stand-in model that continues a fixed cycle of 16 tokens (t -> t + 4 mod 64) whatever came
    before: a text holding the cycle is one prompt lookup copies from perfectly."""

    def __init__(self, vocab: int = 64):
        self.next = mx.array([(t + 4) % vocab for t in range(vocab)])
        self.args = types.SimpleNamespace(vocab_size=vocab, max_position_embeddings=1 << 30)
        self.layers = [None]
        self.vocab = vocab

    def __call__(self, tokens, cache=None, mask=None):
        B, L = tokens.shape
        if cache is not None:  # keeps the cache's offset honest, so trims are exercised
            z = mx.zeros((B, 1, L, 1))
            cache[0].update_and_fetch(z, z)
        return 8.0 * (mx.arange(self.vocab) == self.next[tokens][..., None]).astype(mx.float32)


def test_copy_heavy_text_drafts_the_most_a_round():
    """Every lookup draft holds: the controller drafts the most it may (k = 6) and most tokens come
    from drafts; the tokens are plain greedy's."""
    model = Cycle()
    prompt = mx.array([(1 + 4 * i) % 64 for i in range(40)])  # the cycle, two and a half times
    want = [t for t, _ in generate_step(prompt, model, max_tokens=200)]
    got = list(speculative_generate_step(prompt, model, prompt_lookup=3, max_tokens=200, num_draft_tokens=6))
    assert [t.token for t in got] == want
    stats = got[-1].stats
    assert stats["k_max"] == 6 and stats["acceptance"] > 0.9
    # (the CPU row's prior prices checks dearly: drafting starts off, and a probe or two turn it on)
    assert sum(t.from_draft for t in got) > 0.6 * len(got)
    assert stats["accepted"] == stats["drafted"] and stats["speedup"] > 1


def test_describe_says_acceptance_range_and_estimate():
    line = spec.describe({"drafted": 210, "accepted": 132, "rounds": 80, "rounds_off": 12, "k": 4, "k_min": 1,
                          "k_max": 4, "acceptance": 0.6, "speedup": 1.9})
    assert line == "speculative: 63% of 210 drafts accepted, k 1-4, off 12 of 80 rounds, 1.90x estimated"
    assert spec.describe({"drafted": 0, "accepted": 0, "rounds": 0, "rounds_off": 0, "k": 0, "k_min": 0,
                          "k_max": 0, "acceptance": 0.7, "speedup": None}) == "speculative: no drafts"


def test_chat_stats_carry_the_speculative_line():
    from llama_mlx.chat import Turn
    from llama_mlx.sequence import GenerationResponse
    from llama_mlx_cli.chat import stats_line

    stats = {"drafted": 40, "accepted": 30, "rounds": 30, "rounds_off": 5, "k": 3, "k_min": 2, "k_max": 4,
             "acceptance": 0.75, "speedup": 1.5}
    r = GenerationResponse("", 1, mx.zeros(4), 10, 100.0, 60, 20.0, 0.1, "stop", draft_tokens=40,
                           accepted_tokens=30, speculative=stats)
    line = stats_line(Turn(r, "x", 70, False), 2048)
    assert spec.describe(stats) in line and "drafted 40" not in line
