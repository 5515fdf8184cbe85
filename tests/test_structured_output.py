"""Structured outputs (grammar-constrained decoding) end to end on a tiny random model that
speaks the demo tokenizer (SmolLM2, 49152 ids): every output is checked by an independent
judge (json.loads and jsonschema, re.fullmatch, membership, a parse), the device's mask
against NumPy and a separately driven llguidance matcher, and nothing compiles after warm-up."""

import json
import re

import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import pytest

from jaxinfer.engine.compile_counter import CompileCounter
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.engine import LLMEngine
from jaxinfer.engine.sampling import apply_token_bitmask
from jaxinfer.sampling_params import SamplingParams, StructuredOutputsParams
from tests.engine_fixtures import tiny_model

VOCAB = 49152

PERSON = {"type": "object", "additionalProperties": False, "required": ["color", "n", "name", "tags"],
          "properties": {"color": {"enum": ["red", "green", "blue"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "name": {"type": "string", "maxLength": 6},
                         "tags": {"type": "array", "maxItems": 2, "items": {"type": "boolean"}}}}
ITEM = {"type": "object", "additionalProperties": False, "required": ["sku", "ok"],
        "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, "ok": {"type": "boolean"}}}
EMAIL = r"[a-z]{2,5}@[a-z]{3}\.(com|org)"
CHOICES = ["yes", "no", "maybe so"]
# A list of one to three numbers below 100, in Lark; and a GBNF grammar (converted to Lark).
LIST_GRAMMAR = 'start: "[" NUM ("," NUM)? ("," NUM)? "]"\nNUM: /[0-9]{1,2}/'
GBNF_GRAMMAR = 'root ::= ("up" | "down") " " [0-9]'


@pytest.fixture(scope="module")
def model(demo_gguf_path):
    from jaxinfer.tokenizer import Tokenizer

    m = tiny_model(seed=1, vocab_size=VOCAB)
    m.tokenizer = Tokenizer.from_gguf(demo_gguf_path)
    return m


def _engine(model, **kw):
    # 40 pages of 4 tokens for up to 4 sequences of up to 96 tokens: long runs preempt.
    cfg = dict(max_model_len=96, max_num_seqs=4, max_num_batched_tokens=8, page_size=4, num_pages=41,
               compilation_cache_dir="", warmup=True)
    cfg.update(kw)
    return LLMEngine(model, EngineConfig(**cfg), kv_fill=float("nan"))


@pytest.fixture(scope="module")
def engines(model):
    # Only the asynchronous engine is warmed up (the compile-counter test runs on it); the other
    # compiles what it uses on first use, which keeps this file's start-up short.
    return {True: _engine(model, async_scheduling=True), False: _engine(model, async_scheduling=False, warmup=False)}


def run_all(engine, requests, steps_between: int = 0):
    """Adds (id, prompt, params) requests (stepping `steps_between` times after each) and steps
    until all finish; returns id -> RequestOutput."""
    done = {}

    def step():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out

    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
        for _ in range(steps_between):
            step()
    while engine.has_unfinished_requests():
        step()
    assert engine.block_manager.usage == 0
    return done


def _so(**kw):
    return StructuredOutputsParams(**kw)


def check(kind: str, spec, text: str):
    """The independent judge of one output of a constraint."""
    if kind == "json":
        jsonschema.validate(json.loads(text), spec)
    elif kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif kind == "regex":
        assert re.fullmatch(spec, text), text
    elif kind == "choice":
        assert text in spec, text
    elif kind == "list":
        values = json.loads(text)
        assert isinstance(values, list) and 1 <= len(values) <= 3 and all(
            isinstance(v, int) and 0 <= v < 100 for v in values), text
        assert re.fullmatch(r"\[\d{1,2}(,\d{1,2}){0,2}\]", text), text  # no whitespace, no signs
    elif kind == "gbnf":
        direction, digit = text.split(" ")
        assert direction in ("up", "down") and digit.isdigit() and len(digit) == 1, text
    else:
        raise AssertionError(kind)


# Constraint name -> (StructuredOutputsParams, judge kind, judge spec)
CASES = {
    "person": (_so(json=PERSON, disable_any_whitespace=True), "json", PERSON),
    "item_text": (_so(json=json.dumps(ITEM), disable_any_whitespace=True), "json", ITEM),
    "email": (_so(regex=EMAIL), "regex", EMAIL),
    "choice": (_so(choice=CHOICES), "choice", CHOICES),
    "list": (_so(grammar=LIST_GRAMMAR), "list", None),
    "gbnf": (_so(grammar=GBNF_GRAMMAR), "gbnf", None),
    "object": (_so(json_object=True, disable_any_whitespace=True), "json_object", None),
}


def test_device_bitmask_matches_numpy_reference():
    """apply_token_bitmask (device) against llguidance's NumPy reference, for a vocabulary that
    is not a multiple of 32 and one that is."""
    rng = np.random.default_rng(0)
    for vocab in (100, 256):
        logits = rng.normal(size=(3, vocab)).astype(np.float32)
        words = rng.integers(-2**31, 2**31, size=(3, -(-vocab // 32)), dtype=np.int64).astype(np.int32)
        expected = logits.copy()
        llguidance.numpy.apply_token_bitmask_inplace(expected, words)
        got = np.asarray(apply_token_bitmask(logits, words))
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_outputs_satisfy_their_constraints_mixed_with_plain_requests(engines, model, async_scheduling):
    """Every kind of constraint, greedy and sampled, n = 2, beside unconstrained requests in the
    same batches; the plain requests' tokens equal those of the same requests run alone."""
    engine = engines[async_scheduling]
    requests, judges = [], {}
    # A free-form object from a random model could outgrow max_tokens: a bias towards closing
    # it (the mask still decides what is allowed).
    closing = {model.tokenizer.backend.token_to_id(t): 30.0 for t in ("}", "{}")}
    for i, (name, (so, kind, spec)) in enumerate(CASES.items()):
        params = SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=80,
                                structured_outputs=so, n=2 if name == "email" else 1,
                                logit_bias=closing if name == "object" else None)
        requests.append((name, f"Request {i}: answer", params))
        judges[name] = (kind, spec)
        if i % 3 == 0:
            requests.append((f"plain{i}", f"Plain {i}", SamplingParams(temperature=0.0, max_tokens=12,
                                                                        ignore_eos=True)))
    done = run_all(engine, requests, steps_between=1)
    for name, (kind, spec) in judges.items():
        outs = done[name].outputs
        assert len(outs) == (2 if name == "email" else 1)
        for c in outs:
            assert c.finish_reason == "stop" and c.stop_reason is None, (name, c)
            check(kind, spec, c.text)
    alone = run_all(engine, [(rid, p, sp) for rid, p, sp in requests if rid.startswith("plain")])
    for rid, out in alone.items():
        assert done[rid].outputs[0].token_ids == out.outputs[0].token_ids
        assert done[rid].outputs[0].finish_reason == "length"


def test_greedy_token_is_the_argmax_over_the_reference_mask(engines, model):
    """Each step's logits before masking and the token the device picked: the token is the
    NumPy argmax over the tokens a separately driven llguidance matcher allows after the same
    prefix (eos only when the grammar may end)."""
    engine = engines[True]
    runner = engine.runner
    seen = []
    original = runner._run_sampler

    def record(prepared, logits, bitmask=None):
        if bitmask is not None:
            assert bitmask.shape[0] == logits.shape[0]  # filled at the sampler's size: sent as it is
            seen.append((np.asarray(logits), bitmask.copy()))
        return original(prepared, logits, bitmask)

    runner._run_sampler = record
    try:
        done = run_all(engine, [("g", "The answer:", SamplingParams(
            temperature=0.0, max_tokens=60, structured_outputs=CASES["person"][0]))])
    finally:
        del runner._run_sampler
    tokens = done["g"].outputs[0].token_ids
    # (A step planned before the request ended may sample once more; its token is dropped.)
    assert len(tokens) <= len(seen) <= len(tokens) + 1
    ll_tok = llguidance.LLTokenizer(model.tokenizer.backend.to_str(), n_vocab=VOCAB,
                                    eos_token=list(engine.eos_token_ids))
    ref = llguidance.LLMatcher(ll_tok, llguidance.LLMatcher.grammar_from_json_schema(
        PERSON, defaults={"whitespace_flexible": False}))
    for step, ((logits, bitmask), token) in enumerate(zip(seen, tokens)):
        ref_mask = llguidance.numpy.allocate_token_bitmask(1, VOCAB)
        llguidance.numpy.fill_next_token_bitmask(ref, ref_mask)
        np.testing.assert_array_equal(bitmask[0], ref_mask[0], err_msg=f"step {step}")
        allowed = np.unpackbits(ref_mask[0].view(np.uint8), bitorder="little")[:VOCAB].astype(bool)
        assert token == int(np.argmax(np.where(allowed, logits[0], -np.inf))), step
        assert ref.consume_token(token)
    assert ref.is_stopped()
    check("json", PERSON, done["g"].outputs[0].text)


def test_new_schemas_mid_run_compile_nothing(engines):
    """Schemas never seen before arrive while other requests run, under every sampler variant
    (penalties, logprobs, top-p, min-p, logit bias): no XLA compilation after warm-up."""
    engine = engines[True]
    rng = np.random.default_rng(3)
    extras = [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9), dict(temperature=0.7, min_p=0.1),
              dict(temperature=0.0, presence_penalty=0.5, repetition_penalty=1.2),
              dict(temperature=0.6, logprobs=3), dict(temperature=0.0, logit_bias={100: 5.0})]
    requests, schemas = [], {}
    for i in range(8):
        schema = {"type": "object", "additionalProperties": False, "required": [f"k{i}"],
                  "properties": {f"k{i}": {"type": "string", "maxLength": int(rng.integers(1, 6))}}}
        schemas[f"s{i}"] = schema
        params = SamplingParams(max_tokens=40, seed=i, structured_outputs=_so(json=schema, disable_any_whitespace=True),
                                **extras[i % len(extras)])
        requests.append((f"s{i}", f"Schema {i}", params))
        requests.append((f"p{i}", f"Plain {i}", SamplingParams(max_tokens=int(rng.integers(1, 10)), seed=i,
                                                              **extras[(i + 1) % len(extras)])))
    with CompileCounter() as counter:
        done = run_all(engine, requests, steps_between=2)
    assert counter.count == 0, f"{counter.count} compilations after warm-up"
    for rid, schema in schemas.items():
        assert done[rid].outputs[0].finish_reason == "stop"
        check("json", schema, done[rid].outputs[0].text)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_preemption_keeps_matchers_in_step(engines, async_scheduling):
    """Structured requests long enough to be preempted (the pool holds 40 pages) give the tokens
    they give alone, and stay valid."""
    engine = engines[async_scheduling]
    schema = {"type": "array", "minItems": 8, "maxItems": 8, "items": {"type": "integer", "minimum": 0, "maximum": 999}}
    so = _so(json=schema, disable_any_whitespace=True)
    prompts = {f"q{i}": "word " * (30 + 3 * i) for i in range(4)}
    before = engine.scheduler.num_preemptions_total
    done = run_all(engine, [(rid, p, SamplingParams(temperature=0.0, max_tokens=50, structured_outputs=so))
                            for rid, p in prompts.items()])
    assert engine.scheduler.num_preemptions_total > before, "the pool was meant to force preemption"
    for rid, p in prompts.items():
        out = done[rid].outputs[0]
        check("json", schema, out.text)
        [alone] = run_all(engine, [(rid, p, SamplingParams(temperature=0.0, max_tokens=50,
                                                           structured_outputs=so))]).values()
        assert alone.outputs[0].token_ids == out.token_ids


def test_mask_work_overlaps_the_forward_pass(engines, monkeypatch):
    """Asynchronous scheduling with a structured row: step t+1's forward pass is queued, then
    step t's tokens are read, then the mask is computed, then step t+1's sampler is queued.
    Steps without structured rows never compute or apply a mask."""
    from jaxinfer.engine import runner as runner_module

    engine = engines[True]
    events = []

    def spy(obj, name, label):
        original = getattr(obj, name)

        def wrapper(*args, **kwargs):
            events.append(label)
            return original(*args, **kwargs)

        monkeypatch.setattr(obj, name, wrapper)

    spy(engine.runner, "_run_model", "forward")
    spy(engine.runner, "_prepare_sampler", "prepare")
    spy(engine.runner, "_run_sampler", "sample")
    original_mask = engine.runner._grammar_mask

    def grammar_mask(num_rows, bitmask):
        if bitmask is not None:  # every sampler takes a mask; only a grammar's comes from the host
            events.append("apply_mask")
        return original_mask(num_rows, bitmask)

    monkeypatch.setattr(engine.runner, "_grammar_mask", grammar_mask)
    spy(engine.structured, "fill_bitmask", "mask")
    spy(runner_module.PendingStep, "result", "read")
    # The first run also finishes what an earlier test left in flight (its last step's sampler).
    for rid in ("plain-0", "plain"):
        events.clear()
        run_all(engine, [(rid, "Plain", SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))])
    assert "mask" not in events and "apply_mask" not in events
    events.clear()
    run_all(engine, [("s", "Hi", SamplingParams(temperature=0.0, max_tokens=30,
                                                structured_outputs=CASES["person"][0]))])
    # Steady state: forward(t+1) queued with its sampler's metadata, read(t), then the mask of
    # t+1 filled (in the mask thread, while the host builds t's outputs and plans t+2); t+1's
    # sampler is queued, mask applied first, just before forward(t+2), which reads its tokens.
    pattern = ["prepare", "read", "mask", "forward", "sample", "apply_mask"]
    steady = [i for i in range(len(events)) if events[i:i + len(pattern)] == pattern]
    assert len(steady) >= 3, events
    forwards = 0
    for e in events:  # every mask is filled after the forward pass of its step was queued
        forwards += e == "forward"
        if e == "mask":
            assert forwards >= 1, events
            forwards -= 1


def test_bad_constraints_fail_at_admission_and_others_finish(engines):
    engine = engines[False]
    engine.add_request("ok", "Fine", SamplingParams(temperature=0.0, max_tokens=40,
                                                    structured_outputs=CASES["choice"][0]))
    engine.step()
    bad = [(_so(regex="a(b"), "regex"), (_so(json={"type": "nonsense"}), "json"),
           (_so(json="{not json"), "json"), (_so(grammar="start: undefined_rule"), "grammar"),
           (_so(grammar='root ::= "a" | missing'), "grammar")]
    for so, field in bad:
        with pytest.raises(ValueError, match=rf"structured_outputs\.{field}"):
            engine.add_request(f"bad-{field}", "Broken", SamplingParams(structured_outputs=so))
        assert engine.num_unfinished_requests == 1
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert list(done) == ["ok"] and done["ok"].outputs[0].text in CHOICES


def test_new_grammars_compile_off_the_admission_path(engines, monkeypatch):
    """A new constraint is validated at admission (errors raise there) and compiled in the
    pool: admission returns before the compile ends, the request's forward pass is queued
    meanwhile, and its sampler waits for the compiled grammar; a group of n shares it."""
    import threading

    from jaxinfer.engine.structured import StructuredOutputs

    engine = engines[True]
    bad_pattern = {"type": "object", "properties": {"s": {"type": "string", "pattern": "a(b"}}}
    with pytest.raises(ValueError, match=r"structured_outputs\.json"):
        engine.add_request("bad-pattern", "Broken", SamplingParams(structured_outputs=_so(json=bad_pattern)))
    release, builds = threading.Event(), []
    original = StructuredOutputs._build

    def held_build(self, *args):
        builds.append(args[-1])
        assert release.wait(30)
        return original(self, *args)

    monkeypatch.setattr(StructuredOutputs, "_build", held_build)
    schema = {**PERSON, "required": ["color", "n"]}  # not compiled by any other test
    so = _so(json=schema, disable_any_whitespace=True)
    engine.add_request("pooled", "Hi", SamplingParams(temperature=0.0, max_tokens=50, n=2, seed=3,
                                                      structured_outputs=so))
    forwards = []
    monkeypatch.setattr(engine.runner, "_run_model",
                        lambda *a, _run=engine.runner._run_model, **k: forwards.append(1) or _run(*a, **k))
    threading.Timer(0.5, release.set).start()
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o for o in engine.step() if o.finished]
    assert builds == ["json"] and forwards  # one compile for the group
    [out] = outputs
    assert len(out.outputs) == 2
    for completion in out.outputs:
        check("json", schema, completion.text)


def test_a_batch_compiles_its_new_grammars_together(engines, monkeypatch):
    """`prepare_structured_outputs` (what `LLM.generate` calls) compiles a batch's new
    constraints in the pool at once: adding the batch then validates nothing on its own
    thread. An invalid constraint raises naming its field, and the valid ones stay compiled."""
    engine = engines[False]
    schemas = [{**PERSON, "required": [field]} for field in ("n", "name", "tags")]  # new to the engine
    params = [SamplingParams(temperature=0.0, max_tokens=50, structured_outputs=_so(json=s, disable_any_whitespace=True))
              for s in schemas]
    bad = SamplingParams(structured_outputs=_so(regex="a(b"))
    compiles = engine.structured.num_compiles
    with pytest.raises(ValueError, match=r"structured_outputs\.regex"):
        engine.prepare_structured_outputs(params[:1] + [bad])
    assert engine.structured.num_compiles == compiles + 1
    validations = []
    validate = llguidance.LLMatcher.validate_grammar
    monkeypatch.setattr(llguidance.LLMatcher, "validate_grammar",
                        staticmethod(lambda *a: validations.append(1) or validate(*a)))
    engine.prepare_structured_outputs(params + params)
    assert engine.structured.num_compiles == compiles + 3
    done = run_all(engine, [(f"batch-{i}", "Hi", p) for i, p in enumerate(params)])
    assert not validations
    for i, schema in enumerate(schemas):
        check("json", schema, done[f"batch-{i}"].outputs[0].text)


def test_structured_needs_a_tokenizer(model):
    engine = _engine(tiny_model(seed=1), warmup=False)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("x", [5, 6], SamplingParams(structured_outputs=CASES["choice"][0]))
    assert engine.num_unfinished_requests == 0


def test_offline_llm_generate_and_plain_runs_build_no_grammar_state(model):
    from jaxinfer import LLM

    llm = LLM(model, max_model_len=96, max_num_seqs=4, max_num_batched_tokens=8, page_size=4, num_pages=64,
              compilation_cache_dir="", warmup=False)
    llm.generate(["Plain"], SamplingParams(max_tokens=3), use_tqdm=False)
    assert llm.engine.structured._ll_tokenizer is None  # built only when a structured request comes
    outs = llm.generate(["Pick one:", "Email:"], [
        SamplingParams(temperature=0.0, max_tokens=20, structured_outputs=CASES["choice"][0]),
        SamplingParams(temperature=0.5, seed=1, max_tokens=30, structured_outputs=CASES["email"][0])],
        use_tqdm=False)
    check("choice", CHOICES, outs[0].outputs[0].text)
    check("regex", EMAIL, outs[1].outputs[0].text)


def test_switch_interval_is_short_only_while_a_mask_fills(engines, monkeypatch):
    """The mask thread fills under a 0.2 ms GIL switch interval (so it gets the GIL back soon
    after llguidance finishes) and the process's own interval is back once the mask is ready."""
    import sys

    from jaxinfer.engine.structured import GIL_SWITCH_INTERVAL_S

    so = engines[False].structured
    seen = []
    fill = so.fill_bitmask

    def recording_fill(grammars):
        seen.append(sys.getswitchinterval())
        return fill(grammars)

    monkeypatch.setattr(so, "fill_bitmask", recording_fill)
    before = sys.getswitchinterval()
    assert before > GIL_SWITCH_INTERVAL_S
    grammar = so.compile(CASES["person"][0])
    mask = so.fill_bitmask_async([grammar, None]).result()
    assert seen == [pytest.approx(GIL_SWITCH_INTERVAL_S)]
    assert sys.getswitchinterval() == before
    assert mask.shape == (2, so.num_words) and (mask[1] == -1).all() and not (mask[0] == -1).all()


def test_overlapping_fills_restore_the_interval_once_the_last_ends():
    """Two engines' fills overlapping (data-parallel replicas): the interval stays short until
    both are done, then is what it was before either began."""
    import sys

    from jaxinfer.engine.structured import _SHORT_SWITCH_INTERVAL, GIL_SWITCH_INTERVAL_S

    before = sys.getswitchinterval()
    _SHORT_SWITCH_INTERVAL.enter()
    _SHORT_SWITCH_INTERVAL.enter()
    _SHORT_SWITCH_INTERVAL.exit()
    assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S)
    _SHORT_SWITCH_INTERVAL.exit()
    assert sys.getswitchinterval() == before


def test_a_failed_pooled_compile_aborts_its_request_only(engines, monkeypatch):
    """A constraint that validates but whose compile in the pool fails (an llguidance defect)
    ends its own request with finish_reason "abort"; the engine keeps stepping, the plain and
    structured requests beside it finish as usual, and the failed compile is not served from
    the cache: the next request with that constraint compiles it again."""
    from jaxinfer.engine.structured import StructuredOutputs

    engine = engines[True]
    # not compiled by any other test; the property's name marks it in the grammar text
    schema = {"type": "object", "properties": {"pool_fails": {"type": "integer"}}, "required": ["pool_fails"]}
    so = _so(json=schema, disable_any_whitespace=True)
    original = StructuredOutputs._build

    def failing_build(self, ll_tokenizer, text, kind):
        if "pool_fails" in text:
            raise RuntimeError("compile failed in the pool")
        return original(self, ll_tokenizer, text, kind)

    monkeypatch.setattr(StructuredOutputs, "_build", failing_build)
    done = run_all(engine, [
        ("plain", "Hello there", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)),
        ("broken", "Hi", SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=so)),
        ("choice", "Pick", SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=CASES["choice"][0])),
    ])
    assert done["broken"].outputs[0].finish_reason == "abort" and done["broken"].outputs[0].text == ""
    assert len(done["plain"].outputs[0].token_ids) == 12
    assert done["choice"].outputs[0].text in CHOICES
    monkeypatch.setattr(StructuredOutputs, "_build", original)
    again = run_all(engine, [("again", "Hi", SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=so))])
    check("json", schema, again["again"].outputs[0].text)
