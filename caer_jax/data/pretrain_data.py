"""Image-caption pairs for CLIP pretraining, drawn by the synthetic generator, in ArrayRecord.

    build(config) -> the folder of config.data.dir, built unless it already holds this config's data

Clips are drawn as the RAER-layout generator draws them (synthetic.draw_clip), but from the
generator stream PRETRAIN_STREAM, which the RAER-layout clips (stream 1) never use: whatever the
seeds, pretraining never sees a clip of the demo's train or test split. Classes are drawn
uniformly (a caption corpus has no reason to follow RAER's class shares) and are not stored; the
captions say what was drawn (caer_jax.data.captions).

One record per frame: its face crop and context frame as the RAER build makes them
(tfds_raer.raer.raer_lib: the detector's face box grown by the margin, the body box letterboxed),
both resized to config.data.image_size and JPEG-encoded, `captions_per_frame` captions of each
and their token ids. Records are TFDS examples (tf.train.Example of a tfds FeaturesDict, the
format of every TFDS build) in one ArrayRecord file, read by grain's ArrayRecordDataSource.

Why not a TFDS builder: the pairs are drawn from a config, not read from a manual folder, and a
builder's download_and_prepare would add a pass that shuffles and rewrites the same bytes (and a
registered name and version to keep in step with the config). Written directly, the records
still are TFDS examples in ArrayRecord, read by grain as every other split.

`info.json`, written last, holds the fingerprint of the build (the data config, the tokenizer's
files and the drawing and caption code): a folder whose fingerprint matches is reused as it is.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import shutil
import time
from pathlib import Path
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from caer_jax import errors, prompts
from caer_jax.data import augment, captions, synthetic
from caer_jax.models import tokenizer as tokenizer_lib
from tfds_raer.raer import raer_lib

PRETRAIN_STREAM = 2  # generator stream of pretraining clips (RAER-layout clips use stream 1)
CAPTION_STREAM = 3  # generator stream of the caption phrasings
RECORDS_FILE = "pairs.array_record"
INFO_FILE = "info.json"
FORMAT_VERSION = 1
STREAMS = ("face", "context")
# The fields of config.data that the records depend on (the others say where and how fast).
DRAWING_FIELDS = (
    "seed",
    "num_clips",
    "frames_per_clip",
    "captions_per_frame",
    "frame_width",
    "frame_height",
    "image_size",
    "text_length",
    "jpeg_quality",
)


class PretrainDataError(errors.BadInputError):
    """A pretraining data folder that cannot be used as it is."""


def features(image_size: int, captions_per_frame: int, text_length: int):
    """The tfds features of one record."""
    image = lambda: tfds.features.Image(  # noqa: E731
        shape=(image_size, image_size, 3), encoding_format="jpeg"
    )
    texts = lambda: tfds.features.Sequence(tfds.features.Text(), length=captions_per_frame)  # noqa: E731
    ids = lambda: tfds.features.Tensor(  # noqa: E731
        shape=(captions_per_frame, text_length), dtype=np.int32
    )
    return tfds.features.FeaturesDict(
        {
            "face": image(),
            "context": image(),
            "face_captions": texts(),
            "context_captions": texts(),
            "face_ids": ids(),
            "context_ids": ids(),
        }
    )


def _code_hash() -> str:
    digest = hashlib.sha256()
    for path in (synthetic.__file__, captions.__file__, __file__):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def fingerprint(data_cfg: ml_collections.ConfigDict, tokenizer_dir: Path) -> str:
    """What the records depend on: the data config, the tokenizer's files, the drawing code."""
    digest = hashlib.sha256()
    fields = {k: data_cfg[k] for k in DRAWING_FIELDS}
    digest.update(json.dumps({"version": FORMAT_VERSION, **fields}, sort_keys=True).encode())
    for name in ("vocab.json", "merges.txt"):
        digest.update((tokenizer_dir / name).read_bytes())
    digest.update(_code_hash().encode())
    return digest.hexdigest()[:16]


def check_config(data_cfg: ml_collections.ConfigDict) -> None:
    """Refuses data settings out of range, naming the field."""
    bad = []
    for field, low in (
        ("num_clips", 1),
        ("frames_per_clip", 1),
        ("captions_per_frame", 1),
        ("image_size", 8),
        ("text_length", 3),
        ("jpeg_quality", 1),
        ("seed", 0),
        ("draw_workers", 0),
    ):
        value = data_cfg[field]
        if value < low:
            bad.append(f"config.data.{field}={value!r} (expected >= {low})")
    if data_cfg.jpeg_quality > 100:
        bad.append(f"config.data.jpeg_quality={data_cfg.jpeg_quality} (expected <= 100)")
    if bad:
        raise PretrainDataError("; ".join(bad))


def _resize(img: Image.Image, size: int) -> np.ndarray:
    """A face crop at the model's size, resized as the input pipeline resizes it."""
    return augment.transform_frames_uint8([img], size)[0]


def _draw_records(job: tuple) -> list[bytes]:
    """The serialized records of pretraining clip `index` (runs in worker processes)."""
    index, cfg, tokenizer_dir = job
    cfg = ml_collections.ConfigDict(cfg)
    tok = _tokenizer(tokenizer_dir)
    rng = np.random.default_rng([cfg.seed, PRETRAIN_STREAM, index])
    label = int(rng.integers(len(prompts.CLASS_NAMES)))
    drawn = synthetic.draw_clip(rng, label, cfg.frames_per_clip, cfg.frame_width, cfg.frame_height)
    text_rng = np.random.default_rng([cfg.seed, CAPTION_STREAM, index])
    feats = features(cfg.image_size, cfg.captions_per_frame, cfg.text_length)
    storage = raer_lib.Storage(cfg.image_size, "jpeg", cfg.jpeg_quality)
    out = []
    for t, frame in enumerate(drawn.frames):
        face = _resize(raer_lib.crop_face(frame, drawn.face_boxes[t]), cfg.image_size)
        context = raer_lib.crop_context(frame, drawn.body_box, cfg.image_size)
        # Encoded here (as the RAER build encodes its crops); the feature stores the bytes.
        example: dict[str, Any] = {
            "face": io.BytesIO(storage.encode(Image.fromarray(face))),
            "context": io.BytesIO(storage.encode(context)),
        }
        for stream, write in (
            ("face", captions.face_caption),
            ("context", captions.context_caption),
        ):
            texts, ids = _captions(
                write, text_rng, drawn, t, tok, cfg.text_length, cfg.captions_per_frame
            )
            example[f"{stream}_captions"] = texts
            example[f"{stream}_ids"] = ids
        out.append(feats.serialize_example(example))
    return out


MAX_CAPTION_DRAWS = 50


def _captions(
    write, rng, drawn, t: int, tok: Any, text_length: int, count: int
) -> tuple[list[str], np.ndarray]:
    """`count` captions of frame t by `write` and their token ids [count, text_length].

    A caption longer than text_length tokens is replaced by another draw: a caption is a random
    choice of phrasings, not data. (All are tokenised in one call first, as that is the usual
    case; only when one does not fit are they drawn again one by one.)
    """
    texts = [write(rng, drawn, t) for _ in range(count)]
    try:
        return texts, tokenizer_lib.tokenize(tok, texts, text_length)
    except errors.BadInputError:
        pass
    ids = []
    for i in range(count):
        for _ in range(MAX_CAPTION_DRAWS):
            try:
                ids.append(tokenizer_lib.tokenize(tok, texts[i : i + 1], text_length)[0])
                break
            except errors.BadInputError:
                texts[i] = write(rng, drawn, t)
        else:
            raise PretrainDataError(
                f"config.data.text_length={text_length}: {MAX_CAPTION_DRAWS} captions in a row "
                f"were longer (the last: {texts[i]!r}); raise it (captions take up to about 45 "
                "tokens)"
            )
    return texts, np.stack(ids)


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(folder: str) -> Any:
    if folder not in _TOKENIZERS:
        from transformers import CLIPTokenizer

        _TOKENIZERS[folder] = CLIPTokenizer.from_pretrained(folder)
    return _TOKENIZERS[folder]


def build(data_cfg: ml_collections.ConfigDict, tokenizer_dir: str | Path) -> Path:
    """The pretraining pairs of `data_cfg` in data_cfg.dir, drawn unless already there; captions
    are tokenised with the tokenizer in `tokenizer_dir` (vocab.json, merges.txt)."""
    check_config(data_cfg)
    folder = Path(data_cfg.dir)
    tokenizer_dir = Path(tokenizer_dir)
    wanted = fingerprint(data_cfg, tokenizer_dir)
    info = read_info(folder)
    if info is not None and info["fingerprint"] == wanted:
        logging.info("pretraining data in %s is up to date (fingerprint %s)", folder, wanted)
        return folder
    if folder.exists():
        unknown = sorted(
            p.name for p in folder.iterdir() if p.name not in (RECORDS_FILE, INFO_FILE)
        )
        if unknown:
            raise PretrainDataError(
                f"config.data.dir={str(folder)!r} holds files pretraining data does not write "
                f"({', '.join(unknown[:5])}); give another folder or empty it yourself"
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    jobs = [(i, data_cfg.to_dict(), str(tokenizer_dir)) for i in range(data_cfg.num_clips)]
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(folder / RECORDS_FILE), "group_size:1")
    count = 0
    try:
        if data_cfg.draw_workers > 1:
            # spawn: safe when the caller already runs JAX threads (fork is not)
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(data_cfg.draw_workers) as pool:
                chunks = max(1, len(jobs) // (data_cfg.draw_workers * 8))
                for records in pool.imap(_draw_records, jobs, chunksize=chunks):
                    for record in records:
                        writer.write(record)
                        count += 1
        else:
            for job in jobs:
                for record in _draw_records(job):
                    writer.write(record)
                    count += 1
    finally:
        writer.close()
    seconds = time.perf_counter() - start
    info = {"fingerprint": wanted, "num_records": count, "seconds": round(seconds, 1)}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    logging.info("drew %d pretraining pairs into %s in %.0f s", count, folder, seconds)
    return folder


def read_info(folder: Path) -> dict | None:
    """The build record of `folder`; None when it holds no finished build."""
    try:
        return json.loads((Path(folder) / INFO_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PretrainDataError(
            f"{Path(folder) / INFO_FILE}: cannot be read ({e}); remove the folder to draw it again"
        ) from e


class PairSource:
    """The records of a build by index, decoded (images uint8, captions str, ids int32)."""

    def __init__(self, folder: str | Path, data_cfg: ml_collections.ConfigDict):
        folder = Path(folder)
        self.info = read_info(folder)
        if self.info is None:
            raise errors.MissingInputError(f"{folder}: no pretraining data; build it first")
        self._records = grain.sources.ArrayRecordDataSource(str(folder / RECORDS_FILE))
        if len(self._records) != self.info["num_records"]:
            raise PretrainDataError(
                f"{folder}: {len(self._records)} records, {INFO_FILE} says "
                f"{self.info['num_records']}; remove the folder to draw it again"
            )
        self._features = features(
            data_cfg.image_size, data_cfg.captions_per_frame, data_cfg.text_length
        )

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._features.deserialize_example_np(self._records[index])


class PairLoader:
    """A record -> one training example: both images and one caption per stream, drawn by
    `rng` among the record's captions (another phrasing each epoch)."""

    def load(self, record: dict, index: int, rng: np.random.Generator) -> dict:
        k = len(record["face_ids"])
        out = {stream: np.asarray(record[stream], np.uint8) for stream in STREAMS}
        for stream in STREAMS:
            out[f"{stream}_ids"] = record[f"{stream}_ids"][int(rng.integers(k))]
        out["index"] = np.int32(index)
        return out


def training_pairs(config: ml_collections.ConfigDict, tokenizer_dir: str | Path) -> PairSource:
    """The pairs of config.data (built unless already there), refused when they are fewer than
    one batch of config.train."""
    folder = build(config.data, tokenizer_dir)
    source = PairSource(folder, config.data)
    if len(source) < config.train.batch_size:
        raise errors.BadInputError(
            f"{folder} holds {len(source)} pairs, fewer than one batch "
            f"(config.train.batch_size={config.train.batch_size}); draw more clips "
            "(config.data.num_clips) or lower the batch size"
        )
    return source
