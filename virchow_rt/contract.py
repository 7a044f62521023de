"""The contracts every layer shares: what a model computes (:class:`ModelInfo`) and what a batch of tiles is.

Imports only the standard library and numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from virchow_rt.errors import InputError
from virchow_rt.registry import Variant, get_variant


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model says about itself (from ONNX metadata or the manifest beside it)."""

    variant: str
    embedding_dim: int  # E: columns of the "embedding" output (class token ‖ patch mean = 2·width)
    width: int  # D: the class token alone is embedding[:, :width]
    tile_size: int  # S: the model's input is uint8 (N, S, S, 3)
    precision: str  # "fp32" | "fp16"
    random_weights: bool
    weights_sha256: str  # "random" for random weights
    pooling: str = "cls_mean"  # the embedding the model's authors use: what embed() returns by default
    # timm's eval geometry for tiles: shorter side to floor(S / crop_pct) with this filter, centre crop S
    crop_pct: float = 1.0
    interpolation: str = "bicubic"


def check_tile_array(tiles: Any, what: str = "tiles") -> None:
    """Raise :class:`InputError` unless ``tiles`` is uint8 (N, H, W, 3); ``what`` names it in the message.

    ``tiles``: anything with numpy's ``dtype`` and ``shape`` (a numpy array, or a GPU array's description).
    """
    if tiles.dtype != np.uint8:
        raise InputError(
            f"{what}: dtype {tiles.dtype}; tiles must be uint8 RGB (0-255): convert with "
            "np.clip(x, 0, 255).astype(np.uint8) (multiply 0-1 floats by 255 first; normalization "
            "happens inside the model)"
        )
    if len(tiles.shape) != 4 or tiles.shape[-1] != 3:
        raise InputError(
            f"{what}: shape {tuple(tiles.shape)}; expected (N, H, W, 3) uint8 RGB, channels last "
            "(channels-first: x.transpose(0, 2, 3, 1); one tile: x[None]; RGBA: x[..., :3])"
        )


def variant_from_manifest(manifest: dict[str, Any]) -> Variant:
    """The exact variant an export was made from (its model_args and preprocessing beat the registry's)."""
    base = get_variant(manifest["variant"])
    pre = manifest.get("preprocess") or {}
    config: dict[str, Any] = {
        "model_args": {
            **manifest.get("model_args", {}),
            "mlp": manifest.get("mlp", base.mlp),
            "norm_eps": manifest.get("norm_eps", base.norm_eps),
        }
    }
    if manifest.get("timm_arch"):
        config["architecture"] = manifest["timm_arch"]
    if pre:
        config["pretrained_cfg"] = {
            "input_size": (3, pre["size"], pre["size"]),
            **{k: pre[k] for k in pre if k != "size"},
        }
    return base.with_config(config)
