"""CLIP weight importers: parity with transformers' PyTorch CLIPModel, formats and errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import serialization

from caer_jax import errors
from caer_jax.models import caer, clip_weights, hub
from caer_jax.models import clip as clip_lib
from caer_jax.models import tokenizer as tokenizer_lib
from configs import synthetic_tiny

TINY = clip_lib.CLIPGeometry(
    image_size=32,
    patch_size=8,
    vision_width=64,
    vision_layers=2,
    vision_heads=2,
    text_width=48,
    text_layers=2,
    text_heads=3,
    vocab_size=300,
    context_length=20,
    embed_dim=40,
)
# ViT-B/32 widths, heads, vocabulary and context, two layers per tower.
B32_2L = clip_lib.CLIPGeometry(
    image_size=224,
    patch_size=32,
    vision_width=768,
    vision_layers=2,
    vision_heads=12,
    text_width=512,
    text_layers=2,
    text_heads=8,
    vocab_size=49408,
    context_length=77,
    embed_dim=512,
)


def _reference(geometry, seed=0):
    # Imported here, not at the top: transformers' CLIP modules take 3 s to import, which every
    # xdist worker would pay while collecting, whether or not it runs these tests.
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(geometry.to_hf_config()).eval()
    # Random weights everywhere (HF's init leaves LayerNorms at 1/0 and small projections).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                is_norm = "norm" in name
                std = 0.5 if is_norm else 0.05
                p.copy_(torch.randn_like(p) * std + float(is_norm and name.endswith("weight")))
    return model


def _inputs(geometry, n_img=2, seed=1):
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(0, 1, (n_img, geometry.image_size, geometry.image_size, 3)).astype(
        np.float32
    )
    ids = np.zeros((3, geometry.context_length), np.int64)
    for i, eot in enumerate((4, 9, geometry.context_length - 1)):
        ids[i, 0] = geometry.vocab_size - 2
        ids[i, 1:eot] = rng.integers(1, geometry.vocab_size - 2, eot - 1)
        ids[i, eot] = geometry.vocab_size - 1
    return pixels, ids


def _ref_outputs(model, pixels, ids):
    with torch.no_grad():
        px = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        img = model.get_image_features(pixel_values=px).pooler_output.numpy()
        txt = model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
        logits = model(input_ids=torch.from_numpy(ids), pixel_values=px).logits_per_image.numpy()
    return img, txt, logits, float(model.logit_scale.detach().exp())


def _ours(params, geometry, pixels, ids, scale):
    img, txt = jax.jit(clip_lib.CLIP(geometry).apply)(
        {"params": params}, pixels, jnp.asarray(ids, jnp.int32)
    )
    img, txt = np.asarray(img), np.asarray(txt)
    n = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    return img, txt, scale * n(img) @ n(txt).T


def _assert_parity(ours, ref, tol):
    for name, a, b in zip(("image", "text", "logits"), ours, ref, strict=True):
        rel = np.abs(a - b).max() / np.abs(b).max()
        assert rel <= tol, f"{name}: max|d|/max|ref| = {rel:.2e}"
    return [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(ours, ref, strict=True)]


def _flax_4x_tree(sd):
    """The params tree transformers 4.x FlaxCLIPModel writes (independent of the importer)."""
    tree = {}

    def put(path, value):
        node = tree
        *parents, leaf = path
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    for key, t in sd.items():
        if key.endswith("position_ids"):
            continue
        v = t.numpy()
        parts = key.split(".")
        if key == "logit_scale":
            put(["logit_scale"], v)
        elif parts[-2] == "patch_embedding":
            put(parts[:-1] + ["kernel"], v.transpose(2, 3, 1, 0))
        elif parts[-2] in ("token_embedding", "position_embedding"):
            put(parts[:-1] + ["embedding"], v)
        elif parts[-1] == "class_embedding":
            put(parts, v)
        elif "norm" in parts[-2] or "layrnorm" in parts[-2]:
            put(parts[:-1] + ["scale" if parts[-1] == "weight" else "bias"], v)
        else:  # Linear
            put(
                parts[:-1] + ["kernel" if parts[-1] == "weight" else "bias"],
                v.T if parts[-1] == "weight" else v,
            )
    return tree


def _openai_sd(sd):
    """OpenAI names from HF names (written from the layouts, independent of the importer)."""
    out = {}
    for src, dst in (
        ("vision_model.encoder.layers", "visual.transformer.resblocks"),
        ("text_model.encoder.layers", "transformer.resblocks"),
    ):
        i = 0
        while f"{src}.{i}.layer_norm1.weight" in sd:
            s, d = f"{src}.{i}", f"{dst}.{i}"
            out[f"{d}.attn.in_proj_weight"] = torch.cat(
                [sd[f"{s}.self_attn.{x}_proj.weight"] for x in "qkv"]
            )
            out[f"{d}.attn.in_proj_bias"] = torch.cat(
                [sd[f"{s}.self_attn.{x}_proj.bias"] for x in "qkv"]
            )
            for a, b in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                out[f"{d}.{a}.weight"] = sd[f"{s}.{b}.weight"]
                out[f"{d}.{a}.bias"] = sd[f"{s}.{b}.bias"]
            i += 1
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    for a, b in (
        ("visual.ln_pre", "vision_model.pre_layrnorm"),
        ("visual.ln_post", "vision_model.post_layernorm"),
        ("ln_final", "text_model.final_layer_norm"),
    ):
        out[f"{a}.weight"], out[f"{a}.bias"] = sd[f"{b}.weight"], sd[f"{b}.bias"]
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["logit_scale"] = sd["logit_scale"]
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tiny")
    model = _reference(TINY)
    model.save_pretrained(folder)
    pixels, ids = _inputs(TINY)
    return folder, model, (pixels, ids), _ref_outputs(model, pixels, ids)


def test_hf_folder_parity_tiny(tiny):
    folder, _, (pixels, ids), ref = tiny
    assert (folder / "model.safetensors").exists()
    params, geometry = clip_weights.load_clip_weights(folder)
    assert geometry == TINY
    rel = _assert_parity(_ours(params, TINY, pixels, ids, ref[3]), ref[:3], 1e-5)
    print("tiny parity max|d|/max|ref| (image, text, logits):", rel)


def test_pytorch_bin_folder(tiny, tmp_path):
    folder, model, (pixels, ids), ref = tiny
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    params = clip_weights.load_clip_params(tmp_path, TINY)
    _assert_parity(_ours(params, TINY, pixels, ids, ref[3]), ref[:3], 1e-5)


def test_init_params_loads_source_into_caer(tmp_path):
    geometry = dataclasses.replace(TINY, vocab_size=1024)
    model = _reference(geometry, seed=3)
    model.save_pretrained(tmp_path)
    cfg = synthetic_tiny.get_config("scratch").model
    for k, v in dataclasses.asdict(geometry).items():
        cfg.clip[k] = v
    cfg.clip.source = str(tmp_path)
    cfg.prompt.text_type = "class_names"
    cfg.prompt.n_ctx = 4
    tok = tokenizer_lib.offline_tokenizer()
    net, _ = caer.build_model(cfg, tokenizer=tok)
    params = caer.init_params(net, cfg, jax.random.key(0), num_frames=2)
    loaded = clip_weights.load_clip_params(tmp_path, geometry)
    for ours, theirs in (("image_encoder", "visual"), ("text_encoder", "text")):
        jax.tree_util.tree_map(np.testing.assert_array_equal, params[ours], loaded[theirs])
    cfg.clip.embed_dim = 32
    net, _ = caer.build_model(cfg, tokenizer=tok)
    with pytest.raises(clip_weights.WeightsError, match="embed_dim: config 32 vs weights 40"):
        caer.init_params(net, cfg, jax.random.key(0), num_frames=2)


def test_flax_msgpack(tiny, tmp_path):
    _, model, (pixels, ids), ref = tiny
    tree = _flax_4x_tree(model.state_dict())
    assert tree["vision_model"]["encoder"]["layers"]["1"]["self_attn"]["q_proj"][
        "kernel"
    ].shape == (64, 64)
    path = tmp_path / "flax_model.msgpack"
    path.write_bytes(serialization.msgpack_serialize(tree))
    # Without config.json heads are width // 64: give the folder its config for the tiny heads.
    with pytest.raises(clip_weights.WeightsError, match="config.model.clip"):
        clip_weights.load_clip_params(path, TINY)
    (tmp_path / "config.json").write_text((tiny[0] / "config.json").read_text())
    params = clip_weights.load_clip_params(path, TINY)
    _assert_parity(_ours(params, TINY, pixels, ids, ref[3]), ref[:3], 1e-5)


def test_openai_state_dict_file(tiny, tmp_path):
    _, model, (pixels, ids), ref = tiny
    sd = _openai_sd(model.state_dict())
    torch.save(sd, tmp_path / "ViT-tiny.pt")
    params, geometry = clip_weights.load_clip_weights(tmp_path / "ViT-tiny.pt")
    assert geometry.vision_layers == 2 and geometry.text_width == 48 and geometry.patch_size == 8
    g = clip_lib.CLIPGeometry(**{**geometry.__dict__, "vision_heads": 2, "text_heads": 3})
    _assert_parity(_ours(params, g, pixels, ids, ref[3]), ref[:3], 1e-5)


def _scripted_state_dict_module(sd: dict) -> torch.nn.Module:
    """A module tree whose state dict is `sd` (keys with dots, as in OpenAI's archives)."""
    root = torch.nn.Module()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        node = root
        for name in path:
            if not hasattr(node, name):
                node.add_module(name, torch.nn.Module())
            node = getattr(node, name)
        node.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
    return torch.jit.script(root)


def test_openai_torchscript_archive(tiny, tmp_path):
    _, model, (pixels, ids), ref = tiny
    sd = _openai_sd(model.state_dict())
    _scripted_state_dict_module(sd).save(str(tmp_path / "ViT-tiny.pt"))
    # weights_only refuses a TorchScript archive: the same entry point as a real OpenAI file
    # reads it through torch.jit.load, to the same parameters as the plain state dict file.
    params, geometry = clip_weights.load_clip_weights(tmp_path / "ViT-tiny.pt")
    expected, expected_geometry = clip_weights.from_openai_state_dict(sd)
    assert geometry == expected_geometry
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
    g = clip_lib.CLIPGeometry(**{**geometry.__dict__, "vision_heads": 2, "text_heads": 3})
    _assert_parity(_ours(params, g, pixels, ids, ref[3]), ref[:3], 1e-5)


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, path)
    assert not marker.exists() or marker.unlink() is None
    with pytest.raises(clip_weights.WeightsError, match="refused"):
        clip_weights.load_clip_weights(path)
    assert not marker.exists()


def test_errors_name_key_and_shapes(tiny, tmp_path):
    _, model, _, _ = tiny
    sd = dict(model.state_dict())
    missing = dict(sd)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(
        clip_weights.WeightsError, match=r"missing key 'text_model.encoder.layers.1.mlp.fc2.bias'"
    ):
        clip_weights.from_hf_state_dict(missing)
    extra = dict(sd, **{"text_model.extra.weight": torch.zeros(3, 4)})
    with pytest.raises(
        clip_weights.WeightsError,
        match=r"unexpected key 'text_model.extra.weight' with shape \(3, 4\)",
    ):
        clip_weights.from_hf_state_dict(extra)
    params, _ = clip_weights.from_hf_state_dict(sd)
    init = jax.jit(clip_lib.CLIP(TINY).init)
    target = init(jax.random.key(0), *map(jnp.asarray, _inputs(TINY)))["params"]
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["visual"]["proj"] = np.zeros((64, 41), np.float32)
    with pytest.raises(
        clip_weights.WeightsError, match=r"visual/proj: checkpoint \(64, 41\), model \(64, 40\)"
    ):
        clip_weights.merge_checked(target["visual"], bad["visual"], "visual")
    del bad["visual"]["ln_pre"]["bias"]
    with pytest.raises(
        clip_weights.WeightsError,
        match=r"missing key visual/ln_pre/bias \(expected shape \(64,\)\)",
    ):
        clip_weights.merge_checked(target["visual"], bad["visual"], "visual")
    merged = clip_weights.merge_checked(target["text"], params["text"], "text")
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(
        dict(target["text"])
    )


def test_unknown_format_lists_accepted(tmp_path):
    f = tmp_path / "weights.npz"
    f.write_bytes(b"xx")
    with pytest.raises(clip_weights.WeightsError, match="accepted.*safetensors.*msgpack.*OpenAI"):
        clip_weights.load_clip_weights(f)
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(clip_weights.WeightsError, match="empty.pth: truncated or corrupt"):
        clip_weights.load_clip_weights(tmp_path / "empty.pth")
    torch.save({"foo": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(clip_weights.WeightsError, match="not a CLIP state dict"):
        clip_weights.load_clip_weights(tmp_path / "other.pt")


def test_hf_parity_b32_widths_two_layers(tmp_path):
    model = _reference(B32_2L)
    model.save_pretrained(tmp_path)
    pixels, ids = _inputs(B32_2L)
    ref = _ref_outputs(model, pixels, ids)
    del model
    params = clip_weights.load_clip_params(tmp_path, B32_2L)
    rel = _assert_parity(_ours(params, B32_2L, pixels, ids, ref[3]), ref[:3], 1e-5)
    print("B/32-width parity max|d|/max|ref| (image, text, logits):", rel)


def test_hub_id_without_network_says_what_to_do(monkeypatch, tmp_path):
    from huggingface_hub import constants

    # An endpoint nothing listens on stands for a machine without network; an empty cache.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    hub.hub_reachable.cache_clear()
    try:
        with pytest.raises(errors.MissingInputError, match="not in the local cache .* cannot be"):
            clip_weights.load_clip_weights("openai/clip-vit-base-patch32")
    finally:
        hub.hub_reachable.cache_clear()
