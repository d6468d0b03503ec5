"""The paper's setting: CLIP ViT-B/32 on face and context streams, 16 segments, batch 8, SGD groups.

  python -m caer_jax.train --config=configs/clip_caer_b32.py --workdir=runs/b32 \
      --config.data.data_dir=/data/tfds

Variants through the config argument: `configs/clip_caer_b32.py:face` (face stream only, the
DFER-CLIP-like ablation), `:context` (context only), `:validation` (honest model selection on a
validation split carved from train instead of the authors' test-set selection), `:feature_cache`
(frozen image encoder, train and evaluate from its cached features; no rotation). Variants
combine: `:face,feature_cache`.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42

    c.data = ml_collections.ConfigDict()
    c.data.tfds_name = "raer/224px"  # builder/config; the builder stores crops at this size
    c.data.data_dir = ""  # TFDS data_dir; empty = TFDS default (~/tensorflow_datasets)
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.num_segments = 16
    c.data.duration = 1
    c.data.image_size = 224
    c.data.rotation_degrees = 4.0
    c.data.flip_prob = 0.5
    # grain worker processes per host: -1 = one per core the process may use (0 = decode in the
    # main process). Several training processes on one host should split the cores between them.
    c.data.worker_count = -1
    c.data.prefetch_buffer_size = 2  # host batches read ahead by grain
    # Global batches already on the devices when a step starts (and steps in flight): the host
    # prepares batch k + device_prefetch while the device runs step k.
    c.data.device_prefetch = 2
    # Embedded default only: generate synthetic RAER-layout clips and build them before training.
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.enabled = False
    c.data.synthetic.manual_dir = ""
    c.data.synthetic.num_clips = 0
    c.data.synthetic.seed = 0
    # Train and evaluate from per-frame features of the frozen image encoder, computed once per
    # split and stream (caer_jax/data/feature_cache.py), instead of from pixels: the same frames
    # and flips, the ViT run once per stored frame rather than every step. Needs
    # model.freeze_image_encoder=True and rotation_degrees=0: a rotation is drawn per clip and
    # changes the pixels before the encoder, so it cannot be cached (the `feature_cache` variant
    # sets all three).
    c.data.feature_cache = ml_collections.ConfigDict()
    c.data.feature_cache.enabled = False
    c.data.feature_cache.dir = ""  # empty: <dataset folder>/feature_cache/<encoder fingerprint>
    # Also cache every frame flipped (twice the build time and disk): then flip_prob > 0 is
    # reproduced exactly; with flipped=False flip_prob must be 0.
    c.data.feature_cache.flipped = True
    c.data.feature_cache.clips_per_chunk = 64  # clips per file: the unit of work and of resuming
    c.data.feature_cache.frames_per_batch = 64  # frames per encoder call while building

    c.model = ml_collections.ConfigDict()
    c.model.streams = "both"  # face | context | both
    c.model.dtype = "float32"  # compute dtype; params and optimizer state stay float32
    c.model.remat = False
    c.model.logit_scale = 100.0  # logits = cos / 0.01
    c.model.pixel_normalization = "none"  # the authors': [0, 1] pixels; "clip": CLIP mean/std
    # Classes and class texts (caer_jax.label_sets): "raer5" (RAER's five classes) or the path of
    # a label set JSON file. The dataset must be built with the same set (builder option
    # label_set); a checkpoint keeps its class names and evaluates only data of the same classes.
    c.model.label_set = "raer5"
    # True: the CLIP image encoder is not trained (no updates, no optimizer state, no backward
    # pass through it), as the text encoder; the authors fine-tune it. data.feature_cache needs it.
    c.model.freeze_image_encoder = False
    c.model.clip = ml_collections.ConfigDict()
    # "random" (geometry below, offline tokenizer), a Hugging Face hub id or folder,
    # a flax_model.msgpack, or an OpenAI CLIP .pt/.pth state dict.
    c.model.clip.source = "openai/clip-vit-base-patch32"
    c.model.clip.image_size = 224
    c.model.clip.patch_size = 32
    c.model.clip.vision_width = 768
    c.model.clip.vision_layers = 12
    c.model.clip.vision_heads = 12
    c.model.clip.text_width = 512
    c.model.clip.text_layers = 12
    c.model.clip.text_heads = 8
    c.model.clip.vocab_size = 49408
    c.model.clip.context_length = 77
    c.model.clip.embed_dim = 512
    c.model.prompt = ml_collections.ConfigDict()
    c.model.prompt.text_type = "class_descriptor"
    c.model.prompt.n_ctx = 8
    c.model.prompt.class_token_position = "end"  # end | middle | front
    c.model.prompt.class_specific = True  # False = one generic context shared by all classes
    c.model.prompt.ctx_init_std = 0.02
    c.model.temporal = ml_collections.ConfigDict()
    c.model.temporal.depth = 1
    c.model.temporal.heads = 8
    c.model.temporal.head_dim = 64
    c.model.temporal.mlp_dim = 1024
    c.model.temporal.dropout = 0.1
    c.model.temporal.init_std = 1.0  # cls_token and pos_embedding ~ N(0, init_std^2)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "sgd"  # sgd (the authors') | adamw
    c.optim.momentum = 0.9
    c.optim.weight_decay = 1e-4  # sgd: coupled L2 added to the gradient, as torch.optim.SGD
    # Learning rate per parameter group; the text encoder is frozen.
    c.optim.lr = ml_collections.ConfigDict()
    c.optim.lr.image_encoder = 1e-5
    c.optim.lr.temporal = 1e-2
    c.optim.lr.prompt_learner = 1e-3
    c.optim.lr.project_fc = 1e-5
    c.optim.milestones = (10, 15)  # epochs after which every learning rate is multiplied by gamma
    c.optim.gamma = 0.1
    c.optim.warmup_epochs = 0.0  # linear warm-up of every learning rate (the authors have none)

    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 20
    c.train.batch_size = 8  # global, over all hosts and devices
    # Micro-batches per step: the global batch is run in grad_accum_steps slices whose gradients
    # are averaged (the same update in 1/grad_accum_steps of the activation memory; dropout
    # masks are drawn per micro-batch). Must divide batch_size.
    c.train.grad_accum_steps = 1
    c.train.eval_batch_size = 8
    c.train.log_every_steps = 50
    # Model selection: "test" is the authors' protocol (best epoch by test UAR); "validation"
    # selects on the builder's validation split and reports test at that checkpoint.
    c.train.selection_split = "test"
    c.train.keep_checkpoints = 2  # the latest K; the best by UAR is kept besides
    c.train.checkpoint_every_steps = 0  # 0: at epoch ends (and on SIGTERM) only
    c.train.skip_nonfinite = False  # True: skip and count steps with a non-finite loss/gradient

    # metrics.json: percentile bootstrap intervals over clips resampled within the evaluated split
    # (seeded on their own, so one set of predictions always gets the same intervals).
    c.eval = ml_collections.ConfigDict()
    c.eval.bootstrap_resamples = 1000
    c.eval.bootstrap_seed = 0
    c.eval.confidence = 0.95

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axis
    c.mesh.fsdp = 1

    for variant in filter(None, arg.split(",")):
        if variant in ("face", "context"):
            c.model.streams = variant
        elif variant == "validation":
            c.train.selection_split = "validation"
        elif variant == "feature_cache":
            c.model.freeze_image_encoder = True
            c.data.feature_cache.enabled = True
            c.data.rotation_degrees = 0.0
        else:
            raise ValueError(
                f"unknown variant {variant!r} of clip_caer_b32 "
                "(face, context, validation, feature_cache)"
            )
    return c
