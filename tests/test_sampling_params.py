import dataclasses
import math

import pytest

from jaxinfer.sampling_params import RequestOutputKind, SamplingParams

INVALID = [
    ("n", 0), ("n", 1.5), ("n", "2"), ("n", True),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", "0.5"), ("top_p", None),
    ("top_k", -2), ("top_k", 2.0), ("top_k", "5"),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", "0"),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", "1"),
    ("frequency_penalty", -3.0), ("frequency_penalty", 2.1), ("frequency_penalty", [1]),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("seed", 1.5), ("seed", "7"), ("seed", 2**63), ("seed", -(2**63) - 1),
    ("stop", ""), ("stop", [""]), ("stop", ["ok", 3]), ("stop", 5), ("stop", b"x"),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["3"]), ("stop_token_ids", [1.0]), ("stop_token_ids", 3),
    ("include_stop_str_in_output", 1), ("ignore_eos", "yes"),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 16.0), ("max_tokens", "16"),
    ("min_tokens", -1), ("min_tokens", 1.0),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", "5"),
    ("prompt_logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", 2.0),
    ("logit_bias", {"5": 1.0}), ("logit_bias", {-1: 1.0}), ("logit_bias", {5: 101.0}),
    ("logit_bias", {5: "1"}), ("logit_bias", {5: math.nan}), ("logit_bias", [(5, 1.0)]),
    ("skip_special_tokens", None), ("spaces_between_special_tokens", 0),
    ("output_kind", 1),
]


@pytest.mark.parametrize("field,value", INVALID)
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    assert SamplingParams(max_tokens=None, min_tokens=500).min_tokens == 500


def test_range_in_message():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)


def test_boundaries_accepted():
    p = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, presence_penalty=-2,
                       frequency_penalty=2, repetition_penalty=1e-3, seed=-(2**63), logprobs=20,
                       prompt_logprobs=0, max_tokens=1, logit_bias={0: -100, 7: 100})
    assert p.top_k == 0  # -1 and 0 both mean off; one spelling keeps equality and hashing simple
    assert isinstance(p.temperature, float) and isinstance(p.presence_penalty, float)
    assert p.logit_bias == {0: -100.0, 7: 100.0}


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=[3, 4])
    assert p.stop == ("###",) and p.stop_token_ids == (3, 4)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams().stop == () and SamplingParams().stop_token_ids == ()
    assert SamplingParams(logit_bias={}).logit_bias is None


def test_frozen_hashable_and_equal():
    a = SamplingParams(temperature=0.5, stop=["x"], logit_bias={3: 1.0, 1: -2.0})
    b = SamplingParams(temperature=0.5, stop=("x",), logit_bias={1: -2.0, 3: 1.0})
    assert a == b and hash(a) == hash(b)
    assert a != a.clone(temperature=0.6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.temperature = 1.0


def test_bias_dict_is_a_copy():
    bias = {3: 1.0}
    p = SamplingParams(logit_bias=bias)
    bias[4] = 2.0
    assert p.logit_bias == {3: 1.0}


def test_greedy_and_penalties():
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=5e-6).greedy
    assert not SamplingParams(temperature=1e-3).greedy
    assert not SamplingParams().has_penalties
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(presence_penalty=-0.5).has_penalties


def test_stop_ids():
    p = SamplingParams(stop_token_ids=[7])
    assert p.stop_ids([2]) == {2, 7}
    assert p.clone(ignore_eos=True).stop_ids([2]) == {7}


def test_clone_validates():
    p = SamplingParams(max_tokens=8)
    assert p.clone(max_tokens=9).max_tokens == 9
    with pytest.raises(ValueError, match="temperature"):
        p.clone(temperature=-1)


def test_with_seed_keeps_an_existing_seed():
    assert SamplingParams().with_seed(5).seed == 5
    assert SamplingParams(seed=3).with_seed(5).seed == 3


def test_for_sample():
    p = SamplingParams(n=3, seed=2**63 - 2)
    children = [p.for_sample(i) for i in range(3)]
    assert [c.n for c in children] == [1, 1, 1]
    assert [c.seed for c in children] == [2**63 - 2, 2**63 - 1, -(2**63)]
    assert SamplingParams(n=2).for_sample(1).seed is None
    with pytest.raises(ValueError, match="index"):
        p.for_sample(3)


def test_output_kind():
    assert SamplingParams().output_kind is RequestOutputKind.CUMULATIVE
    assert SamplingParams(output_kind=RequestOutputKind.DELTA).output_kind is RequestOutputKind.DELTA
