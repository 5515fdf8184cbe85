"""Tokenizers and chat templates from an HF directory or a GGUF file.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library) and renders chat templates in a
Jinja sandbox with the helpers and whitespace settings HF transformers uses, so that prompts match
what the model was trained on. A GGUF carries no tokenizer.json; `from_gguf` rebuilds the
tokenizer from llama.cpp's `tokenizer.ggml.*` metadata the way HF transformers' GGUF converter does.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from jaxinfer.errors import CheckpointError
from jaxinfer.loading.gguf import open_gguf, read_field
from jaxinfer.loading.gguf_file import GGUFFile

# Named special tokens, as HF's `special_tokens_map` names them; chat templates read them by name.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Tokens that close a chat turn; generation stops on them as well as on EOS when the template
# writes them (Instruct models often keep a different EOS for pretraining documents).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class ChatTemplateError(ValueError):
    """A chat template is missing, invalid, or rejected the conversation (`raise_exception`)."""


class Tokenizer:
    """Text <-> token ids, special tokens and the chat template of one model.

    Build with `from_directory` or `from_gguf`. Attributes:
      backend: the `tokenizers.Tokenizer`.
      special_tokens: named special tokens ({"bos_token": "<s>", ...}), the chat template's variables.
      chat_templates: template source by name; "default" is the one `apply_chat_template` uses.
    """

    def __init__(self, backend: tokenizers.Tokenizer, special_tokens: Mapping[str, str] | None = None,
                 chat_templates: Mapping[str, str] | str | None = None, extra_eos_token_ids: Sequence[int] = ()):
        """
        Args:
          backend: the Rust tokenizer, with its post-processor already adding BOS/EOS as wanted.
          special_tokens: named special tokens (keys from SPECIAL_TOKEN_NAMES); each must be in the vocabulary.
          chat_templates: one template, or templates by name ("default", "tool_use", ...).
          extra_eos_token_ids: further ids that end generation (e.g. from generation_config.json).
        """
        self.backend = backend
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        for name, token in self.special_tokens.items():
            if name not in SPECIAL_TOKEN_NAMES:
                raise ValueError(f"unknown special token name {name!r}; known: {', '.join(SPECIAL_TOKEN_NAMES)}")
            if backend.token_to_id(token) is None:
                raise CheckpointError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        if isinstance(chat_templates, str):
            chat_templates = {"default": chat_templates}
        self.chat_templates = dict(chat_templates or {})
        self._compiled: dict[str, jinja2.Template] = {}
        vocab_size = self.vocab_size
        for i in extra_eos_token_ids:
            if not 0 <= i < vocab_size:
                raise CheckpointError(f"eos token id {i} is outside the vocabulary (size {vocab_size})")
        self._extra_eos = tuple(extra_eos_token_ids)

    # ----- constructors -----

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads tokenizer.json, with special tokens and chat template from tokenizer_config.json
        (and special_tokens_map.json, chat_template.jinja / .json, generation_config.json when present)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(
                f"{path} has no tokenizer.json (only fast tokenizers are supported; a sentencepiece "
                "tokenizer.model alone is not)"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust library raises plain Exception on a malformed file
            raise CheckpointError(f"{path / 'tokenizer.json'} could not be read: {e}") from None
        config = _read_json(path / "tokenizer_config.json")
        special = {**_token_strings(_read_json(path / "special_tokens_map.json")), **_token_strings(config)}
        # tokenizer.json's post-processor decides whether BOS/EOS are added; like HF transformers
        # (>= 5) we ignore tokenizer_config's add_bos_token / add_eos_token beside it.
        _add_special_tokens(backend, special.values())

        templates = _templates_from_config(config.get("chat_template"))
        if (path / "chat_template.json").is_file():
            templates = _templates_from_config(_read_json(path / "chat_template.json").get("chat_template"))
        if (path / "chat_template.jinja").is_file():
            templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")

        extra_eos = []
        for name in ("generation_config.json", "config.json"):
            extra_eos += _id_list(_read_json(path / name).get("eos_token_id"))
        return cls(backend, special, templates, list(dict.fromkeys(extra_eos)))

    @classmethod
    def from_gguf(cls, path_or_reader) -> "Tokenizer":
        """Builds the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata.

        Args:
          path_or_reader: a .gguf path or an open `GGUFFile`.
        """
        reader = path_or_reader if isinstance(path_or_reader, GGUFFile) else open_gguf(path_or_reader)
        return cls(*_parts_from_gguf(reader))

    def save(self, directory: str | os.PathLike) -> None:
        """Writes the files `from_directory` reads back into an equal tokenizer (the same ids,
        special tokens, chat templates and eos ids), whether this one came from an HF directory
        or a GGUF file: tokenizer.json, tokenizer_config.json and, for further eos ids,
        generation_config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = dict(self.special_tokens)
        templates = self.chat_templates
        if set(templates) == {"default"}:
            config["chat_template"] = templates["default"]
        elif templates:
            config["chat_template"] = [{"name": name, "template": t} for name, t in templates.items()]
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        if self._extra_eos:
            (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": list(self._extra_eos)}))

    # ----- encoding -----

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS as the tokenizer is configured to."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (BOS, EOS, chat markers) are dropped unless asked for."""
        return self.backend.decode(self._checked_ids(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        """Vocabulary strings of token ids (byte-level tokens stay in their byte spelling)."""
        if isinstance(ids, int):
            return self.convert_ids_to_tokens([ids])[0]
        return [self.backend.id_to_token(i) for i in self._checked_ids(ids)]

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        size = self.vocab_size
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {size})")
        return ids

    def token_id(self, name: str) -> int | None:
        """Id of a named special token ("bos_token", ...), or None when the tokenizer has none."""
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id("pad_token")

    @functools.cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation: EOS, then end-of-turn tokens the chat template writes, then
        those the checkpoint's configs list."""
        ids = [self.token_id("eos_token")]
        template = self.chat_templates.get("default", "")
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        ids += [self.backend.token_to_id(t) for t in END_OF_TURN_TOKENS if t in special and t in template]
        ids += list(self._extra_eos)
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    # ----- chat -----

    @property
    def chat_template(self) -> str | None:
        """The default chat template source, or None."""
        return self.chat_templates.get("default")

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: Sequence[Mapping[str, Any]] | None = None, **kwargs) -> str:
        """Renders a conversation to the prompt text, as HF `apply_chat_template(tokenize=False)` does.

        Args:
          messages: dicts with at least "role"; keys whose value is None are dropped, as HF does.
          add_generation_prompt: end with the header that opens the assistant's turn.
          tools: JSON schemas of callable tools, for templates that support them.
          **kwargs: further template variables (e.g. `enable_thinking`, `documents`); they override
            the special token variables (`bos_token`, ...).
        Raises:
          ChatTemplateError: no template, a broken template, or one that rejected the conversation.
        """
        if isinstance(messages, (str, bytes)) or not messages:
            raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        for m in messages:
            if not isinstance(m, Mapping) or "role" not in m:
                raise ChatTemplateError(f"each message must be a dict with a 'role', got {m!r}")
        name = "tool_use" if tools is not None and "tool_use" in self.chat_templates else "default"
        template = self._template(name)
        variables = {**self.special_tokens, **kwargs}
        variables.setdefault("documents", None)
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return template.render(messages=_plain(chat), tools=_plain(tools),
                                   add_generation_prompt=add_generation_prompt, **_plain(variables))
        # A template is a program from the checkpoint; whatever it raises on this input (a Jinja
        # error, or e.g. a TypeError from `'a' + 1`) means it rejected the conversation.
        except Exception as e:  # noqa: BLE001
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None

    def _template(self, name: str) -> jinja2.Template:
        if name not in self.chat_templates:
            raise ChatTemplateError("this tokenizer has no chat template; pass the prompt as plain text instead")
        if name not in self._compiled:
            try:
                self._compiled[name] = _jinja_environment().from_string(self.chat_templates[name])
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(f"chat template {name!r} is invalid: {e}") from None
        return self._compiled[name]


# ----- chat template sandbox -----

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which HF templates use to mark assistant text for
    training masks; rendering only needs the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes, closing a path to Python internals."""

    def __init__(*args, **kwargs):  # noqa: N805 - Jinja's Namespace takes `self` this way too
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own `tojson` escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _jinja_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    return env


def _plain(value):
    """A copy of template data made of JSON types only, so the sandbox sees no foreign methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for base in (str, bool, int, float):  # subclasses (enums, numpy scalars) back to the base type
        if isinstance(value, base):
            return base(value)
    if hasattr(value, "item"):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


# ----- shared construction helpers -----

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _token_strings(config: Mapping[str, Any]) -> dict[str, str]:
    """Named special tokens from a tokenizer_config / special_tokens_map (plain or AddedToken dicts)."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def _templates_from_config(value) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, Mapping) and "name" in t and "template" in t for t in value):
        return {t["name"]: t["template"] for t in value}
    raise CheckpointError(f"chat_template must be a string or a list of {{name, template}}, got {type(value).__name__}")


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _add_special_tokens(backend: tokenizers.Tokenizer, tokens) -> None:
    # Named special tokens must match whole and be skippable in decode, even when the vocabulary
    # holds them as ordinary tokens; adding an existing token keeps its id.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(tokens)])


def _bos_eos_processor(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None):
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)



# ----- GGUF: rebuilding the tokenizer from llama.cpp metadata -----

# llama.cpp token types (`tokenizer.ggml.token_type`).
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4

# `tokenizer.ggml.pre` names the regex llama.cpp splits text with before byte-level BPE. Values as
# in HF transformers' GGUF converter; names not listed get GPT-2's split.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
# Vocabularies trained with each digit split off first (llama.cpp prepends `\p{N}` to GPT-2's
# split for these, as their tokenizer.json does with a `Digits` pre-tokenizer).
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, in which byte-level vocabularies are written."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _byte_level_pre_tokenizer(pre: str | None):
    if pre in _PRE_SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> tokenizers.Tokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # llama.cpp stores some added tokens as plain text; the BPE vocabulary needs every entry in the
    # byte spelling.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                                              dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
                                              fuse_unk=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
    ranked by the merged token's score (best first), as HF transformers derives them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece_bpe(tokens: list[str], scores: list[float] | None, merges: list[str] | None,
                       add_space_prefix: bool) -> tokenizers.Tokenizer:
    if merges:
        pairs = [tuple(m.split(" ")) for m in merges]
    elif scores is not None:
        pairs = _merges_from_scores(tokens, scores)
    else:
        raise CheckpointError("GGUF sentencepiece tokenizer has neither merges nor token scores")
    backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=pairs,
                                              fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _parts_from_gguf(reader: GGUFFile):
    """(backend, special tokens, chat templates, extra eos ids) from `tokenizer.ggml.*` metadata."""
    def meta(key, default=None):
        return read_field(reader, key, default)

    kind = meta("tokenizer.ggml.model")
    tokens = meta("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise CheckpointError("GGUF file has no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens)")
    token_types = meta("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        backend = _byte_level_bpe(tokens, meta("tokenizer.ggml.merges", []), meta("tokenizer.ggml.pre"))
        alphabet = set(_bytes_to_unicode().values())
        default_add_bos = False
    elif kind == "llama":
        backend = _sentencepiece_bpe(tokens, meta("tokenizer.ggml.scores"), meta("tokenizer.ggml.merges"),
                                     bool(meta("tokenizer.ggml.add_space_prefix", True)))
        alphabet = None
        # llama.cpp adds BOS to sentencepiece vocabularies unless the file says otherwise.
        default_add_bos = True
    else:
        raise CheckpointError(
            f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE), "
            "'llama' (sentencepiece BPE)"
        )

    # Control tokens are special (matched whole, skipped in decode). In a byte-level vocabulary a
    # "control" token outside the byte alphabet is a converter mislabel, left as an ordinary token.
    backend.add_special_tokens([
        AddedToken(t, special=True, normalized=False) for t, token_type in zip(tokens, token_types)
        if token_type == _GGUF_CONTROL and (alphabet is None or set(t) <= alphabet)])
    vocab = backend.get_vocab(with_added_tokens=False)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, token_type in zip(tokens, token_types)
                        if token_type == _GGUF_USER_DEFINED and t in vocab])

    special = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                      ("pad_token", "padding")):
        token_id = meta(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            if not 0 <= token_id < len(tokens):
                raise CheckpointError(f"tokenizer.ggml.{key}_token_id {token_id} is outside the vocabulary")
            special[name] = tokens[token_id]
    _add_special_tokens(backend, special.values())
    add_bos = bool(meta("tokenizer.ggml.add_bos_token", default_add_bos))
    add_eos = bool(meta("tokenizer.ggml.add_eos_token", False))
    backend.post_processor = _bos_eos_processor(backend, special.get("bos_token") if add_bos else None,
                                                special.get("eos_token") if add_eos else None)

    templates = {}
    if meta("tokenizer.chat_template") is not None:
        templates["default"] = meta("tokenizer.chat_template")
    for name in meta("tokenizer.chat_templates", []):
        templates[name] = meta(f"tokenizer.chat_template.{name}")
    extra_eos = [meta(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
    return backend, special, templates, [int(i) for i in extra_eos if i is not None]
