"""The README's Python quick start runs as written, on the demo model."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_offline_quick_start_runs(demo_gguf_path, capsys):
    [block] = [b for b in python_blocks() if "from jaxinfer import LLM, SamplingParams" in b]
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    texts = eval(capsys.readouterr().out)  # the block prints a list of the two completions
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    [chat] = namespace["chat"]
    assert chat.finished and chat.outputs[0].token_ids
    # Greedy, so the first completion is the reference loop's continuation of the prompt.
    from jaxinfer.generate import generate

    llm = namespace["llm"]
    ids = llm.get_tokenizer().encode("The capital of France is")
    [ref] = generate(llm.model, [ids], 16, eos_token_ids=llm.get_tokenizer().eos_token_ids)
    assert texts[0] == llm.get_tokenizer().decode(ref)


def test_flax_module_example_runs():
    """The README's own-module example: the module it builds runs through LLM like the reference."""
    [block] = [b for b in python_blocks() if "LlamaForCausalLM" in b]
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own documentation
    from jaxinfer import SamplingParams
    from jaxinfer.generate import generate

    llm, model = namespace["llm"], namespace["model"]
    [out] = llm.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                         use_tqdm=False)
    assert out.outputs[0].token_ids == generate(model, [[3, 4, 5]], 8)[0]
