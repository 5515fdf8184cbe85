"""The offline API as a notebook user meets it: LLM(...).generate / .chat with vLLM's names."""

import pytest

from jaxinfer import LLM, SamplingParams
from jaxinfer.generate import generate
from tests.server_fixtures import write_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    directory = write_checkpoint(tmp_path_factory.mktemp("llm_ckpt"), seed=11)
    return LLM(str(directory), max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, page_size=8,
               num_pages=80, compilation_cache_dir="")


def test_generate_strings_and_ids_in_order(llm):
    tok = llm.get_tokenizer()
    prompts = ["The quick brown fox", {"prompt_token_ids": [5, 6, 7]}, "Paris is the capital"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outs] == ["The quick brown fox", None, "Paris is the capital"]
    for prompt, out in zip(prompts, outs):
        ids = tok.encode(prompt) if isinstance(prompt, str) else prompt["prompt_token_ids"]
        [ref] = generate(llm.model, [ids], 8)
        c = out.outputs[0]
        assert out.finished and out.prompt_token_ids == ids and c.token_ids == ref
        assert c.text == tok.decode(ref) and c.finish_reason == "length"


def test_generate_builds_only_final_outputs(llm, monkeypatch):
    """The engine hands back no partial outputs while the batch runs (no copies of growing token
    lists and texts each step), and the text is still whole."""
    seen = []
    step = llm.engine.step

    def recording_step():
        outs = step()
        seen.extend(outs)
        return outs

    monkeypatch.setattr(llm.engine, "step", recording_step)
    outs = llm.generate(["one", "two three"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    assert len(seen) == 2 and all(o.finished for o in seen)
    assert [o.outputs[0].text for o in outs] == [llm.get_tokenizer().decode(o.outputs[0].token_ids) for o in outs]


def test_chat_applies_the_template(llm):
    tok = llm.get_tokenizer()
    messages = [{"role": "user", "content": "Name a color."}]
    [out] = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert out.prompt == tok.apply_chat_template(messages)
    assert out.prompt_token_ids == tok.encode(out.prompt, add_special_tokens=False)
    two = llm.chat([messages, messages + [{"role": "assistant", "content": "Red."}, messages[0]]],
                   SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == out.outputs[0].token_ids[:len(two[0].outputs[0].token_ids)]


def test_one_bad_prompt_queues_nothing(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["fine", {"prompt_token_ids": []}], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate(["x"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    with pytest.raises(TypeError, match="unknown LLM arguments"):
        LLM("unused", max_num_sequences=3)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
