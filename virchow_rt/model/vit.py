"""The one torch definition of an exported model: timm's backbone built as the model card does, its eval
transform, and the exported computation (uint8 tiles -> normalise -> features -> pool). Imports torch and
timm: imported only by the export, the PyTorch reference and the torch-cuda backend.

:func:`build_model` makes the backbone exactly as the model card does (``timm.create_model`` with
``mlp_layer=SwiGLUPacked, act_layer=SiLU`` for the SwiGLU variants); :class:`ExportWrapper` is what the
ONNX graphs and the torch-cuda backend compute; :class:`PooledBackbone` is the reference's computation
after timm's transform.

Random weights (``random_weights=True``) are timm's seeded init, except that every LayerScale gamma
is redrawn from U(0.1, 1.0): timm initialises them to 1e-5 (``init_values``), which makes every block
contribute ~1e-5 of the residual stream, so a parity check on such a model would only test the patch
embedding. With gammas near 1 every attention and MLP block moves the output, and an export mistake
anywhere in the network shows up as a cosine drop.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virchow_rt._deps import optional_import
from virchow_rt.contract import Manifest, WeightsInfo
from virchow_rt.errors import InputError, WeightsError
from virchow_rt.model.weights import check_state_dict, load_weights, warn_random_weights
from virchow_rt.registry import Variant, get_variant

if TYPE_CHECKING:
    import timm
    import torch
else:  # through the helper, so a missing package says how to install it
    torch = optional_import("torch", "for the PyTorch reference and ONNX export")
    timm = optional_import("timm", "for the PyTorch reference and ONNX export")

#: Variant.mlp -> extra timm.create_model kwargs; the published config.json does not record these
MLP_LAYERS: dict[str, dict[str, Any]] = {
    "swiglu_packed": {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU},
    "gelu": {},  # timm's default Mlp with GELU
}
#: timm's VisionTransformer LayerNorm epsilon
DEFAULT_NORM_EPS = 1e-6
#: range the LayerScale gammas of random models are drawn from (see the module docstring)
RANDOM_LAYER_SCALE = (0.1, 1.0)
#: the graph outputs an export can have: "embedding" first, optionally "patch_tokens"
OUTPUTS = ("embedding", "patch_tokens")


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Class token ‖ mean of the patch tokens (registers excluded): (B, T, D) -> (B, 2D).

    The one definition of the embedding, shared by the reference and the ONNX export wrapper.
    """
    cls = tokens[:, 0]  # (B, D)
    patch_mean = tokens[:, num_prefix_tokens:].mean(dim=1)  # (B, D)
    return torch.cat([cls, patch_mean], dim=1)  # (B, 2D)


def timm_pretrained_cfg(variant: Variant) -> dict[str, Any]:
    """The variant's preprocessing as a timm ``pretrained_cfg`` (what the published config.json holds)."""
    p = variant.preprocess
    return {
        "input_size": (3, p.size, p.size),
        "interpolation": p.interpolation,
        "crop_pct": p.crop_pct,
        "crop_mode": "center",
        "mean": tuple(p.mean),
        "std": tuple(p.std),
    }


def timm_transform(variant: Variant) -> Any:
    """timm's eval transform for ``variant`` (PIL in): Resize -> CenterCrop -> ToTensor -> Normalize."""
    config = timm.data.resolve_data_config(pretrained_cfg=timm_pretrained_cfg(variant))
    return timm.data.create_transform(**config, is_training=False)


def _create(variant: Variant) -> torch.nn.Module:
    if variant.mlp not in MLP_LAYERS:
        raise WeightsError(
            f"variant {variant.name!r} has MLP kind {variant.mlp!r}; known: {', '.join(MLP_LAYERS)}"
        )
    extra = dict(MLP_LAYERS[variant.mlp])
    if variant.norm_eps != DEFAULT_NORM_EPS:  # transformers' ViTModel: 1e-12
        extra["norm_layer"] = functools.partial(torch.nn.LayerNorm, eps=variant.norm_eps)
    try:
        model: Any = timm.create_model(variant.timm_arch, pretrained=False, **variant.model_args, **extra)
    except Exception as err:  # noqa: BLE001 - timm raises many types for bad kwargs
        raise WeightsError(
            f"timm cannot build {variant.timm_arch!r} with model_args {dict(variant.model_args)} "
            f"({type(err).__name__}: {err}); check config.json model_args"
        ) from err
    # Users following the model card call resolve_data_config(model.pretrained_cfg, model=model): make that
    # give the variant's preprocessing, not the default of the timm architecture name.
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **timm_pretrained_cfg(variant)}
    return model


def randomize_layer_scale(model: torch.nn.Module, generator: torch.Generator) -> int:
    """Redraw every LayerScale gamma from :data:`RANDOM_LAYER_SCALE`; returns how many were redrawn."""
    low, high = RANDOM_LAYER_SCALE
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, timm.layers.LayerScale):
                module.gamma.uniform_(low, high, generator=generator)
                count += 1
    return count


def build_model(
    variant: Variant | str,
    weights: str | os.PathLike | None = None,
    random_weights: bool = False,
    seed: int = 0,
) -> tuple[torch.nn.Module, Variant, WeightsInfo]:
    """Build the timm backbone of ``variant`` in eval mode on the CPU.

    ``weights``: see :func:`virchow_rt.model.weights.load_weights` (its config.json may update the
    variant, which is returned). ``random_weights=True``: seeded timm init with LayerScale gammas redrawn
    (module docstring); recorded as random everywhere and warned about. One of the two is required.
    """
    variant = get_variant(variant) if isinstance(variant, str) else variant
    if weights is not None and random_weights:
        raise InputError("both weights and random_weights were given; pass only one")
    if weights is None and not random_weights:
        raise WeightsError(
            f"no weights given for {variant.name!r}; pass --weights (a Hugging Face-layout folder, a "
            "state-dict file or a cached model id), or --random-weights for a test model with meaningless "
            "embeddings"
        )
    if weights is not None:
        state, variant, info = load_weights(weights, variant)
        model = _create(variant)
        check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, variant)
        model.load_state_dict(state, strict=True)
    else:
        with torch.random.fork_rng(devices=[]):  # seed timm's init without touching the caller's RNG
            torch.manual_seed(seed)
            model = _create(variant)
        generator = torch.Generator().manual_seed(seed)
        redrawn = randomize_layer_scale(model, generator)
        low, high = RANDOM_LAYER_SCALE
        scale = f", {redrawn} LayerScale gammas ~ U({low}, {high})" if redrawn else ""
        info = WeightsInfo(random=True, sha256="random", source=f"random (timm init, seed {seed}{scale})")
        warn_random_weights(f"{variant.name} built with {info.source}")
    model.eval().requires_grad_(False)
    return model, variant, info


def load_export_model(
    folder: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None
) -> tuple[torch.nn.Module, Variant, WeightsInfo, Manifest]:
    """(fp32 backbone on the CPU, variant, weights info, manifest) of the model an export folder holds.

    The weights are ``weights`` or the source the manifest records (a path or cached model id; random
    weights are drawn again from the same seed); real weights must have the recorded sha256.
    """
    folder = Path(folder)
    manifest = Manifest.read(folder)
    variant = manifest.to_variant()
    recorded = manifest.weights or WeightsInfo(source="")
    if weights is None and not recorded.random:
        weights = recorded.source
        if not weights:
            raise WeightsError(f"{folder}/manifest.json does not say where its weights are; pass --weights")
    try:
        model, variant, info = build_model(variant, weights, random_weights=weights is None)
    except WeightsError as err:
        raise WeightsError(
            f"{err} (virchow-rt rebuilds {folder}'s model from its weights; pass --weights PATH where they "
            "are on this machine)"
        ) from err
    if not info.random and recorded.sha256 not in ("unknown", info.sha256):
        raise WeightsError(
            f"weights {weights} (sha256 {info.sha256[:12]}…) are not those {folder} was exported from "
            f"(sha256 {recorded.sha256[:12]}…); pass the matching --weights or export again"
        )
    return model, variant, info, manifest


def check_outputs(outputs: Sequence[str]) -> tuple[str, ...]:
    """Validate the requested graph outputs: "embedding" first, optionally "patch_tokens"."""
    outputs = tuple(outputs)
    if (
        not outputs
        or outputs[0] != "embedding"
        or len(set(outputs)) != len(outputs)
        or set(outputs) - set(OUTPUTS)
    ):
        raise InputError(
            f"outputs {list(outputs)} are not valid; use ['embedding'] or ['embedding', 'patch_tokens']"
        )
    return outputs


class PooledBackbone(torch.nn.Module):
    """forward_features + pooling as one module, so that torch.compile sees the whole computation."""

    def __init__(self, model: torch.nn.Module, num_prefix_tokens: int) -> None:
        super().__init__()
        self.model: Any = model  # a timm VisionTransformer (forward_features)
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) float
        tokens = self.model.forward_features(x)  # (B, T, D)
        return pool_tokens(tokens, self.num_prefix_tokens)  # (B, 2D)


class ExportWrapper(torch.nn.Module):
    """uint8 tiles (N, S, S, 3) -> embedding (N, 2D) float32 [+ patch tokens (N, P, D)], as one module."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(
        self,
        backbone: torch.nn.Module,
        variant: Variant,
        outputs: Sequence[str] = ("embedding",),
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.backbone: Any = backbone  # a timm VisionTransformer (forward_features)
        self.num_prefix_tokens = variant.num_prefix_tokens
        self.outputs = check_outputs(outputs)
        # the backbone's dtype when it is not fp32 (the torch-cuda backend's fp16 module): the input is
        # normalised in fp32 and cast to it, the tokens are pooled in fp32 (as the fp16 ONNX plan does)
        self.compute_dtype = None if compute_dtype == torch.float32 else compute_dtype
        mean = torch.tensor(variant.preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(variant.preprocess.std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x/255 - mean)/std == x * scale + shift: one multiply-add per pixel instead of three ops
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)  # (1, 3, 1, 1)
        self.register_buffer("shift", -mean / std, persistent=False)  # (1, 3, 1, 1)

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (N, S, S, 3) uint8
        # cast first: TensorRT takes a uint8 tensor only as a network input that feeds a Cast
        x = tiles.float().permute(0, 3, 1, 2)  # (N, 3, S, S) float32
        x = x * self.scale + self.shift  # (N, 3, S, S) float32
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        tokens = self.backbone.forward_features(x)  # (N, T, D), after the final LayerNorm
        if self.compute_dtype is not None:
            tokens = tokens.float()
        result = [pool_tokens(tokens, self.num_prefix_tokens)]  # (N, 2D)
        if "patch_tokens" in self.outputs:
            result.append(tokens[:, self.num_prefix_tokens :])  # (N, P, D)
        return tuple(result)
