"""CLIP pretraining of the embedded default's tiny CLIP on synthetic image-caption pairs.

  python -m caer_jax.pretrain --config=configs/pretrain_tiny.py --workdir=runs/pretrain_tiny

Draws the pairs (caer_jax.data.pretrain_data), trains both towers with CLIP's contrastive loss and
exports a Hugging Face CLIP folder to <workdir>/clip, which configs/synthetic_tiny.py can load
with config.model.clip.source. It is the embedded default's CLIP: configs/synthetic_tiny.py takes
its geometry from here. config.data.dir (data/pretrain_tiny) is relative to the working directory,
as --workdir is.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.clip = ml_collections.ConfigDict()
    c.model.clip.image_size = 64
    c.model.clip.patch_size = 16
    c.model.clip.vision_width = 64
    c.model.clip.vision_layers = 2
    c.model.clip.vision_heads = 2
    c.model.clip.text_width = 64
    c.model.clip.text_layers = 2
    c.model.clip.text_heads = 2
    c.model.clip.vocab_size = 1024  # the offline tokenizer's budget (models/tokenizer.py)
    c.model.clip.context_length = 77
    c.model.clip.embed_dim = 64
    c.model.dtype = "float32"  # compute dtype; parameters and optimizer state stay float32
    c.model.remat = False
    # A randomly initialised ViT learns far faster on centred pixels. The export folds this
    # normalisation into the patch embedding, so the exported CLIP takes [0, 1] pixels (the
    # authors' input, config.model.pixel_normalization = "none" in training).
    c.model.pixel_normalization = "clip"
    c.model.init_temperature = 0.07  # CLIP's: logits = exp(t) * cosine, t = log(1 / 0.07)
    c.model.max_logit_scale = 100.0  # CLIP clips exp(t) at 100

    c.data = ml_collections.ConfigDict()
    c.data.dir = "data/pretrain_tiny"
    c.data.seed = 0  # drawn from the generator stream RAER-layout clips never use
    c.data.num_clips = 600
    c.data.frames_per_clip = 8
    c.data.captions_per_frame = 3  # phrasings stored per frame and stream; one drawn per epoch
    c.data.frame_width = 160  # the RAER-layout generator's frames
    c.data.frame_height = 120
    c.data.image_size = 64
    c.data.text_length = 48  # tokens per caption (start and end included); longer ones are redrawn
    c.data.jpeg_quality = 95
    c.data.draw_workers = 2  # processes drawing the pairs (0 or 1: in this process)
    c.data.worker_count = 0  # grain reader processes; on 2 cores they only add start-up time
    c.data.prefetch_buffer_size = 2
    c.data.device_prefetch = 2

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.1  # on matrices only, as CLIP
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98  # CLIP's, for stability with large batches
    c.optim.eps = 1e-6

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 600
    c.train.batch_size = 64  # frames: each gives a face and a context pair, 2 x 64 in the loss
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 200
    c.train.keep_checkpoints = 2

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    return c
