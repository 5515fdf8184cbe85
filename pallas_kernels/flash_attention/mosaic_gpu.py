"""Flash attention (prefill) for Hopper GPUs: Pallas with the Mosaic GPU lowering.

Batched layout (q [B, S, N, H], k, v [B, S, K, H]); the packed variable-length API stays on the
Triton-lowered kernel in gpu.py, which also serves shapes this one does not take.

One CTA owns 2 * block_q query rows of one (batch, head) and runs three warpgroups:
- a copy warpgroup streams the K and V blocks the CTA needs through `num_stages` shared-memory
  slots with TMA, each slot guarded by a "full" barrier (TMA done) and a "free" barrier (both
  consumers done);
- two compute warpgroups each own block_q rows: QK^T and PV on the tensor cores (wgmma, Q and
  K/V read from shared memory), the online softmax in registers. A two-party "turn" barrier
  makes them take turns on the tensor cores: while one runs its softmax (exp2 on the SFU), the
  other's matmuls run, which is where a single warpgroup would leave the tensor cores idle.

The grid's fastest axis is the query tile (Mosaic GPU launches the last grid axis fastest), so
the CTAs resident at once share one head's K and V through L2: at P3 Nsight Compute reads DRAM
at 17% of its peak. Causal work is triangular, so each head's tiles are visited from the last
(most keys) to the first.

Key blocks that every row of a warpgroup sees in full run without masks. Both warpgroups walk
the whole key range of the CTA in lockstep (the turn barrier counts steps), so a warpgroup
steps through blocks only its neighbour needs without computing (below a sliding window's
start, past its causal end).

The running maximum starts at -1e30 rather than -inf: a row with every key of a block masked
then gets p = exp2(-inf) = 0 and alpha = 1 instead of NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.flash_attention.tuned_block_sizes import MosaicFlashBlockSizes, mosaic_flash_block_sizes

try:  # the Mosaic GPU dialect ships with jaxlib; keep this module importable without it
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the installed jaxlib
    plgpu = None
try:  # the Mosaic GPU interpreter (CPU tests); a private module in JAX 0.10
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:  # pragma: no cover
    InterpretGPUParams = None

M_INIT = -1e30
LOG2E = math.log2(math.e)
COMPUTE_WARPGROUPS = 2
SUPPORTED_DTYPES = ("bfloat16", "float16")


def _dot(a, b, contract):
    """The interpreter's stand-in for a wgmma: bf16/fp16 operands, float32 accumulation."""
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _static(*xs):
    return all(isinstance(x, int) for x in xs)


def _max(a, b):
    return max(a, b) if _static(a, b) else jnp.maximum(a, b)


def _min(a, b):
    return min(a, b) if _static(a, b) else jnp.minimum(a, b)


def _fori(lo, hi, body, carry):
    """lax.fori_loop that drops loops known to be empty. Bounds known at trace time stay Python
    ints: a concrete jax Array closed over by a Mosaic GPU loop body fails to lower."""
    if _static(lo, hi) and lo >= hi:
        return carry
    return lax.fori_loop(lo, hi, body, carry)


def _key_blocks(q_first, q_last, *, seq_len, block_kv, causal, sliding_window):
    """Key blocks seen by query positions [q_first, q_last] (traced int32 scalars): (lo, full_lo,
    full_hi, hi); blocks [full_lo, full_hi) are seen in full by every row, the rest of [lo, hi)
    need the mask. Python ints where static; divisions see non-negative values only."""
    if causal:
        hi = lax.div(q_last + block_kv, block_kv)
        full_hi = lax.div(q_first + 1, block_kv)
    else:
        hi = full_hi = seq_len // block_kv
    lo = full_lo = 0
    if sliding_window is not None:
        lo = lax.div(jnp.maximum(q_first - sliding_window + 1, 0), block_kv)
        full_lo = lax.div(jnp.maximum(q_last - sliding_window + 1, 0) + block_kv - 1, block_kv)
    full_lo = _min(_max(full_lo, lo), hi)
    full_hi = _min(_max(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


def _kernel(q_ref, k_ref, v_ref, o_ref, scoped, *, block_q, block_kv, num_stages, num_tiles, group,
            scale, causal, sliding_window, logit_softcap, interpret):
    (qo_smem, k_smem, v_smem), (k_full, v_full, q_full), (k_free, v_free), turn = scoped
    _, seq_len, num_heads, head_dim = q_ref.shape
    dtype = q_ref.dtype
    bn = lax.axis_index("bn")
    batch = lax.div(bn, num_heads)
    head = lax.rem(bn, num_heads)
    tile = num_tiles - 1 - lax.axis_index("tile")  # heaviest (last) tiles first
    cta_first = tile * (COMPUTE_WARPGROUPS * block_q)
    blocks = functools.partial(_key_blocks, seq_len=seq_len, block_kv=block_kv, causal=causal,
                               sliding_window=sliding_window)
    cta_lo, _, _, cta_hi = blocks(cta_first, cta_first + COMPUTE_WARPGROUPS * block_q - 1)
    wg = lax.axis_index("wg")

    def slot_of(j):
        return lax.rem(j - cta_lo, num_stages)

    def take_turn():
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        qo = qo_smem.at[wg]
        q_first = cta_first + wg * block_q
        lo, full_lo, full_hi, hi = blocks(q_first, q_first + block_q - 1)
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(q_first, block_q), head], qo, q_full.at[wg])
        plgpu.barrier_wait(q_full.at[wg])

        # Register layouts (the interpreter has none): accumulators in the wgmma layout, row
        # statistics in its row reduction.
        def in_layout(x, layout):
            return x if interpret else plgpu.layout_cast(x, layout)

        def iota(dim):
            shape = (block_q, block_kv)
            if interpret:
                return lax.broadcasted_iota(jnp.int32, shape, dim)
            return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

        m = in_layout(jnp.full((block_q,), M_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l = in_layout(jnp.zeros((block_q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = in_layout(jnp.zeros((block_q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        # log2-domain factor applied to the (soft-capped) logits inside exp2's FMA.
        c = LOG2E if logit_softcap is not None else scale * LOG2E

        plgpu.barrier_wait(k_full.at[0])  # the CTA's first block (every CTA has at least one)
        pl.when(wg == 1)(take_turn)  # offsets the two warpgroups by one turn

        def end_of_softmax(slot):
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(v_full.at[slot])
            plgpu.barrier_wait(turn)

        def step(j, carry, *, masked):
            acc, m, l = carry
            slot = slot_of(j)

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, qo, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                take_turn()
                return acc_ref[...]

            if interpret:  # the interpreter's wgmma takes no transposed operand
                s = _dot(qo[...], k_smem[slot], ((1,), (1,)))
                take_turn()
            else:
                s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if logit_softcap is not None:
                s = logit_softcap * jnp.tanh(s * (scale / logit_softcap))
            if masked:
                q_pos = q_first + iota(0)
                k_pos = j * block_kv + iota(1)
                visible = None
                if causal:
                    visible = k_pos <= q_pos
                if sliding_window is not None:
                    in_window = k_pos > q_pos - sliding_window
                    visible = in_window if visible is None else visible & in_window
                if visible is not None:
                    s = jnp.where(visible, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1) * c)
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha + p.sum(axis=1)
            p_lo = p.astype(dtype)
            # Keeps the scheduler from sinking the softmax past the barrier below, which would
            # hand the tensor cores to the other warpgroup before p is ready.
            acc, l, m_new, p_lo = lax.optimization_barrier((acc, l, m_new, p_lo))
            end_of_softmax(slot)

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p_lo, v_smem.at[slot])

                @pl.when(j + 1 < hi)
                def _():
                    plgpu.barrier_wait(k_full.at[slot_of(j + 1)])

            if interpret:  # nor an accumulator seeded from a value (run_state)
                acc = acc + _dot(p_lo, v_smem[slot], ((1,), (0,)))

                @pl.when(j + 1 < hi)
                def _():
                    plgpu.barrier_wait(k_full.at[slot_of(j + 1)])
            else:  # the wgmma accumulates into acc in place
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        def pass_before(j, _):
            """A block below this warpgroup's window that its neighbour needs: keep the barrier
            phases and the turns in step without computing."""
            slot = slot_of(j)
            take_turn()
            plgpu.barrier_arrive(k_free.at[slot])
            end_of_softmax(slot)
            plgpu.barrier_wait(k_full.at[slot_of(j + 1)])  # j + 1 <= lo < hi
            plgpu.barrier_arrive(v_free.at[slot])

        def pass_after(j, _):
            """A block past this warpgroup's last key. Its copies are waited for (the
            neighbour needs them anyway) so that every barrier phase is observed."""
            slot = slot_of(j)
            plgpu.barrier_wait(k_full.at[slot])
            plgpu.barrier_wait(v_full.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            take_turn()
            take_turn()

        carry = (acc, m, l)
        _fori(cta_lo, lo, pass_before, None)
        carry = _fori(lo, full_lo, functools.partial(step, masked=True), carry)
        carry = _fori(full_lo, full_hi, functools.partial(step, masked=False), carry)
        acc, m, l = _fori(full_hi, hi, functools.partial(step, masked=True), carry)
        _fori(hi, cta_hi, pass_after, None)
        pl.when(wg == 0)(take_turn)

        # Every row sees at least its own key (causal) or the whole sequence, so l > 0.
        out = acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])
        qo[...] = out.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo, o_ref.at[batch, pl.ds(q_first, block_q), head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _copy():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(head, group)

        def issue(j, slot):
            rows = (batch, pl.ds(j * block_kv, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_full.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_full.at[slot])

        for i in range(num_stages):
            needed = cta_lo + i < cta_hi
            if not isinstance(needed, bool):
                pl.when(needed)(functools.partial(issue, cta_lo + i, i))
            elif needed:
                issue(cta_lo + i, i)

        def refill(j, _):
            slot = slot_of(j)
            rows = (batch, pl.ds(j * block_kv, block_kv), kv_head)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_full.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_full.at[slot])

        def last_release(j, _):
            plgpu.barrier_wait(k_free.at[slot_of(j)])
            plgpu.barrier_wait(v_free.at[slot_of(j)])

        _fori(cta_lo + num_stages, cta_hi, refill, None)
        # The last blocks' releases, so that every barrier phase is observed before exit.
        _fori(_max(cta_lo, cta_hi - num_stages), cta_hi, last_release, None)


def _interpret_params(interpret):
    if not interpret:
        return None
    if InterpretGPUParams is None:
        raise ValueError("this JAX has no Mosaic GPU interpreter")
    return interpret if isinstance(interpret, InterpretGPUParams) else InterpretGPUParams()


def is_supported_device(device=None) -> bool:
    """A Hopper GPU (compute capability 9.x): wgmma and TMA as this kernel uses them."""
    if plgpu is None:
        return False
    device = device or jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def applies(q, k, v, *, sliding_window=None, logit_softcap=None, block_sizes=None) -> bool:
    """Whether this kernel takes these inputs (shapes, dtypes, options)."""
    block_sizes = block_sizes or mosaic_flash_block_sizes(head_dim=q.shape[-1], dtype=q.dtype)
    try:
        check_mosaic_inputs(q, k, v, block_sizes=block_sizes, sliding_window=sliding_window,
                            logit_softcap=logit_softcap)
    except ValueError:
        return False
    return True


def check_mosaic_inputs(q, k, v, *, block_sizes: MosaicFlashBlockSizes, sliding_window, logit_softcap):
    """ValueErrors for what this kernel does not take; the caller may fall back to gpu.py."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"q must be [B, S, N, H] and k, v [B, S, K, H], got {q.shape}, {k.shape}, {v.shape}")
    b, s, n, h = q.shape
    if k.shape[:2] != (b, s) or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(f"k {k.shape} does not fit q {q.shape} (N must be a multiple of K)")
    if not (q.dtype == k.dtype == v.dtype) or jnp.dtype(q.dtype).name not in SUPPORTED_DTYPES:
        raise ValueError(f"q, k, v must share one of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if h % 64 or h > 256:
        raise ValueError(f"head_dim must be a multiple of 64 and at most 256, got {h}")
    rows = COMPUTE_WARPGROUPS * block_sizes.block_q
    if s % rows or s % block_sizes.block_kv:
        raise ValueError(f"sequence length {s} must be a multiple of {rows} (2 * block_q) and of "
                         f"block_kv {block_sizes.block_kv}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be positive, got {logit_softcap!r}")


@functools.partial(jax.jit, static_argnames=("scale", "causal", "sliding_window", "logit_softcap",
                                             "block_sizes", "interpret"))
def flash_attention_dense(q, k, v, *, scale, causal=True, sliding_window=None, logit_softcap=None,
                          block_sizes: MosaicFlashBlockSizes | None = None, interpret=False):
    """Flash attention over equal-length sequences: q [B, S, N, H], k, v [B, S, K, H] ->
    [B, S, N, H]. Query head n reads kv head n // (N // K). Arguments as in gpu.flash_attention.
    `interpret=True` runs the Mosaic GPU interpreter (any backend; slow, for tests)."""
    if plgpu is None:
        raise ValueError("this jaxlib has no Mosaic GPU Pallas lowering")
    if block_sizes is None:
        block_sizes = mosaic_flash_block_sizes(head_dim=q.shape[-1], dtype=q.dtype)
    check_mosaic_inputs(q, k, v, block_sizes=block_sizes, sliding_window=sliding_window,
                        logit_softcap=logit_softcap)
    b, s, n, h = q.shape
    bq, bkv, stages = block_sizes.block_q, block_sizes.block_kv, block_sizes.num_stages
    num_tiles = s // (COMPUTE_WARPGROUPS * bq)
    kernel = functools.partial(
        _kernel, block_q=bq, block_kv=bkv, num_stages=stages, num_tiles=num_tiles, group=n // k.shape[2],
        scale=float(scale), causal=bool(causal), sliding_window=sliding_window,
        logit_softcap=None if logit_softcap is None else float(logit_softcap), interpret=bool(interpret))

    def entry(q_ref, k_ref, v_ref, o_ref):
        # 128-byte swizzled (8, 64) tiles: the layout wgmma reads without bank conflicts.
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, k_ref, v_ref, o_ref, scoped),
            (plgpu.SMEM((COMPUTE_WARPGROUPS, bq, h), q.dtype, transforms=transforms),
             plgpu.SMEM((stages, bkv, h), q.dtype, transforms=transforms),
             plgpu.SMEM((stages, bkv, h), q.dtype, transforms=transforms)),
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
             plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS)),
            (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(b * n, num_tiles),  # tiles fastest: see the module docstring
        grid_names=("bn", "tile"),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params(interpret),
    )(q, k, v)
