"""Streaming detokenizers: fed one token at a time, they give exactly `decode(all_ids)`."""

import random

import pytest
import tokenizers
from test_tokenizer_corpus import CORPUS, hf_llama3, llama3, smollm2
from tokenizers import AddedToken, decoders, models, normalizers

from llama_mlx.tokenizer import HFTokenizer, NaiveStreamingDetokenizer, StreamingDetokenizer

BACKENDS = {"llama3": llama3, "hf_llama3": hf_llama3, "smollm2": smollm2}


def stream(tok, ids, detok=None):
    """Every segment, checking as it goes that the text so far is a prefix of the final decode."""
    detok = detok or tok.detokenizer()
    expected = tok.decode(ids)
    segments, length = [], 0
    for token in ids:
        segment = detok.add_token(token)
        assert isinstance(segment, str)
        segments.append(segment)
        # nothing emitted is ever taken back: no half character, no premature U+FFFD
        assert expected.startswith(segment, length)
        length += len(segment)
    segments.append(detok.finalize())
    return segments, expected


def _corpus_ids(tok):
    for text in CORPUS:
        if len(text) > 100_000:
            text = text[:20_000] + text[-20_000:]
        yield tok.encode(text, allowed_special="all")


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_reproduces_decode_on_corpus(backend):
    tok = BACKENDS[backend]()
    for ids in _corpus_ids(tok):
        segments, expected = stream(tok, ids)
        assert "".join(segments) == expected
        assert "".join(segments).count("\ufffd") == expected.count("\ufffd")


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_reproduces_decode_on_invalid_utf8(backend):
    """Random ids (many of them lone pieces of multi-byte characters), special tokens included."""
    tok = BACKENDS[backend]()
    rng = random.Random(1234)
    # tokens that are not whole UTF-8 on their own
    partial = [i for i in range(min(tok.vocab_size, 60000)) if "\ufffd" in tok.decode([i])]
    assert len(partial) > 100
    specials = list(tok.special_tokens.values())
    for _ in range(150):
        ids = []
        for _ in range(rng.randrange(1, 40)):
            r = rng.random()
            pool = partial if r < 0.5 else specials if r < 0.55 else range(tok.vocab_size - len(specials))
            ids.append(rng.choice(pool))
        segments, expected = stream(tok, ids)
        assert "".join(segments) == expected


def test_emoji_arrive_whole():
    tok = llama3()
    ids = tok.encode("🎉👩🏾‍🚀中")
    detok = tok.detokenizer()
    segments = [detok.add_token(i) for i in ids] + [detok.finalize()]
    assert "".join(segments) == "🎉👩🏾‍🚀中"
    assert all("\ufffd" not in s for s in segments)
    assert len(ids) > len([s for s in segments if s])  # some tokens completed nothing yet


def test_unfinished_character_is_flushed_as_decode_does():
    tok = llama3()
    ids = tok.encode("ab🎉")[:-1]  # the last token finishes the emoji
    segments, expected = stream(tok, ids)
    assert segments[-1] == "\ufffd" and "".join(segments) == expected == "ab\ufffd"


def test_detokenizers_never_re_decode(monkeypatch):
    """Per-token work does not grow with the answer: the streaming path never calls decode."""
    for make in BACKENDS.values():
        tok = make()
        ids = tok.encode("Lorem ipsum dolor sit amet, 🎉 consectetur. " * 200)
        expected = tok.decode(ids)
        detok = tok.detokenizer()
        assert isinstance(detok, StreamingDetokenizer)
        monkeypatch.setattr(tok, "decode", lambda *_: pytest.fail("re-decoded"))
        assert "".join([detok.add_token(i) for i in ids] + [detok.finalize()]) == expected
        monkeypatch.undo()


def test_fresh_detokenizers_are_independent():
    tok = llama3()
    first, second = tok.detokenizer(), tok.detokenizer()
    half = tok.encode("🎉")[0]
    assert first.add_token(half) == ""
    assert second.add_token(tok.token_to_id("Hello")) == "Hello"
    assert second.finalize() == "" and first.finalize() == "\ufffd"


def test_naive_fallback_matches_decode():
    tok = hf_llama3()
    for ids in list(_corpus_ids(tok))[:45]:
        segments, expected = stream(tok, ids, NaiveStreamingDetokenizer(tok.decode))
        assert "".join(segments) == expected


# -- a SentencePiece vocabulary with byte fallback (Llama 2 style decoder)


@pytest.fixture(scope="module")
def spm():
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "▁a", "a", "b", "▁ab", "é", "中"]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("▁", "a"), ("▁a", "b")]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in pieces[:3]])
    return HFTokenizer(tok, bos_token="<s>", eos_token="</s>")


def test_spm_byte_fallback_streaming(spm):
    assert spm._decoder_kind == "spm" and spm._strip_first_space
    for text in ["ab ab", " ab", "é 中 🎉 x\n", "", "<s>"]:
        ids = spm.encode(text)
        segments, expected = stream(spm, ids)
        assert "".join(segments) == expected
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.randrange(spm.vocab_size) for _ in range(rng.randrange(1, 12))]
        segments, expected = stream(spm, ids)
        assert "".join(segments) == expected, ids
