"""The PyTorch reference behind the :class:`~virchow_rt.backends.base.Backend` interface: timm's model and
timm's own eval transform, the ground truth for every parity check. Imports torch: imported only when
chosen.

uint8 tiles -> PIL -> timm transform -> ``forward_features`` -> class token ‖ mean of patch tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt.backends.base import Backend
from virchow_rt.contract import ModelInfo, WeightsInfo
from virchow_rt.errors import BackendError, InputError
from virchow_rt.model.vit import PooledBackbone, timm_transform
from virchow_rt.registry import Variant

if TYPE_CHECKING:
    import torch
else:  # through the helper, so a missing package says how to install it
    torch = optional_import("torch", "for the PyTorch reference")

#: TorchBackend precision -> (autocast dtype or None, ModelInfo precision)
PRECISIONS: dict[str, tuple[Any, str]] = {"fp32": (None, "fp32"), "fp16-autocast": (torch.float16, "fp16")}


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
        self.info = ModelInfo.from_variant(variant, info_precision, weights)
        self.transform = timm_transform(variant)
        self.transforms_tiles = True  # timm's transform resizes and crops tiles of any size
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="transform") if workers > 1 else None
        embed = PooledBackbone(model.to(self.device).eval(), variant.num_prefix_tokens)
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
