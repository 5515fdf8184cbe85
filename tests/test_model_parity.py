"""The functional model against HF transformers on tiny random models of every family (float32)."""

import jax
import numpy as np
import pytest

from jaxinfer.generate import generate, prefill_logits
from jaxinfer.loading.loader import LoadedModel, load_hf_directory
from tests.hf_models import VARIANTS, build_hf_model, hf_greedy, hf_logits, random_prompts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def hf_and_ours(request, tmp_path_factory):
    model = build_hf_model(request.param, seed=len(request.param))
    directory = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(directory, safe_serialization=True)
    config, host_params = load_hf_directory(directory)
    return request.param, model, config, LoadedModel(config, jax.device_put(host_params), None, directory)


def test_logits_match_hf(hf_and_ours):
    name, model, config, params = hf_and_ours
    for prompt in random_prompts(seed=1, count=3, vocab=config.vocab_size, max_len=20):
        ours = prefill_logits(params, prompt)
        ref = hf_logits(model, prompt)
        rel = np.abs(ours - ref).max() / np.abs(ref).max()
        assert rel < 1e-4, f"{name}: max relative logit error {rel:.2e}"


def test_batched_greedy_matches_hf(hf_and_ours):
    name, model, config, params = hf_and_ours
    prompts = random_prompts(seed=2, count=4, vocab=config.vocab_size, max_len=12)
    ours = generate(params, prompts, max_new_tokens=32)
    for prompt, got in zip(prompts, ours):
        assert got == hf_greedy(model, prompt, 32), f"{name}: greedy tokens differ for prompt {prompt}"
