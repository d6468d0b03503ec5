"""The embedded default: a tiny randomly initialised CLIP-CAER on synthetic RAER-layout clips.

  python -m caer_jax.train --config=configs/synthetic_tiny.py --workdir=runs/synthetic_tiny

Runs in minutes on a 2-core CPU with no network. Everything not set here is the paper's setting
(configs/clip_caer_b32.py). `:face` trains the face stream alone for the context ablation.
"""

import ml_collections

from configs import clip_caer_b32


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = clip_caer_b32.get_config(arg)

    c.data.tfds_name = "raer/64px"
    c.data.data_dir = "data/tfds"
    c.data.num_segments = 8
    c.data.image_size = 64
    c.data.synthetic.enabled = True
    c.data.synthetic.manual_dir = "data/synthetic_raer"
    c.data.synthetic.num_clips = 800
    c.data.synthetic.seed = 0
    c.data.worker_count = 0  # on 2 cores worker processes only add start-up time

    c.model.clip.source = "random"
    # A random ViT learns several times faster on centred input than on the authors' [0, 1].
    c.model.pixel_normalization = "clip"
    c.model.clip.image_size = 64
    c.model.clip.patch_size = 16
    c.model.clip.vision_width = 64
    c.model.clip.vision_layers = 2
    c.model.clip.vision_heads = 2
    c.model.clip.text_width = 64
    c.model.clip.text_layers = 2
    c.model.clip.text_heads = 2
    c.model.clip.vocab_size = 1024  # offline tokenizer built from the class texts
    c.model.clip.embed_dim = 64
    c.model.temporal.heads = 4
    c.model.temporal.head_dim = 16
    c.model.temporal.mlp_dim = 128
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
    c.train.log_every_steps = 20
    return c
