"""The PyTorch reference: timm's model and timm's own eval transform, the ground truth for every parity check.

:func:`build_model` makes the backbone exactly as the model card does (``timm.create_model`` with
``mlp_layer=SwiGLUPacked, act_layer=SiLU`` for the SwiGLU variants). :class:`TorchBackend` runs it
behind the same :class:`~virchow_rt.runtime.backend.Backend` interface as the exported artifacts:
uint8 tiles -> PIL -> timm transform -> ``forward_features`` -> class token ‖ mean of patch tokens.

Random weights (``random_weights=True``) are timm's seeded init, except that every LayerScale gamma
is redrawn from U(0.1, 1.0): timm initialises them to 1e-5 (``init_values``), which makes every block
contribute ~1e-5 of the residual stream, so a parity check on such a model would only test the patch
embedding. With gammas near 1 every attention and MLP block moves the output, and an export mistake
anywhere in the network shows up as a cosine drop.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt.errors import BackendError, InputError, WeightsError
from virchow_rt.export.weights import WeightsInfo, check_state_dict, load_weights, warn_random_weights
from virchow_rt.registry import Variant, get_variant
from virchow_rt.runtime.backend import Backend, ModelInfo

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
#: TorchBackend precision -> (autocast dtype or None, ModelInfo precision)
PRECISIONS: dict[str, tuple[Any, str]] = {"fp32": (None, "fp32"), "fp16-autocast": (torch.float16, "fp16")}


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Class token ‖ mean of the patch tokens (registers excluded): (B, T, D) -> (B, 2D).

    The one definition of the embedding, shared by the reference and the ONNX export wrapper.
    """
    cls = tokens[:, 0]  # (B, D)
    patch_mean = tokens[:, num_prefix_tokens:].mean(dim=1)  # (B, D)
    return torch.cat([cls, patch_mean], dim=1)  # (B, 2D)


def model_info(variant: Variant, precision: str, weights: WeightsInfo) -> ModelInfo:
    """What a PyTorch module of ``variant`` computes, as the runtime describes a model."""
    p = variant.preprocess
    return ModelInfo(
        variant=variant.name,
        embedding_dim=variant.embedding_dim(),
        width=variant.width,
        tile_size=p.size,
        precision=precision,
        random_weights=weights.random,
        weights_sha256=weights.sha256,
        pooling=variant.pooling,
        crop_pct=p.crop_pct,
        interpolation=p.interpolation,
    )


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

    ``weights``: see :func:`virchow_rt.export.weights.load_weights` (its config.json may update the
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


class _Embed(torch.nn.Module):
    """forward_features + pooling as one module, so that torch.compile sees the whole computation."""

    def __init__(self, model: torch.nn.Module, num_prefix_tokens: int) -> None:
        super().__init__()
        self.model: Any = model  # a timm VisionTransformer (forward_features)
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) float
        tokens = self.model.forward_features(x)  # (B, T, D)
        return pool_tokens(tokens, self.num_prefix_tokens)  # (B, 2D)


class TorchBackend(Backend):
    """The PyTorch reference behind the :class:`Backend` interface.

    ``precision``: "fp32" (eager fp32, the ground truth) or "fp16-autocast" (``torch.autocast``, how the
    model card and TRIDENT run it). ``compile=True`` wraps the model in ``torch.compile``. Tiles of any
    size are accepted: timm's transform resizes and crops them, as for timm users. The model is moved
    to ``device`` in place. ``weights`` describes the model's weights for :attr:`info`.
    ``workers`` > 1 runs timm's transform on that many threads, one batch ahead of the model in
    :meth:`pipeline`, as TRIDENT's DataLoader workers do; 0 runs it inline. Free it with :meth:`close`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        variant: Variant,
        precision: str = "fp32",
        compile: bool = False,
        device: str = "cpu",
        weights: WeightsInfo | None = None,
        workers: int = 0,
    ) -> None:
        if precision not in PRECISIONS:
            raise InputError(
                f"unknown TorchBackend precision {precision!r}; use one of: {', '.join(PRECISIONS)}"
            )
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"device {device!r} asked for but torch sees no CUDA GPU; use device='cpu'")
        self.variant = variant
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.gpu = torch.cuda.current_device() if self.device.index is None else self.device.index
        self._autocast_dtype, info_precision = PRECISIONS[precision]
        mode = "compile" if compile else ("autocast" if self._autocast_dtype is not None else "eager")
        self.name = f"torch-{mode}-{info_precision}"
        weights = weights or WeightsInfo(random=False, sha256="unknown", source="caller's module")
        self.info = model_info(variant, info_precision, weights)
        self.transform = timm_transform(variant)
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="transform") if workers > 1 else None
        embed = _Embed(model.to(self.device).eval(), variant.num_prefix_tokens)
        self._module: Any = torch.compile(embed) if compile else embed

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        if self._autocast_dtype is None:
            yield
        else:
            with torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype):
                yield

    def preprocess(self, tiles: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float32 (B, 3, S, S) through timm's transform on PIL images."""
        image = optional_import("PIL.Image", "to preprocess tiles like timm")
        if not (
            isinstance(tiles, np.ndarray)
            and tiles.dtype == np.uint8
            and tiles.ndim == 4
            and tiles.shape[-1] == 3
        ):
            got = f"{tiles.dtype} {tiles.shape}" if isinstance(tiles, np.ndarray) else type(tiles).__name__
            raise InputError(f"tiles must be a uint8 array (B, H, W, 3) RGB, got {got}")

        def one(tile: np.ndarray) -> torch.Tensor:
            return self.transform(image.fromarray(tile))  # (3, S, S)

        mapped = map(one, tiles) if self._pool is None else self._pool.map(one, tiles)
        return torch.stack(list(mapped))  # (B, 3, S, S)

    def _forward(self, x: torch.Tensor) -> np.ndarray:
        if self._module is None:
            raise BackendError(f"{self.name} backend is closed; create a new TorchBackend")
        with torch.inference_mode(), self._precision():
            out = self._module(x.to(self.device))  # (B, 2D)
        return out.float().cpu().numpy()

    def run(self, tiles: np.ndarray) -> np.ndarray:
        """Embed one batch of uint8 tiles (B, H, W, 3); returns a new float32 (B, 2D) array."""
        return self._forward(self.preprocess(tiles))

    def pipeline(self, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """With ``workers``: batch k+1 is transformed on the CPU threads while the model runs batch k."""
        if self._pool is None:
            yield from super().pipeline(batches)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as ahead:
            pending: Future[torch.Tensor] | None = None
            for batch in batches:
                future = ahead.submit(self.preprocess, batch)
                if pending is not None:
                    yield self._forward(pending.result())
                pending = future
            if pending is not None:
                yield self._forward(pending.result())

    def time_compute(self, tiles: np.ndarray, *, repeats: int = 10, warmup: int = 2) -> list[float]:
        """Seconds of GPU time per forward pass on one batch (CUDA events; no preprocessing, no copies)."""
        if self.device.type != "cuda":
            raise BackendError(f"time_compute needs a CUDA device; {self.name} runs on {self.device}")
        if self._module is None:
            raise BackendError(f"{self.name} backend is closed; create a new TorchBackend")
        x = self.preprocess(tiles).to(self.device)  # (B, 3, S, S)
        samples = []
        with torch.inference_mode(), self._precision():
            for _ in range(warmup + repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self._module(x)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)  # elapsed_time is in milliseconds
        return samples[warmup:]

    def close(self) -> None:
        self._module = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
