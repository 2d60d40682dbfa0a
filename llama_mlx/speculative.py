"""Speculative decoding: a cheap draft proposes K tokens, the target checks them in one forward.

Drafts come from a draft model that shares the target's tokenizer, or from prompt lookup: the
last n-gram of the text so far (n from `prompt_lookup` down to 1), found earlier in it, proposes
what followed it there. The target runs its last token and the K drafts as one forward of K + 1
positions (`backends.verify_step`), giving its distribution p_i at each; both caches are trimmed
back to the accepted tokens in the same step.

Which tokens come out (Leviathan et al. 2023; Chen et al. 2023). Let p_i be the distribution
plain sampling would draw position i from: the target's logits, the logits processors applied
(with the tokens before i as their history), log-softmax, then the sampler's own transforms
(top-k, top-p, min-p, temperature, in the sampler's order: `sampler.distribution`). q_i is the
draft's distribution built the same way from the draft's logits (prompt lookup: q_i = one-hot of
its proposal). Draft d_i ~ q_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the
first rejection the token is drawn from norm(max(0, p_i - q_i)) and the round ends; when all K
are accepted, one more token is drawn from p_{K+1}. Each token then has exactly distribution
p_i given the ones before it, as with plain sampling. With a one-hot q the rule accepts with
probability p_i(d_i) and redraws from p_i with d_i removed. Greedy (temperature 0) takes the
argmax of the processed log-probabilities at every position, as plain greedy decoding does: a
draft is kept while it equals that argmax, and the first that differs is replaced by it.

Queued rounds: where the backend's steps take their position as a device array (CUDA's fused
steps: `takes_position`), a draft model's rounds are queued on the device, each computed from the
previous one's device-side result (accepted count, next token, position) and queued before that
one is read, so the device never waits on the host between rounds; the caches run up to one round
ahead and are trimmed back as each round is read. Prompt lookup and logits processors, which need
the host's view of the text, keep the round-by-round loop.

Prompt lookup backs off: after a round whose drafts were all rejected it drafts nothing for 1,
then 2, 4, up to `LOOKUP_MAX_PAUSE` rounds (one-token steps, as plain decoding), and any accepted
draft resets the pause. A text that copies nothing then costs a few wasted checks, not one a
token (a K+1-token check costs up to K+1 one-token steps where decoding is compute-bound).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Generator, NamedTuple, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import backends
from .cache import RotatingKVCache, make_prompt_cache
from .errors import DraftModelError, SpeculativeError
from .sample import LogitsProcessor, Sampler, apply_processors, make_sampler

__all__ = ["LOOKUP_MAX_PAUSE", "SpeculativeToken", "accept_drafts", "check_draft", "lookup_draft", "speculative_generate_step"]


class SpeculativeToken(NamedTuple):
    """One token of `speculative_generate_step`.

    from_draft: a draft token the target accepted (else the target's own: first, correction, bonus).
    drafted: draft tokens proposed so far, this token's round included.
    """

    token: int
    logprobs: mx.array
    from_draft: bool
    drafted: int


def check_draft(model: nn.Module, tokenizer: Any, draft_model: nn.Module, draft_tokenizer: Any = None) -> None:
    """Raise `DraftModelError` unless the draft shares the target's vocabulary (and tokenizer, when
    both tokenizers are given): vocabulary sizes, special tokens, BOS/EOS, and the text of a
    spread sample of token ids are compared."""
    target_v, draft_v = model.args.vocab_size, draft_model.args.vocab_size
    if target_v != draft_v:
        raise DraftModelError(
            f"the draft model's vocabulary has {draft_v} tokens, the target's {target_v}: "
            "a draft must share the target's tokenizer"
        )
    if tokenizer is None or draft_tokenizer is None:
        return
    checks = [
        ("vocabulary size", tokenizer.vocab_size, draft_tokenizer.vocab_size),
        ("BOS id", tokenizer.bos_id, draft_tokenizer.bos_id),
        ("EOS id", tokenizer.eos_id, draft_tokenizer.eos_id),
        ("special tokens", dict(tokenizer.special_tokens), dict(draft_tokenizer.special_tokens)),
    ]
    size = min(tokenizer.vocab_size, draft_tokenizer.vocab_size)
    for i in np.unique(np.linspace(0, size - 1, 257).astype(int)).tolist():
        checks.append((f"token {i}", tokenizer.decode([i]), draft_tokenizer.decode([i])))
    for what, a, b in checks:
        if a != b:
            shown = "differ" if isinstance(a, dict) else f"{a!r} vs {b!r}"
            raise DraftModelError(f"the draft model does not share the target's tokenizer: {what}: {shown}")


def lookup_draft(tokens: Sequence[int], max_ngram: int, k: int) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the last n-gram of
    `tokens`, trying n = max_ngram down to 1; [] when none recurs."""
    seq = np.asarray(tokens, dtype=np.int64)
    L = seq.size
    for n in range(min(max_ngram, L - 1), 0, -1):
        tail = seq[L - n:]
        # Windows starting at 0 .. L-n-1: every earlier n-gram, whose continuation starts at s + n.
        windows = np.lib.stride_tricks.sliding_window_view(seq[: L - 1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return seq[start : start + k].tolist()
    return []


def _prefill(model: nn.Module, cache: list, prompt: mx.array, step_size: int, progress=None) -> mx.array:
    total = prompt.size
    while prompt.size > 1:
        n = min(step_size, prompt.size - 1)
        model(prompt[None, :n], cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[n:]
        if progress:
            progress(total - prompt.size, total)
        mx.clear_cache()
    return prompt


def _leading(accepted: mx.array) -> mx.array:
    """How many leading entries are true."""
    return mx.cumprod(accepted.astype(mx.int32)).sum()


def accept_drafts(p: mx.array, q: Optional[mx.array], drafts: mx.array, next_key=lambda: None):
    """The speculative-sampling rule: (how many drafts are accepted, the token after them).

    p: the target's probabilities [k + 1, vocab]; q: the draft's [k, vocab], None for one-hot
    drafts (prompt lookup); drafts: [k] token ids, each d_i drawn from q_i. d_i is accepted with
    probability min(1, p_i(d_i) / q_i(d_i)); the token after the accepted ones is drawn from
    norm(max(0, p_n - q_n)) at the first rejection n, or from p_k when all are accepted.
    `next_key()` gives the random keys (None: MLX's global generator).
    """
    k = drafts.size
    if q is None:
        q = (mx.arange(p.shape[-1])[None] == drafts[:, None]).astype(p.dtype)
    if k:
        idx = mx.arange(k)
        u = mx.random.uniform(shape=(k,), key=next_key())
        n = _leading(u * q[idx, drafts] < p[idx, drafts])  # u < p/q, with no division by a zero q
        residual = mx.concatenate([mx.maximum(p[:k] - q, 0), p[k:]])[n]
    else:
        n, residual = mx.array(0), p[0]
    # max(0, p - q) vanishes only where p == q, when rejection has probability 0: p then.
    residual = mx.where(residual.sum() > 0, residual, p[n])
    return n, mx.random.categorical(mx.log(residual), key=next_key())


LOOKUP_MAX_PAUSE = 8


def _positioned(*steps) -> bool:
    return all(getattr(s, "takes_position", False) for s in steps)


class _Round(NamedTuple):
    drafts: mx.array  # [k]
    n: mx.array  # drafts accepted
    new: mx.array  # the target's token after them
    logprobs: mx.array  # [k + 1, vocab], the target's
    after: tuple  # the next round's (token before, last token, its position), on the device


class _Rounds:
    """Speculative rounds queued on the device, each from the previous one's device-side result.

    A round's draft model runs [the token before the last, the last] at position pos - 1 (which
    fills in the last accepted draft after a round it got all right, else rewrites a position it
    holds), then k - 1 single tokens; the target checks [last, drafts] at pos. The rule is
    `speculative_generate_step`'s. Each cache advances k + 1 positions a round; the reader trims
    k - n once it reads n.
    """

    def __init__(self, dstep, verify, k: int, greedy: bool, sampler, distribution, next_key):
        self.dstep, self.verify, self.k = dstep, verify, k
        self.greedy, self.sampler, self.distribution, self.next_key = greedy, sampler, distribution, next_key
        self.rounds: deque[_Round] = deque()

    def push(self, before: mx.array, last: mx.array, pos: mx.array) -> None:
        inputs, ds, qs = mx.concatenate([before, last])[None], [], []
        logits = self.dstep.at(inputs, pos - 1)
        for i in range(self.k):
            if i:
                logits = self.dstep.at(ds[-1][None], pos + i)
            if self.greedy:
                d = self.sampler(logits)
            else:
                lq = self.distribution(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
                d = mx.random.categorical(lq, key=self.next_key())
                qs.append(lq)
            mx.async_eval(d)
            ds.append(d.astype(mx.uint32))
        drafts = mx.concatenate(ds)
        checked = mx.concatenate([last, drafts])
        logits = self.verify.at(checked[None], pos)[0]
        lps = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.greedy:
            best = self.sampler(lps)
            n = _leading(best[: self.k] == drafts)
            new = best[n]
        else:
            n, new = accept_drafts(mx.exp(self.distribution(lps)), mx.exp(mx.concatenate(qs)), drafts, self.next_key)
        new = new.reshape(1).astype(mx.uint32)
        r = _Round(drafts, n, new, lps, (checked[n].reshape(1), new, pos + n + 1))
        mx.async_eval(r.drafts, r.n, r.new, r.logprobs, *r.after)
        self.rounds.append(r)


def speculative_generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    draft_model: Optional[nn.Module] = None,
    num_draft_tokens: Optional[int] = None,
    prompt_lookup: Optional[int] = None,
    max_tokens: int = 256,
    sampler: Optional[Sampler] = None,
    logits_processors: Optional[Sequence[LogitsProcessor]] = None,
    prompt_cache: Optional[list] = None,
    draft_cache: Optional[list] = None,
    draft_prompt: Optional[mx.array] = None,
    context: Sequence[int] = (),
    prefill_step_size: int = 512,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    compile: Optional[bool] = None,
    prompt_progress=None,
) -> Generator[SpeculativeToken, None, None]:
    """Yield `SpeculativeToken`s (token, logprobs, from_draft, drafted) for up to `max_tokens` new
    tokens, drafting `num_draft_tokens` a round (default: the backend's, `backends.draft_tokens`)
    with `draft_model` or by `prompt_lookup` (the longest n-gram tried; exactly one of the two).

    `prompt` and `prompt_cache` are as in `generate_step`; `context` holds the tokens already in
    `prompt_cache` (prompt lookup searches them too). `draft_cache` is the draft model's cache and
    `draft_prompt` the tokens not yet in it (default `prompt`: both caches hold the same prefix).
    The tokens have the distribution plain sampling with `sampler` would give (see the module
    docstring); greedy ones are plain greedy decoding's. On close, both caches hold no token that
    was not handed out.
    """
    if (draft_model is None) == (prompt_lookup is None):
        raise SpeculativeError("speculative decoding needs exactly one draft source: a draft model or prompt lookup")
    if num_draft_tokens is None:
        num_draft_tokens = backends.draft_tokens(lookup=prompt_lookup is not None)
    if num_draft_tokens < 1:
        raise SpeculativeError(f"num_draft_tokens must be at least 1, got {num_draft_tokens}")
    if prompt_lookup is not None and prompt_lookup < 1:
        raise SpeculativeError(f"prompt lookup needs an n-gram size of at least 1, got {prompt_lookup}")
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("prompt must be a non-empty 1-D array of token ids")
    if draft_model is not None:
        check_draft(model, None, draft_model)
    sampler = sampler or make_sampler()
    greedy = getattr(sampler, "greedy", False)
    distribution = getattr(sampler, "distribution", None)
    if not greedy and distribution is None:
        raise SpeculativeError("speculative sampling needs the sampler's distribution: make the sampler with make_sampler")
    next_key = getattr(sampler, "next_key", lambda: None)
    processors = list(logits_processors or [])

    def new_cache(m):
        return make_prompt_cache(len(m.layers), kv_bits=kv_bits, kv_group_size=kv_group_size)

    cache = prompt_cache if prompt_cache is not None else new_cache(model)
    dcache = None
    if draft_model is not None:
        dcache = draft_cache if draft_cache is not None else new_cache(draft_model)
    for c in cache + (dcache or []):
        if isinstance(c, RotatingKVCache) or not c.is_trimmable():
            raise SpeculativeError("speculative decoding trims its caches: it cannot use a rotating KV cache (max_kv_size)")

    def process(logits: mx.array, history: Optional[mx.array]) -> mx.array:
        if processors:
            logits = apply_processors(processors, history, logits)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    draft_prompt = prompt if draft_prompt is None else draft_prompt
    start = cache[0].offset + prompt.size  # the target cache holds no more than start + handed out
    dstart = (dcache[0].offset + draft_prompt.size) if dcache else 0
    yielded = 0
    try:
        # First token exactly as generate_step makes it.
        step = backends.decode_step(model, cache, compile)
        last = _prefill(model, cache, prompt, prefill_step_size, prompt_progress)
        history = prompt if processors else None
        logprobs = process(step(last[None]), history)
        token = sampler(logprobs)
        if dcache is not None:
            dstep = backends.decode_step(draft_model, dcache, compile)
            pending = _prefill(draft_model, dcache, draft_prompt, prefill_step_size)  # tokens not yet in dcache
            pending = mx.concatenate([pending, token])
        if processors:
            history = mx.concatenate([history, token])
        verify = backends.verify_step(model, cache)
        drafted, next_clear = 0, 256
        if dcache is not None and not processors and dstart == start and _positioned(dstep, verify):
            # Queued rounds: everything a round needs stays on the device, so each is queued
            # before the previous one is read and the device never waits on the host.
            pos = mx.array([start], dtype=mx.int32)
            queue = _Rounds(dstep, verify, num_draft_tokens, greedy, sampler, distribution, next_key)
            if max_tokens > 1:
                queue.push(pending[:1], token.astype(mx.uint32), pos)
            token_id = token.item()
            yielded += 1
            yield SpeculativeToken(token_id, logprobs[0], False, 0)
            extent = start  # target positions below this hold checked tokens; the draft's, one fewer
            try:
                while queue.rounds:
                    if yielded + 1 < max_tokens:  # the round being read may not finish the answer
                        queue.push(*queue.rounds[-1].after)
                    r = queue.rounds.popleft()
                    n, new_id = r.n.item(), r.new.item()
                    accepted = r.drafts.tolist()[:n]
                    for c in cache + dcache:
                        c.trim(queue.k - n)
                    extent += n + 1
                    drafted += queue.k
                    for i, d in enumerate(accepted + [new_id]):
                        yielded += 1
                        yield SpeculativeToken(d, r.logprobs[i], i < n, drafted)
                        if yielded >= max_tokens:
                            break
                    if yielded >= max_tokens:
                        break
                    if yielded >= next_clear:
                        next_clear += 256
                        mx.clear_cache()
            finally:
                # Queued rounds ran ahead of what was read: keep only what was checked.
                for c in cache:
                    c.trim(max(0, c.offset - extent))
                for c in dcache:
                    c.trim(max(0, c.offset - (extent - 1)))
            return
        token_id = token.item()
        tokens = [int(t) for t in context] + prompt.tolist() + [token_id]
        pause, backoff = 0, 1  # prompt lookup: rounds left without drafting, the next pause
        yielded += 1
        yield SpeculativeToken(token_id, logprobs[0], False, 0)

        while yielded < max_tokens:
            k = min(num_draft_tokens, max_tokens - yielded - 1)
            qs = []
            if dcache is not None and k:
                inputs, dhistory, ds = pending[None], history, []
                for _ in range(k):
                    lq = process(dstep(inputs), dhistory)
                    if greedy:
                        d = sampler(lq)
                    else:
                        lq = distribution(lq)
                        d = mx.random.categorical(lq, key=next_key())
                        qs.append(lq)
                    mx.async_eval(d)
                    ds.append(d)
                    inputs = d[None]
                    if processors:
                        dhistory = mx.concatenate([dhistory, d])
                drafts = mx.concatenate(ds)
            else:
                found = lookup_draft(tokens, prompt_lookup, k) if k and not pause else []
                pause = max(0, pause - 1)
                drafts = mx.array(found, dtype=mx.uint32)
            k = drafts.size

            if k:
                checked = mx.concatenate([mx.array([token_id], dtype=mx.uint32), drafts.astype(mx.uint32)])
                logits = verify(checked[None])[0]
            else:  # nothing to check (no n-gram found): the backend's one-token step, as plain decoding runs
                logits = step(mx.array([[token_id]], dtype=mx.uint32))
            if processors:
                rows = [process(logits[i : i + 1], mx.concatenate([history, drafts[:i]])) for i in range(k + 1)]
                lps = mx.concatenate(rows)
            else:
                lps = process(logits, None)

            if greedy:
                best = sampler(lps)
                n = _leading(best[:k] == drafts) if k else mx.array(0)
                new = best[n]
            else:
                q = mx.exp(mx.concatenate(qs)) if qs else None
                n, new = accept_drafts(mx.exp(distribution(lps)), q, drafts, next_key)
            mx.eval(drafts, n, new)
            n, new_id = int(n), int(new)
            if dcache is None and k:
                pause, backoff = (backoff, min(2 * backoff, LOOKUP_MAX_PAUSE)) if n == 0 else (0, 1)
            accepted = drafts[:n].tolist()

            for c in cache:
                c.trim(k - n)
            if dcache is not None and k:
                # The draft ran pending + drafts[:k-1]; it keeps what was accepted.
                for c in dcache:
                    c.trim(k - 1 - min(n, k - 1))
                pending = mx.array(([drafts[k - 1].item()] if n == k else []) + [new_id], dtype=mx.uint32)
            elif dcache is not None:
                pending = mx.concatenate([pending, mx.array([new_id], dtype=mx.uint32)])
            if processors:
                history = mx.concatenate([history, mx.array(accepted + [new_id], dtype=history.dtype)])
            tokens += accepted + [new_id]
            drafted += k
            for i, d in enumerate(accepted):
                yielded += 1
                yield SpeculativeToken(d, lps[i], True, drafted)
            token_id = new_id
            yielded += 1
            yield SpeculativeToken(new_id, lps[n], False, drafted)
            if yielded >= next_clear:
                next_clear += 256
                mx.clear_cache()
    finally:
        # Drop whatever the caches hold beyond the tokens handed out (unchecked drafts on an
        # interrupt, accepted ones the caller never took).
        for c in cache:
            c.trim(max(0, c.offset - (start + yielded)))
        for c in dcache or []:
            c.trim(max(0, c.offset - (dstart + yielded)))
