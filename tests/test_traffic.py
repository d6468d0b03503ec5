"""Where a compiled step's bytes go (caer_jax.hlo, caer_jax.traffic), the mesh's device order,
and libtpu's start-up noise (caer_jax.backend)."""

import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from caer_jax import backend, hlo, sharding, traffic
from caer_jax.models import caer
from configs import clip_caer_b32

# An excerpt of a compiled TPU program: a fusion holding a 1x1 convolution (the TPU compiler's
# matmul) on tiled arrays, an asynchronous copy of a parameter into on-chip memory (S(3)) and the
# fusion that reads it there, a conditional whose costlier branch is charged, a Pallas kernel,
# the custom call that reassembles a parameter prefetched in chunks, and the prefetch of a chunk.
_HLO = """\
HloModule jit_train_step, is_scheduled=true

%fused_dot (p0: f32[64,50,768], p1: bf16[768,768]) -> f32[64,50,768] {
  %p0 = f32[64,50,768]{2,0,1:T(8,128)} parameter(0)
  %p1 = bf16[768,768]{1,0:T(8,128)(2,1)} parameter(1)
  %k1 = bf16[768,768,1]{1,0,2:T(8,128)(2,1)} bitcast(%p1)
  ROOT %convolution.1 = f32[64,50,768]{2,0,1:T(8,128)} convolution(%p0, %k1), window={size=1}, dim_labels=b0f_io0->b0f
}

%fused_add (q0: f32[5,77]) -> f32[5,77] {
  %q0 = f32[5,77]{1,0:T(8,128)S(3)} parameter(0)
  ROOT %add.1 = f32[5,77]{1,0:T(8,128)} add(%q0, %q0)
}

%cheap (c0: f32[8]) -> f32[8] {
  %c0 = f32[8]{0:T(128)} parameter(0)
  ROOT %neg.1 = f32[8]{0:T(128)} negate(%c0)
}

%costly (d0: f32[8]) -> f32[8] {
  %d0 = f32[8]{0:T(128)} parameter(0)
  %e.1 = f32[8]{0:T(128)} exponential(%d0)
  ROOT %e.2 = f32[8]{0:T(128)} exponential(%e.1)
}

ENTRY %main.1 (x: f32[64,50,768], w: bf16[768,768], t: f32[5,77], v: f32[8], b: pred[]) -> f32[64,50,768] {
  %x = f32[64,50,768]{2,0,1:T(8,128)} parameter(0)
  %w = bf16[768,768]{1,0:T(8,128)(2,1)} parameter(1)
  %t = f32[5,77]{1,0:T(8,128)} parameter(2)
  %v = f32[8]{0:T(128)} parameter(3)
  %b = pred[]{:T(128)} parameter(4)
  %fusion.1 = f32[64,50,768]{2,0,1:T(8,128)} fusion(%x, %w), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(train_step)/transpose(jvp(CLIPCAER))/image_encoder/transformer/resblocks_3/fc/dot_general"}
  %copy-start.1 = (f32[5,77]{1,0:T(8,128)}, f32[5,77]{1,0:T(8,128)S(3)}, u32[]{:S(2)}) copy-start(%t)
  %copy-done.1 = f32[5,77]{1,0:T(8,128)S(3)} copy-done(%copy-start.1)
  %fusion.2 = f32[5,77]{1,0:T(8,128)} fusion(%copy-done.1), kind=kLoop, calls=%fused_add, metadata={op_name="jit(train_step)/jvp(CLIPCAER)/text_encoder.encode/transformer/resblocks_0/ln_1/add"}
  %conditional.1 = f32[8]{0:T(128)} conditional(%b, %v, %v), branch_computations={%cheap, %costly}
  %kernel.1 = f32[64,50,768]{2,1,0:T(8,128)} custom-call(%x), custom_call_target="tpu_custom_call", metadata={op_name="jit(train_step)/jvp(CLIPCAER)/image_encoder/transformer/resblocks_3/attn/cond/branch_0_fun/shard_map/attention_kernel/pallas_call"}
  %custom-call.1 = bf16[768,768]{1,0:T(8,128)(2,1)S(3)} custom-call(%w), custom_call_target="ConcatBitcast"
  %slice-start.1 = ((bf16[768,768]{1,0:T(8,128)(2,1)}), bf16[192,768]{1,0:T(8,128)(2,1)S(3)}, s32[]{:S(2)}) slice-start(%w), slice={[0:192], [0:768]}
  %slice-done.1 = bf16[192,768]{1,0:T(8,128)(2,1)S(3)} slice-done(%slice-start.1)
  ROOT %r = f32[64,50,768]{2,0,1:T(8,128)} copy(%fusion.1), metadata={op_name="jit(train_step)/jvp(CLIPCAER)/image_encoder/transformer/resblocks_3/attn/q/dot_general"}
}
"""
ACTIVATION = 64 * 50 * 768 * 4  # f32[64,50,768]: 768 lanes and 64 rows need no padding
WEIGHT = 768 * 768 * 2
CHUNK = WEIGHT // 4  # bf16[192,768]: a quarter of the weight's rows
TILED_5x77 = 8 * 128 * 4  # f32[5,77] in T(8,128) tiles


def test_op_costs_charge_tiled_operands_and_results_and_matmul_flops():
    costs = {c.name: c for c in hlo.op_costs(_HLO)}
    matmul = costs["fusion.1"]
    assert matmul.bytes == 2 * ACTIVATION + WEIGHT
    assert matmul.flops == 2 * 64 * 50 * 768 * 768
    # a copy into on-chip memory reads what it writes; of that, only the read is in HBM
    assert costs["copy-start.1"].bytes == 2 * TILED_5x77
    assert costs["copy-start.1"].hbm_bytes == TILED_5x77
    assert "copy-done.1" not in costs or costs["copy-done.1"].bytes == 0
    # a chunk's prefetch reads its quarter of the weight from HBM, which its tuple holds whole
    assert costs["slice-start.1"].bytes == 2 * CHUNK
    assert costs["slice-start.1"].hbm_bytes == CHUNK
    # the fusion reads its operand from on-chip memory and writes its result to HBM
    assert costs["fusion.2"].bytes == 2 * TILED_5x77
    assert costs["fusion.2"].hbm_bytes == TILED_5x77
    # of a conditional, the costlier branch: two exponentials of f32[8] (tiled to 128 lanes)
    branch = [c for c in costs.values() if c.opcode == "exponential"]
    assert len(branch) == 2 and not [c for c in costs.values() if c.opcode == "negate"]


def test_breakdown_names_model_parts_and_passes():
    parts = traffic.breakdown(_HLO)
    mlp = parts["image encoder: MLP matmuls"]
    assert mlp.bytes_backward == 2 * ACTIVATION + WEIGHT and mlp.bytes_forward == 0
    # the copy of the matmul's result is charged to the part that made it; the Pallas kernel
    # computes (its bytes are the attention's own), the reassembly of a prefetch only moves
    attention = parts["image encoder: attention"]
    assert attention.copies == 2 * ACTIVATION
    # (its result has the 50 tokens in the tiles' rows: padded to 56 rows of 8 x 128 tiles)
    assert attention.bytes_forward == ACTIVATION + 64 * 56 * 768 * 4
    # (beside the parameter t's copy into on-chip memory and the chunk's prefetch)
    assert parts["parameters (prefetch)"].copies == 2 * WEIGHT + 2 * TILED_5x77 + 2 * CHUNK
    text = parts["text encoder and prompts"]
    assert text.bytes_forward == 2 * TILED_5x77


def test_on_chip_staging_is_the_moves_into_and_out_of_on_chip_memory():
    # the copy of t into S(3), the chunk's prefetch and the reassembly of the prefetched weight;
    # not the copy of the matmul's result in HBM, nor the kernel or the fusion that reads t on chip
    parts = traffic.breakdown(_HLO)
    staged = sum(entry.staged for entry in parts.values())
    assert staged == 2 * TILED_5x77 + 2 * CHUNK + 2 * WEIGHT


@pytest.mark.parametrize(
    "op_name, part",
    [
        ("jit(train_step)/cond/branch_1_fun/optimizer/temporal/mul", "optimizer: temporal"),
        (
            "jit(train_step)/jvp(CLIPCAER)/image_encoder/transformer/resblocks_11/ln_2/mul",
            "image encoder: layer norms",
        ),
        (
            "jit(train_step)/jvp(CLIPCAER)/CLIPCAER.from_features/temporal_face/layers_0/fc1/dot",
            "temporal nets",
        ),
        (
            "jit(train_step)/jvp(CLIPCAER)/CLIPCAER.encode_frames/convert_element_type",
            "input conversion and stream concatenation",
        ),
        ("jit(train_step)/grad_norm/reduce_sum", "gradient norm and finite check"),
    ],
)
def test_part_of(op_name, part):
    assert traffic.part_of(op_name) == part


def test_analytic_minimum_of_the_paper_config():
    config = clip_caer_b32.get_config()
    config.model.clip.source = "random"  # shapes only: no weights to read
    model, _ = caer.build_model(config.model, prompt_token_ids=np.full((5, 77), 3), num_frames=16)
    params = jax.eval_shape(lambda: caer.init_params(model, config.model, jax.random.key(0)))
    minimum = traffic.analytic_minimum(
        config, params, batch_size=8, chips=4, fsdp=1, n_cls=model.n_cls
    )
    sizes = {k: int(np.prod(v.shape)) for k, v in traverse_util.flatten_dict(params).items()}
    trainable = sum(v for k, v in sizes.items() if k[0] != "text_encoder")
    # SGD: parameters and momentum, each read and written once, in float32
    assert minimum["optimizer: parameters and state read and written"] == 4 * 4 * trainable
    assert minimum["batch"] == 2 * 16 * 2 * 224 * 224 * 3  # 2 clips per chip, uint8
    assert minimum["parameters cast to the compute dtype"] == 0  # float32 compute
    assert minimum["total"] == pytest.approx(sum(v for k, v in minimum.items() if k != "total"))
    # 64 images of 50 tokens through 12 layers dominate: about 8 GB of activation traffic
    assert 7e9 < minimum["activations kept and their gradients"] < 9e9


def test_the_mesh_takes_jax_make_mesh_device_order():
    from jax.experimental import topologies

    with backend.quiet_libtpu():
        devices = list(topologies.get_topology_desc("v5e:4x4", "tpu").devices)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 8}), devices)
    expected = jax.make_mesh((2, 8), sharding.MESH_AXES, devices=devices)
    assert (mesh.devices == expected.devices).all()
    assert not (mesh.devices == np.asarray(devices).reshape(2, 8)).all()  # not list order


def test_libtpu_start_up_noise_is_one_line():
    # A fresh process's environment: without the TPU_* variables that libtpu, loaded in this
    # process by the tests before, left behind (with them, it loads quietly).
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # this process may hold libtpu's lockfile
    script = "from caer_jax import backend; backend.initialize(); print('started')"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "started"
    assert out.stderr.strip() == backend.NOISE_NOTE


def _gradient_program_on_one_chip(module, input_shape, topology: str, argnums) -> str:
    """The optimized HLO of the gradient of sum(module(x) ** 2) (with respect to `argnums` of
    (parameters, x)), compiled for one chip of a TPU topology from shapes alone."""
    from jax.experimental import topologies

    with backend.quiet_libtpu():
        device = topologies.get_topology_desc(topology, "tpu").devices[0]
    replicated = sharding.replicated(jax.sharding.Mesh(np.asarray([device]), ("d",)))
    x = jax.ShapeDtypeStruct(input_shape, jax.numpy.float32, sharding=replicated)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), jax.numpy.zeros(x.shape)))
    params = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=replicated), params
    )
    loss = lambda p, x: (module.apply(p, x) ** 2).sum()  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=argnums)).lower(params, x).compile().as_text()


@pytest.mark.slow  # a TPU compile
def test_attention_on_tpu_is_the_kernel_with_no_scores_or_layout_changes_in_memory():
    # Compiled for one v5e chip, a block of 4 heads of 64 (ViT-B's head size) runs its attention
    # as the Pallas kernels (forward and backward): no [8, 4, 50, 50] score or probability
    # tensor is stored, and no activation is reshaped between [.., width] and [.., heads,
    # head_dim] (on TPU a copy through HBM, the tiles' minor dimension changing).
    from caer_jax.models import clip

    block = clip.ResidualBlock(256, 4, 1)
    text = _gradient_program_on_one_chip(block, (8, 50, 256), "v5e:2x2", argnums=(0, 1))
    attention = [c for c in hlo.op_costs(text) if "/attn/" in c.op_name]
    kernels = sorted(c.name.split(".")[0] for c in attention if c.opcode == "custom-call")
    assert kernels == ["backward_kernel", "forward_kernel"], kernels
    assert "8,4,50,50]" not in text
    moved = [
        c
        for c in attention
        if c.opcode in ("reshape", "copy", "transpose") and c.bytes >= 8 * 50 * 256 * 2
    ]
    assert not moved, [(c.opcode, c.op_name, c.bytes) for c in moved]


@pytest.mark.slow  # a TPU compile
def test_patch_embedding_on_tpu_is_a_convolution_that_copies_the_images_little():
    # Compiled for one v4 chip (forward and kernel gradient of 32 images at 224 px): the
    # convolution reads the images after one layout change, where the same function as a matmul
    # over flattened patches (the CPU's form) copies them through several layouts, because their
    # minor dimension of 3 channels pads to 128 lanes: 29.9x the images' bytes in copies, against
    # 6.9x for the convolution.
    from caer_jax.models import clip

    embedding = clip.PatchEmbedding(32, 256)
    text = _gradient_program_on_one_chip(embedding, (32, 224, 224, 3), "v4:2x2x1", argnums=0)
    costs = hlo.op_costs(text)
    assert any(c.op_name.endswith("conv_general_dilated") for c in costs)
    copied = sum(c.bytes for c in costs if c.opcode in ("copy", "transpose", "reshape"))
    assert copied < 10 * 32 * 224 * 224 * 3 * 4, copied / (32 * 224 * 224 * 3 * 4)
