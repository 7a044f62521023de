"""What a benchmark measures and on what: settings (batch sizes, tiles, repeats) and the model source.

The model is a registry variant name (exported during the run) or an export folder / model file,
whose manifest says exactly which variant and weights it was made from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from virchow_rt.contract import Manifest
from virchow_rt.errors import InputError, ModelFileError
from virchow_rt.registry import Variant, get_variant


@dataclass(frozen=True)
class Settings:
    """How much to measure: batch sizes, tiles per timed pass, timed passes, warm-up batches."""

    batch_sizes: tuple[int, ...]
    tiles: int
    repeats: int
    warmup: int
    seed: int = 0

    def tiles_for(self, batch_size: int) -> int:
        """Tiles per pass at ``batch_size``: rounded up to whole batches, so no odd-shaped batch is timed."""
        return math.ceil(self.tiles / batch_size) * batch_size


#: defaults per machine kind: a 2-core CPU must finish in minutes (the median of 5 short passes shrugs off
#: the spikes a shared machine has); a GPU gets a wider sweep and more warm-up
DEFAULTS = {
    "cpu": Settings(batch_sizes=(1, 8, 32), tiles=32, repeats=5, warmup=1),
    "cuda": Settings(batch_sizes=(1, 8, 16, 32, 64, 128), tiles=256, repeats=5, warmup=3),
}


def resolve_settings(
    device: str,
    variant: Variant,
    batch_sizes: Sequence[int] | None = None,
    tiles: int | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    seed: int = 0,
) -> Settings:
    """Fill what the caller left out from :data:`DEFAULTS` (batch sizes capped at the variant's max)."""
    base = DEFAULTS[device]
    if batch_sizes is None:
        batch_sizes = tuple(b for b in base.batch_sizes if b <= variant.batch.max) or (variant.batch.min,)
    settings = Settings(
        batch_sizes=tuple(sorted(dict.fromkeys(int(b) for b in batch_sizes))),
        tiles=base.tiles if tiles is None else int(tiles),
        repeats=base.repeats if repeats is None else int(repeats),
        warmup=base.warmup if warmup is None else int(warmup),
        seed=seed,
    )
    if not settings.batch_sizes or min(settings.batch_sizes) < 1:
        raise InputError(
            f"batch sizes must be positive integers, got {list(batch_sizes)}; e.g. --batch-sizes 1,8,32"
        )
    if settings.tiles < 1 or settings.repeats < 1 or settings.warmup < 0:
        raise InputError(
            f"need --tiles >= 1, --repeats >= 1 and warm-up >= 0, got tiles={settings.tiles}, "
            f"repeats={settings.repeats}, warmup={settings.warmup}"
        )
    return settings


@dataclass
class Source:
    """The variant and, when the model is an export folder, the folder and its manifest."""

    variant: Variant
    folder: Path | None = None
    manifest: Manifest | None = None
    exported_here: bool = False
    export_s: float | None = None


def resolve_source(model: str) -> Source:
    """A variant name (exported during the run) or an export folder / model file with its manifest."""
    path = Path(model)
    if path.exists():
        folder = path if path.is_dir() else path.parent
        manifest = Manifest.read(folder)
        return Source(manifest.to_variant(), folder=folder, manifest=manifest)
    if path.suffix in (".onnx", ".engine", ".plan") or "/" in model:
        raise ModelFileError(
            f"no such export folder or model file: {model}; give a variant name or an existing path"
        )
    return Source(get_variant(model))


def reference_weights(source: Source, weights: str | None, random_weights: bool) -> tuple[str | None, bool]:
    """Weights for the PyTorch reference: the caller's, else those the export folder was made from."""
    if weights is not None or random_weights or source.manifest is None:
        return weights, random_weights
    recorded = source.manifest.weights
    if recorded is not None and recorded.random:
        return None, True
    if recorded is not None and recorded.source and Path(recorded.source).exists():
        return recorded.source, False
    raise InputError(
        f"the reference needs the weights {source.folder} was exported from "
        f"({recorded.source if recorded else None!r} is not "
        "here); pass --weights PATH"
    )
