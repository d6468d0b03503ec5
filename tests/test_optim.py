"""The optimizer matches torch.optim.SGD with the authors' parameter groups and MultiStepLR."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from caer_jax import errors, optim
from configs import clip_caer_b32


def _params(rng):
    shapes = {
        "image_encoder": {"kernel": (3, 4), "bias": (4,)},
        "text_encoder": {"embedding": (5, 4)},
        "prompt_learner": {"ctx": (2, 3, 4)},
        "temporal_face": {"w": (4, 4)},
        "temporal_context": {"w": (4, 4)},
        "project_fc": {"kernel": (8, 4), "bias": (4,)},
    }
    return jax.tree.map(
        lambda s: rng.standard_normal(s).astype(np.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def test_groups_of_every_parameter():
    groups = optim.param_groups(_params(np.random.default_rng(0)))
    assert groups["text_encoder"]["embedding"] == optim.FROZEN
    assert groups["temporal_face"]["w"] == groups["temporal_context"]["w"] == "temporal"
    assert groups["project_fc"]["bias"] == "project_fc"
    with pytest.raises(KeyError, match="mystery/w belongs to no optimizer group"):
        optim.param_groups({"mystery": {"w": np.zeros(2)}})


def test_missing_learning_rate_names_the_group():
    config = clip_caer_b32.get_config().optim
    with config.unlocked():
        del config.lr["temporal"]
    with pytest.raises(KeyError, match="temporal"):
        optim.make_optimizer(_params(np.random.default_rng(0)), config, steps_per_epoch=3)


def test_matches_torch_sgd_with_groups_and_multistep():
    config = clip_caer_b32.get_config().optim
    with config.unlocked():
        config.milestones = (2, 3)
    steps_per_epoch, epochs = 3, 4
    rng = np.random.default_rng(0)
    params = _params(rng)
    grads = [
        jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
        for _ in range(steps_per_epoch * epochs)
    ]

    tx = optim.make_optimizer(params, config, steps_per_epoch)
    jax_params = jax.tree.map(jnp.asarray, params)
    opt_state = tx.init(jax_params)
    for g in grads:
        updates, opt_state = tx.update(g, opt_state, jax_params)
        jax_params = optax.apply_updates(jax_params, updates)

    groups = optim.param_groups(params)
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_groups = jax.tree.leaves(groups)
    torch_params = [torch.tensor(p, requires_grad=True) for _, p in flat_params]
    param_groups = [
        {"params": [tp], "lr": config.lr[g]}
        for tp, g in zip(torch_params, flat_groups, strict=True)
        if g != optim.FROZEN
    ]
    sgd = torch.optim.SGD(
        param_groups, lr=1.0, momentum=config.momentum, weight_decay=config.weight_decay
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(
        sgd, milestones=list(config.milestones), gamma=config.gamma
    )
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            g = jax.tree.leaves(grads[epoch * steps_per_epoch + i])
            for tp, gi in zip(torch_params, g, strict=True):
                tp.grad = torch.tensor(gi)
            sgd.step()
        sched.step()

    for (path, original), tp, ours, group in zip(
        flat_params, torch_params, jax.tree.leaves(jax_params), flat_groups, strict=True
    ):
        if group == optim.FROZEN:
            np.testing.assert_array_equal(ours, original, err_msg=str(path))
        else:
            np.testing.assert_allclose(
                ours, tp.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=str(path)
            )


def test_unknown_optimizer_is_an_error():
    config = ml_collections.ConfigDict(clip_caer_b32.get_config().optim.to_dict())
    config.name = "lion"
    with pytest.raises(errors.BadInputError, match="config.optim.name='lion': unknown optimizer"):
        optim.make_optimizer(_params(np.random.default_rng(0)), config, steps_per_epoch=1)


def test_warmup_ramps_linearly_and_keeps_the_milestones():
    config = ml_collections.ConfigDict(clip_caer_b32.get_config().optim.to_dict())
    config.milestones, config.gamma = (2,), 0.1
    plain = optim.lr_schedule(1.0, config, steps_per_epoch=4)
    config.warmup_epochs = 1.5  # 6 steps
    warm = optim.lr_schedule(1.0, config, steps_per_epoch=4)
    got = np.array([float(warm(step)) for step in range(12)])
    want = [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(
        [float(plain(step)) for step in range(12)], [1.0] * 8 + [0.1] * 4, rtol=1e-6
    )
