"""Hugging Face transformers checkpoints (ViTModel, Dinov2Model, Dinov2WithRegistersModel) as timm ViTs.

Phikon is a ``ViTModel``, Phikon-v2 a ``Dinov2Model``, Hibou a DINOv2 with registers. Their folders hold a
transformers ``config.json`` (``model_type`` "vit", "dinov2" or "dinov2_with_registers") and weights
with transformers' key names. :func:`architecture` reads the timm architecture from the config (never
running the authors' code: no ``trust_remote_code``), and :func:`to_timm` renames and reshapes the
tensors to timm's ``VisionTransformer`` keys:

- q, k, v projections are concatenated (in that order) into ``attn.qkv``;
- ViTModel's ``layernorm_before/after`` and ``intermediate/output.dense`` become ``norm1/2`` and
  ``mlp.fc1/2``; DINOv2's packed SwiGLU ``mlp.weights_in/out`` (``silu(x1) * x2``) is timm's
  ``SwiGLUPacked`` with the gate first; ``layer_scale{1,2}.lambda1`` becomes ``ls{1,2}.gamma``;
- with registers, the class position is folded into ``cls_token`` and ``pos_embed`` keeps the patch
  positions (timm's ``no_embed_class``), as timm's own DINOv2 conversion does;
- a position grid trained at another size is resampled once to the tile size's grid with the same
  call transformers makes at every forward pass (bicubic; antialiased for DINOv2 with registers).

Anything that does not map is listed in the error, with what it would have needed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from virchow_rt._deps import optional_import
from virchow_rt.errors import WeightsError

if TYPE_CHECKING:
    import torch
else:
    torch = optional_import("torch", "to convert transformers checkpoints")

MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")
#: prefixes of transformers task models around the backbone (``ViTForImageClassification`` saves "vit.")
_PREFIXES = ("vit.", "dinov2.", "dinov2_with_registers.", "model.")
_BLOCK = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_BLOCK_KEYS = {
    "attention.output.dense": "attn.proj",
    "layernorm_before": "norm1",  # ViTModel
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "norm1": "norm1",  # DINOv2
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.fc1",  # packed SwiGLU: silu(x1) * x2, gate first
    "mlp.weights_out": "mlp.fc2",
}
_TOP_KEYS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_DROPPED = ("embeddings.mask_token", "pooler.")  # masked pre-training token; ViTModel's unused pooler


def is_transformers_config(config: Mapping[str, Any]) -> bool:
    """True for a transformers ``config.json`` (``model_type``; timm's hub configs have ``architecture``)."""
    return "model_type" in config and "architecture" not in config


def architecture(config: Mapping[str, Any], tile_size: int = 224) -> dict[str, Any]:
    """A timm hub config (``{"model_args": ...}``) from a transformers config (see Variant.with_config)."""
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
        raise WeightsError(
            f"config.json has model_type {kind!r}; virchow-rt converts transformers ViTs of types "
            f"{', '.join(MODEL_TYPES)} (other architectures, and trust_remote_code models, are not loaded)"
        )
    try:
        width, depth = int(config["hidden_size"]), int(config["num_hidden_layers"])
        heads, patch = int(config["num_attention_heads"]), int(config["patch_size"])
    except (KeyError, TypeError, ValueError) as err:
        raise WeightsError(
            f"config.json ({kind}) lacks {err}: not a complete transformers ViT config"
        ) from err
    args: dict[str, Any] = {
        "img_size": tile_size,
        "patch_size": patch,
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "qkv_bias": bool(config.get("qkv_bias", True)),
        "norm_eps": float(config.get("layer_norm_eps", 1e-12 if kind == "vit" else 1e-6)),
    }
    if config.get("hidden_act", "gelu") != "gelu":
        raise WeightsError(
            f"config.json hidden_act is {config['hidden_act']!r}; only gelu ViTs are converted"
        )
    if kind == "vit":
        hidden = int(config.get("intermediate_size", 4 * width))
        args.update(mlp="gelu", mlp_ratio=hidden / width, init_values=0, reg_tokens=0, no_embed_class=False)
        return {"model_args": args}
    ratio = float(config.get("mlp_ratio", 4))
    if config.get("use_swiglu_ffn"):
        # transformers keeps two thirds of the hidden size, rounded up to 8; timm's fc1 makes both halves
        half = (int(int(width * ratio) * 2 / 3) + 7) // 8 * 8
        args.update(mlp="swiglu_packed", mlp_ratio=2 * half / width)
    else:
        args.update(mlp="gelu", mlp_ratio=ratio)
    registers = int(config.get("num_register_tokens", 0)) if kind == "dinov2_with_registers" else 0
    args.update(
        init_values=float(config.get("layerscale_value", 1.0)),
        reg_tokens=registers,
        no_embed_class=registers > 0,
    )
    return {"model_args": args}


def _positions(pos: torch.Tensor, grid: int, antialias: bool) -> torch.Tensor:
    """(1, 1 + G², D) positions -> (1, 1 + grid², D), resampled as transformers does for another size."""
    cls, patches = pos[:, :1], pos[:, 1:]
    side = round(patches.shape[1] ** 0.5)
    if side * side != patches.shape[1]:
        raise WeightsError(f"position embeddings of {patches.shape[1]} patches are not a square grid")
    if side == grid:
        return pos
    dim = patches.shape[-1]
    x = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).to(torch.float32)  # (1, D, G, G)
    x = torch.nn.functional.interpolate(
        x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias
    )
    x = x.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, dim)  # (1, grid², D)
    return torch.cat([cls, x], dim=1)


def to_timm(state: Mapping[str, Any], config: Mapping[str, Any], tile_size: int = 224) -> dict[str, Any]:
    """transformers tensors (see the module docstring) -> a timm ``VisionTransformer`` state dict."""
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    out: dict[str, Any] = {}
    qkv: dict[tuple[int, str], dict[str, Any]] = {}
    unmapped = []
    for key, value in state.items():
        block = _BLOCK.match(key)
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
        elif key == "embeddings.position_embeddings" or key.startswith(_DROPPED):
            continue
        elif block and (m := re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)$", block[2])):
            qkv.setdefault((int(block[1]), m[2]), {})[m[1]] = value
        elif block and (rest := block[2].rsplit(".", 1))[0] in _BLOCK_KEYS:
            out[f"blocks.{block[1]}.{_BLOCK_KEYS[rest[0]]}.{rest[1]}"] = value
        elif block and (m := re.match(r"layer_scale([12])\.lambda1$", block[2])):
            out[f"blocks.{block[1]}.ls{m[1]}.gamma"] = value
        else:
            unmapped.append(key)
    for (index, kind), parts in sorted(qkv.items()):
        if set(parts) != {"query", "key", "value"}:
            unmapped += [f"encoder.layer.{index}.attention.attention.{p}.{kind}" for p in parts]
            continue
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    if unmapped:
        shown = ", ".join(unmapped[:8]) + (f", ... ({len(unmapped) - 8} more)" if len(unmapped) > 8 else "")
        raise WeightsError(
            f"{len(unmapped)} transformers keys do not map to timm's ViT: {shown}; virchow-rt converts "
            "ViTModel / Dinov2Model / Dinov2WithRegistersModel checkpoints as transformers saves them"
        )
    if "embeddings.position_embeddings" not in state:
        raise WeightsError("the checkpoint has no embeddings.position_embeddings; is it a transformers ViT?")
    kind = config.get("model_type")
    grid = tile_size // int(config["patch_size"])
    pos = _positions(state["embeddings.position_embeddings"], grid, antialias=kind == "dinov2_with_registers")
    if "reg_token" in out:  # no_embed_class: the class token carries its position, patches keep theirs
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    else:
        out["pos_embed"] = pos
    return out
