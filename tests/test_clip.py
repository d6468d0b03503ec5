"""Flax CLIP: geometry, shapes, masks, remat and compute dtype."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caer_jax.models import clip as clip_lib

TINY = clip_lib.CLIPGeometry(
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    text_width=32,
    text_layers=2,
    text_heads=4,
    vocab_size=100,
    context_length=16,
    embed_dim=24,
)


def _ids(n=3, length=16, eot=(5, 9, 15)):
    ids = np.zeros((n, length), np.int32)
    for i, e in enumerate(eot):
        ids[i, 0] = 98
        ids[i, 1:e] = np.arange(1, e) + i
        ids[i, e] = 99
    return jnp.asarray(ids)


def _init(geometry=TINY, **kw):
    model = clip_lib.CLIP(geometry, **kw)
    imgs = jnp.ones((2, geometry.image_size, geometry.image_size, 3)) * 0.5
    params = jax.jit(model.init)(jax.random.key(0), imgs, _ids())
    return model, params, imgs


def test_param_tree_and_shapes():
    model, params, imgs = _init()
    p = params["params"]
    assert p["visual"]["conv1"]["kernel"].shape == (8, 8, 3, 32)
    assert "bias" not in p["visual"]["conv1"]
    assert p["visual"]["positional_embedding"].shape == (17, 32)
    assert p["visual"]["proj"].shape == (32, 24)
    blk = p["text"]["transformer"]["resblocks_1"]
    assert set(blk) == {"attn", "ln_1", "ln_2", "fc", "proj"}
    assert set(blk["attn"]) == {"q", "k", "v", "out"}
    assert blk["fc"]["kernel"].shape == (32, 128)
    assert p["text"]["token_embedding"]["embedding"].shape == (100, 32)
    assert p["text"]["text_projection"].shape == (32, 24)
    img, txt = jax.jit(model.apply)(params, imgs, _ids())
    assert img.shape == (2, 24) and txt.shape == (3, 24)
    assert img.dtype == jnp.float32


def test_text_is_causal_and_pooled_at_eot():
    model, params, _ = _init()
    ids = _ids()
    base = model.apply(params, ids, method=lambda m, x: m.text(x))
    # Changing tokens after the EOT changes nothing (causal mask); before it changes the feature.
    after = ids.at[0, 7].set(3)
    np.testing.assert_allclose(
        model.apply(params, after, method=lambda m, x: m.text(x)), base, atol=1e-6
    )
    before = ids.at[0, 2].set(50)
    assert not np.allclose(model.apply(params, before, method=lambda m, x: m.text(x))[0], base[0])


def test_text_from_embeddings_equals_from_ids():
    model, params, _ = _init()
    ids = _ids()

    def via_embeddings(m, x):
        return m.text.encode(m.text.embed(x), jnp.argmax(x, -1))

    np.testing.assert_allclose(
        model.apply(params, ids, method=via_embeddings),
        model.apply(params, ids, method=lambda m, x: m.text(x)),
        atol=1e-6,
    )


# bf16 compute against fp32 on _init's inputs, max |d| / max |ref| per output: measured 0.0099
# (image) and 0.0086 (text) on x86 CPU (XLA's bf16 dots; other seeds and images gave up to 0.015).
# The tolerance is 3x the larger measured value: room for other kernels, tight enough that a
# bf16-only bug of a few percent (e.g. an attention temperature off by 20 %) fails.
BF16_REL_TOL = 0.03


def _features_loss(remat: bool):
    """A scalar of both towers' outputs, so that every parameter gets a gradient."""

    def loss(params, imgs, ids):
        img, txt = clip_lib.CLIP(TINY, remat=remat).apply(params, imgs, ids)
        return jnp.sum(img * img) + jnp.sum(jnp.sin(txt))

    return loss


def test_remat_gives_the_same_outputs_and_gradients():
    model, params, _ = _init()
    imgs = jax.random.uniform(jax.random.key(5), (2, 32, 32, 3))
    ref = jax.jit(model.apply)(params, imgs, _ids())
    out = jax.jit(clip_lib.CLIP(TINY, remat=True).apply)(params, imgs, _ids())
    for a, b in zip(out, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # Rematerialisation recomputes the forward pass in the backward pass: the same function, so
    # the same gradients up to fp32 rounding (measured: max |d| 0 with max |g| 121).
    grads = {
        remat: jax.jit(jax.grad(_features_loss(remat)))(params, imgs, _ids())
        for remat in (False, True)
    }
    scale = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads[False]))
    assert scale > 0.1
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * scale),
        grads[True],
        grads[False],
    )


def test_remat_keeps_fewer_activations_for_the_backward_pass():
    """What remat is for: the backward pass recomputes each block from its input instead of
    keeping its intermediates. The residuals jax.vjp keeps for the backward pass (parameters and
    activations) measured 953 kB without remat, 315 kB with it (252 kB of them parameters)."""
    # Traced, not run: the residuals' shapes are what counts.
    params = jax.eval_shape(lambda: _init()[1])
    imgs = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    kept = {}
    for remat in (False, True):
        loss = functools.partial(_features_loss(remat), ids=_ids())
        backward = jax.eval_shape(lambda p, x, f=loss: jax.vjp(f, p, x)[1], params, imgs)
        kept[remat] = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(backward))
    print("residual bytes by remat:", kept)
    assert kept[True] < 0.5 * kept[False], kept


def test_bf16_compute_stays_close_to_fp32():
    model, params, imgs = _init()
    ref = jax.jit(model.apply)(params, imgs, _ids())
    out16 = jax.jit(clip_lib.CLIP(TINY, dtype=jnp.bfloat16).apply)(params, imgs, _ids())
    for name, a, b in zip(("image", "text"), out16, ref, strict=True):
        assert a.dtype == jnp.bfloat16
        rel = float(np.abs(np.asarray(a, np.float32) - b).max() / np.abs(b).max())
        print(f"bf16 vs fp32 {name}: max |d| / max |ref| = {rel:.4f}")
        assert rel <= BF16_REL_TOL, (name, rel)


def test_geometry_from_hf_config_roundtrip():
    assert clip_lib.CLIPGeometry.from_hf_config(TINY.to_hf_config()) == TINY
    bad = TINY.to_hf_config()
    bad.vision_config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act"):
        clip_lib.CLIPGeometry.from_hf_config(bad)
    with pytest.raises(ValueError, match="patch_size"):
        dataclasses.replace(TINY, patch_size=7)


def test_dtype_names():
    assert clip_lib.dtype_from_name("bfloat16") == jnp.bfloat16
    with pytest.raises(ValueError, match="config.model.dtype"):
        clip_lib.dtype_from_name("fp8")
