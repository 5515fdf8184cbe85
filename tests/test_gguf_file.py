"""The GGUF header parser against gguf's own GGUFReader: every field, every tensor's view, on a
file with every value type written by gguf's GGUFWriter and on the demo model's file; malformed
files fail as ValueError (which the loader turns into a CheckpointError)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter

from jaxinfer.loading.gguf_file import GGUFFile


def _assert_same(path):
    ours, theirs = GGUFFile(path), GGUFReader(path)
    # GGUFReader adds three pseudo-fields of the header (version and counts).
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(fields)
    for key, field in fields.items():
        assert ours.fields[key].types == field.types, key
        assert ours.fields[key].contents() == field.contents(), key
    assert (ours.alignment, ours.data_offset) == (theirs.alignment, theirs.data_offset)
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, a.n_elements, a.n_bytes, a.data_offset) == \
            (b.name, b.tensor_type, b.n_elements, b.n_bytes, b.data_offset)
        np.testing.assert_array_equal(a.shape, b.shape)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        np.testing.assert_array_equal(a.data, b.data)


@pytest.fixture(scope="module")
def every_type_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "types.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo \u2028 wörld")
    w.add_array("t.tokens", ["a", "", "ü", "<s>", "\n"])
    w.add_array("t.scores", [0.5, -1.25, 3.0])
    w.add_array("t.ids", [1, 2, 3, 2**31 - 1])
    w.add_array("t.flags", [True, False, True])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4, 64)).astype(np.float16))
    w.add_tensor("i32", np.arange(7, dtype=np.int32))
    # A Q8_0 tensor as raw blocks: 2 rows of 64 values = 2 blocks of 34 bytes each per row.
    w.add_tensor("q8", rng.integers(0, 255, (2, 68), dtype=np.uint8), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_type_and_tensor_type_reads_as_gguf_reads_it(every_type_gguf):
    _assert_same(every_type_gguf)
    f = GGUFFile(every_type_gguf)
    assert f.fields["t.u64"].contents() == 2**63 + 5 and f.fields["t.bool"].contents() is True
    assert f.fields["t.tokens"].contents() == ["a", "", "ü", "<s>", "\n"]


def test_the_demo_model_file_reads_as_gguf_reads_it(demo_gguf_path):
    _assert_same(demo_gguf_path)


@pytest.mark.parametrize("keep", [0, 3, 10, 40, 300])
def test_a_file_cut_short_is_a_value_error(tmp_path, every_type_gguf, keep):
    path = tmp_path / "cut.gguf"
    path.write_bytes(every_type_gguf.read_bytes()[:keep])
    with pytest.raises(ValueError):
        GGUFFile(path)


def test_tensor_data_past_the_end_is_a_value_error(tmp_path, every_type_gguf):
    data = every_type_gguf.read_bytes()
    path = tmp_path / "short.gguf"
    path.write_bytes(data[:-150])  # into the last tensor (q8, 136 bytes, then padding)
    with pytest.raises(ValueError, match="past the end"):
        GGUFFile(path)
