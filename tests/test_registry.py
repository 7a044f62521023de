import pytest

from virchow_rt.errors import InputError, WeightsError
from virchow_rt.registry import VARIANTS, get_variant


def test_published_token_layouts():
    assert get_variant("virchow").num_tokens == 257  # pos_embed (1, 257, 1280)
    assert get_variant("virchow2").num_tokens == 261  # (1, 261, 1280): 1 class + 4 registers + 256 patches
    assert get_variant("virchow2").embedding_dim() == 2560
    assert get_variant("virchow2").embedding_dim("cls") == 1280
    assert get_variant("virchow2g-mini").embedding_dim() == 768


def test_swiglu_hidden_matches_published_fc1():
    v = get_variant("virchow")
    assert v.mlp == "swiglu_packed" and v.mlp_hidden == 6832  # fc1 1280 -> 6832, fc2 3416 -> 1280


@pytest.mark.parametrize("name,gflops", [("virchow", 330), ("virchow2", 330), ("virchow2g-mini", 12)])
def test_flops_close_to_published_estimates(name, gflops):
    assert gflops < get_variant(name).flops_per_tile() / 1e9 < gflops * 1.05


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tiny_keeps_architecture(name):
    v, t = get_variant(name), get_variant(f"{name}-tiny")
    assert (t.mlp, t.num_registers, t.model_args["patch_size"]) == (
        v.mlp,
        v.num_registers,
        v.model_args["patch_size"],
    )
    assert t.width < v.width and t.mlp_hidden % 2 == 0


def test_config_json_overrides_unconfirmed_settings():
    v = get_variant("virchow2g").with_config(
        {
            "architecture": "vit_giant_patch14_224",
            "model_args": {"embed_dim": 1408, "depth": 40, "mlp": "gelu"},
            "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "input_size": [3, 224, 224]},
        }
    )
    assert (v.width, v.model_args["depth"], v.mlp, v.timm_arch) == (1408, 40, "gelu", "vit_giant_patch14_224")
    assert v.preprocess.mean == (0.5, 0.5, 0.5)
    with pytest.raises(WeightsError, match="model_args.mlp"):
        get_variant("virchow2g").with_config({"model_args": {"mlp": "relu"}})


def test_unknown_variant_names_the_known_ones():
    with pytest.raises(InputError, match="virchow2g-mini"):
        get_variant("virchow3")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_count_matches_timm(name):
    timm = pytest.importorskip("timm")
    import torch

    from virchow_rt.model.vit import MLP_LAYERS

    variant = get_variant(name)
    with torch.device("meta"):  # shapes only
        model = timm.create_model(variant.timm_arch, **variant.model_args, **MLP_LAYERS[variant.mlp])
    assert variant.parameters() == sum(p.numel() for p in model.parameters())


def test_published_sizes():
    assert round(get_variant("virchow2").parameters() / 1e6) == 631  # ViT-H/14
    assert round(get_variant("h-optimus-0").parameters() / 1e9, 2) == 1.13  # ViT-g/14
    assert round(get_variant("uni").parameters() / 1e6) == 303  # ViT-L/16


def test_list_command_shows_every_encoder(capsys):
    import json

    from virchow_rt.cli.main import main

    assert main(["list"]) == 0
    text = capsys.readouterr().out
    assert (
        all(name in text for name in VARIANTS) and "256 + crop 224" in text and "random weights only" in text
    )
    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(VARIANTS)
    assert rows["uni"]["embedding"] == "1024 (cls)" and rows["uni"]["poolings"] == {
        "cls_mean": 2048,
        "cls": 1024,
    }
    assert (
        rows["h-optimus-0"]["mean"] == [0.707223, 0.578729, 0.703617]
        and "NaN" in rows["uni"]["precision_note"]
    )
    assert rows["phikon"]["weights_layout"] == "transformers" and rows["kaiko-vitl14"]["source"].startswith(
        "https://"
    )
