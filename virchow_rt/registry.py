"""The Virchow family as data: one frozen :class:`Variant` per encoder, nothing else.

A new encoder is a new entry in :data:`VARIANTS`, never a new class or an ``if variant == ...``
branch. This module imports only the standard library so that every part of the package
(export, runtime, CLI) can read it cheaply.

Facts marked *unconfirmed* (Virchow2G) are settings: a weights folder's ``config.json``
(timm hub layout, ``model_args``) overrides them through :meth:`Variant.with_config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from virchow_rt.errors import InputError, WeightsError

POOLINGS = ("cls_mean", "cls")
MLP_KINDS = ("swiglu_packed", "gelu")


@dataclass(frozen=True)
class Preprocess:
    """timm's eval transform for the model: Resize(shorter side, bicubic) -> CenterCrop -> Normalize."""

    size: int = 224
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes an engine is built for (TensorRT optimization profile) and the default batch."""

    min: int = 1
    opt: int = 32
    max: int = 64


@dataclass(frozen=True)
class Tolerance:
    """Minimum cosine similarity to the fp32 PyTorch reference an artifact must reach."""

    fp32_min_cosine: float = 0.99999
    fp16_min_cosine: float = 0.999

    def min_cosine(self, precision: str) -> float:
        return {"fp32": self.fp32_min_cosine, "fp16": self.fp16_min_cosine}[precision]


@dataclass(frozen=True)
class Variant:
    """One encoder of the family.

    ``model_args`` are the timm ``VisionTransformer`` kwargs, spelled out in full so that nothing
    depends on the defaults behind ``timm_arch``; ``mlp`` says which MLP block the caller must pass
    (the published ``config.json`` does not record it).
    """

    name: str
    timm_arch: str
    model_args: Mapping[str, Any]
    mlp: str
    hf_repo: str | None = None
    license: str | None = None
    unconfirmed: tuple[str, ...] = ()
    preprocess: Preprocess = field(default_factory=Preprocess)
    batch: BatchProfile = field(default_factory=BatchProfile)
    tolerance: Tolerance = field(default_factory=Tolerance)

    def __post_init__(self) -> None:
        assert self.mlp in MLP_KINDS, self.mlp
        object.__setattr__(self, "model_args", dict(self.model_args))

    # --- token layout: [class token, registers..., patch tokens...] ---------------------------
    @property
    def width(self) -> int:
        return int(self.model_args["embed_dim"])

    @property
    def num_registers(self) -> int:
        return int(self.model_args.get("reg_tokens", 0))

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_registers

    @property
    def num_patches(self) -> int:
        side = int(self.model_args["img_size"]) // int(self.model_args["patch_size"])
        return side * side

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * float(self.model_args["mlp_ratio"]))

    def flops_per_tile(self) -> float:
        """Multiply-add FLOPs (2 per MAC) of one tile through the backbone, counted from the shapes."""
        t, d, h = self.num_tokens, self.width, self.mlp_hidden
        patch = self.model_args["patch_size"]
        fc2_in = h // 2 if self.mlp == "swiglu_packed" else h  # SwiGLU: fc1 makes gate and value halves
        per_block = 2 * t * d * (3 * d + d + h) + 2 * t * fc2_in * d + 2 * 2 * t * t * d
        return float(2 * self.num_patches * 3 * patch * patch * d + self.model_args["depth"] * per_block)

    def embedding_dim(self, pooling: str = "cls_mean") -> int:
        """Size of the embedding: class token ‖ mean of patch tokens (2·D) or class token alone (D)."""
        check_pooling(pooling)
        return 2 * self.width if pooling == "cls_mean" else self.width

    # --- derived variants ----------------------------------------------------------------------
    def with_config(self, config: Mapping[str, Any]) -> Variant:
        """Apply a timm hub ``config.json`` (``{"architecture", "model_args", "pretrained_cfg"}``).

        Keys of ``model_args`` override this variant's (that is how unconfirmed Virchow2G facts are
        settled by real weights); ``pretrained_cfg`` mean/std/size override the preprocessing.
        An optional ``"mlp"`` key inside ``model_args`` ("swiglu_packed" or "gelu") picks the MLP block.
        """
        args = dict(config.get("model_args") or {})
        mlp = str(args.pop("mlp", self.mlp))
        if mlp not in MLP_KINDS:
            raise WeightsError(f"config.json model_args.mlp is {mlp!r}; use one of {', '.join(MLP_KINDS)}")
        for ignored in ("mlp_layer", "act_layer", "pretrained_cfg_overlay"):
            args.pop(ignored, None)
        pre = self.preprocess
        cfg = config.get("pretrained_cfg") or {}
        if cfg:
            size = cfg.get("input_size", (3, pre.size, pre.size))[-1]
            pre = dataclasses.replace(
                pre,
                size=int(size),
                interpolation=str(cfg.get("interpolation", pre.interpolation)),
                crop_pct=float(cfg.get("crop_pct", pre.crop_pct)),
                mean=tuple(cfg.get("mean", pre.mean)),
                std=tuple(cfg.get("std", pre.std)),
            )
        return dataclasses.replace(
            self,
            timm_arch=str(config.get("architecture", self.timm_arch)),
            model_args={**self.model_args, **args},
            mlp=mlp,
            preprocess=pre,
        )

    def tiny(self) -> Variant:
        """The same architecture (MLP kind, registers, LayerScale, patch) at tiny width and depth."""
        args = {**self.model_args, "embed_dim": 96, "depth": 2, "num_heads": 2}
        return dataclasses.replace(self, name=f"{self.name}-tiny", model_args=args, hf_repo=None)


def variant_from_manifest(manifest: dict[str, Any]) -> Variant:
    """The exact variant an export was made from (its model_args and preprocessing beat the registry's)."""
    base = get_variant(manifest["variant"])
    pre = manifest.get("preprocess") or {}
    config: dict[str, Any] = {
        "model_args": {**manifest.get("model_args", {}), "mlp": manifest.get("mlp", base.mlp)}
    }
    if manifest.get("timm_arch"):
        config["architecture"] = manifest["timm_arch"]
    if pre:
        config["pretrained_cfg"] = {
            "input_size": (3, pre["size"], pre["size"]),
            **{k: pre[k] for k in pre if k != "size"},
        }
    return base.with_config(config)


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise InputError(f"unknown pooling {pooling!r}; use one of: {', '.join(POOLINGS)}")
    return pooling


def _vit(
    embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, reg_tokens: int, init_values: float | None
):
    return {
        "img_size": 224,
        "patch_size": 14,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp_ratio,
        "init_values": init_values,
        "reg_tokens": reg_tokens,
        "no_embed_class": False,
        "num_classes": 0,
        "global_pool": "",
        "dynamic_img_size": True,
    }


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            name="virchow",
            timm_arch="vit_huge_patch14_224",
            model_args=_vit(1280, 32, 16, 5.3375, 0, 1e-5),
            mlp="swiglu_packed",
            hf_repo="paige-ai/Virchow",
            license="Apache-2.0",
        ),
        Variant(
            name="virchow2",
            timm_arch="vit_huge_patch14_224",
            model_args=_vit(1280, 32, 16, 5.3375, 4, 1e-5),
            mlp="swiglu_packed",
            hf_repo="paige-ai/Virchow2",
            license="CC-BY-NC-ND-4.0",
        ),
        Variant(
            name="virchow2g",
            timm_arch="vit_gigantic_patch14_224",
            model_args=_vit(1664, 48, 16, 8192 / 1664, 8, 1e-5),
            mlp="swiglu_packed",
            unconfirmed=("embed_dim", "depth", "num_heads", "mlp_ratio", "mlp", "init_values", "reg_tokens"),
            batch=BatchProfile(min=1, opt=16, max=32),
        ),
        Variant(
            name="virchow2g-mini",
            timm_arch="vit_small_patch16_224",
            model_args=_vit(384, 12, 6, 4.0, 0, None),
            mlp="gelu",
            batch=BatchProfile(min=1, opt=64, max=256),
        ),
    )
}


def get_variant(name: str) -> Variant:
    """Look a variant up by name; ``NAME-tiny`` gives its tiny test configuration."""
    base = name.removesuffix("-tiny")
    if base not in VARIANTS:
        raise InputError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
    variant = VARIANTS[base]
    return variant.tiny() if name.endswith("-tiny") else variant
