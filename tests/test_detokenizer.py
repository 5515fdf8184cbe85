"""Incremental detokenization against full decoding, with a real byte-level BPE trained here."""

import itertools

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxinfer.engine.detokenizer import IncrementalDetokenizer
from jaxinfer.sampling_params import SamplingParams

SPECIALS = ["<|endoftext|>", "<|im_end|>"]
CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "Emoji: 😀😃🎉👍🏽 and café naïve résumé",
    "日本語のテキストも少し。東京は大きい都市です。",
    "🚀 launch 🚀 at 10:00, 🌍 wide",
]


class BPETokenizer:
    """The two methods (and special ids) the detokenizer uses, over a `tokenizers` BPE."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.all_special_ids = [tok.token_to_id(s) for s in SPECIALS]

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tok.id_to_token(i) for i in ids]


@pytest.fixture(scope="module")
def bpe():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return BPETokenizer(tok)


class CharTokenizer:
    """One id per character (id = code point): makes the timing of each delta obvious."""

    all_special_ids = [0]

    def decode(self, ids, skip_special_tokens=True):
        return "".join("<eos>" if i == 0 else chr(i) for i in ids if not (i == 0 and skip_special_tokens))

    def convert_ids_to_tokens(self, ids):
        return ["<eos>" if i == 0 else chr(i) for i in ids]


def ids_of(text):
    return [ord(c) for c in text]


def random_ids(rng, bpe, length):
    """Random ids: single bytes and merges, special tokens, and real CJK/emoji tokenizations."""
    out = []
    while len(out) < length:
        kind = rng.integers(0, 3)
        if kind == 0:
            out += rng.integers(0, 420, rng.integers(1, 4)).tolist()
        elif kind == 1:
            text = CORPUS[rng.integers(1, len(CORPUS))]
            start = rng.integers(0, len(text))
            out += bpe.tok.encode(text[start:start + rng.integers(1, 8)]).ids
        else:
            out += [int(rng.choice(bpe.all_special_ids))] if rng.random() < 0.3 else [int(rng.integers(256, 420))]
    return out[:length]


def stream(detok, ids, rng=None, **kw):
    """Feeds ids in random chunks; returns (deltas, stop matched)."""
    deltas, i = [], 0
    while i < len(ids):
        n = 1 if rng is None else int(rng.integers(1, 4))
        delta, stop = detok.add_tokens(ids[i:i + n], **kw)
        deltas.append(delta)
        i += n
        if stop is not None:
            return deltas, stop
    deltas.append(detok.finish())
    return deltas, None


def segmented_decode(bpe, ids):
    """HF's Python-tokenizer convention: special tokens set apart from the text by spaces."""
    parts = []
    for special, group in itertools.groupby(ids, lambda i: i in bpe.all_special_ids):
        group = list(group)
        parts += bpe.convert_ids_to_tokens(group) if special else [bpe.decode(group, False)]
    return " ".join(parts)


def test_training_splits_characters(bpe):
    ids = bpe.tok.encode("".join(CORPUS)).ids
    split = [i for i in ids if "\ufffd" in bpe.decode([i])]
    assert len(split) > 5  # the property tests below exercise incomplete characters


@pytest.mark.parametrize("skip,spaces", [(True, True), (False, False), (False, True)])
def test_deltas_concatenate_to_full_decode(bpe, skip, spaces):
    rng = np.random.default_rng(int(skip) * 2 + int(spaces))
    held = 0
    for _ in range(150):
        prompt = random_ids(rng, bpe, int(rng.integers(0, 12)))
        output = random_ids(rng, bpe, int(rng.integers(1, 40)))
        detok = IncrementalDetokenizer(bpe, prompt, skip, spaces)
        deltas, stop = stream(detok, output, rng)
        want = segmented_decode(bpe, output) if spaces and not skip else bpe.decode(output, skip)
        assert "".join(deltas) == want == detok.output_text, (prompt, output)
        assert stop is None
        held += sum(d == "" for d in deltas)
    assert held > 50  # incomplete characters were held back along the way


def test_long_output(bpe):
    rng = np.random.default_rng(3)
    output = random_ids(rng, bpe, 1200)  # past the point where old ids are dropped
    detok = IncrementalDetokenizer(bpe, [5, 6], False, True)
    assert "".join(stream(detok, output, rng)[0]) == segmented_decode(bpe, output)


def test_hf_tokenizer_object(bpe):
    from transformers import PreTrainedTokenizerFast  # slow to import: only here

    hf = PreTrainedTokenizerFast(tokenizer_object=bpe.tok)
    ids = bpe.tok.encode("Emoji: 😀😃🎉 你好，世界").ids + [bpe.all_special_ids[0]]
    detok = IncrementalDetokenizer(hf, bpe.tok.encode("Hello").ids)
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == "Emoji: 😀😃🎉 你好，世界"


def test_multibyte_character_is_held_until_complete(bpe):
    ids = bpe.tok.encode("😀").ids
    assert len(ids) > 1 and bpe.decode(ids[:1]).endswith("\ufffd")
    detok = IncrementalDetokenizer(bpe, [])
    assert [detok.add_tokens([i])[0] for i in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_prompt_context_keeps_leading_space():
    class LeadingSpaceStripped(CharTokenizer):  # like SentencePiece: no space at decode start
        def decode(self, ids, skip_special_tokens=True):
            return super().decode(ids, skip_special_tokens).removeprefix(" ")

    detok = IncrementalDetokenizer(LeadingSpaceStripped(), ids_of("Hi"))
    assert detok.add_tokens(ids_of(" there")) == (" there", None)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(bpe, include):
    rng = np.random.default_rng(10 + include)
    spanning = 0
    for _ in range(60):
        text = "".join(rng.choice(CORPUS, 3))
        ids = bpe.tok.encode(text).ids
        full = bpe.decode(ids)
        start = int(rng.integers(0, len(full) - 6))
        stop = full[start:start + int(rng.integers(1, 6))]
        detok = IncrementalDetokenizer(bpe, [], stop=(stop,), include_stop_str_in_output=include)
        deltas, matched = stream(detok, ids, rng)
        cut = full.index(stop) + (len(stop) if include else 0)
        assert matched == stop and "".join(deltas) == full[:cut] == detok.output_text
        spanning += len(bpe.tok.encode(stop).ids) > 1
        with pytest.raises(RuntimeError):
            detok.add_tokens(ids[:1])
    assert spanning > 20


def test_partial_match_is_held_back():
    tok = CharTokenizer()
    detok = IncrementalDetokenizer(tok, [], stop=("END", "!?"))
    steps = [("a", "a"), ("E", ""), ("N", ""), ("x", "ENx"), ("!", ""), ("E", "!"), ("N", ""),
             ("D", "")]
    for char, want in steps:
        delta, stop = detok.add_tokens(ids_of(char))
        assert delta == want, (char, delta)
    assert stop == "END" and detok.output_text == "aENx!"


def test_partial_match_flushed_by_finish():
    detok = IncrementalDetokenizer(CharTokenizer(), [], stop=("END",))
    assert detok.add_tokens(ids_of("okEN")) == ("ok", None)
    assert detok.finish() == "EN" and detok.output_text == "okEN"
    assert detok.finish() == ""


def test_include_stop_string_does_not_hold_back():
    detok = IncrementalDetokenizer(CharTokenizer(), [], stop=("END",), include_stop_str_in_output=True)
    assert detok.add_tokens(ids_of("okEN")) == ("okEN", None)
    assert detok.add_tokens(ids_of("Dmore")) == ("D", "END")
    assert detok.output_text == "okEND"


def test_streaming_emits_all_but_partial_matches():
    rng = np.random.default_rng(12)
    stops = ("abc", "cab", "bb")
    for _ in range(100):
        text = "".join(rng.choice(list("abcx"), 30))
        detok = IncrementalDetokenizer(CharTokenizer(), [], stop=stops)
        for n, char in enumerate(text, 1):
            delta, stop = detok.add_tokens(ids_of(char))
            if stop:
                first = min((text.find(s) for s in stops if s in text[:n]))
                assert detok.output_text == text[:first]
                break
            # Exactly the longest end of the text that begins a stop string is held back.
            held = max((k for s in stops for k in range(1, len(s)) if text[:n].endswith(s[:k])), default=0)
            assert detok.output_text == text[:n - held]


def test_earliest_stop_in_a_chunk_wins():
    detok = IncrementalDetokenizer(CharTokenizer(), [], stop=("cd", "abcde"))
    assert detok.add_tokens(ids_of("xabcdef")) == ("x", "abcde")


def test_special_tokens_and_stop_token():
    tok = CharTokenizer()
    kept = IncrementalDetokenizer(tok, [], skip_special_tokens=False, spaces_between_special_tokens=True)
    assert stream(kept, ids_of("hi") + [0] + ids_of("yo"))[0] == ["h", "i", " <eos>", " y", "o", ""]
    glued = IncrementalDetokenizer(tok, [], skip_special_tokens=False, spaces_between_special_tokens=False)
    assert "".join(stream(glued, ids_of("hi") + [0] + ids_of("yo"))[0]) == "hi<eos>yo"
    skipped = IncrementalDetokenizer(tok, [])
    assert "".join(stream(skipped, ids_of("hi") + [0] + ids_of("yo"))[0]) == "hiyo"
    # The eos that ends a request shows only when stop strings are kept in the output.
    for include, want in [(False, "hi"), (True, "hi<eos>")]:
        detok = IncrementalDetokenizer(tok, [], skip_special_tokens=False,
                                       spaces_between_special_tokens=False,
                                       include_stop_str_in_output=include)
        assert detok.add_tokens(ids_of("hi") + [0], last_is_stop_token=True)[0] == want


def test_from_params():
    params = SamplingParams(stop="END", include_stop_str_in_output=True, skip_special_tokens=False)
    detok = IncrementalDetokenizer.from_params(CharTokenizer(), [], params)
    assert detok.add_tokens(ids_of("aEND") + [0]) == ("aEND", "END")


def test_rejects_empty_stop_string():
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(CharTokenizer(), [], stop=("",))
