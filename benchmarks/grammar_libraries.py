"""llguidance against xgrammar on the demo tokenizer (SmolLM2, 49152 ids): per-request grammar
compile time for a few JSON schemas, and per-token mask time along a valid output.

xgrammar is not a dependency (it pulls torch and triton); install it by hand to run this:
`pip install xgrammar && python benchmarks/grammar_libraries.py`. Each schema is compiled
fresh (xgrammar's cache off), then the mask is computed before every token of one instance
of the schema, tokenized by the model's tokenizer, as the engine does it.
"""

from __future__ import annotations

import json
import statistics
import time

SCHEMAS = {
    "flat": ({"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["name", "age", "ok"]},
             {"name": "Ada Lovelace", "age": 36, "ok": True}),
    "enum_array": ({"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4}},
        "required": ["color", "tags"]},
        {"color": "green", "tags": ["a", "bb", "ccc"]}),
    "nested": ({"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"}, "email": {"type": "string"}},
                 "required": ["id", "email"]},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "qty": {"type": "integer", "minimum": 1}},
            "required": ["sku", "qty"]}},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["user", "items", "note"]},
        {"user": {"id": 7, "email": "a@b.c"}, "items": [{"sku": "ABC-1234", "qty": 2}], "note": None}),
    "tool_call": ({"type": "object", "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14}}, "required": ["city", "unit"]}},
        "required": ["name", "arguments"]},
        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}),
}


def _tokenizer():
    from jaxinfer.loading.resolve import DEFAULT_MODEL, resolve_model
    from jaxinfer.tokenizer import Tokenizer

    return Tokenizer.from_gguf(resolve_model(DEFAULT_MODEL).path)


def _summary(compile_s: float, times: list[float]) -> dict:
    """Compile time, the first mask (llguidance builds its lexer lazily, on first use) and the
    later masks of one output."""
    return {"compile_ms": 1e3 * compile_s, "tokens": len(times), "first_mask_us": 1e6 * times[0],
            "mask_us_mean": 1e6 * statistics.mean(times[1:]), "mask_us_max": 1e6 * max(times[1:])}


def bench_llguidance(tok, vocab: int) -> dict:
    import llguidance
    import llguidance.numpy

    t0 = time.perf_counter()
    ll_tok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=vocab, eos_token=list(tok.eos_token_ids))
    out = {"tokenizer_s": time.perf_counter() - t0, "schemas": {}}
    mask = llguidance.numpy.allocate_token_bitmask(1, vocab)
    for name, (schema, instance) in SCHEMAS.items():
        t0 = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = llguidance.LLMatcher(ll_tok, grammar)
        compile_s = time.perf_counter() - t0
        assert not matcher.is_error(), matcher.get_error()
        ids = tok.encode(json.dumps(instance, separators=(",", ":")), add_special_tokens=False)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            llguidance.numpy.fill_next_token_bitmask(matcher, mask, 0)
            times.append(time.perf_counter() - t0)
            assert matcher.consume_token(t), (name, matcher.get_error())
        out["schemas"][name] = _summary(compile_s, times)
    return out


def bench_xgrammar(tok, vocab: int) -> dict:
    import transformers
    import xgrammar as xg

    t0 = time.perf_counter()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    info = xg.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=list(tok.eos_token_ids))
    out = {"tokenizer_s": time.perf_counter() - t0, "schemas": {}}
    mask = xg.allocate_token_bitmask(1, vocab)
    for name, (schema, instance) in SCHEMAS.items():
        compiler = xg.GrammarCompiler(info, cache_enabled=False, max_threads=2)
        t0 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        matcher = xg.GrammarMatcher(compiled)
        compile_s = time.perf_counter() - t0
        ids = tok.encode(json.dumps(instance, separators=(",", ":")), add_special_tokens=False)
        times = []
        for t in ids:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(mask, 0)
            times.append(time.perf_counter() - t0)
            assert matcher.accept_token(t), name
        out["schemas"][name] = _summary(compile_s, times)
    return out


def main():
    tok = _tokenizer()
    vocab = tok.vocab_size
    results = {"vocab": vocab, "llguidance": bench_llguidance(tok, vocab), "xgrammar": bench_xgrammar(tok, vocab)}
    print(json.dumps(results, indent=1))
    print(f"tokenizer build: llguidance {results['llguidance']['tokenizer_s']:.2f} s, "
          f"xgrammar {results['xgrammar']['tokenizer_s']:.2f} s")
    print("| schema | tokens | compile (ms) llg / xgr | first mask (us) llg / xgr | later masks mean (us) llg / xgr "
          "| later masks max (us) llg / xgr |")
    print("|---|---|---|---|---|---|")
    for name in SCHEMAS:
        a, b = results["llguidance"]["schemas"][name], results["xgrammar"]["schemas"][name]
        print(f"| {name} | {a['tokens']} | {a['compile_ms']:.1f} / {b['compile_ms']:.1f} | "
              f"{a['first_mask_us']:.0f} / {b['first_mask_us']:.0f} | "
              f"{a['mask_us_mean']:.0f} / {b['mask_us_mean']:.0f} | "
              f"{a['mask_us_max']:.0f} / {b['mask_us_max']:.0f} |")

if __name__ == "__main__":
    main()
