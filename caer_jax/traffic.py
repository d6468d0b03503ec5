"""Where a compiled step's memory traffic goes, against what the step must move at the least.

`breakdown(hlo_text)` groups the bytes and FLOPs of every top-level operation of a compiled
program (`caer_jax.hlo.op_costs`) by the part of CLIP-CAER its code belongs to (image encoder
attention / MLP / layer norms / embedding, temporal nets, text encoder and prompts, loss,
optimizer per parameter group, input conversion, collectives), split into forward and backward
pass, with the memory-space copies the compiler schedules (prefetches into and evictions out of
on-chip memory, layout copies) charged to the operation whose result they move.

`analytic_minimum(...)` is the traffic of an ideal step of the same config, per chip: every
parameter the step uses read once by the forward and once by the backward pass in the compute
dtype (and, for a compute dtype narrower than the float32 master weights, read once in float32
for the cast), the trainable parameters' gradients written and read once, the optimizer reading
and writing parameters and its state once, each activation the backward pass needs written once
and read once and its gradient written once and read once (under remat, the block inputs are
what is kept, and the recomputed activations cost the same as kept ones), and the batch read
once. Logical sizes: no tile padding. The ratio compiler / minimum is the step's efficiency.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

import jax
import ml_collections
from flax import traverse_util

from caer_jax import hlo, optim
from caer_jax.models import clip as clip_lib

GB = 1e9

# (pattern on the operation's name stack, part), first match wins.
_PARTS = (
    (r"optimizer/(\w+)", r"optimizer: \1"),
    (r"grad_norm", "gradient norm and finite check"),
    (r"/loss/", "loss"),
    (r"image_encoder/transformer/resblocks_\d+/attn/", "image encoder: attention"),
    (r"image_encoder/transformer/resblocks_\d+/(fc|proj)/", "image encoder: MLP matmuls"),
    (r"image_encoder/transformer/resblocks_\d+/ln_\d", "image encoder: layer norms"),
    (r"image_encoder/transformer/resblocks_\d+/", "image encoder: residuals, activation"),
    (r"image_encoder/transformer/remat", "image encoder: rematerialised blocks"),
    (r"image_encoder/", "image encoder: patch embedding, ln_pre, ln_post, proj"),
    (r"text_encoder|prompt_learner|text_features|prompt_embeddings", "text encoder and prompts"),
    (r"temporal_(face|context)", "temporal nets"),
    (r"project_fc|from_features", "fusion and logits"),
    (r"encode_frames|_stream_features", "input conversion and stream concatenation"),
)


def part_of(op_name: str) -> str:
    """The model part an operation belongs to, from its JAX name stack."""
    for pattern, part in _PARTS:
        found = re.search(pattern, op_name)
        if found:
            return found.expand(part)
    return "other"


@dataclasses.dataclass
class Entry:
    bytes_forward: float = 0.0
    bytes_backward: float = 0.0
    copies: float = 0.0  # memory-space and layout copies of this part's results
    flops: float = 0.0
    in_hbm: float = 0.0  # of all its bytes, those read from or written to HBM
    # of its copies, the moves into and out of on-chip memory spaces (v4's CMEM: prefetches,
    # their reassembly, evictions) that the compiler's memory-space assignment schedules
    staged: float = 0.0

    @property
    def bytes(self) -> float:
        return self.bytes_forward + self.bytes_backward + self.copies


# Operations that move a result between memory spaces or layouts without computing anything:
# copies, reshapes and transposes, and the custom call by which the TPU compiler reassembles an
# array it prefetched in chunks (ConcatBitcast). A Pallas kernel (tpu_custom_call) computes.
_MOVES = {"copy", "copy-start", "slice-start", "reshape", "transpose"}
_MOVING_CUSTOM_CALLS = {"ConcatBitcast"}


def _moves(inst: hlo.Instruction) -> bool:
    if inst.opcode == "custom-call":
        return inst.custom_call_target in _MOVING_CUSTOM_CALLS
    return inst.opcode in _MOVES


def breakdown(hlo_text: str) -> dict[str, Entry]:
    """{part: Entry} of a compiled program's optimized HLO text, costliest first."""
    module = hlo.Module.parse(hlo_text)
    producers = {i.name: i for insts in module.computations.values() for i in insts}

    def origin(name: str) -> str:
        # The op_name of the computation whose result a chain of moves carries.
        for _ in range(32):
            inst = producers.get(name)
            if inst is None:
                return ""
            if inst.op_name and inst.opcode not in ("copy-start", "slice-start", "custom-call"):
                return inst.op_name
            if inst.opcode == "parameter" or not inst.operands:
                return "parameters"
            name = inst.operands[0]
        return ""

    parts: dict[str, Entry] = collections.defaultdict(Entry)
    for cost in hlo.op_costs(hlo_text):
        if cost.opcode.removesuffix("-start") in hlo.COLLECTIVES:
            parts["collectives"].bytes_forward += cost.bytes
            parts["collectives"].in_hbm += cost.hbm_bytes
            continue
        inst = producers[cost.name]
        moved = _moves(inst) and not cost.flops
        op_name = (
            cost.op_name if cost.op_name else origin(inst.operands[0] if inst.operands else "")
        )
        entry = parts["parameters (prefetch)" if op_name == "parameters" else part_of(op_name)]
        entry.flops += cost.flops
        entry.in_hbm += cost.hbm_bytes
        if moved:
            entry.copies += cost.bytes
            if _touches_on_chip_memory(inst, producers):
                entry.staged += cost.bytes
        elif "transpose(" in op_name:
            entry.bytes_backward += cost.bytes
        else:
            entry.bytes_forward += cost.bytes
    return dict(sorted(parts.items(), key=lambda kv: -kv[1].bytes))


def _touches_on_chip_memory(move: hlo.Instruction, producers: dict) -> bool:
    """Whether a move reads or writes an array in an on-chip memory space. A -start's tuple is
    (source, destination, context): the context (a sync flag) is always on chip, so only the
    two arrays tell."""
    if move.opcode.endswith("-start"):
        arrays = hlo.tuple_elements(move.shape)[:2]
    else:
        arrays = [move.shape, *(producers[o].shape for o in move.operands if o in producers)]
    return any(hlo.on_chip(a) for a in arrays)


# ----------------------------------------------------------------------------- the minimum


def _tokens_per_transformer(config: ml_collections.ConfigDict, clips: float, n_cls: int) -> dict:
    """Frames per chip in one step, the image tower's sequence length, and the tokens per chip
    that go through each transformer tower."""
    clip_cfg = config.model.clip
    streams = 2 if config.model.streams == "both" else 1
    frames = clips * config.data.num_segments * streams
    image_length = (clip_cfg.image_size // clip_cfg.patch_size) ** 2 + 1
    return {
        "frames": frames,
        "image_length": image_length,
        "image": frames * image_length * (0 if config.data.feature_cache.enabled else 1),
        "text": n_cls * clip_cfg.context_length,
        "temporal": clips * streams * (config.data.num_segments + 1),
    }


def _saved_per_token(width: int, heads: int, length: int, mlp: int) -> int:
    """Activations a pre-norm transformer block keeps for its backward pass, per token: its input
    and the layer-norm outputs (3 x width), q, k, v and the attention output (4 x width), the
    attention probabilities (heads x length), the MLP's pre- and post-activation (2 x mlp)."""
    return 7 * width + heads * length + 2 * mlp


def analytic_minimum(
    config: ml_collections.ConfigDict,
    params: Any,
    *,
    batch_size: int,
    chips: int,
    fsdp: int,
    n_cls: int,
) -> dict[str, float]:
    """Bytes per chip an ideal train step of `config` must move (see the module docstring).
    `params` is the parameter tree (arrays or ShapeDtypeStructs); `fsdp` the mesh's fsdp size,
    over which the optimizer's reads and writes are split; `n_cls` the number of prompts."""

    compute = jax.numpy.dtype(clip_lib.dtype_from_name(config.model.dtype)).itemsize
    groups = optim.flat_groups(params, freeze_image_encoder=config.model.freeze_image_encoder)
    sizes = {k: math.prod(v.shape) for k, v in traverse_util.flatten_dict(params).items()}
    table = [k for k in sizes if k[-2:] == ("token_embedding", "embedding")]
    # The prompts gather n_cls x context_length rows of the token embedding table, not all of it.
    c = config.model.clip
    used = sum(v for k, v in sizes.items() if k not in table) + n_cls * c.context_length * (
        c.text_width
    )
    trainable = sum(v for k, v in sizes.items() if groups[k] != optim.FROZEN)
    state_per_param = {"sgd": 1, "adamw": 2}.get(config.optim.name, 1)
    tokens = _tokens_per_transformer(config, batch_size / chips, n_cls)
    t = config.model.temporal
    saved = (
        tokens["image"]
        * c.vision_layers
        * _saved_per_token(
            c.vision_width, c.vision_heads, tokens["image_length"], 4 * c.vision_width
        )
        + tokens["text"]
        * c.text_layers
        * _saved_per_token(c.text_width, c.text_heads, c.context_length, 4 * c.text_width)
        + tokens["temporal"]
        * t.depth
        * _saved_per_token(c.embed_dim, t.heads, config.data.num_segments + 1, t.mlp_dim)
    )
    minimum = {
        "parameters read (forward, backward)": 2 * used * compute,
        "parameters cast to the compute dtype": used * (4 + compute) if compute < 4 else 0.0,
        "gradients written and read": 2 * trainable * 4,
        "optimizer: parameters and state read and written": 2
        * trainable
        * 4
        * (1 + state_per_param)
        / fsdp,
        "activations kept and their gradients": 4 * saved * compute,
        "batch": tokens["frames"] * config.data.image_size**2 * 3,
    }
    minimum["total"] = sum(minimum.values())
    return minimum
