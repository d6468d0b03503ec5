"""Multi-head attention (caer_jax.models.attention): XLA's form, and the Pallas TPU kernel run
in Pallas' interpret mode against it, in value and gradient."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from caer_jax import sharding
from caer_jax.models import attention
from caer_jax.models import clip as clip_lib


@pytest.mark.parametrize("masked", [False, True])
def test_attention_weights_are_softmax_with_its_gradient(masked):
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7, 7)) * 3
    mask = jnp.where(jnp.tril(jnp.ones((7, 7), bool)), 0.0, -jnp.inf) if masked else None
    g = jax.random.normal(jax.random.key(1), logits.shape)
    offset = 0.0 if mask is None else mask
    reference = lambda x: jnp.sum(jax.nn.softmax(x * 0.125 + offset, axis=-1) * g)  # noqa: E731
    ours = lambda x: jnp.sum(attention.attention_weights(x, 0.125, mask) * g)  # noqa: E731
    np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(reference)(logits), atol=1e-6)


def test_bf16_attention_keeps_its_probabilities_in_bf16():
    # The [batch, heads, tokens, tokens] tensors XLA's attention keeps for its backward pass are
    # the narrow ones in a bf16 model: no float32 copy of the probabilities.
    layer = clip_lib.MultiHeadAttention(32, 2, 1, jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, 5, 32), jnp.float32)
    params = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros(x.shape)))
    backward = jax.eval_shape(lambda p, x: jax.vjp(layer.apply, p, x)[1], params, x)
    scores = [leaf for leaf in jax.tree.leaves(backward) if leaf.shape == (2, 2, 5, 5)]
    assert scores and {leaf.dtype for leaf in scores} == {jnp.dtype(jnp.bfloat16)}, scores


def test_reference_is_per_head_softmax_attention():
    # Head h of the output sees only head h's lanes of q, k and v.
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 8))
    out = attention.reference(q, k, v, heads=2, causal=True)
    for h in range(2):
        lanes = slice(4 * h, 4 * h + 4)
        s = jnp.einsum("bqd,bkd->bqk", q[..., lanes], k[..., lanes]) / 2.0
        s = jnp.where(jnp.tril(jnp.ones((5, 5), bool)), s, -jnp.inf)
        expected = jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, -1), v[..., lanes])
        np.testing.assert_allclose(out[..., lanes], expected, atol=1e-6)


@pytest.mark.parametrize(
    "batch, length, width, heads, causal, dtype, tolerance",
    [
        (3, 50, 256, 4, False, jnp.float32, 2e-6),  # ViT-B/32's 50 tokens, 64-wide heads
        (2, 13, 128, 1, True, jnp.float32, 2e-6),  # one 128-wide head, causal like the text tower
        (16, 9, 128, 4, False, jnp.bfloat16, 2e-2),  # 32-wide heads, two blocks of 8 sequences
    ],
)
def test_tpu_kernel_matches_reference(batch, length, width, heads, causal, dtype, tolerance):
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(key, (batch, length, width), dtype) for key in keys)

    def loss(fn):
        return lambda q, k, v: jnp.vdot(fn(q, k, v, heads, causal).astype(jnp.float32), g)

    with pltpu.force_tpu_interpret_mode():
        out = attention.tpu_kernel(q, k, v, heads, causal)
        grads = jax.grad(loss(attention.tpu_kernel), (0, 1, 2))(q, k, v)
    expected = attention.reference(q, k, v, heads, causal)
    expected_grads = jax.grad(loss(attention.reference), (0, 1, 2))(q, k, v)
    assert out.dtype == dtype and all(grad.dtype == dtype for grad in grads)
    for ours, theirs in zip((out, *grads), (expected, *expected_grads), strict=True):
        ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
        np.testing.assert_allclose(ours, theirs, atol=tolerance * np.abs(theirs).max())


def test_kernel_blocks_divide_the_batch_and_fit_vmem():
    assert attention._sequences_per_block(64, 50, 4) == 8
    assert attention._sequences_per_block(12, 50, 4) == 6
    assert attention._sequences_per_block(13, 77, 2) == 1
    # ViT-L/14's 257 tokens: 4 float32 sequences a block, 8 MiB.
    assert attention._sequences_per_block(64, 257, 4) == 4
    assert attention.tpu_kernel_applies(768, 12) and attention.tpu_kernel_applies(512, 8)
    assert not attention.tpu_kernel_applies(96, 2) and not attention.tpu_kernel_applies(32, 2)


@pytest.mark.parametrize("batch, split", [(8, ("data", "fsdp")), (12, ("data",)), (3, None)])
def test_tpu_kernel_runs_per_device_on_a_mesh(batch, split):
    # Traced for a mesh (as every jitted step is), the kernel is called under shard_map: each
    # device on its own sequences when the mesh's axes divide the batch, on all of them
    # otherwise. (Its values are tested above: Pallas' interpret mode cannot run inside a
    # shard_map on CPU.)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 4, "fsdp": 2}))
    x = jax.ShapeDtypeStruct((batch, 9, 128), jnp.float32)
    traced = sharding.traced_for(mesh, lambda q, k, v: attention.tpu_kernel(q, k, v, 2))
    jaxpr = jax.make_jaxpr(jax.grad(lambda q, k, v: traced(q, k, v).sum(), (0, 1, 2)))(x, x, x)
    calls = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    calls += [
        e
        for outer in jaxpr.eqns
        for sub in jax.core.jaxprs_in_params(outer.params)
        for e in sub.eqns
        if e.primitive.name == "shard_map"
    ]
    assert len(calls) == 2, jaxpr  # the forward and the backward kernel
    for call in calls:
        assert all(spec == jax.sharding.PartitionSpec(split) for spec in call.params["in_specs"])
        kernel = call.params["jaxpr"].eqns[0]
        assert kernel.primitive.name == "pallas_call"
        assert kernel.outvars[0].aval.shape[0] == batch // math.prod(
            mesh.shape[a] for a in split or ()
        )
