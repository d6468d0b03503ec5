"""The embedded default: the paper's recipe on a tiny CLIP pretrained here, on synthetic clips.

  python -m caer_jax.pretrain --config=configs/pretrain_tiny.py --workdir=runs/pretrain_tiny
  python -m caer_jax.train --config=configs/synthetic_tiny.py --workdir=runs/synthetic_tiny

Runs in minutes on a 2-core CPU with no network. `model.clip.source` is the Hugging Face CLIP
folder that `caer_jax.pretrain` exports (contrastive pretraining on synthetic image-caption pairs
drawn with other seeds than these clips); from it everything not set here is the paper's setting
(configs/clip_caer_b32.py): SGD with its per-group learning rates and milestones, [0, 1] pixels,
temporal tokens of std 1, no warm-up. Variants: `:face` trains the face stream alone for the
context ablation; `:scratch` trains a randomly initialised CLIP instead (no pretrained folder
needed; the tests use it), with the four departures a random CLIP needs to learn at all.

The file loads by its path from any working directory; the folders it names
(runs/pretrain_tiny/clip, data/tfds, data/synthetic_raer) are relative to the working directory,
as --workdir is: run from the repository root (as the Makefile does) or give absolute ones
(--config.data.data_dir=...). A command that misses one names it with the folder it looked in.
"""

import ml_collections

from caer_jax import config_files

clip_caer_b32 = config_files.sibling(__file__, "clip_caer_b32")
pretrain_tiny = config_files.sibling(__file__, "pretrain_tiny")

# The Hugging Face folder that `caer_jax.pretrain --config=configs/pretrain_tiny.py
# --workdir=runs/pretrain_tiny` exports (`make demo` runs it first; a rerun reuses it).
PRETRAINED = "runs/pretrain_tiny/clip"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = [v for v in arg.split(",") if v]
    scratch = "scratch" in variants
    try:
        c = clip_caer_b32.get_config(",".join(v for v in variants if v != "scratch"))
    except ValueError as e:
        raise ValueError(f"{e}; synthetic_tiny has also scratch") from None

    c.data.tfds_name = "raer/64px"
    c.data.data_dir = "data/tfds"
    c.data.num_segments = 8
    c.data.image_size = 64
    c.data.synthetic.enabled = True
    c.data.synthetic.manual_dir = "data/synthetic_raer"
    c.data.synthetic.num_clips = 800
    c.data.synthetic.seed = 0
    c.data.worker_count = 0  # on 2 cores worker processes only add start-up time

    c.model.clip.source = PRETRAINED
    # The geometry of the CLIP that configs/pretrain_tiny.py pretrains (also the `scratch`
    # variant's); loading the folder checks it against the weights.
    for key, value in pretrain_tiny.get_config().model.clip.items():
        c.model.clip[key] = value
    c.model.temporal.heads = 4
    c.model.temporal.head_dim = 16
    c.model.temporal.mlp_dim = 128
    c.train.log_every_steps = 20
    if scratch:
        _from_scratch(c)
    return c


def _from_scratch(c: ml_collections.ConfigDict) -> None:
    """A randomly initialised CLIP (offline tokenizer of the class texts) and what it needs to
    learn at all: each departure from the paper named with its reason."""
    c.model.clip.source = "random"
    # A random ViT learns several times faster on centred input than on the authors' [0, 1].
    c.model.pixel_normalization = "clip"
    # A random tiny CLIP gives nearly the same feature for every frame; a std-1 CLS token would
    # swamp that small signal, so the temporal tokens start small.
    c.model.temporal.init_std = 0.02
    # A randomly initialised CLIP does not learn at the authors' fine-tuning rates with SGD.
    c.optim.name = "adamw"
    c.optim.lr.image_encoder = 1e-3
    c.optim.lr.temporal = 1e-3
    c.optim.lr.prompt_learner = 1e-3
    c.optim.lr.project_fc = 1e-3
    c.optim.milestones = (14, 18)  # from scratch it needs longer at the full rate
    # Random features at the logit scale of 100 give a first-epoch loss of 12-15; full-rate Adam
    # steps on those gradients could settle training on the majority class for some seeds and
    # data orders (train UAR 20 in tests/test_end_to_end.py's learning run). One epoch's ramp
    # avoids it there.
    c.optim.warmup_epochs = 1.0
