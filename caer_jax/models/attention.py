"""Multi-head dot-product attention over short sequences, on activations laid out [batch,
tokens, heads x head_dim]: the plain XLA form everywhere, and on TPU a Pallas kernel that keeps
the scores in VMEM.

Why a kernel of our own: a ViT-B/32 sees 50 tokens, a CLIP text encoder 77. Neither jax's
Pallas flash nor splash attention takes such sequences (their blocks are multiples of 128), and
XLA's attention on TPU writes the [batch, heads, tokens, tokens] scores and probabilities to
HBM between its fusions, tiled to 8 x 128 (a 50 x 50 matrix takes 56 x 128 slots), and keeps q,
k and v with head_dim (64) as the minor dimension, padded to 128 lanes: in the paper's step
that was a third of all bytes moved. Here a whole sequence fits in VMEM, so one kernel call per
block of sequences computes every head's softmax(q k^T) v without writing a score, and the
backward kernel recomputes the probabilities from q and k (0.2 % more FLOPs in a ViT-B/32
training step) instead of storing them.

Layout inside the kernel: q, k, v stay [tokens, width] with width in lanes; a pair of 64-wide
heads shares one 128-lane vreg column. A head is selected by zeroing the other head's lanes
before each matmul: on the 128-wide MXU the masked 128-lane contraction costs the same passes
as a 64-lane one, and the outputs of the two heads land in their own lanes, so no relayout
happens anywhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

LANES = 128  # width of a TPU vreg row and of the MXU
# A kernel step takes a block of sequences x all tokens x one 128-lane column (a pair of heads)
# of each array: up to 7 arrays (the backward's 4 inputs and 3 outputs), double-buffered, in
# 16 MiB of scoped VMEM (v4's default) with room for the [tokens, tokens] float32 temporaries.
MAX_SEQUENCES_PER_BLOCK = 8
BLOCK_BUDGET_BYTES = 8 << 20


def multi_head(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, causal: bool = False):
    """softmax(q_h k_h^T / sqrt(head_dim) [+ causal mask]) v_h for each head h, on q, k, v of
    [batch, tokens, heads x head_dim], returned in the same layout and dtype.

    The softmax is computed in float32 whatever the inputs' dtype. On TPU the Pallas kernel runs
    where its layout applies (head_dim divides 128 and the width is a multiple of 128); XLA's
    form runs everywhere else. The choice is made when the program is lowered, for the platform
    it is lowered for (so plans compiled for a TPU on a CPU host get the kernel)."""
    if not tpu_kernel_applies(q.shape[-1], heads):
        return reference(q, k, v, heads, causal)
    return jax.lax.platform_dependent(
        q,
        k,
        v,
        tpu=functools.partial(tpu_kernel, heads=heads, causal=causal),
        default=functools.partial(reference, heads=heads, causal=causal),
    )


def tpu_kernel_applies(width: int, heads: int) -> bool:
    head_dim = width // heads
    return width % LANES == 0 and LANES % head_dim == 0


def reference(q, k, v, heads: int, causal: bool = False):
    """XLA's multi-head attention (the definition the kernel is tested against)."""
    batch, length, width = q.shape
    head_dim = width // heads
    split = lambda t: t.reshape(batch, length, heads, head_dim)  # noqa: E731
    logits = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k))
    mask = _causal_mask(length) if causal else None
    weights = attention_weights(logits, head_dim**-0.5, mask)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, split(v)).reshape(batch, length, width)


def _causal_mask(length: int) -> jax.Array:
    return jnp.where(jnp.tril(jnp.ones((length, length), bool)), 0.0, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def attention_weights(logits: jax.Array, scale: float, mask: jax.Array | None = None) -> jax.Array:
    """softmax(logits * scale + mask) over the last axis, computed in float32 and returned (and
    kept for the backward pass) in the logits' dtype.

    In a bfloat16 model the scores and probabilities are the largest tensors of XLA's attention:
    jax.nn.softmax on float32 logits writes and keeps them in float32. Here the float32
    arithmetic stays inside the fused kernels and only the narrow tensors are stored. In a
    float32 model it is the plain softmax.
    """
    return _attention_weights_fwd(logits, scale, mask)[0]


def _attention_weights_fwd(logits, scale, mask):
    x = logits.astype(jnp.float32) * scale
    if mask is not None:
        x = x + mask
    weights = jax.nn.softmax(x, axis=-1).astype(logits.dtype)
    return weights, (weights, mask)


def _attention_weights_bwd(scale, residuals, g):
    weights, mask = residuals
    y, g = weights.astype(jnp.float32), g.astype(jnp.float32)
    grad = y * (g - jnp.sum(g * y, axis=-1, keepdims=True)) * scale
    return grad.astype(weights.dtype), None if mask is None else jnp.zeros_like(mask)


attention_weights.defvjp(_attention_weights_fwd, _attention_weights_bwd)


# ------------------------------------------------------------------------------ TPU kernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def tpu_kernel(q, k, v, heads: int, causal: bool = False):
    """The Pallas TPU form of `reference` (runs elsewhere only in Pallas' interpret mode)."""
    return _forward_call(q, k, v, heads, causal)


def _tpu_kernel_fwd(q, k, v, heads, causal):
    return _forward_call(q, k, v, heads, causal), (q, k, v)


def _tpu_kernel_bwd(heads, causal, residuals, d_out):
    q, k, v = residuals
    return _backward_call(q, k, v, d_out.astype(q.dtype), heads, causal)


tpu_kernel.defvjp(_tpu_kernel_fwd, _tpu_kernel_bwd)


def _padded_length(length: int, itemsize: int) -> int:
    """Tokens rounded up to whole sublane tiles (8 rows of 32 bits: 16 of bfloat16)."""
    rows_per_tile = 8 * 4 // itemsize
    return -(-length // rows_per_tile) * rows_per_tile


def _sequences_per_block(batch: int, length: int, itemsize: int) -> int:
    """The largest divisor of batch, at most MAX_SEQUENCES_PER_BLOCK, whose blocks fit the
    budget (a sequence's column: its padded tokens x 128 lanes)."""
    per_sequence = 7 * 2 * _padded_length(length, itemsize) * LANES * itemsize
    fitting = max(1, min(MAX_SEQUENCES_PER_BLOCK, BLOCK_BUDGET_BYTES // per_sequence))
    return max(n for n in range(1, fitting + 1) if batch % n == 0)


def _forward_call(q, k, v, heads, causal):
    (out,) = _partitioned(_forward_kernel, 3, 1, heads, causal)(q, k, v)
    return out


def _backward_call(q, k, v, d_out, heads, causal):
    return tuple(_partitioned(_backward_kernel, 4, 3, heads, causal)(q, k, v, d_out))


def _partitioned(kernel, inputs: int, outputs: int, heads: int, causal: bool):
    """The kernel's pallas_call, run by each device on its own sequences when the program is
    traced for a mesh (sharding.traced_for): the batch is split over as many of the mesh's axes,
    in order, as divide it (none: every device runs the whole batch, as XLA does with a
    replicated operation); tokens and width stay whole. (XLA's partitioner cannot split a
    Mosaic kernel itself.)"""

    def call(*arrays):
        return _pallas_call(kernel, arrays, outputs, heads, causal)

    def split(*arrays):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return call(*arrays)
        axes, size = [], 1
        for name in mesh.axis_names:
            if arrays[0].shape[0] % (size * mesh.shape[name]) == 0:
                axes.append(name)
                size *= mesh.shape[name]
        spec = PartitionSpec(tuple(axes) or None)  # none divides: each device runs all
        # check_vma off: pallas_call does not type its outputs as varying over the axes.
        run = jax.shard_map(call, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
        return run(*arrays)

    return split


# FLOPs per element of batch x tokens x tokens x width: the forward's q k^T and p v; the
# backward's q k^T again, d_p, d_q, d_k and d_v.
_FLOPS = {"_forward_kernel": 4, "_backward_kernel": 10}


def _pallas_call(kernel, arrays, outputs: int, heads: int, causal: bool):
    batch, length, width = arrays[0].shape
    head_dim = width // heads
    block = _sequences_per_block(batch, length, arrays[0].dtype.itemsize)
    spec = pl.BlockSpec((block, length, LANES), lambda i, j: (i, 0, j))
    shape = jax.ShapeDtypeStruct(arrays[0].shape, arrays[0].dtype)
    # What the DMAs move: each [tokens, 128] slab padded to whole sublane tiles.
    itemsize = arrays[0].dtype.itemsize
    array_bytes = batch * _padded_length(length, itemsize) * width * itemsize
    return pl.pallas_call(
        functools.partial(kernel, head_dim=head_dim, scale=head_dim**-0.5, causal=causal),
        out_shape=[shape] * outputs,
        grid=(batch // block, width // LANES),
        in_specs=[spec] * len(arrays),
        out_specs=[spec] * outputs,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        cost_estimate=pl.CostEstimate(
            flops=_FLOPS[kernel.__name__] * batch * length * length * width,
            transcendentals=batch * heads * length * length,
            bytes_accessed=(len(arrays) + outputs) * array_bytes,
        ),
        name=kernel.__name__.strip("_"),
    )(*arrays)


def _head_lanes(head_dim: int) -> list[jax.Array]:
    """A [1, 128] mask per head sharing a 128-lane column."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, LANES), 1)
    return [(lane >= h * head_dim) & (lane < (h + 1) * head_dim) for h in range(LANES // head_dim)]


def _dot(a, b, contract: tuple[int, int]):
    return jax.lax.dot_general(
        a, b, ((contract[:1], contract[1:]), ((), ())), preferred_element_type=jnp.float32
    )


def _probabilities(q_head, k, scale, causal):
    """softmax(q_head k^T * scale) in float32, q_head zero outside its head's lanes."""
    s = _dot(q_head, k, (1, 1)) * scale
    if causal:
        row = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
        col = jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(col <= row, s, -jnp.inf)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    return p / jnp.sum(p, axis=-1, keepdims=True)


def _for_each_sequence(q_ref, body):
    def sequence(i, carry):
        body(i)
        return carry

    jax.lax.fori_loop(0, q_ref.shape[0], sequence, None)


def _forward_kernel(q_ref, k_ref, v_ref, out_ref, *, head_dim, scale, causal):
    def sequence(i):
        q, k, v = q_ref[i], k_ref[i], v_ref[i]
        out = jnp.zeros((q.shape[0], LANES), jnp.float32)
        for head in _head_lanes(head_dim):
            p = _probabilities(jnp.where(head, q, 0), k, scale, causal)
            out += _dot(p.astype(v.dtype), jnp.where(head, v, 0), (1, 0))
        out_ref[i] = out.astype(out_ref.dtype)

    _for_each_sequence(q_ref, sequence)


def _backward_kernel(
    q_ref, k_ref, v_ref, d_out_ref, dq_ref, dk_ref, dv_ref, *, head_dim, scale, causal
):
    def sequence(i):
        q, k, v = q_ref[i], k_ref[i], v_ref[i]
        d_out = d_out_ref[i]
        dq = dk = dv = jnp.zeros((q.shape[0], LANES), jnp.float32)
        for head in _head_lanes(head_dim):
            q_head, d_out_head = jnp.where(head, q, 0), jnp.where(head, d_out, 0)
            p = _probabilities(q_head, k, scale, causal)
            dp = _dot(d_out_head, v, (1, 1))
            ds = (p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * scale).astype(q.dtype)
            dq += _dot(ds, jnp.where(head, k, 0), (1, 0))
            dk += _dot(ds, q_head, (0, 0))
            dv += _dot(p.astype(q.dtype), d_out_head, (0, 0))
        dq_ref[i] = dq.astype(dq_ref.dtype)
        dk_ref[i] = dk.astype(dk_ref.dtype)
        dv_ref[i] = dv.astype(dv_ref.dtype)

    _for_each_sequence(q_ref, sequence)
