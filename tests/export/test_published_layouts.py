"""Weights folders written the way each encoder's authors' library saves them, loaded offline by virchow-rt.

For each layout (transformers' ViTModel, Dinov2Model and Dinov2WithRegistersModel through
``save_pretrained``; timm's hub folder loaded by timm itself through ``local-dir:``), the test proves that
virchow-rt's embedding (the exported fp32 ONNX, in ONNX Runtime, through the Embedder) equals the
authors' recipe run in their own library (their model class plus their pooling) on real tissue tiles.
Tiny random configs stand in for the gated weights (RANDOM WEIGHTS).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from virchow_rt.compare import compare
from virchow_rt.embed import Embedder
from virchow_rt.errors import WeightsError
from virchow_rt.export.pipeline import export_model
from virchow_rt.model.vit import build_model
from virchow_rt.registry import get_variant
from virchow_rt.tissue import tissue_tiles

transformers = pytest.importorskip("transformers", reason="transformers (a test dependency) is not installed")
TILES = tissue_tiles(6, 224, seed=21)  # real tissue, already 224 px (the authors' processors leave them so)


def _pixels(variant_name: str) -> torch.Tensor:
    """The authors' normalisation of 224 px tiles (their processors do no resize at that size)."""
    pre = get_variant(variant_name).preprocess
    x = TILES.astype(np.float32) / 255.0
    x = (x - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())  # (N, 3, 224, 224)


def _randomize_layer_scale(model: Any) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):  # the default (1.0 everywhere) would hide a swapped ls1 / ls2
                p.uniform_(0.1, 1.0)


def _virchow_rt(variant_name: str, folder: Path, out: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(variant_name, out, weights=folder, precisions=["fp32"], parity_tiles=4)
    with Embedder(out / f"{variant_name}.fp32.onnx", backend="onnxruntime-cpu") as embedder:
        assert embedder.info.pooling == "cls"  # the authors' embedding is the default
        return embedder.embed(TILES)


# (variant, transformers classes, config kwargs, the authors' pooling)
LAYOUTS = {
    "phikon": ("ViTConfig", "ViTModel", dict(intermediate_size=384, patch_size=16, layer_norm_eps=1e-12),
               lambda out: out.last_hidden_state[:, 0]),
    "phikon-v2": ("Dinov2Config", "Dinov2Model", dict(patch_size=16, layerscale_value=1e-5),
                  lambda out: out.last_hidden_state[:, 0]),
    "hibou-b": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel",
                dict(patch_size=14, use_swiglu_ffn=True, num_register_tokens=4),
                lambda out: out.pooler_output),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("image_size", [224, 112], ids=["same-grid", "resampled-grid"])
def test_transformers_folders_embed_like_the_authors_recipe(
    name: str, image_size: int, tmp_path: Path
) -> None:
    config_cls, model_cls, extra, pool = LAYOUTS[name]
    config = getattr(transformers, config_cls)(
        hidden_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=image_size, **extra
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    _randomize_layer_scale(model)
    model.save_pretrained(tmp_path / "weights")  # as the authors' library writes a folder
    with torch.inference_mode():
        # trained at another grid, transformers resamples its positions at every 224 px call
        want = pool(model(pixel_values=_pixels(name), interpolate_pos_encoding=True)).numpy()
    got = _virchow_rt(name, tmp_path / "weights", tmp_path / "export")
    result = compare(got, want, 0.99999)
    assert result, str(result)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_timm_hub_folder_embeds_like_timm(tmp_path: Path) -> None:
    """UNI's folder as published: incomplete model_args, keys timm ignores, init_values outside model_args."""
    timm = pytest.importorskip("timm")
    variant = get_variant("uni-tiny")
    args = variant.model_args
    folder = tmp_path / "UNI"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, _ = build_model(variant, random_weights=True, seed=3)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    config = {
        "architecture": "vit_large_patch16_224",
        "num_classes": 0,
        "init_values": 1.0,  # UNI's hub config: outside model_args, and not what the card passes
        "model_args": {key: args[key] for key in ("embed_dim", "depth", "num_heads")},  # the rest: timm's
        "pretrained_cfg": {"interpolation": "bilinear", "crop_pct": 1.0, "mean": [0.485, 0.456, 0.406],
                           "std": [0.229, 0.224, 0.225], "input_size": [3, 224, 224], "num_classes": 0},
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    # the model card's recipe: timm.create_model(..., init_values=1e-5, dynamic_img_size=True), class token
    theirs = timm.create_model(
        f"local-dir:{folder}", pretrained=True, init_values=1e-5, dynamic_img_size=True
    )
    with torch.inference_mode():
        want = theirs.eval()(_pixels("uni")).numpy()  # (N, D): num_classes 0 pools the class token
    got = _virchow_rt("uni", folder, tmp_path / "export")
    result = compare(got, want, 0.99999)
    assert result, str(result)


@pytest.mark.parametrize("off", [None, 0, False])
def test_layer_scale_off_however_spelled_loads(off: Any, tmp_path: Path) -> None:
    """A Virchow2G-mini folder naming a DINOv2 architecture whose config switches LayerScale off."""
    variant = get_variant("virchow2g-mini-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, _ = build_model(variant, random_weights=True, seed=4)
    assert not any("ls1" in k for k in model.state_dict())
    folder = tmp_path / "mini"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    args = {**variant.model_args, "init_values": off}
    (folder / "config.json").write_text(
        json.dumps({"architecture": "vit_small_patch14_dinov2", "model_args": args})
    )
    loaded, _, _ = build_model("virchow2g-mini-tiny", folder)
    assert not any("ls1" in k for k in loaded.state_dict())


def test_refusals_never_name_the_refused_variant_as_the_match(tmp_path: Path) -> None:
    variant = get_variant("virchow2g-mini-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, _ = build_model(variant, random_weights=True, seed=4)
    torch.save(model.state_dict(), tmp_path / "mini.pt")
    with pytest.raises(WeightsError) as err:
        build_model("uni-tiny", tmp_path / "mini.pt")  # other weights entirely
    text = str(err.value)
    assert "do not fit variant 'uni-tiny'" in text and "look like virchow2g-mini-tiny" in text
    assert text.count("uni-tiny") == 1


def test_unmapped_transformers_keys_are_listed(tmp_path: Path) -> None:
    config = transformers.ViTConfig(
        hidden_size=96, num_hidden_layers=1, num_attention_heads=2, intermediate_size=384
    )
    model = transformers.ViTModel(config)
    model.save_pretrained(tmp_path / "w")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "w" / "model.safetensors"))
    state["encoder.layer.0.adapter.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "w" / "model.safetensors"))
    with pytest.raises(
        WeightsError, match=r"1 transformers keys do not map.*encoder\.layer\.0\.adapter\.weight"
    ):
        build_model("phikon-tiny", tmp_path / "w")
    (tmp_path / "w" / "config.json").write_text(json.dumps({"model_type": "swin"}))
    with pytest.raises(WeightsError, match="model_type 'swin'.*trust_remote_code"):
        build_model("phikon-tiny", tmp_path / "w")
