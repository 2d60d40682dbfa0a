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

One loop runs every round (`_Rounds`): each is built from the previous one's device-side result
(accepted count, next token, position). Where the backend row reads ahead (`backends.read_ahead`:
CUDA's fused steps, which take their position as a device array: `positioned`), a draft model's
rounds are queued that many rounds before they are read, so the device never waits on the host
between rounds; the caches run ahead and are trimmed back as each round is read. Prompt lookup
and logits processors, which need the host's view of the text, read each round before the next.

How many drafts a round adapts online (`_Adapt`), for a draft model and prompt lookup alike: it
keeps decaying estimates of the acceptance per drafted token a, of the wall time of a plain
one-token step (rounds without drafts) and of a round's time with k drafts, and each round picks
the k in 0..K with the most expected tokens a second, (1 - a^(k+1)) / (1 - a) per round's time
(until a k is timed, the backend row's `check_cost` prices it). When no k beats plain decoding by
`MARGIN`, drafting is off: plain steps (queued ahead, as plain decoding's are), then one probe
round after 4, 16, then every `MAX_PAUSE` of them (4 again after a probe that says it pays),
so drafts that never match cost a few checks, not one a token, and drafting comes back when they
start to match. It only picks k: the tokens are the rule's above whatever it picks. A draft model
skips the rounds drafting is off and catches up on the tokens it missed in its next round.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Generator, NamedTuple, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import backends
from .cache import RotatingKVCache, make_prompt_cache
from .errors import DraftModelError, SpeculativeError
from .sample import LogitsProcessor, Sampler, apply_processors, log_softmax, make_sampler
from .sequence import Sampling, prefill

__all__ = ["MARGIN", "MAX_PAUSE", "SpeculativeToken", "accept_drafts", "check_draft", "describe", "lookup_draft",
           "speculative_generate_step"]


class SpeculativeToken(NamedTuple):
    """One token of `speculative_generate_step`.

    from_draft: a draft token the target accepted (else the target's own: first, correction, bonus).
    drafted: draft tokens proposed so far, this token's round included.
    stats: the adaptive controller's figures after this token's round (`_Adapt.stats`), or None.
    """

    token: int
    logprobs: mx.array
    from_draft: bool
    drafted: int
    stats: Optional[dict] = None


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


def describe(stats: dict) -> str:
    """One line from `SpeculativeToken.stats` / `GenerationResponse.speculative`, as
    "speculative: 63% of 210 drafts accepted, k 1-4, off 12 of 80 rounds, 1.90x estimated"."""
    drafted = stats["drafted"]
    parts = [f"{100 * stats['accepted'] / drafted:.0f}% of {drafted} drafts accepted" if drafted else "no drafts"]
    if drafted:
        lo, hi = stats["k_min"], stats["k_max"]
        parts.append(f"k {lo}-{hi}" if lo != hi else f"k {hi}")
    if stats["rounds_off"]:
        parts.append(f"off {stats['rounds_off']} of {stats['rounds']} rounds")
    if stats["speedup"] is not None:
        parts.append(f"{stats['speedup']:.2f}x estimated")
    return "speculative: " + ", ".join(parts)


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


class _Rule:
    """The sampler's side of the rule: how a draft is drawn from the draft's log-probabilities
    (keeping q for the check when sampling) and how the target's check is judged."""

    def __init__(self, sampler: Sampler):
        self.sampler, self.greedy = sampler, getattr(sampler, "greedy", False)
        self.distribution = getattr(sampler, "distribution", None)
        if not self.greedy and self.distribution is None:
            raise SpeculativeError(
                "speculative sampling needs the sampler's distribution: make the sampler with make_sampler")
        self.next_key = getattr(sampler, "next_key", lambda: None)

    def draw(self, lq: mx.array, qs: list) -> mx.array:
        """A draft token from log-probabilities lq [1, vocab] (greedy: any logits); q goes to `qs`."""
        if self.greedy:
            return self.sampler(lq)
        lq = self.distribution(lq)
        qs.append(lq)
        return mx.random.categorical(lq, key=self.next_key())

    def judge(self, lps: mx.array, drafts: mx.array, qs: list) -> tuple[mx.array, mx.array]:
        """(drafts accepted, the token after them) from the target's log-probabilities [k + 1, vocab]."""
        k = drafts.size
        if self.greedy:
            best = self.sampler(lps)
            n = _leading(best[:k] == drafts) if k else mx.array(0)
            return n, best[n]
        q = mx.exp(mx.concatenate(qs)) if qs else None
        return accept_drafts(mx.exp(self.distribution(lps)), q, drafts, self.next_key)


class _Round(NamedTuple):
    k: int
    drafts: mx.array  # [k]
    n: mx.array  # drafts accepted
    new: mx.array  # the target's token after them
    logprobs: mx.array  # [k + 1, vocab], the target's
    after: tuple  # the next round's (token before, last token, its position), on the device
    timed: bool = True  # its time is a round of k drafts' (not one where the draft model caught up)


class _Lookup:
    """Prompt lookup's drafts from the text so far (`tokens`, on the host)."""

    def __init__(self, ngram: int, tokens: list[int]):
        self.ngram, self.tokens = ngram, tokens

    def drafts(self, k: int) -> list[int]:
        return lookup_draft(self.tokens, self.ngram, k) if k else []


MARGIN = 1.02  # drafting must beat plain decoding by this much: a tie is not worth the risk
MAX_PAUSE = 64  # plain steps between probes at most: a probe then costs ~1/64 of the time


class _Adapt:
    """Online choice of drafts a round (see the module docstring). `choose` gives the next round's
    k; `read` takes each round's k, accepted count and tokens given when the round is read, and
    times it as the wall time since the previous read (rounds queued ahead overlap, so in steady
    state that is the round's own time). `check_cost`: the prior for a round of k drafts, about
    1 + check_cost * k plain steps, until one is timed (the backend row's)."""

    DECAY = 0.9  # weight of the past per observation: about the last 10 rounds count
    PRIOR = (1.4, 2.0)  # acceptance prior (hits, tries): 0.7, worth two drafts
    FIRST_PAUSE = 4  # plain steps before the first probe; x4 after each failed one, up to MAX_PAUSE

    def __init__(self, k_max: int, check_cost: float = 0.1, adaptive: bool = True, clock=time.perf_counter):
        self.k_max, self.check_cost, self.adaptive, self.clock = k_max, check_cost, adaptive, clock
        self.hits, self.tries = self.PRIOR
        self.plain: Optional[float] = None  # seconds a plain one-token round
        self.cost: dict[int, float] = {}  # seconds a round of k drafts
        self.wait: Optional[int] = None  # plain steps left before a probe; None: drafting is on
        self.backoff = self.FIRST_PAUSE
        self.probes: deque[bool] = deque()  # per round chosen and not yet read: whether it is a probe
        self.last: Optional[float] = None
        self.k = 0
        self.rounds = self.off = self.drafted = self.accepted = self.timed_tokens = self.timed_plain = 0
        self.k_low, self.k_high, self.elapsed, self.plain_elapsed = k_max, 0, 0.0, 0.0

    def acceptance(self) -> float:
        return self.hits / self.tries

    def expected(self, k: int) -> float:
        """Tokens a round of k drafts gives at the estimated acceptance."""
        a = min(self.acceptance(), 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def round_cost(self, k: int) -> float:
        if k in self.cost:
            return self.cost[k]
        # Linear in k: through the two nearest ks timed; from one, the prior's slope; from none, the prior.
        near = sorted(self.cost, key=lambda j: (abs(j - k), -j))[:2]
        if len(near) == 2:
            (i, ci), (j, cj) = sorted((j, self.cost[j]) for j in near)
            return max(self.plain, ci + max(0.0, (cj - ci) / (j - i)) * (k - i))
        if near:
            return max(self.plain, self.cost[near[0]] + self.plain * self.check_cost * (k - near[0]))
        return self.plain * (1 + self.check_cost * k)

    def gain(self, k: int) -> float:
        """Expected speed over plain decoding with k drafts a round."""
        return self.expected(k) * self.plain / self.round_cost(k)

    def choose(self, limit: int) -> int:
        """Drafts for the next round, at most `limit`."""
        self.k = self._choose(min(self.k_max, limit))
        return self.k

    def _choose(self, k_max: int) -> int:
        self.probes.append(False)
        if not self.adaptive:
            return max(k_max, 0)
        if self.plain is None or k_max < 1:
            if self.wait:  # (a plain round queued ahead during a pause counts towards it)
                self.wait -= 1
            return 0  # a plain step's time first: nothing compares without it
        gains = {k: self.gain(k) for k in range(1, k_max + 1)}
        k = max(gains, key=gains.get)
        if gains[k] >= MARGIN:
            self.wait, self.backoff = None, self.FIRST_PAUSE
            if k < k_max and k + 1 not in self.cost:
                k += 1  # one more than the best, untimed: time it, so k can grow where checks are cheap
        elif self.wait is None:  # it stopped paying: plain steps, then a probe
            self.wait, k = self.backoff - 1, 0
            self.backoff = min(4 * self.backoff, MAX_PAUSE)
        elif self.wait:
            self.wait, k = self.wait - 1, 0
        else:  # a probe: one round of drafts (its outcome sets the next pause: `read`)
            self.wait, self.probes[-1] = self.backoff, True
        return k

    def pausing(self) -> bool:
        """Whether the next round will be plain (drafting is off, its pause not over)."""
        return self.adaptive and bool(self.wait)

    def read(self, k: int, n: int, given: int, timed: bool = True) -> None:
        now = self.clock()
        probing = self.probes.popleft() if self.probes else False
        self.rounds += 1
        if k:
            self.drafted += k
            self.accepted += n
            self.k_low, self.k_high = min(self.k_low, k), max(self.k_high, k)
            # Per drafted token: n hits, then a miss unless all k held (tokens after a miss are unseen).
            self.hits = self.DECAY * self.hits + n
            self.tries = self.DECAY * self.tries + n + (n < k)
            if probing and self.plain is not None and max(map(self.gain, range(1, self.k_max + 1))) >= MARGIN:
                self.wait = self.backoff = self.FIRST_PAUSE  # drafting would pay now: back to it soon
            elif probing:  # (drafts that hold but cost more than they save count as failing)
                self.backoff = min(4 * self.backoff, MAX_PAUSE)
        else:
            self.off += 1
            if probing:  # nothing to draft (lookup found no match): probe on the next round
                self.wait = 0
        if self.last is not None:
            t = now - self.last
            self.elapsed += t
            self.timed_tokens += given
            if k == 0:
                self.timed_plain += 1
                self.plain_elapsed += t
            old = self.plain if k == 0 else self.cost.get(k)
            if not timed:
                pass
            elif old is not None:  # a stall (the caller busy, the machine shared) counts as 4x at most
                self.set(k, self.DECAY * old + (1 - self.DECAY) * min(t, 4 * old))
            elif k == 0 or self.plain is None or t <= 2 * (k + 1) * self.plain:  # else a first use compiling kernels
                self.set(k, t)
        self.last = now

    def set(self, k: int, t: float) -> None:
        if k == 0:
            self.plain = t
        else:
            self.cost[k] = t

    def stats(self) -> dict:
        """drafted, accepted, rounds, rounds_off (rounds without drafts), k (the last chosen),
        k_min/k_max (over drafting rounds), acceptance (the estimate), speedup (tokens a second
        over all rounds timed against the plain steps' mean, unclipped both, so all plain gives 1.0;
        None before a plain step was timed)."""
        speedup = None
        if self.timed_plain and self.elapsed > 0:
            speedup = round(self.timed_tokens / self.elapsed * self.plain_elapsed / self.timed_plain, 3)
        return {"drafted": self.drafted, "accepted": self.accepted, "rounds": self.rounds, "rounds_off": self.off,
                "k": self.k, "k_min": min(self.k_low, self.k_high), "k_max": self.k_high,
                "acceptance": round(self.acceptance(), 3), "speedup": speedup}


class _Rounds:
    """Speculative rounds, each built from the previous one's device-side result (`after`), so a
    backend whose steps take a device position queues them ahead of the host.

    A round's draft model runs [the token before the last, the last] at position pos - 1 (which
    fills in the last accepted draft after a round it got all right, else rewrites a position it
    holds), then k - 1 single tokens; after rounds without drafts, which it skips, the tokens it
    missed go first. Prompt lookup's drafts come from the text read so far. The target checks
    [last, drafts] at pos (no drafts: its one-token step). Each cache advances k + 1 positions a
    drafting round (the draft model's, plus what it missed); `read` trims k - n once n is known.
    """

    def __init__(self, step, verify, rule: _Rule, processors: list, dstep=None, dshift: int = 0,
                 lookup: Optional[_Lookup] = None, history: Optional[mx.array] = None,
                 adapt: Optional[_Adapt] = None):
        self.step, self.verify, self.rule, self.processors = step, verify, rule, processors
        self.dstep, self.dshift, self.lookup, self.history = dstep, dshift, lookup, history
        self.adapt = adapt
        self.rounds: deque[_Round] = deque()
        self.missed: list[mx.array] = []  # tokens the draft model skipped (device-side, [1] each)
        self.caught_up = 0
        short = getattr(dstep, "short", None)
        self.chunk = max(2, getattr(short, "max_rows", 0) if getattr(dstep, "positioned", False) else 1 << 20)

    def process(self, logits: mx.array, history: Optional[mx.array]) -> mx.array:
        if self.processors:
            logits = apply_processors(self.processors, history, logits)
        return log_softmax(logits)

    def _draft(self, k: int, before: mx.array, last: mx.array, pos: mx.array) -> tuple[mx.array, list]:
        qs: list = []
        if self.dstep is None:
            return mx.array(self.lookup.drafts(k), dtype=mx.uint32), qs
        if not k:
            self.missed.append(before)
            return mx.array([], dtype=mx.uint32), qs
        dpos, history, ds = pos + self.dshift, self.history, []
        feed = mx.concatenate(self.missed + [before, last])
        self.caught_up = len(self.missed)
        start, self.missed = dpos - feed.size + 1, []
        for i in range(0, feed.size, self.chunk):  # a positioned step takes a few tokens at a time
            logits = self.dstep.at(feed[None, i : i + self.chunk], start + i)
        for i in range(k):
            if i:
                logits = self.dstep.at(ds[-1][None], dpos + i)
            # greedy drafts take the argmax of the logits as they are: nothing to normalise
            lq = logits if self.rule.greedy and not self.processors else self.process(logits, history)
            d = self.rule.draw(lq, qs)
            mx.async_eval(d)
            ds.append(d.astype(mx.uint32))
            if self.processors:
                history = mx.concatenate([history, d.astype(history.dtype)])
        return mx.concatenate(ds), qs

    def push(self, before: mx.array, last: mx.array, pos: mx.array, limit: int) -> None:
        k = self.adapt.choose(limit)
        self.caught_up = 0
        drafts, qs = self._draft(k, before, last, pos)
        k = drafts.size
        checked = mx.concatenate([last, drafts])
        if k:
            logits = self.verify.at(checked[None], pos)[0]
        else:  # nothing to check: the backend's one-token step, as plain decoding runs
            logits = self.step.at(last[None], pos)
        if self.processors:
            seen = [mx.concatenate([self.history, drafts[:i].astype(self.history.dtype)]) for i in range(k + 1)]
            rows = [self.process(logits[i : i + 1], seen[i]) for i in range(k + 1)]
            lps = mx.concatenate(rows)
        else:
            lps = log_softmax(logits)
        n, new = self.rule.judge(lps, drafts, qs)
        new = new.reshape(1).astype(mx.uint32)
        # A round that ran many tokens the draft model missed says little about a round's cost.
        r = _Round(k, drafts, n, new, lps, (checked[n].reshape(1), new, pos + n + 1), self.caught_up <= 2)
        mx.async_eval(r.drafts, r.n, r.new, r.logprobs, *r.after)
        self.rounds.append(r)

    def read(self, caches: list) -> tuple[_Round, list[int]]:
        """The oldest round and the tokens it gives (accepted drafts, then the target's); trims
        every cache to what it checked and tells the text-side state."""
        r = self.rounds.popleft()
        n, new_id = r.n.item(), r.new.item()
        out = r.drafts.tolist()[:n] + [new_id]
        for c in caches:
            c.trim(r.k - n)
        self.adapt.read(r.k, n, len(out), r.timed)
        if self.lookup is not None:
            self.lookup.tokens += out
        if self.processors:
            self.history = mx.concatenate([self.history, mx.array(out, dtype=self.history.dtype)])
        return r, out


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
    prompt_progress=None,
    adaptive: bool = True,
) -> Generator[SpeculativeToken, None, None]:
    """Yield `SpeculativeToken`s (token, logprobs, from_draft, drafted, stats) for up to `max_tokens`
    new tokens, drafting up to `num_draft_tokens` a round (default: the backend's,
    `backends.draft_tokens`; fewer, or none, where that is faster: see the module docstring) with
    `draft_model` or by `prompt_lookup` (the longest n-gram tried; exactly one of the two).
    `adaptive=False` drafts `num_draft_tokens` every round, whether or not it pays.

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
    rule = _Rule(sampler)
    processors = list(logits_processors or [])

    def new_cache(m):
        return make_prompt_cache(len(m.layers), kv_bits=kv_bits, kv_group_size=kv_group_size)

    cache = prompt_cache if prompt_cache is not None else new_cache(model)
    dcache = []
    if draft_model is not None:
        dcache = draft_cache if draft_cache is not None else new_cache(draft_model)
    for c in cache + dcache:
        if isinstance(c, RotatingKVCache) or not c.is_trimmable():
            raise SpeculativeError(
                "speculative decoding trims its caches: it cannot use a rotating KV cache (max_kv_size)")

    draft_prompt = prompt if draft_prompt is None else draft_prompt
    start = cache[0].offset + prompt.size  # the target cache holds no more than start + handed out
    dstart = (dcache[0].offset + draft_prompt.size) if dcache else 0
    yielded = 0
    try:
        # The first token exactly as generate_step makes it.
        sample = Sampling(sampler, processors, prompt)
        step = backends.decode_step(model, cache)
        token, logprobs = sample(step(prefill(model, cache, prompt, prefill_step_size, prompt_progress)[None]))
        token = token.astype(mx.uint32)
        before, dstep, lookup = token, None, None
        if draft_model is not None:
            dstep = backends.decode_step(draft_model, dcache)
            before = prefill(draft_model, dcache, draft_prompt, prefill_step_size).astype(mx.uint32)
        else:
            lookup = _Lookup(prompt_lookup, [int(t) for t in context] + prompt.tolist())
        rounds = _Rounds(step, backends.verify_step(model, cache), rule, processors, dstep, dstart - start, lookup,
                         sample.history, _Adapt(num_draft_tokens, backends.check_cost(), adaptive))
        # Rounds are queued ahead only where they need nothing from the host (a draft model, no
        # processors) and every step takes a device position.
        positioned = all(s.positioned for s in (step, rounds.verify, dstep or step))
        ahead = backends.read_ahead() if dstep is not None and not processors and positioned else 0
        state = (before, token, mx.array([start], dtype=mx.int32))
        if ahead and max_tokens > 1:  # queued before the first token is read: the device never waits
            rounds.push(*state, num_draft_tokens)
            state = rounds.rounds[-1].after
        token_id = token.item()
        if lookup is not None:
            lookup.tokens.append(token_id)
        yielded += 1
        yield SpeculativeToken(token_id, logprobs, False, 0, rounds.adapt.stats())
        next_clear = 256
        while yielded < max_tokens:
            while len(rounds.rounds) <= ahead and (not rounds.rounds or yielded + 1 < max_tokens):
                rounds.push(*state, num_draft_tokens if ahead else min(num_draft_tokens, max_tokens - yielded - 1))
                state = rounds.rounds[-1].after
            # While drafting is paused, a plain round is queued before the previous one is read, as
            # plain decoding does: it needs nothing from the host, and behind plain rounds only (no
            # trim pending) any step writes where it should.
            while (rounds.adapt.pausing() and not processors and len(rounds.rounds) < ahead + 2
                   and all(q.k == 0 for q in rounds.rounds) and yielded + len(rounds.rounds) + 1 < max_tokens):
                rounds.push(*state, 0)
                state = rounds.rounds[-1].after
            r, out = rounds.read(cache + dcache)
            drafted, stats = rounds.adapt.drafted, rounds.adapt.stats()
            for i, t in enumerate(out):
                yielded += 1
                yield SpeculativeToken(t, r.logprobs[i], i < len(out) - 1, drafted, stats)
                if yielded >= max_tokens:
                    break
            if yielded >= next_clear:
                next_clear += 256
                mx.clear_cache()
    finally:
        # Drop whatever the caches hold beyond the tokens handed out (rounds queued ahead, unchecked
        # drafts on an interrupt, accepted ones the caller never took).
        for c in cache:
            c.trim(max(0, c.offset - (start + yielded)))
        for c in dcache:
            c.trim(max(0, c.offset - (dstart + yielded)))
