"""Sharding is invisible in results: the same train steps on meshes (data, fsdp) of 1, (8, 1),
(2, 4) and (1, 8) fake CPU devices give the same losses and parameters (fp32, max |d| <= 1e-5);
bfloat16 compute stays close to fp32; gradient accumulation gives the same update as one batch.

The steps are trainer.jit_train_step with each mesh's shardings (sharding.tree_shardings,
sharding.batch_sharding), as train_and_evaluate does, on fixed random batches: the partitioning
is what is tested, not the input pipeline.
"""

import collections
import functools
import importlib
import math
import re
import typing

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from caer_jax import optim, sharding, steps, trainer
from caer_jax import state as state_lib
from caer_jax.models import caer
from configs import synthetic_tiny

MESHES = [(1, 1), (8, 1), (2, 4), (1, 8)]
NUM_STEPS = 4
BATCH = 8
FP32_TOL = 1e-5
# The comparisons mean something only if the steps changed the parameters by far more than the
# tolerance: an update that does nothing gives equal parameters on every mesh.
MIN_MOVE = 100 * FP32_TOL
# bf16 compute (fp32 params and optimizer state) against fp32: |loss_bf16 - loss_fp32| per step
# over the 4 steps. bf16 keeps 8 significant bits (relative rounding 2^-9); on losses of 1.7-2.2
# the gap measured 0.0145 (x86 CPU, XLA's bf16 dots); the bound leaves room for other kernels.
BF16_LOSS_TOL = 0.05
# ...and at least this: fp32 on another mesh differs by <= FP32_TOL, so a gap this large shows
# that the run computed in bf16 at all (a model ignoring config.model.dtype gives 0).
BF16_MIN_GAP = 1e-3


def scaling_config(dtype: str = "float32") -> ml_collections.ConfigDict:
    """The tiny model at 32 px, 4 frames and one layer per CLIP tower (quick to compile on every
    mesh), trained with the paper's SGD at 1e-2 and logits = cos / 0.1.

    Why not the tiny config's AdamW: Adam divides by sqrt(v), so a leaf whose gradient is zero
    in exact arithmetic (the attention key biases: softmax ignores a shift shared by all keys)
    moves by +-lr on the sign of its rounding noise, and two reduction orders (two meshes, or
    two XLA versions on one) then differ by ~lr there: measured 2.9e-3 on the key biases, all
    other leaves within 3.4e-5. That is the optimizer, not the partitioning. Why cos / 0.1: at
    cos / 0.01 a random model's loss on noise is 10-50, where fp32 rounding alone is ~1e-5.
    """
    c = synthetic_tiny.get_config("scratch")
    c.data.num_segments = 4
    c.data.image_size = 32
    c.model.clip.image_size = 32
    c.model.clip.vision_layers = 1
    c.model.clip.text_layers = 1
    c.model.logit_scale = 10.0
    c.model.dtype = dtype
    c.optim.name = "sgd"
    for group in c.optim.lr:
        c.optim.lr[group] = 1e-2
    c.train.batch_size = BATCH
    return c


@functools.cache
def initial_params():
    """The seed's initial parameters (host numpy; the same for every dtype and mesh)."""
    config = scaling_config()
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    init_rng, _ = jax.random.split(jax.random.key(config.seed))
    return jax.device_get(caer.init_params(model, config.model, init_rng))


def fixed_batches(config, num_steps: int, batch: int) -> list[dict]:
    rng = np.random.default_rng(0)
    shape = (batch, config.data.num_segments, config.data.image_size, config.data.image_size, 3)
    return [
        {
            "face": rng.random(shape, np.float32),
            "context": rng.random(shape, np.float32),
            "label": rng.integers(0, 5, batch).astype(np.int32),
        }
        for _ in range(num_steps)
    ]


class Run(typing.NamedTuple):
    losses: np.ndarray  # per step
    params: dict  # final, host numpy
    shardings: object  # the state's
    program: str  # the train step's StableHLO, as jitted for the run's mesh


def run_steps(config, mesh_shape, batches, *, grad_accum_steps: int = 1) -> Run:
    """Trains from the seed's initial parameters on `mesh_shape` (data, fsdp) devices."""
    data, fsdp = mesh_shape
    mesh_config = ml_collections.ConfigDict({"data": data, "fsdp": fsdp})
    mesh = sharding.make_mesh(mesh_config, jax.devices()[: data * fsdp])
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    _, dropout_rng = jax.random.split(jax.random.key(config.seed))
    params = initial_params()
    tx = optim.make_optimizer(params, config.optim, NUM_STEPS)
    state = state_lib.create(params, tx)
    shardings = sharding.tree_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    step_fn = trainer.jit_train_step(
        model,
        tx,
        streams=config.model.streams,
        grad_accum_steps=grad_accum_steps,
        state_shardings=shardings,
        mesh=mesh,
    )
    losses = []
    for batch in batches:
        batch = jax.device_put(batch, sharding.batch_sharding(mesh))
        state, metrics = step_fn(state, batch, dropout_rng)
        assert bool(metrics["finite"])
        losses.append(float(metrics["loss"]))
    program = step_fn.lower(state, batch, dropout_rng).as_text()
    return Run(np.asarray(losses), jax.device_get(state.params), shardings, program)


def dot_operand_dtypes(program: str) -> collections.Counter:
    """How many matrix products of a StableHLO program take operands of each dtype pair."""
    operands = re.findall(
        r"stablehlo\.dot_general .*: \(tensor<([^>]*)>, tensor<([^>]*)>\)", program
    )
    return collections.Counter((a.split("x")[-1], b.split("x")[-1]) for a, b in operands)


def max_abs_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def assert_moved(params) -> None:
    """Every trained group moved away from the initial parameters by more than MIN_MOVE."""
    init = initial_params()
    moved = {group: max_abs_diff(params[group], init[group]) for group in params}
    print("max |param - initial| per group:", moved)
    # The text encoder is frozen (optim.py); the groups the optimizer updates all moved.
    assert moved.pop("text_encoder") == 0.0
    assert min(moved.values()) > MIN_MOVE, moved


@pytest.fixture(scope="module")
def fp32_runs():
    config = scaling_config()
    batches = fixed_batches(config, NUM_STEPS, BATCH)
    with pytest.MonkeyPatch.context() as mp:
        # Shard every matrix of at least 1k elements, so that most weights are split on fsdp.
        mp.setattr(sharding, "MIN_FSDP_SIZE", 2**10)
        runs = {shape: run_steps(config, shape, batches) for shape in MESHES}
    return config, batches, runs


@pytest.mark.slow  # training runs on several meshes
def test_fsdp_meshes_really_shard_the_parameters(fp32_runs):
    _, _, runs = fp32_runs
    for shape, run in runs.items():
        shardings = run.shardings
        specs = [s.spec for s in jax.tree.leaves(shardings.params)]
        sharded = sum(spec != P() for spec in specs)
        if shape[1] == 1:
            assert sharded == 0, shape
        else:
            # all of the ViT, text and temporal matrices; vectors and small leaves replicated
            assert sharded >= 20 and sharded < len(specs), (shape, sharded, len(specs))
            assert all(s.spec == P() or "fsdp" in s.spec for s in jax.tree.leaves(shardings))


@pytest.mark.slow  # training runs on several meshes
def test_losses_and_parameters_do_not_depend_on_the_mesh(fp32_runs):
    _, _, runs = fp32_runs
    ref_losses, ref_params, *_ = runs[(1, 1)]
    assert np.all(np.isfinite(ref_losses)) and len(ref_losses) == NUM_STEPS
    assert_moved(ref_params)
    for shape in MESHES[1:]:
        losses, params, *_ = runs[shape]
        np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=FP32_TOL, err_msg=str(shape))
        delta = max_abs_diff(params, ref_params)
        print(
            f"mesh {shape}: max |d loss| {np.max(np.abs(losses - ref_losses)):.2e}, "
            f"max |d param| {delta:.2e}"
        )
        assert delta <= FP32_TOL, (shape, delta)


@pytest.mark.slow  # training runs on several meshes
def test_bfloat16_loss_stays_close_to_float32(fp32_runs):
    config, batches, runs = fp32_runs
    ref_losses = runs[(1, 1)].losses
    run = run_steps(scaling_config("bfloat16"), (2, 4), batches)
    gap = np.max(np.abs(run.losses - ref_losses))
    print(f"bf16 vs fp32: losses {run.losses} vs {ref_losses}, max gap {gap:.4f}")
    assert BF16_MIN_GAP <= gap <= BF16_LOSS_TOL, (run.losses, ref_losses)
    # The towers' and temporal transformers' matrix products take bf16 operands (a few, like
    # the cosine logits, stay in fp32); the fp32 program has none.
    bf16, fp32 = dot_operand_dtypes(run.program), dot_operand_dtypes(runs[(1, 1)].program)
    print(f"dot_general operand dtypes: bf16 run {dict(bf16)}, fp32 run {dict(fp32)}")
    assert set(fp32) == {("f32", "f32")}
    assert bf16[("bf16", "bf16")] >= 0.9 * fp32[("f32", "f32")], bf16
    # parameters and optimizer state stay float32 under bf16 compute
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(run.params))


@pytest.mark.slow  # training runs on several meshes
def test_gradient_accumulation_gives_the_same_update(monkeypatch):
    config = scaling_config()
    monkeypatch.setattr(sharding, "MIN_FSDP_SIZE", 2**10)
    config.model.temporal.dropout = 0.0  # accumulation draws other dropout masks (steps.py)
    batches = fixed_batches(config, 2, BATCH)
    ref_losses, ref_params, *_ = run_steps(config, (1, 1), batches)
    assert_moved(ref_params)
    # on an FSDP mesh: the micro-batches are strided slices of every device's rows
    losses, params, *_ = run_steps(config, (2, 4), batches, grad_accum_steps=2)
    delta = max_abs_diff(params, ref_params)
    print(
        f"accum 2 vs 1: max |d loss| {np.max(np.abs(losses - ref_losses)):.2e}, "
        f"max |d param| {delta:.2e}"
    )
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=FP32_TOL)
    assert delta <= FP32_TOL


def test_gradient_accumulation_must_divide_the_batch():
    batch = {"label": np.arange(6, dtype=np.int32), "face": np.zeros((6, 2, 8, 8, 3), np.uint8)}
    with pytest.raises(
        ValueError, match="grad_accum_steps=4 does not divide the global batch of 6"
    ):
        steps.micro_batches(batch, 4)
    split = steps.micro_batches(batch, 3)
    assert split["face"].shape == (3, 2, 2, 8, 8, 3)
    np.testing.assert_array_equal(split["label"], [[0, 3], [1, 4], [2, 5]])  # strided rows


@pytest.mark.parametrize("name,millions", [("clip_caer_b16", 154), ("clip_caer_l14", 435)])
def test_large_configs_split_nearly_every_parameter_over_fsdp(name, millions):
    config = importlib.import_module(f"configs.{name}").get_config()
    assert (config.model.dtype, config.model.remat) == ("bfloat16", True)
    config.model.clip.source = "random"  # the same geometry, without the hub download
    model, _ = caer.build_model(config.model, num_frames=config.data.num_segments)
    params = state_lib.abstract_params(model, config)
    mesh = sharding.make_mesh(config.mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8}
    sizes = [math.prod(leaf.shape) for leaf in jax.tree.leaves(params)]
    specs = [s.spec for s in jax.tree.leaves(sharding.tree_shardings(params, mesh))]
    assert round(sum(sizes) / 1e6) == millions
    replicated = sum(n for n, spec in zip(sizes, specs, strict=True) if spec == P())
    assert replicated < 0.002 * sum(sizes)  # LayerNorms, biases, small embeddings
