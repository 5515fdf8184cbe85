"""Tokenizer and chat templates against HF transformers loading the same GGUF file or directory."""

import io
import json

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jaxinfer.errors import CheckpointError
from jaxinfer.tokenizer import ChatTemplateError, Tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 2024; they're 12345 miles away.",
    "def add(a, b):\n    return a + b  # sum\n\n\nclass X:\n\tpass\n",
    "日本語のテキストと中文 and emoji 🙂🚀👩‍👩‍👧 with accents: café, naïve, Ünïcödé",
    "   leading and trailing spaces   ",
    "tabs\t\tand\nnew\n\n\nlines\r\n  mixed \u00a0nbsp",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "inline<|endoftext|>special and <|im_end|>",
    "",
    "a",
    "x = [1, 2, 3]; y = {'k': 'v'}; z = f\"{x!r:>10}\"",
]

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Unicode: 日本語 🙂\n\nand   spaces"}],
]

# ----- the demo GGUF against HF's GGUF tokenizer -----


@pytest.fixture(scope="module")
def demo_pair(demo_gguf_path):
    hf = transformers.AutoTokenizer.from_pretrained(demo_gguf_path.parent, gguf_file=demo_gguf_path.name)
    return Tokenizer.from_gguf(demo_gguf_path), hf


@pytest.mark.parametrize("text", TEXTS)
def test_demo_encode_matches_hf(demo_pair, text):
    ours, hf = demo_pair
    for add_special in (True, False):
        assert ours.encode(text, add_special_tokens=add_special) == hf.encode(text, add_special_tokens=add_special)


@pytest.mark.parametrize("text", TEXTS)
def test_demo_decode_matches_hf_and_round_trips(demo_pair, text):
    ours, hf = demo_pair
    ids = ours.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_demo_special_tokens_match_hf(demo_pair):
    ours, hf = demo_pair
    assert ours.vocab_size == len(hf) == 49152
    assert (ours.bos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.pad_token_id)
    assert ours.eos_token_ids == (hf.eos_token_id,) == (hf.convert_tokens_to_ids("<|im_end|>"),)
    assert ours.convert_ids_to_tokens(ours.bos_token_id) == "<|im_start|>"


@pytest.mark.parametrize("chat", CHATS)
def test_demo_chat_template_matches_hf(demo_pair, chat):
    ours, hf = demo_pair
    for add_prompt in (True, False):
        expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_prompt)
        assert ours.apply_chat_template(chat, add_generation_prompt=add_prompt) == expected


def test_decode_rejects_ids_outside_the_vocabulary(demo_pair):
    ours, _ = demo_pair
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([5, ours.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.convert_ids_to_tokens([-1])


# ----- a directory with tokenizer.json and tokenizer_config.json -----

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "def function(x):\n    return x * 2\n",
    "Numbers like 1234 and 56789 appear here.", "日本語 and 中文 text with emoji 🙂",
    "tokenizers are fun   to test",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Uses the helpers HF provides and the whitespace control HF's settings imply.
CHAT_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% if tools %}
<tools>{{ tools | tojson }}</tools>
{% endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}
    {% if loop.index > 10 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
{# {{ ns.n }} messages #}
{{ '' if custom_flag is undefined else 'flag=' ~ custom_flag }}"""


def _train_byte_level_bpe(vocab_size: int = 420) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def trained_bpe():
    return _train_byte_level_bpe()


def _write_directory(path, backend: tokenizers.Tokenizer, config: dict, chat_template_file: str | None = None):
    path.mkdir(exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if chat_template_file is not None:
        (path / "chat_template.jinja").write_text(chat_template_file)
    return path


@pytest.mark.parametrize("add_bos", [True, False])
def test_directory_tokenizer_matches_hf(tmp_path, trained_bpe, add_bos):
    backend = tokenizers.Tokenizer.from_str(trained_bpe.to_str())
    if add_bos:
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>", backend.token_to_id("<|im_start|>"))])
    # tokenizer.json's post-processor rules; a contradicting config flag is ignored, as in HF.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
              "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
              "pad_token": "<|endoftext|>", "add_bos_token": not add_bos, "chat_template": CHAT_TEMPLATE}
    directory = _write_directory(tmp_path / "tok", backend, config)
    ours = Tokenizer.from_directory(directory)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(directory)

    assert ours.vocab_size == len(hf)
    assert (ours.bos_token_id, ours.pad_token_id) == (hf.bos_token_id, hf.pad_token_id)
    assert ours.eos_token_ids == (hf.eos_token_id,)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text) == fast.encode(text)
        plain = ours.encode(text, add_special_tokens=False)
        assert plain == hf.encode(text, add_special_tokens=False)
        assert ids == [ours.bos_token_id] * add_bos + plain
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather <now> & \"later\"",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    for chat in CHATS:
        for kwargs in ({}, {"tools": tools}, {"custom_flag": "é"}):
            expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kwargs)
            assert ours.apply_chat_template(chat, **kwargs) == expected


def test_chat_template_file_and_generation_config(tmp_path, trained_bpe):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
              "eos_token": "<|endoftext|>", "chat_template": "ignored {{ messages }}"}
    directory = _write_directory(tmp_path / "tok", trained_bpe, config, chat_template_file=CHAT_TEMPLATE)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    ours = Tokenizer.from_directory(directory)
    assert ours.chat_template == CHAT_TEMPLATE
    end_of_text, im_end = trained_bpe.token_to_id("<|endoftext|>"), trained_bpe.token_to_id("<|im_end|>")
    # EOS first, then the end-of-turn token the template writes, then the generation config's.
    assert ours.eos_token_ids == (end_of_text, im_end)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.apply_chat_template(CHATS[1]) == hf.apply_chat_template(CHATS[1], tokenize=False,
                                                                         add_generation_prompt=True)


def test_chat_template_errors(tmp_path, trained_bpe):
    directory = _write_directory(tmp_path / "tok", trained_bpe, {"chat_template": CHAT_TEMPLATE})
    ours = Tokenizer.from_directory(directory)
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="non-empty"):
        ours.apply_chat_template([])
    bare = Tokenizer(trained_bpe)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.apply_chat_template(CHATS[0])
    broken = Tokenizer(trained_bpe, chat_templates="{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="invalid"):
        broken.apply_chat_template(CHATS[0])


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.append(1) }}",
    "{% set ns = namespace(_x=1) %}",
    "{{ messages[0]['content'] + 1 }}",  # a plain Python error inside the template
])
def test_chat_template_sandbox_blocks_escapes_and_errors(trained_bpe, template):
    with pytest.raises(ChatTemplateError):
        Tokenizer(trained_bpe, chat_templates=template).apply_chat_template(CHATS[0])


def test_strftime_now_and_generation_tag(trained_bpe):
    template = "{% generation %}{{ strftime_now('%Y') }}{% endgeneration %}"
    import datetime

    assert Tokenizer(trained_bpe, chat_templates=template).apply_chat_template(CHATS[0]) == \
        str(datetime.datetime.now().year)


def test_directory_without_tokenizer_json(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_directory(tmp_path)


def test_special_token_must_be_in_vocabulary(trained_bpe):
    with pytest.raises(CheckpointError, match="not in the tokenizer's vocabulary"):
        Tokenizer(trained_bpe, {"bos_token": "<never-seen-token>"})


# ----- GGUF files written here: byte-level BPE with each pre-tokenizer, and sentencepiece -----


def _write_tokenizer_gguf(path, tokens, token_types, *, model, merges=None, scores=None, pre=None, extra=None):
    w = gguf.GGUFWriter(str(path), "llama")
    # The model keys HF's loader needs to build a config alongside the tokenizer.
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    for key, value in (extra or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, value)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _byte_level_gguf(path, backend: tokenizers.Tokenizer, pre: str | None, extra=None):
    model = json.loads(backend.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    size = backend.get_vocab_size()
    tokens = [backend.id_to_token(i) for i in range(size)]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    return _write_tokenizer_gguf(path, tokens, types, model="gpt2", merges=merges, pre=pre,
                                 extra={"tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.bos_token_id": 1,
                                        **(extra or {})})


@pytest.mark.parametrize("pre", [None, "llama-bpe", "qwen2", "gpt-4o"])
def test_byte_level_gguf_matches_hf(tmp_path, trained_bpe, pre):
    path = _byte_level_gguf(tmp_path / "bpe.gguf", trained_bpe, pre,
                            extra={"tokenizer.ggml.add_bos_token": True, "tokenizer.chat_template": CHAT_TEMPLATE})
    ours = Tokenizer.from_gguf(path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.vocab_size == len(hf)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ids[0] == ours.bos_token_id == 1
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    assert ours.apply_chat_template(CHATS[1]) == hf.apply_chat_template(CHATS[1], tokenize=False,
                                                                         add_generation_prompt=True)


def test_smollm_pre_splits_every_digit(tmp_path, trained_bpe):
    # The trained vocabulary merges digits ("12", "234", ...); SmolLM2's own tokenizer.json splits
    # each digit off first (a `Digits` pre-tokenizer), and llama.cpp's "smollm" pre does the same.
    path = _byte_level_gguf(tmp_path / "smollm.gguf", trained_bpe, "smollm")
    ours = Tokenizer.from_gguf(path)
    reference = tokenizers.Tokenizer.from_str(trained_bpe.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    merges = json.loads(trained_bpe.to_str())["model"]["merges"]
    assert any(c.isdigit() for m in merges for c in "".join(m))
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text).ids
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.encode("1234") == [trained_bpe.token_to_id(d) for d in "1234"]


@pytest.fixture(scope="module")
def sentencepiece_model():
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=420, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, user_defined_symbols=["<tool>"], control_symbols=["<|eot|>"], minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=buffer.getvalue())


def _sentencepiece_gguf(path, sp: spm.SentencePieceProcessor):
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
             else 4 if tokens[i] == "<tool>" else 1 for i in range(len(tokens))]
    return _write_tokenizer_gguf(path, tokens, types, model="llama",
                                 scores=[sp.get_score(i) for i in range(len(tokens))],
                                 extra={"tokenizer.ggml.bos_token_id": sp.bos_id(),
                                        "tokenizer.ggml.eos_token_id": sp.eos_id(),
                                        "tokenizer.ggml.unknown_token_id": sp.unk_id()})


def test_sentencepiece_gguf_matches_hf_and_sentencepiece(tmp_path, sentencepiece_model):
    sp = sentencepiece_model
    path = _sentencepiece_gguf(tmp_path / "sp.gguf", sp)
    ours = Tokenizer.from_gguf(path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    texts = TEXTS + ["a<tool>b <|eot|> c", "Ω≈ç√ rare chars fall back to bytes"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        # sentencepiece itself adds its dummy prefix even before a leading space and does not
        # match control tokens in text; HF's (and our) tokenizer differ there only.
        if not text.startswith(" ") and "<|" not in text:
            assert ids == [sp.bos_id()] + sp.encode(text), text
            assert ours.decode(ids) == text
    assert ours.bos_token_id == sp.bos_id() and ours.eos_token_ids == (sp.eos_id(),)


def test_unsupported_gguf_tokenizer_model(tmp_path):
    path = _write_tokenizer_gguf(tmp_path / "bert.gguf", ["[PAD]", "a"], [3, 1], model="bert")
    with pytest.raises(CheckpointError, match="'bert' is not supported.*gpt2.*llama"):
        Tokenizer.from_gguf(path)


def test_gguf_special_token_id_out_of_range(tmp_path, trained_bpe):
    path = _byte_level_gguf(tmp_path / "bad.gguf", trained_bpe, None, extra={"tokenizer.ggml.padding_token_id": 10**6})
    with pytest.raises(CheckpointError, match="padding_token_id"):
        Tokenizer.from_gguf(path)

