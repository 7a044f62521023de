"""The encoders as data: one frozen :class:`Variant` per encoder (the Virchow family and the public
pathology tile encoders built on timm's ViT), nothing else.

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
    int8_min_cosine: float = 0.995
    #: int8 also keeps each tile's 10 nearest neighbours (what retrieval and MIL pooling see)
    int8_min_knn10: float = 0.90

    def min_cosine(self, precision: str) -> float:
        return {"fp32": self.fp32_min_cosine, "fp16": self.fp16_min_cosine, "int8": self.int8_min_cosine}[
            precision
        ]

    def min_knn10(self, precision: str) -> float | None:
        """The 10-NN overlap gate of ``precision`` (None: cosine alone decides)."""
        return self.int8_min_knn10 if precision == "int8" else None


@dataclass(frozen=True)
class Variant:
    """One encoder of the family.

    ``model_args`` are the timm ``VisionTransformer`` kwargs, spelled out in full so that nothing
    depends on the defaults behind ``timm_arch``; ``mlp`` says which MLP block the caller must pass
    (the published ``config.json`` does not record it); ``norm_eps`` is the LayerNorm epsilon (timm's
    1e-6, or transformers' 1e-12 for ViTModel checkpoints). ``pooling`` is the embedding the authors
    use (every encoder offers :data:`POOLINGS`). ``unconfirmed`` lists facts no primary source confirmed:
    a weights folder's config.json and the tensors' shapes settle them.
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
    norm_eps: float = 1e-6
    pooling: str = "cls_mean"
    magnification: str = "20x (0.5 µm/px)"
    gated: bool = False
    #: "timm" (config.json in timm's hub format) or "transformers" (ViTModel / Dinov2Model folders)
    weights_layout: str = "timm"
    weights_url: str | None = None  # where the weights are published when not on Hugging Face
    precision_note: str = ""
    #: whether virchow-rt's embedding was compared with the authors' on their published weights
    checked_on_published_weights: bool = False

    def __post_init__(self) -> None:
        assert self.mlp in MLP_KINDS, self.mlp
        assert self.pooling in POOLINGS, self.pooling
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

    def parameters(self) -> int:
        """Parameters of the headless backbone, counted from the architecture (no torch needed)."""
        a, d, h = self.model_args, self.width, self.mlp_hidden
        patch, depth = int(a["patch_size"]), int(a["depth"])
        positions = self.num_patches if a.get("no_embed_class") else self.num_tokens
        fc2_in = h // 2 if self.mlp == "swiglu_packed" else h
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (fc2_in * d + d)
        block += 2 * d if a.get("init_values") else 0  # LayerScale gammas
        embed = 3 * patch * patch * d + d + d + self.num_registers * d + positions * d  # patch, cls, reg, pos
        return embed + depth * block + 2 * d  # + the final norm

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
        norm_eps = float(args.pop("norm_eps", self.norm_eps))
        for ignored in ("mlp_layer", "act_layer", "norm_layer", "pretrained_cfg_overlay"):
            args.pop(ignored, None)
        if "init_values" in args and not args["init_values"]:
            # LayerScale off, however spelled (null, 0, false): timm drops None kwargs (the architecture's
            # default would switch it back on), while 0 reaches VisionTransformer, which then skips it
            args["init_values"] = 0
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
            norm_eps=norm_eps,
            preprocess=pre,
        )

    def tiny(self) -> Variant:
        """The same architecture (MLP kind, registers, LayerScale, patch) at tiny width and depth."""
        args = {**self.model_args, "embed_dim": 96, "depth": 2, "num_heads": 2}
        if self.mlp == "swiglu_packed" and int(96 * float(args["mlp_ratio"])) % 2:
            args["mlp_ratio"] = 5.25  # a packed SwiGLU's fc1 makes two halves: its width must be even
        return dataclasses.replace(self, name=f"{self.name}-tiny", model_args=args, hf_repo=None)


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise InputError(f"unknown pooling {pooling!r}; use one of: {', '.join(POOLINGS)}")
    return pooling


def _vit(
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    reg_tokens: int = 0,
    init_values: float = 0,
    *,
    patch_size: int = 14,
    no_embed_class: bool = False,
    dynamic_img_size: bool = True,
) -> dict[str, Any]:
    """timm ``VisionTransformer`` kwargs at 224 px, headless (``init_values`` 0: no LayerScale)."""
    return {
        "img_size": 224,
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": mlp_ratio,
        "init_values": init_values,
        "reg_tokens": reg_tokens,
        "no_embed_class": no_embed_class,
        "num_classes": 0,
        "global_pool": "",
        "dynamic_img_size": dynamic_img_size,
    }


IMAGENET = Preprocess()  # 224, bicubic, crop_pct 1, ImageNet mean/std
SWIGLU_RATIO = 2.66667 * 2  # DINOv2 giant / UNI2-h / H-optimus: packed SwiGLU, fc1 8192 wide at 1536
H_OPTIMUS = Preprocess(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))
HIBOU = Preprocess(mean=(0.7068, 0.5755, 0.722), std=(0.195, 0.2316, 0.1816))
KAIKO = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
NON_COMMERCIAL = "CC-BY-NC-ND-4.0"
FP16_NAN = (
    "users report NaN outputs under fp16 autocast (UNI issue 18): the fp16 parity gate decides; "
    "bf16 is offered"
)
KAIKO_RELEASES = "https://github.com/kaiko-ai/towards_large_pathology_fms/releases"

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
            gated=True,
        ),
        Variant(
            name="virchow2",
            timm_arch="vit_huge_patch14_224",
            model_args=_vit(1280, 32, 16, 5.3375, 4, 1e-5),
            mlp="swiglu_packed",
            hf_repo="paige-ai/Virchow2",
            license=NON_COMMERCIAL,
            gated=True,
            magnification="5x, 10x, 20x, 40x (mixed)",
        ),
        Variant(
            name="virchow2g",
            timm_arch="vit_gigantic_patch14_224",
            model_args=_vit(1664, 48, 16, 8192 / 1664, 8, 1e-5),
            mlp="swiglu_packed",
            unconfirmed=("embed_dim", "depth", "num_heads", "mlp_ratio", "mlp", "init_values", "reg_tokens"),
            batch=BatchProfile(min=1, opt=16, max=32),
            license="no public weights",
        ),
        Variant(
            name="virchow2g-mini",
            timm_arch="vit_small_patch16_224",
            model_args=_vit(384, 12, 6, 4.0),  # patch 14, as the family's
            mlp="gelu",
            batch=BatchProfile(min=1, opt=64, max=256),
            license="no public weights",
        ),
        Variant(
            name="uni",
            timm_arch="vit_large_patch16_224",
            model_args=_vit(1024, 24, 16, 4.0, 0, 1e-5, patch_size=16),
            mlp="gelu",
            hf_repo="MahmoodLab/UNI",
            license=NON_COMMERCIAL,
            gated=True,
            pooling="cls",
            # the model card: Resize(224) (torchvision's default, bilinear) + CenterCrop(224)
            preprocess=Preprocess(interpolation="bilinear"),
            precision_note=FP16_NAN,
        ),
        Variant(
            name="uni2-h",
            timm_arch="vit_giant_patch14_224",
            model_args=_vit(1536, 24, 24, SWIGLU_RATIO, 8, 1e-5, no_embed_class=True),
            mlp="swiglu_packed",
            hf_repo="MahmoodLab/UNI2-h",
            license=NON_COMMERCIAL,
            gated=True,
            pooling="cls",
            batch=BatchProfile(min=1, opt=32, max=64),
            precision_note=FP16_NAN,
        ),
        Variant(
            name="h-optimus-0",
            timm_arch="vit_giant_patch14_reg4_dinov2",
            model_args=_vit(1536, 40, 24, SWIGLU_RATIO, 4, 1e-5, no_embed_class=True, dynamic_img_size=False),
            mlp="swiglu_packed",
            hf_repo="bioptimus/H-optimus-0",
            license="Apache-2.0",
            gated=True,  # a click-through agreement
            pooling="cls",
            # no resize for 224 px tiles at 0.5 µm/px: ToTensor + Normalize with the authors' mean/std
            preprocess=H_OPTIMUS,
            batch=BatchProfile(min=1, opt=16, max=32),
        ),
        Variant(
            name="h-optimus-1",
            timm_arch="vit_giant_patch14_reg4_dinov2",
            model_args=_vit(1536, 40, 24, SWIGLU_RATIO, 4, 1e-5, no_embed_class=True, dynamic_img_size=False),
            mlp="swiglu_packed",
            hf_repo="bioptimus/H-optimus-1",
            license=NON_COMMERCIAL,
            gated=True,
            pooling="cls",
            preprocess=H_OPTIMUS,
            batch=BatchProfile(min=1, opt=16, max=32),
        ),
        Variant(
            name="prov-gigapath",
            timm_arch="vit_giant_patch14_dinov2",
            model_args=_vit(1536, 40, 24, 5.33334, 0, 1e-5, patch_size=16),
            mlp="swiglu_packed",
            hf_repo="prov-gigapath/prov-gigapath",
            license="Apache-2.0",
            gated=True,
            pooling="cls",
            # the authors' transform: Resize(256, bicubic) + CenterCrop(224) (the hub config says crop_pct 1)
            preprocess=Preprocess(crop_pct=0.875),
            unconfirmed=("crop_pct",),
            batch=BatchProfile(min=1, opt=16, max=32),
        ),
        Variant(
            name="phikon",
            timm_arch="vit_base_patch16_224",
            model_args=_vit(768, 12, 12, 4.0, patch_size=16),
            mlp="gelu",
            hf_repo="owkin/phikon",
            license="Owkin non-commercial",
            pooling="cls",
            norm_eps=1e-12,  # transformers' ViTModel default
            weights_layout="transformers",
            preprocess=Preprocess(interpolation="bilinear"),  # ViTImageProcessor: resize 224, bilinear
        ),
        Variant(
            name="phikon-v2",
            timm_arch="vit_large_patch16_224",
            model_args=_vit(1024, 24, 16, 4.0, 0, 1e-5, patch_size=16),
            mlp="gelu",
            hf_repo="owkin/phikon-v2",
            license="Owkin non-commercial",
            pooling="cls",
            weights_layout="transformers",
            unconfirmed=("reg_tokens",),
        ),
        Variant(
            name="hibou-b",
            timm_arch="vit_base_patch14_reg4_dinov2",
            model_args=_vit(768, 12, 12, 4096 / 768, 4, 1e-5, no_embed_class=True),
            mlp="swiglu_packed",
            hf_repo="histai/hibou-b",
            license="Apache-2.0",
            pooling="cls",
            weights_layout="transformers",
            preprocess=HIBOU,
        ),
        Variant(
            name="hibou-l",
            timm_arch="vit_large_patch14_reg4_dinov2",
            model_args=_vit(1024, 24, 16, 5.34375, 4, 1e-5, no_embed_class=True),
            mlp="swiglu_packed",
            hf_repo="histai/hibou-L",
            license="Apache-2.0",
            gated=True,
            pooling="cls",
            weights_layout="transformers",
            preprocess=HIBOU,
            unconfirmed=("mlp", "mlp_ratio"),
        ),
        *(
            Variant(
                name=f"kaiko-{name}",
                timm_arch=arch,
                model_args=args,
                mlp="gelu",
                license="Kaiko non-commercial",
                weights_url=KAIKO_RELEASES,
                pooling="cls",
                preprocess=KAIKO,
                magnification="5x-40x (mixed)",
                unconfirmed=("interpolation",),
            )
            for name, arch, args in (
                ("vits16", "vit_small_patch16_224", _vit(384, 12, 6, 4.0, patch_size=16)),
                ("vits8", "vit_small_patch8_224", _vit(384, 12, 6, 4.0, patch_size=8)),
                ("vitb16", "vit_base_patch16_224", _vit(768, 12, 12, 4.0, patch_size=16)),
                ("vitb8", "vit_base_patch8_224", _vit(768, 12, 12, 4.0, patch_size=8)),
                (
                    "vitl14",
                    "vit_large_patch14_reg4_dinov2",
                    _vit(1024, 24, 16, 4.0, 4, 1e-5, no_embed_class=True),
                ),
            )
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
