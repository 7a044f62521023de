"""Helpers for the export tests: checkpoints laid out like the published ones (imported by test modules)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from virchow_rt.registry import VARIANTS, Variant, get_variant

TINY = [f"{name}-tiny" for name in VARIANTS]

# pretrained_cfg of the published paige-ai/Virchow2 config.json (timm hub layout)
PUBLISHED_PRETRAINED_CFG = {
    "tag": "virchow_v2",
    "custom_load": False,
    "input_size": [3, 224, 224],
    "fixed_input_size": False,
    "interpolation": "bicubic",
    "crop_pct": 1.0,
    "crop_mode": "center",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "num_classes": 0,
    "pool_size": None,
    "first_conv": "patch_embed.proj",
    "classifier": "head",
    "license": "CC-BY-NC-ND-4.0",
}


def hub_config(variant: Variant) -> dict:
    """A config.json as published (architecture, model_args, pretrained_cfg) for ``variant``.

    The published file lists only what differs from the timm architecture (img_size, init_values,
    num_classes, reg_tokens, mlp_ratio, global_pool, dynamic_img_size); a tiny test config must also
    name its width, depth and heads, which the real ViT-H implies.
    """
    args = variant.model_args
    model_args = {
        "img_size": args["img_size"],
        "init_values": args["init_values"],
        "num_classes": 0,
        "mlp_ratio": args["mlp_ratio"],
        "global_pool": "",
        "dynamic_img_size": True,
        "embed_dim": args["embed_dim"],
        "depth": args["depth"],
        "num_heads": args["num_heads"],
        "patch_size": args["patch_size"],
    }
    if variant.num_registers:
        model_args["reg_tokens"] = variant.num_registers
    return {
        "architecture": variant.timm_arch,
        "model_args": model_args,
        "pretrained_cfg": PUBLISHED_PRETRAINED_CFG,
    }


def random_state_dict(name: str, seed: int = 1) -> dict:
    """The state dict of a random model of variant ``name`` (stands in for downloaded weights)."""
    from virchow_rt.model.vit import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, _ = build_model(get_variant(name), random_weights=True, seed=seed)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def write_checkpoint(
    folder: Path, name: str, files: tuple[str, ...] = ("pytorch_model.bin", "model.safetensors")
) -> dict:
    """Write ``folder`` like a published checkpoint (config.json + weight files); returns the state dict."""
    import safetensors.torch
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    state = random_state_dict(name)
    (folder / "config.json").write_text(json.dumps(hub_config(get_variant(name)), indent=2))
    if "pytorch_model.bin" in files:
        torch.save(state, folder / "pytorch_model.bin")
    if "model.safetensors" in files:
        safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    return state
