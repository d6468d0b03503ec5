"""CLIP-CAER model: streams, prompts (positions, generic/class-specific), EOT, gradients."""

import functools
import re

import jax
import jax.extend as jex
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from caer_jax import errors, sharding
from caer_jax.models import caer
from caer_jax.models import tokenizer as tokenizer_lib
from configs import synthetic_tiny

T = 3


def _cfg(**overrides):
    c = synthetic_tiny.get_config("scratch")
    c.model.clip.image_size = 32
    c.model.clip.patch_size = 16
    c.model.clip.vision_layers = 1
    c.model.clip.text_layers = 1
    c.model.clip.context_length = 40
    for k, v in overrides.items():
        obj = c.model
        *path, last = k.split(".")
        for p in path:
            obj = obj[p]
        obj[last] = v
    return c.model


@functools.lru_cache
def _tok():
    return tokenizer_lib.offline_tokenizer()


def _build(**overrides):
    return _build_cached(tuple(sorted(overrides.items())))


@functools.lru_cache
def _build_cached(overrides):
    overrides = dict(overrides)
    cfg = _cfg(**overrides)
    model, _ = caer.build_model(cfg, tokenizer=_tok())
    if set(overrides) <= {"streams", "prompt.class_token_position"} and overrides:
        # Same parameter tree as the default model, less the absent streams: no new init.
        _, params, _ = _build()
        params = {k: v for k, v in params.items() if k in _expected_keys(cfg.streams)}
    else:
        params = caer.init_params(model, cfg, jax.random.key(0), num_frames=T)
    return model, params, cfg


def _expected_keys(streams):
    return {"image_encoder", "text_encoder", "prompt_learner"} | {
        "face": {"temporal_face"},
        "context": {"temporal_context"},
        "both": {"temporal_face", "temporal_context", "project_fc"},
    }[streams]


def _clips(b=2):
    k1, k2 = jax.random.split(jax.random.key(1))
    return (jax.random.uniform(k1, (b, T, 32, 32, 3)), jax.random.uniform(k2, (b, T, 32, 32, 3)))


@pytest.mark.parametrize("streams", ["face", "context", "both"])
def test_streams_shapes_and_param_tree(streams):
    model, params, cfg = _build(streams=streams) if streams != "both" else _build()
    face, context = _clips()
    args = {
        "face": (face, None),
        "context": (None, context),
        "both": (face, context),
    }[streams]
    fwd = jax.jit(
        lambda p, f, c: model.apply(
            {"params": p}, f, c, train=True, rngs={"dropout": jax.random.key(3)}
        )
    )
    logits, aux = fwd(params, *args)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert aux["video_features"].shape == (2, 64) and aux["text_features"].shape == (5, 64)
    np.testing.assert_allclose(np.linalg.norm(aux["video_features"], axis=-1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(aux["text_features"], axis=-1), 1, atol=1e-5)
    np.testing.assert_allclose(
        logits, 100 * aux["video_features"] @ aux["text_features"].T, atol=1e-4
    )
    # The module's own parameter tree for this stream option (traced, not computed).
    x = caer.dummy_clip(model, T)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), x, x, train=False)["params"])
    assert set(tree) == _expected_keys(streams) == set(params)
    assert jax.tree_util.tree_map(lambda a: a.shape, tree) == jax.tree_util.tree_map(
        lambda a: a.shape, params
    )
    if streams == "both":
        assert params["project_fc"]["kernel"].shape == (128, 64)
    t = params["temporal_face" if streams != "context" else "temporal_context"]
    assert t["pos_embedding"].shape == (1, T + 1, 64) and t["cls_token"].shape == (1, 1, 64)
    assert t["layers_0"]["to_qkv"]["kernel"].shape == (64, 3 * 4 * 16)
    assert "bias" not in t["layers_0"]["to_qkv"]
    # eval is deterministic; a missing needed stream is an error
    fwd = jax.jit(lambda p, f, c: model.apply({"params": p}, f, c, train=False)[0])
    a, b = fwd(params, *args), fwd(params, *args)
    np.testing.assert_array_equal(a, b)
    if streams == "both":
        with pytest.raises(ValueError, match="context"):
            model.apply({"params": params}, face, None)


def test_dropout_acts_in_training_and_not_in_eval():
    model, params, cfg = _build()
    assert cfg.temporal.dropout > 0
    face, context = _clips()
    variables = {"params": params}

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def logits(net, key, train):
        rngs = {"dropout": jax.random.key(key)} if train else None
        return net.apply(variables, face, context, train=train, rngs=rngs)[0]

    # Training: the dropout key draws the masks, so different keys give different outputs.
    first, again, other = logits(model, 0, True), logits(model, 0, True), logits(model, 1, True)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0.1, np.abs(first - other).max()
    # Eval: no dropout at all, i.e. the same function as training with a dropout rate of 0
    # (measured: identical; logits up to ~20, dropout changes them by ~5).
    no_dropout, _ = caer.build_model(_cfg(**{"temporal.dropout": 0.0}), tokenizer=_tok())
    evaluated = logits(model, 0, False)
    np.testing.assert_allclose(evaluated, logits(no_dropout, 0, True), rtol=0, atol=1e-5)
    assert np.abs(first - evaluated).max() > 0.1


def test_eot_indices_and_prompt_ids():
    model, _, cfg = _build()
    ids = np.asarray(model.prompt_token_ids)
    tok = _tok()
    eot = ids.argmax(-1)
    assert (ids[np.arange(5), eot] == tok.eos_token_id).all()
    x = tok.convert_tokens_to_ids("x</w>")
    assert (ids[:, 1 : 1 + cfg.prompt.n_ctx] == x).all()
    for row, text, e in zip(ids, caer.prompt_texts(cfg), eot, strict=True):
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert e == n + 1
        assert (row[e + 1 :] == 0).all()


def test_gradient_reaches_ctx_not_token_table():
    model, params, _ = _build()
    face, context = _clips()

    def loss(p):
        logits, _ = model.apply({"params": p}, face, context, train=False)
        return jax.nn.log_softmax(logits)[:, 0].sum()

    g = jax.jit(jax.grad(loss))(params)
    assert np.abs(g["prompt_learner"]["ctx"]).sum() > 0
    assert np.abs(g["text_encoder"]["token_embedding"]["embedding"]).sum() == 0
    # gradient flows *through* the text encoder (its weights get gradients; the optimiser freezes them)
    assert np.abs(g["text_encoder"]["ln_final"]["scale"]).sum() > 0
    assert np.abs(g["image_encoder"]["conv1"]["kernel"]).sum() > 0


def _prompts(model, params):
    return model.apply({"params": params}, method=lambda m: m.prompt_embeddings())


def _token_table(params):
    return params["text_encoder"]["token_embedding"]["embedding"]


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_prompt_positions(position):
    model, params, cfg = _build(**{"prompt.class_token_position": position})
    n_ctx = cfg.prompt.n_ctx
    ids = np.asarray(model.prompt_token_ids)
    table = np.asarray(_token_table(params))
    ctx = np.asarray(params["prompt_learner"]["ctx"])
    got = np.asarray(_prompts(model, params))
    for i in range(5):
        e = ids[i].argmax()
        name = table[ids[i, 1 + n_ctx : e]]  # class-text tokens
        rest = table[ids[i, e:]]  # end token and padding
        start = table[ids[i, :1]]
        half = n_ctx // 2
        expected = {
            "end": [start, ctx[i], name, rest],
            "middle": [start, ctx[i, :half], name, ctx[i, half:], rest],
            "front": [start, name, ctx[i], rest],
        }[position]
        np.testing.assert_array_equal(got[i], np.concatenate(expected))


def test_generic_context_is_shared():
    model, params, cfg = _build(**{"prompt.class_specific": False})
    ctx = params["prompt_learner"]["ctx"]
    assert ctx.shape == (cfg.prompt.n_ctx, 64)
    got = np.asarray(_prompts(model, params))
    for i in range(5):
        np.testing.assert_array_equal(got[i, 1 : 1 + cfg.prompt.n_ctx], ctx)
    _, params_cs, _ = _build()
    assert params_cs["prompt_learner"]["ctx"].shape == (5, cfg.prompt.n_ctx, 64)
    std = float(np.std(params_cs["prompt_learner"]["ctx"]))
    assert 0.015 < std < 0.025


def test_init_needs_clip_length_and_checks_it():
    cfg = _cfg()
    model, _ = caer.build_model(cfg, tokenizer=_tok())
    with pytest.raises(ValueError, match="num_segments"):
        caer.init_params(model, cfg, jax.random.key(0))
    _, params, _ = _build()
    face, context = _clips()
    with pytest.raises(ValueError, match="pos_embedding holds 3 frames"):
        model.apply({"params": params}, face[:, :2], context[:, :2])


def test_bad_options_name_the_key():
    # User errors (one `error:` line on the command line), raised before any data is read.
    with pytest.raises(errors.BadInputError, match="class_token_position"):
        caer.build_model(_cfg(**{"prompt.class_token_position": "left"}), tokenizer=_tok())
    with pytest.raises(errors.BadInputError, match="config.model.streams='faces'"):
        caer.build_model(_cfg(streams="faces"), tokenizer=_tok())
    with pytest.raises(errors.BadInputError, match="config.model.pixel_normalization='imagenet'"):
        caer.build_model(_cfg(pixel_normalization="imagenet"), tokenizer=_tok())


def test_encode_then_head_is_the_whole_model_and_uint8_is_scaled_in_the_graph():
    model, params, _ = _build()
    k1, k2 = jax.random.split(jax.random.key(5))
    face = jax.random.randint(k1, (2, T, 32, 32, 3), 0, 256).astype(jnp.uint8)
    context = jax.random.randint(k2, (2, T, 32, 32, 3), 0, 256).astype(jnp.uint8)
    apply = jax.jit(model.apply, static_argnames="method")
    whole, _ = apply({"params": params}, face, context)
    as_float, _ = apply({"params": params}, face / np.float32(255), context / np.float32(255))
    np.testing.assert_allclose(whole, as_float, rtol=1e-6, atol=1e-5)
    feats = [apply({"params": params}, c, method="encode_frames") for c in (face, context)]
    assert feats[0].shape == (2, T, 64) and feats[0].dtype == jnp.float32
    split, _ = apply({"params": params}, *feats, method="from_features")
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)


def test_each_device_encodes_the_frames_of_its_own_clips():
    # The batch split over 4 devices: the face and context frames go through the shared image
    # encoder together without leaving the device that holds their clip, so the forward pass
    # has no collective. Concatenated along the batch axis instead, a device's share of the
    # frames would be other devices' clips, exchanged between devices (all-to-alls).
    model, params, _ = _build()
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 4, "fsdp": 1}), jax.devices()[:4])
    params = jax.device_put(params, sharding.replicated(mesh))
    face, context = (jax.device_put(c, sharding.batch_sharding(mesh)) for c in _clips(8))
    text = jax.jit(model.apply).lower({"params": params}, face, context).compile().as_text()
    assert not re.findall(r"all-to-all|collective-permute|all-gather|all-reduce", text)


def test_frozen_image_encoder_gets_no_gradient():
    model, params, cfg = _build()
    cfg.freeze_image_encoder = True
    frozen, _ = caer.build_model(cfg, tokenizer=_tok())
    face, context = _clips()

    def loss(m, p):
        logits, _ = m.apply({"params": p}, face, context, train=False)
        return jax.nn.log_softmax(logits)[:, 0].sum()

    g = jax.jit(jax.grad(functools.partial(loss, frozen)))(params)
    assert not any(np.any(x) for x in jax.tree.leaves(g["image_encoder"]))
    trained = jax.jit(jax.grad(functools.partial(loss, model)))(params)
    for key in ("prompt_learner", "temporal_face", "project_fc"):
        for a, b in zip(jax.tree.leaves(g[key]), jax.tree.leaves(trained[key]), strict=True):
            np.testing.assert_array_equal(a, b)


def _dot_dtypes(jaxpr) -> list:
    """The operand dtypes of every dot_general of `jaxpr` and of its sub-jaxprs (jit, remat)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append({v.aval.dtype for v in eqn.invars})
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else [param]:
                if isinstance(sub, jex.core.ClosedJaxpr):
                    found += _dot_dtypes(sub.jaxpr)
                elif isinstance(sub, jex.core.Jaxpr):
                    found += _dot_dtypes(sub)
    return found


def test_build_model_computes_in_the_configs_dtype():
    # Built through build_model from config.model (test_clip's bf16 test builds CLIP itself):
    # with dtype bfloat16 every matmul but the logits' cosine runs in bfloat16, the parameters
    # being the same float32 ones.
    model, params, _ = _build()
    in_bfloat16, _ = caer.build_model(_cfg(dtype="bfloat16"), tokenizer=_tok())
    face, context = _clips()

    def dots(m):
        closed = jax.make_jaxpr(lambda p: m.apply({"params": p}, face, context))(params)
        assert closed.out_avals[0].dtype == jnp.float32  # the logits
        return _dot_dtypes(closed.jaxpr)

    in_fp32, in_bf16 = dots(model), dots(in_bfloat16)
    assert len(in_fp32) == len(in_bf16) > 20
    fp32, bf16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16)
    assert all(d == {fp32} for d in in_fp32), in_fp32
    assert sum(d == {bf16} for d in in_bf16) == len(in_bf16) - 1, in_bf16
