"""The PyTorch reference: timm's model, timm's own transform, random weights that are not vacuous."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from virchow_rt.backends.torch_reference import TorchBackend
from virchow_rt.compare import compare, cosine_rows
from virchow_rt.errors import BackendError, InputError
from virchow_rt.model.vit import RANDOM_LAYER_SCALE, build_model
from virchow_rt.model.weights import RandomWeightsWarning
from virchow_rt.registry import VARIANTS, get_variant
from virchow_rt.tissue import tissue_tiles

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.model.weights.RandomWeightsWarning")


@pytest.fixture(scope="module")
def v2_tiny():
    return build_model("virchow2-tiny", random_weights=True, seed=0)


def test_random_weights_are_warned_about_and_recorded():
    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS"):
        _, _, info = build_model("virchow-tiny", random_weights=True, seed=3)
    assert info.random is True and info.sha256 == "random" and "seed 3" in info.source


def test_random_layer_scale_is_not_vacuous(v2_tiny):
    model, variant, _ = v2_tiny
    gammas = [m.gamma for m in model.modules() if isinstance(m, timm.layers.LayerScale)]
    assert len(gammas) == 2 * variant.model_args["depth"]
    low, high = RANDOM_LAYER_SCALE
    assert all(float(g.min()) >= low and float(g.max()) <= high for g in gammas)
    # every block moves the output: dropping the last block changes the embedding measurably
    tiles = tissue_tiles(4, 224, seed=1)
    full = TorchBackend(model, variant).run(tiles)
    blocks = model.blocks
    model.blocks = blocks[:-1]
    try:
        fewer = TorchBackend(model, variant).run(tiles)
    finally:
        model.blocks = blocks
    assert cosine_rows(full, fewer).max() < 0.999


def test_random_weights_are_seeded_and_leave_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _, _ = build_model("virchow-tiny", random_weights=True, seed=5)
    assert torch.equal(torch.rand(3), expected)
    b, _, _ = build_model("virchow-tiny", random_weights=True, seed=5)
    c, _, _ = build_model("virchow-tiny", random_weights=True, seed=6)
    assert torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("name", [f"{n}-tiny" for n in VARIANTS])
def test_mlp_kind_comes_from_the_registry(name):
    model, variant, _ = build_model(name, random_weights=True)
    fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    swiglu = fc1.out_features == 2 * fc2.in_features
    assert swiglu == (variant.mlp == "swiglu_packed")
    assert model.num_prefix_tokens == variant.num_prefix_tokens


def test_backend_uses_timms_own_transform(v2_tiny):
    """A 256-px tile must be resized and cropped exactly as the model card's timm recipe does."""
    model, variant, _ = v2_tiny
    tiles = tissue_tiles(3, 256, seed=2)
    got = TorchBackend(model, variant).run(tiles)
    # the model card: transforms = create_transform(**resolve_data_config(model.pretrained_cfg, model=model))
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model.pretrained_cfg, model=model))
    x = torch.stack([transform(Image.fromarray(t)) for t in tiles])
    with torch.no_grad():
        out = model.forward_features(x)
    p = variant.num_prefix_tokens
    expected = torch.cat([out[:, 0], out[:, p:].mean(1)], dim=-1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # and the test can tell: a plain 224 centre crop (no resize) gives something else
    cropped = TorchBackend(model, variant).run(np.ascontiguousarray(tiles[:, 16:240, 16:240]))
    assert np.abs(cropped - got).max() > 1e-3


def test_backend_interface_and_names(v2_tiny):
    model, variant, info = v2_tiny
    tiles = tissue_tiles(4, 224, seed=0)
    with TorchBackend(model, variant, weights=info) as eager:
        ref = eager.run(tiles)
        assert eager.name == "torch-eager-fp32"
        assert (eager.info.embedding_dim, eager.info.width, eager.info.tile_size) == (192, 96, 224)
        assert eager.info.random_weights and eager.info.weights_sha256 == "random"
        assert [b.shape for b in eager.pipeline([tiles[:1], tiles[1:]])] == [(1, 192), (3, 192)]
    assert ref.dtype == np.float32 and ref.shape == (4, 192) and np.isfinite(ref).all()
    half = TorchBackend(model, variant, precision="fp16-autocast")
    assert half.name == "torch-autocast-fp16" and half.info.precision == "fp16"
    assert compare(half.run(tiles), ref, variant.tolerance.fp16_min_cosine)


@pytest.mark.slow
def test_compiled_backend_matches_eager(v2_tiny):
    model, variant, _ = v2_tiny
    tiles = tissue_tiles(4, 224, seed=0)
    ref = TorchBackend(model, variant).run(tiles)
    compiled = TorchBackend(model, variant, compile=True)
    assert compiled.name == "torch-compile-fp32"
    assert compare(compiled.run(tiles), ref, variant.tolerance.fp32_min_cosine)


@pytest.mark.parametrize(
    "tiles",
    [
        np.zeros((2, 224, 224, 3), np.float32),
        np.zeros((224, 224, 3), np.uint8),
        np.zeros((2, 224, 224, 4), np.uint8),
    ],
)
def test_bad_tiles_are_refused(v2_tiny, tiles):
    model, variant, _ = v2_tiny
    with pytest.raises(InputError, match=r"uint8 array \(B, H, W, 3\)"):
        TorchBackend(model, variant).run(tiles)


def test_unknown_precision_refused(v2_tiny):
    model, variant, _ = v2_tiny
    with pytest.raises(InputError, match="fp16-autocast"):
        TorchBackend(model, variant, precision="int8")


def test_compute_only_timing_needs_a_gpu(v2_tiny):
    model, variant, _ = v2_tiny
    backend = TorchBackend(model, variant)
    assert backend.gpu is None
    with pytest.raises(BackendError, match="needs a CUDA device.*runs on cpu"):
        backend.time_compute(np.zeros((1, 224, 224, 3), np.uint8))


def test_full_size_preprocess_matches_published_config():
    variant = get_variant("virchow2")
    from virchow_rt.model.vit import timm_transform

    text = repr(timm_transform(variant))
    assert "Resize(size=224, interpolation=bicubic" in text and "CenterCrop(size=(224, 224))" in text
    assert "Normalize(mean=tensor([0.4850, 0.4560, 0.4060]), std=tensor([0.2290, 0.2240, 0.2250]))" in text


def test_transform_workers_give_the_same_embeddings_a_batch_ahead(v2_tiny):
    model, variant, _ = v2_tiny
    batches = [tissue_tiles(n, 256, seed=i) for i, n in enumerate([5, 3, 4])]  # resized by timm's transform
    inline = TorchBackend(model, variant)
    threaded = TorchBackend(model, variant, workers=2)
    expected = [inline.run(b) for b in batches]
    for got, want in zip(threaded.pipeline(iter(batches)), expected, strict=True):
        np.testing.assert_array_equal(got, want)  # same pixels, same model, in order
    np.testing.assert_array_equal(threaded.run(batches[0]), expected[0])
    threaded.close()
    assert threaded._pool is None
    with pytest.raises(BackendError, match="closed"):
        threaded.run(batches[0])
