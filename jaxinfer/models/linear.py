"""The one linear hook every projection of every model passes through.

`Linear.__call__(x, w, layer)` computes y[T, N] = x[T, K] @ w[K, N], where w is a layer's weight
or a stack [L, K, N] of every layer's weights with `layer` selecting one (the models run their
layers in `lax.scan` over stacked weights). It dispatches on the weight's type, so quantized
formats plug in here without touching model files: today a plain array (float32, bfloat16);
the quantized types register themselves in `WEIGHT_HANDLERS`.

For dense weights the hook picks the kernel: XLA's dot, or at few tokens on a GPU the Pallas
skinny-matmul kernel (pallas_kernels/matmul), which reads the stacked weight in place, where
XLA's dot on `w[layer]` is free to copy the slice first.

Beside the plain product it offers the two fusions a decoder layer wants around its matmuls
(at decode sizes every extra kernel is launch latency over a few kilobytes): `gated` (the
MLP's act(gate) * up computed in the gate|up kernel's epilogue) and `partials` with `add_norm`
(a projection's split-K partials summed inside the residual-add RMSNorm kernel). Without the
Pallas kernels both are the plain jnp computations in the same order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.matmul.reference import GATED_ACTIVATIONS, gated_product

# weight type -> handler(linear, x_tk, w, layer, transpose, out_dtype) -> y_tn; filled by quantization modules.
WEIGHT_HANDLERS: dict[type, Callable[..., jax.Array]] = {}


def select_layer(w, layer) -> jax.Array:
    """w itself, or w[layer] of a stacked weight (a dynamic index when `layer` is traced) or of
    a tuple of per-layer weights."""
    if layer is None:
        return w
    if isinstance(layer, int) or isinstance(w, (tuple, list)):
        return w[layer]
    return lax.dynamic_index_in_dim(w, layer, axis=0, keepdims=False)


def dense_dot(x_tk, w, *, transpose: bool = False, out_dtype=None):
    """x @ w (w [K, N]) or x @ w.T (w [N, K]), accumulating in float32, in out_dtype (default x's)."""
    contract = ((x_tk.ndim - 1,), (1 if transpose else 0,))
    precision = lax.Precision.HIGHEST if x_tk.dtype == jnp.float32 else None
    y = lax.dot_general(x_tk, w, (contract, ((), ())), precision=precision, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x_tk.dtype)


@dataclasses.dataclass(frozen=True)
class Linear:
    """How projections run (static: part of the jitted step's identity).

    kernel: "xla" (XLA's dot always) or "pallas" (the skinny-matmul kernel for steps of at most
      `max_kernel_tokens` tokens, XLA above that). On the H200 the kernel beats XLA's dot up to
      256 tokens: steps of 80 / 128 / 256 tokens of the 8B shape took 9.7 / 13.1 / 17.5 ms
      against 18.5 / 21.8 / 23.5 with XLA above 64 (benchmarks/NOTES.md).
    interpret: run the Pallas kernel in interpret mode (tests on the CPU).
    max_grouped_rows: the most routed (token, expert) rows the grouped expert kernel takes
      (pallas_kernels/grouped_matmul); XLA's ragged dot above. Every bucket by default: on the
      H200 XLA's ragged dot read Mixtral's experts at 1.1 TB/s at one token, and a 2048-token
      prefill through it took 2.4 s (benchmarks/NOTES.md).
    """

    kernel: str = "xla"
    interpret: bool = False
    max_kernel_tokens: int = 256
    max_grouped_rows: int = 65536

    def __post_init__(self):
        if self.kernel not in ("xla", "pallas"):
            raise ValueError(f"kernel must be 'xla' or 'pallas', got {self.kernel!r}")

    def __call__(self, x_tk: jax.Array, w: Any, layer=None, *, transpose: bool = False,
                 out_dtype=None) -> jax.Array:
        """y = x @ w[layer] (w [L, K, N]) or x @ w (w [K, N]); with transpose, w is [.., N, K].

        Args:
          x_tk: activations [T, K].
          w: the weight: an array, or a quantized weight type registered in WEIGHT_HANDLERS.
          layer: None, or the index into a stacked weight (int or traced int32 scalar).
          transpose: the weight is stored [N, K] (the LM head reads the embedding table so).
          out_dtype: the result's dtype (default: x's; the LM head asks for float32 logits).
        """
        handler = WEIGHT_HANDLERS.get(type(w))
        if handler is not None:
            return handler(self, x_tk, w, layer, transpose, out_dtype)
        if self._use_kernel(x_tk, w, transpose, out_dtype):
            from pallas_kernels.matmul import skinny_matmul

            return skinny_matmul(x_tk, w, layer, interpret=self.interpret)
        return dense_dot(x_tk, select_layer(w, layer), transpose=transpose, out_dtype=out_dtype)

    def partials(self, x_tk: jax.Array, w: Any, layer=None) -> jax.Array:
        """x @ w[layer], left as the skinny kernel's float32 split-K partials [S, T, N] where it
        runs with a split of K (`add_norm` sums them inside its kernel: one launch fewer), else
        the finished product [T, N]."""
        if type(w) in WEIGHT_HANDLERS or not self._use_kernel(x_tk, w, False, None):
            return self(x_tk, w, layer)
        from pallas_kernels.matmul import skinny_matmul

        return skinny_matmul(x_tk, w, layer, interpret=self.interpret, sum_partials=False)

    def gated(self, x_tk: jax.Array, w: Any, layer=None, *, activation: str) -> jax.Array:
        """act(x @ gate) * (x @ up) for a weight whose column halves are gate | up: [T, N / 2].
        The skinny kernel computes it in its epilogue where its tiling does not split K (the
        two halves never reach memory); otherwise the product is finished and split here."""
        if type(w) not in WEIGHT_HANDLERS and self._use_kernel(x_tk, w, False, None):
            from pallas_kernels.matmul import gpu

            k, n = w.shape[-2:]
            bs = gpu.gated_block_sizes(num_tokens=x_tk.shape[0], k=k, n=n, dtype=x_tk.dtype, interpret=self.interpret)
            if bs is not None:
                return gpu.skinny_matmul(x_tk, w, layer, block_sizes=bs, interpret=self.interpret,
                                         activation=activation)
        y = self(x_tk, w, layer)
        gate, up = y[:, : y.shape[1] // 2], y[:, y.shape[1] // 2:]
        return GATED_ACTIVATIONS[activation](gate) * up

    def grouped(self, x_pk: jax.Array, w: Any, group_sizes: jax.Array, layer=None, *,
                activation: str | None = None) -> jax.Array:
        """The experts' product: row p of x (rows sorted by group, group_sizes[g] rows each)
        times its group's weight, w [G, K, N] or a stack [L, G, K, N] with `layer` selecting
        one (or a tuple of per-layer [G, K, N]); with `activation`, the gated act(gate) * up of
        w's column halves. Rows past sum(group_sizes) come out unspecified.

        Returns float32 [P, N'] or, from the kernel with a split of K, float32 partials [S, P,
        N'] (sum over axis 0); N' = N / 2 when gated. At decode sizes on a GPU the grouped
        kernel reads only the routed groups' weights, in place; otherwise XLA's ragged dot.
        """
        if isinstance(w, (tuple, list)):
            w, layer = w[layer], None
        n = w.shape[-1]
        fits = x_pk.shape[0] <= self.max_grouped_rows and (activation is None or n % 32 == 0)
        if self.kernel == "pallas" and fits and self._kernel_tiles(x_pk, w):
            from pallas_kernels.grouped_matmul import grouped_matmul

            y = grouped_matmul(x_pk, w, group_sizes, layer, activation=activation, interpret=self.interpret,
                               sum_partials=False)
            return y.astype(jnp.float32)
        precision = lax.Precision.HIGHEST if x_pk.dtype == jnp.float32 else None
        y = lax.ragged_dot(x_pk, select_layer(w, layer), group_sizes, precision=precision,
                           preferred_element_type=jnp.float32)
        if activation is None:
            return y
        return gated_product(y[:, : n // 2], y[:, n // 2:], activation, x_pk.dtype)

    def add_norm(self, y: jax.Array, residual: jax.Array, weight, layer=None, *, eps: float,
                 kind: str = "llama") -> tuple[jax.Array, jax.Array]:
        """(x, RMSNorm(x) scaled by weight[layer]) with x = residual + y, where y is a
        projection's output or its split-K partials (`partials`). With the Pallas kernels one
        fused kernel (pallas_kernels/rms_norm) does what XLA runs as three: the partials' sum
        with the add, the slice of the stacked norm weight, the norm."""
        from pallas_kernels.rms_norm import add_rms_norm, finish_partials, fusable_width, rms_norm_ordered

        if isinstance(weight, (tuple, list)):  # per-layer arrays (unrolled layers)
            weight, layer = weight[layer], None
        elif weight.ndim == 1:
            layer = None
        if self.kernel == "pallas" and fusable_width(residual.shape[-1]):
            return add_rms_norm(y, residual, weight, layer, eps=eps, kind=kind, interpret=self.interpret)
        x = residual + finish_partials(y, residual.dtype)
        return x, rms_norm_ordered(x, select_layer(weight, layer), eps, kind)

    def _use_kernel(self, x_tk, w, transpose: bool, out_dtype) -> bool:
        if self.kernel != "pallas" or transpose or x_tk.ndim != 2 or x_tk.shape[0] > self.max_kernel_tokens:
            return False
        if out_dtype is not None and jnp.dtype(out_dtype) != x_tk.dtype:
            return False
        return self._kernel_tiles(x_tk, w)

    @staticmethod
    def _kernel_tiles(x_tk, w) -> bool:
        """The weight-stream kernels tile w's last two dims (multiples of 16) in x's dtype."""
        k, n = w.shape[-2:]
        return x_tk.ndim == 2 and k % 16 == 0 and n % 16 == 0 and x_tk.dtype == w.dtype


XLA_LINEAR = Linear()
