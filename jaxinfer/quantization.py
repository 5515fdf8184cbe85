"""Weight-only quantization: quantized projection weights as a pytree the `Linear` hook runs.

`quantize_params(state, "int8" | "int4" | "fp8")` replaces the decoder layers' four
projection weights (q|k|v, o, gate|up, down) by `QuantizedWeight`s; the `Linear` hook
dispatches on that type (models/linear.py), so model files do not change. What stays in the
model's dtype, and why:
  - the embedding: a lookup reads one row per token, so its bytes do not cost decode time;
  - the LM head: 3% of the Llama-3-8B weights (7% of the int8 ones) for most of the logits'
    accuracy; vLLM and the GGUF Q4/Q8 presets also keep it wider by default;
  - norms, biases: a few KB.

Formats (values, scales and offsets as pallas_kernels/quantized_matmul/layout.py stores them):
  int8  symmetric, one scale per output channel: w = q * s, q in [-127, 127].
  int4  asymmetric, one scale and one offset per group of `group_size` input rows (128 by
        default, AWQ's and GPTQ's): w = u * s + m, u in [0, 15]; packed two codes a byte.
  fp8   e4m3 with one scale per output channel: w = f * s, |f| <= 448. Weight-only: at decode
        the weight bytes are the cost, and widening fp8 to bf16 in the matmul's registers is
        free; an fp8 x fp8 matmul would also need the activations quantized.
Scales and offsets are kept in the model's dtype.

Steps of up to 64 tokens on a GPU run the quantized skinny-matmul kernel (codes widened in
registers); elsewhere (prefill, CPU) the weight is dequantized inside the jitted step and
multiplied by XLA's dot.

W8A8 (SGLang's names `w8a8_int8`, `w8a8_fp8`; vLLM's dynamic fp8 on Hopper is the same
scheme): the weight as int8 or fp8 per output channel, stored [N, K], and the activations
quantized per token at each projection, so the products run on the tensor cores' 8-bit
instructions with nothing widened (pallas_kernels/quantized_matmul/w8a8.py says why that
streams faster). Decode steps on a GPU run the W8A8 kernel, larger steps XLA's own 8-bit dot;
on the CPU the same numbers come from the fake-quantized activations times the float weight.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxinfer.models.linear import WEIGHT_HANDLERS, Linear, dense_dot, select_layer
from pallas_kernels.quantized_matmul import QuantLayout, dequantize, pack_int4, w8a8
from pallas_kernels.quantized_matmul.tuned_block_sizes import kernel_supports

WEIGHT_ONLY_METHODS = ("int8", "int4", "fp8")
W8A8_METHODS = ("w8a8_int8", "w8a8_fp8")
METHODS = WEIGHT_ONLY_METHODS + W8A8_METHODS
DEFAULT_GROUP_SIZE = 128
QUANTIZED_LAYER_PARAMS = ("w_qkv", "w_o", "w_gate_up", "w_down")
_FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedWeight:
    """A quantized weight of logical shape [K, N], or [L, K, N] stacked by layer.

    values, scales, offsets: the arrays of `layout` (offsets None for symmetric formats);
      each may also be a tuple of per-layer arrays (the unrolled form models/__init__.py
      makes of stacked layers).
    layout: the static QuantLayout.
    """

    values: jax.Array
    scales: jax.Array
    offsets: jax.Array | None
    layout: QuantLayout = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (float) shape: [.., K, N]."""
        if isinstance(self.values, (tuple, list)):
            lead, (rows, n) = (len(self.values),), self.values[0].shape
        else:
            *lead, rows, n = self.values.shape
        return (*lead, rows * 2 if self.layout.kind == "int4" else rows, n)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in jax.tree.leaves(self))

    def reshape(self, *shape):
        return view_as_itself(self, shape)

    def layer(self, i):
        """(values, scales, offsets, layer) to read layer i (None: the weight is not stacked): a
        per-layer tuple is indexed here, a stack is passed whole with its index."""
        if i is not None and isinstance(self.values, (tuple, list)):
            pick = (lambda a: None if a is None else a[i])
            return pick(self.values), pick(self.scales), pick(self.offsets), None
        return self.values, self.scales, self.offsets, i


def view_as_itself(w, shape):
    """`w.reshape(*shape)` of a quantized weight: the models view a weight as [L, K, N] before
    projecting; a quantized weight is stored in that form already, so only that view is allowed."""
    if len(shape) == 1 and isinstance(shape[0], tuple):
        shape = shape[0]
    mine = w.shape
    if len(shape) != len(mine) or shape[:-1] != mine[:-1] or shape[-1] not in (-1, mine[-1]):
        raise ValueError(f"a quantized weight of shape {mine} can only be viewed as itself, not {shape}")
    return w


QUANTIZED_KERNEL_MAX_TOKENS = 64


def _quantized_linear(linear: Linear, x_tk, w: QuantizedWeight, layer, transpose: bool, out_dtype):
    if transpose:
        raise ValueError("quantized weights are stored [K, N]; transposed use (the tied LM head) is not quantized")
    values, scales, offsets, layer = w.layer(layer)
    k, n = w.shape[-2:]
    # The quantized kernel was measured only up to 64 tokens (0.4-0.6x the float kernel there):
    # larger steps keep XLA's dot over the widened codes.
    if (linear.kernel == "pallas" and x_tk.ndim == 2
            and x_tk.shape[0] <= min(linear.max_kernel_tokens, QUANTIZED_KERNEL_MAX_TOKENS)
            and kernel_supports(w.layout, k, n)):
        from pallas_kernels.quantized_matmul import quantized_matmul

        y = quantized_matmul(x_tk, values, scales, offsets, layer, layout=w.layout, interpret=linear.interpret)
        return y.astype(out_dtype or x_tk.dtype)
    if layer is not None:
        values, scales = select_layer(values, layer), select_layer(scales, layer)
        offsets = None if offsets is None else select_layer(offsets, layer)
    if w.layout.group_size == k and offsets is None:
        # Per-channel: the scale comes out of the sum, so the dot reads the widened codes
        # (a convert XLA can fuse into the matmul) and the scale multiplies [T, N] after.
        y = dense_dot(x_tk, values.astype(x_tk.dtype), out_dtype=jnp.float32) * scales.astype(jnp.float32)
        return y.astype(out_dtype or x_tk.dtype)
    return dense_dot(x_tk, dequantize(values, scales, offsets, w.layout, x_tk.dtype), out_dtype=out_dtype)


WEIGHT_HANDLERS[QuantizedWeight] = _quantized_linear


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class W8A8Weight:
    """A W8A8 weight of logical shape [K, N] (or [L, K, N] stacked by layer).

    values: int8 or float8_e4m3fn codes stored [.., N, K] (K-major, see the module docstring),
      or a tuple of per-layer arrays (the unrolled form).
    scales: per-output-channel scales [.., 1, N] in the model's dtype.
    kind: "int8" or "fp8" (static): the codes' and the activations' format.
    """

    values: jax.Array
    scales: jax.Array
    kind: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        if isinstance(self.values, (tuple, list)):
            lead, (n, k) = (len(self.values),), self.values[0].shape
        else:
            *lead, n, k = self.values.shape
        return (*lead, k, n)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in jax.tree.leaves(self))

    def reshape(self, *shape):
        return view_as_itself(self, shape)

    def layer(self, i):
        """(values, scales, layer): a per-layer tuple indexed here, a stack passed whole."""
        if i is not None and isinstance(self.values, (tuple, list)):
            return self.values[i], self.scales[i], None
        return self.values, self.scales, i


# Steps up to this many tokens run the W8A8 kernel on a GPU; larger ones XLA's 8-bit dot. At 64
# tokens XLA's dot alone is as fast (benchmarks/results/quantized_matmul_h200_2026-12-02_w8a8*),
# but in the engine it reads a slice of the stacked weight, which XLA copies first: batch-64
# decode of the 8B shape ran 4,858 tok/s through XLA against 11,821 through the kernel.
W8A8_KERNEL_MAX_TOKENS = 64


def _w8a8_linear(linear: Linear, x_tk, w: W8A8Weight, layer, transpose: bool, out_dtype):
    if transpose:
        raise ValueError("W8A8 weights are projections; the tied LM head is not quantized")
    values, scales, layer = w.layer(layer)
    k, n = w.shape[-2:]
    out_dtype = out_dtype or x_tk.dtype
    if (linear.kernel == "pallas" and x_tk.ndim == 2 and x_tk.shape[0] <= W8A8_KERNEL_MAX_TOKENS
            and w8a8.kernel_supports(k, n)):
        return w8a8.w8a8_matmul(x_tk, values, scales, layer, kind=w.kind, interpret=linear.interpret,
                                out_dtype=jnp.dtype(out_dtype))
    values, scales = select_layer(values, layer), select_layer(scales, layer)
    lead = x_tk.shape[:-1]
    y = w8a8_xla(x_tk.reshape(-1, k), values, w.kind, native=jax.default_backend() == "gpu")
    y = y * scales.astype(jnp.float32)[0]
    return y.astype(out_dtype).reshape(*lead, n)


def w8a8_xla(x, values_nk, kind: str, *, native: bool):
    """Per-token quantized x [T, K] times the codes [N, K]^T, before the channel scales, in
    float32, by XLA. native: the GPU form, with 8-bit products (int8: XLA's int8 tensor-core
    dot, exact int32 sums; fp8: the codes widened to bf16, which holds e4m3 exactly; the engine
    with XLA's own fp8 x fp8 dot gave no result on the H200 in two runs, cause not captured).
    Otherwise the CPU form: the fake-quantized activations times the float32 codes (XLA's 8-bit
    dots are slow there), the same numbers but for float32 rounding of the sums."""
    if not native:
        return dense_dot(w8a8.fake_quantize_activations(x, kind), values_nk.astype(jnp.float32), transpose=True,
                         out_dtype=jnp.float32)
    q, x_scale = w8a8.quantize_activations(x, kind)
    if kind == "int8":
        acc = jax.lax.dot_general(q, values_nk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    else:
        acc = dense_dot(q.astype(jnp.bfloat16), values_nk.astype(jnp.bfloat16), transpose=True,
                        out_dtype=jnp.float32)
    return acc.astype(jnp.float32) * x_scale[:, None]


WEIGHT_HANDLERS[W8A8Weight] = _w8a8_linear


def quantize_w8a8(w_kn: jax.Array, method: str) -> W8A8Weight:
    """A float weight [.., K, N] as a W8A8Weight: per-channel int8 or fp8 codes, stored [.., N, K]."""
    if method not in W8A8_METHODS:
        raise ValueError(f"W8A8 method must be one of {W8A8_METHODS}, got {method!r}")
    kind = method.split("_")[1]
    q = _quantize(w_kn, QuantLayout(kind, w_kn.shape[-2]))
    return W8A8Weight(jnp.swapaxes(q.values, -1, -2), q.scales, kind)


def quantize_weight(w_kn: jax.Array, method: str,
                    group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedWeight | W8A8Weight:
    """Quantizes a float weight [.., K, N] (any leading axes are batch, e.g. layers); the W8A8
    methods give a W8A8Weight (`quantize_w8a8`).

    int8 and fp8 take one scale per output channel (group_size is ignored); int4 one scale and
    offset per group_size rows (or, where that does not divide K, per `group_for(K, ...)`).
    """
    if method in W8A8_METHODS:
        return quantize_w8a8(w_kn, method)
    if method not in METHODS:
        raise ValueError(f"quantization must be one of {METHODS}, got {method!r}")
    k = w_kn.shape[-2]
    if method == "int4":
        if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
            raise ValueError(f"int4 group_size must be an even integer >= 2, got {group_size!r}")
        group = group_for(k, group_size)
        layout = QuantLayout("int4", group, group)
    else:
        layout = QuantLayout(method, k)
    return _quantize(w_kn, layout)


def group_for(k: int, group_size: int) -> int:
    """group_size if it divides k; else the largest power of 2 below it that does (at least 16:
    the kernel's tiles are powers of 2), else the largest even divisor below it. SmolLM2's
    width 576 takes groups of 64 where 128 was asked."""
    if k % group_size == 0:
        return group_size
    g = 1 << (group_size.bit_length() - 1)
    while g >= 16:
        if k % g == 0:
            return g
        g //= 2
    for g in range(min(group_size, k), 1, -1):
        if k % g == 0 and g % 2 == 0:
            return g
    raise ValueError(f"K = {k} has no even divisor to group int4 rows by")


@functools.partial(jax.jit, static_argnames=("layout",))
def _quantize(w_kn, layout: QuantLayout) -> QuantizedWeight:
    if w_kn.ndim > 2:  # one layer at a time: the float32 temporaries of a whole stack are large
        return jax.lax.map(lambda w: _quantize(w, layout), w_kn)
    dtype = w_kn.dtype
    k, n = w_kn.shape
    g = layout.group_size
    w = w_kn.astype(jnp.float32).reshape(k // g, g, n)
    if layout.kind == "int4":
        scale, offset = _fit_affine(w, levels=15, dtype=dtype)
        codes = _affine_codes(w, scale, offset, 15).astype(jnp.uint8).reshape(k, n)
        return QuantizedWeight(pack_int4(codes, layout.pack_size), scale, offset, layout)
    absmax = jnp.max(jnp.abs(w), axis=-2)
    top = 127.0 if layout.kind == "int8" else _FP8_MAX
    scale = (jnp.maximum(absmax, _TINY) / top).astype(dtype)
    q = w / scale.astype(jnp.float32)[..., None, :]
    if layout.kind == "int8":
        values = jnp.clip(jnp.round(q), -127, 127).astype(jnp.int8)
    else:
        values = jnp.clip(q, -_FP8_MAX, _FP8_MAX).astype(jnp.float8_e4m3fn)
    return QuantizedWeight(values.reshape(k, n), scale, None, layout)


_TINY = float(jnp.finfo(jnp.float32).tiny)
_AFFINE_FIT_ITERATIONS = 8


def _affine_codes(w, scale, offset, levels: int):
    """Nearest codes u in [0, levels] of w [G, g, N] under w ~ u * scale + offset ([G, N], as
    stored: the codes are chosen for the rounded scale and offset)."""
    s = scale.astype(jnp.float32)[:, None, :]
    m = offset.astype(jnp.float32)[:, None, :]
    return jnp.clip(jnp.round((w - m) / s), 0, levels)


def _fit_affine(w, *, levels: int, dtype):
    """Scale and offset per group of w [G, g, N] minimising the squared error of the codes:
    start from the group's [min, max], then alternate nearest codes and the least-squares
    (scale, offset) for those codes. Each half-step cannot raise the error. Measured on the
    demo model (benchmarks/NOTES.md): int4 in groups of 96, +73% perplexity with min/max
    alone, +55% after the fit."""
    lo, hi = jnp.min(w, axis=1), jnp.max(w, axis=1)
    scale = (jnp.maximum(hi - lo, _TINY) / levels).astype(dtype)
    offset = lo.astype(dtype)

    count = w.shape[1]

    def refine(_, sm):
        scale, offset = sm
        u = _affine_codes(w, scale, offset, levels)
        su, suu = jnp.sum(u, 1), jnp.sum(u * u, 1)
        sw, suw = jnp.sum(w, 1), jnp.sum(u * w, 1)
        det = count * suu - su * su
        ok = det > 0
        s_new = (count * suw - su * sw) / jnp.where(ok, det, 1.0)
        m_new = (sw - s_new * su) / count
        ok = ok & (s_new > _TINY)
        return (jnp.where(ok, s_new, scale.astype(jnp.float32)).astype(dtype),
                jnp.where(ok, m_new, offset.astype(jnp.float32)).astype(dtype))

    return jax.lax.fori_loop(0, _AFFINE_FIT_ITERATIONS, refine, (scale, offset))


def dequantize_weight(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The float weight [.., K, N] a stacked (or single) QuantizedWeight stands for."""
    return dequantize(w.values, w.scales, w.offsets, w.layout, dtype)


def quantize_params(state, method: str, group_size: int = DEFAULT_GROUP_SIZE):
    """The model state with its decoder projections quantized (in place of the float arrays,
    which are freed once no one else holds them). Each weight is quantized in its [L, K, N]
    matrix form, the form the model projects with."""
    from jaxinfer.models import param_value

    layers = state["layers"]
    if "w_expert_gate_up" in layers:
        # The experts run in a grouped matmul (models/moe.py) that takes float weights only.
        raise ValueError(f"quantization={method!r} is not supported for mixture-of-experts models")
    for name in QUANTIZED_LAYER_PARAMS:
        var = layers[name]
        w = param_value(var)
        if isinstance(w, (QuantizedWeight, W8A8Weight)):
            raise ValueError(f"layers.{name} is quantized already ({quantization_method(state)}); load the "
                             "float checkpoint to quantize it another way")
        if isinstance(w, (tuple, list)):
            raise ValueError("quantize the stacked (scanned) model, before its layers are unstacked")
        rows = w.shape[1] if name != "w_o" else w.shape[1] * w.shape[2]
        matrix = w.reshape(w.shape[0], rows, -1)
        q = quantize_weight(matrix, method, group_size)
        del w, matrix
        _set(var, q)
    return state


def _set(var, value):
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:
        var.value = value


def quantization_method(state) -> str | None:
    """How the model's projections are stored: None (float), "int8", "int4", "fp8",
    "w8a8_int8" or "w8a8_fp8"."""
    from jaxinfer.models import param_value

    w = param_value(state["layers"]["w_qkv"])
    if isinstance(w, W8A8Weight):
        return f"w8a8_{w.kind}"
    return w.layout.kind if isinstance(w, QuantizedWeight) else None
