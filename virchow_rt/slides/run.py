"""``virchow-rt slides``: many slides -> one ``.h5`` each, resumable, failures isolated, a run summary.

A rerun skips every slide whose ``.h5`` is complete and valid for this model and these settings
(checked, not just present) and redoes the rest. A slide that cannot be read is reported with its
reason, leaves no file, and does not stop the others; the exit code is then 1.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import errno
import glob
import hashlib
import json
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from virchow_rt.backends.base import Backend
from virchow_rt.errors import InputError, MissingDependency, OutputError, VirchowError, warn_random_weights
from virchow_rt.files import atomic_path, check_output, sha256_file, write_json
from virchow_rt.registry import check_pooling
from virchow_rt.slides import folder, locks
from virchow_rt.slides.embed import EmbeddingStream, complete_groups, embedding_dim, opened_backend
from virchow_rt.slides.grid import (
    GRID_RULES,
    MPP_AT_1X,
    TilePlan,
    check_tile_settings,
    coords_grid,
    magnification_to_mpp,
    nominal_magnification,
    read_coords,
    tile_grid,
)
from virchow_rt.slides.mask import qc_picture
from virchow_rt.slides.reader import Slide, find_slides, open_slide
from virchow_rt.slides.regions import parse_magnifications, region_grid
from virchow_rt.slides.writer import FORMAT_VERSION, FeatureWriter, resume_problem, stored_counts

SUMMARY_NAME = "summary.json"
#: skipped-tile errors listed per slide in the summary (the count is always complete)
MAX_LISTED_ERRORS = 20


@dataclass(frozen=True)
class SlideSettings:
    """How slides are tiled and embedded (the CLI flags of ``virchow-rt slides``)."""

    mpp: float = 0.5
    tile_size: int = 224
    slide_mpp: float | None = None
    regions: tuple[float, ...] | None = None
    min_tissue: float = 0.5
    batch_size: int | None = None
    workers: int | None = None
    pooling: str | None = None  # None: the model's own (ModelInfo.pooling)
    skip_errors: bool = False
    reader: str = "auto"
    prefetch_batches: int = 2
    #: read tiles in worker processes (the CLI's default; None: the library's, threads: see slides.tiles)
    read_processes: bool | None = None
    recursive: bool = False  # look for slides in sub-folders of the folders given
    also_pt: bool = False  # also write CLAM's pt_files/<slide>.pt
    qc: bool = False  # also write <slide>.qc.png: thumbnail, tissue outline and the kept tiles
    grid: str = "magnification"  # how a tile's level-0 side is derived: TRIDENT's rule, or "mpp" (exact)
    #: another tool's tiling to reuse: a TRIDENT or CLAM .h5 (one slide) or a folder of them (by slide name)
    coords: str | None = None
    progress: bool | None = (
        None  # tiles done / total, tiles/s and ETA inside each slide (None: on a terminal)
    )

    def check(self) -> None:
        """Raise :class:`InputError` for settings no slide could use (before any slide is opened)."""
        check_tile_settings(self.mpp, self.tile_size, self.min_tissue)
        if self.grid not in GRID_RULES:
            raise InputError(f"--grid {self.grid!r} is not one of: {', '.join(GRID_RULES)}")
        if self.pooling is not None:
            check_pooling(self.pooling)
        if self.regions:
            mags = parse_magnifications(self.regions)
            if not any(np.isclose(magnification_to_mpp(m), self.mpp) for m in mags):
                raise InputError(
                    f"--mpp {self.mpp} ({MPP_AT_1X / self.mpp:g}x) is not one of the --regions "
                    f"magnifications {','.join(f'{m:g}' for m in mags)}: the file's features/coords are the "
                    f"region tiles at --mpp; add {MPP_AT_1X / self.mpp:g} to --regions or pass "
                    f"--mpp {magnification_to_mpp(mags[-1]):g}"
                )

    @property
    def regions_text(self) -> str:
        return ",".join(f"{m:g}" for m in parse_magnifications(self.regions)) if self.regions else ""


@dataclass
class _Model:
    """The model as recorded in every output."""

    backend: Backend
    file: str
    sha256: str

    @classmethod
    def identify(cls, model: str | Path | Backend, backend: Backend) -> _Model:
        # the file the backend runs (an export folder resolves to one of its artifacts), else the argument
        file = backend.path or (None if isinstance(model, Backend) else model)
        if file is not None and Path(file).is_file():
            return cls(backend, str(file), sha256_file(file))
        # no file to hash (a Backend object): the model's own description identifies it
        info = json.dumps(asdict(backend.info), sort_keys=True).encode()
        return cls(backend, "", "backend:" + hashlib.sha256(info).hexdigest())


@dataclass
class _Record:
    name: str
    path: str
    status: str = "pending"  # done | skipped | failed | locked | interrupted | not started
    output: str | None = None
    reason: str | None = None
    redone_because: str | None = None
    warnings: list[str] = field(default_factory=list)
    tiles: int = 0  # rows of the file's features (with regions: the --mpp tiles)
    regions: int | None = None
    embedded_tiles: int = 0  # tiles through the model (with regions: every tile of every region)
    skipped_tiles: int = 0
    skipped_tile_errors: list[dict] = field(default_factory=list)
    host: str | None = None
    worker: str | None = None  # a --ray run: the Ray worker (and its GPUs) that embedded it
    reader: str | None = None
    level0_mpp: float | None = None
    read_level: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    tiles_per_s: float | None = None


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _expected_attrs(settings: SlideSettings, model: _Model, dim: int) -> dict[str, Any]:
    """Root attributes a complete file of this run must carry (anything else changed -> redo)."""
    return {
        "format_version": FORMAT_VERSION,
        "model_sha256": model.sha256,
        "pooling": settings.pooling,
        "embedding_dim": dim,
        "patch_size": settings.tile_size,
        "target_mpp": float(settings.mpp),
        "min_tissue": float(settings.min_tissue),
        "regions": settings.regions_text,
        "grid_rule": settings.grid,
        "coords_source": str(settings.coords or ""),
    }


def _embed_to_file(
    slide: Slide, model: _Model, settings: SlideSettings, tmp: Path, record: _Record, qc: Path | None = None
) -> None:
    """The slide's tile grid into ``features``/``coords`` and, with ``--regions``, the region sequences
    into ``regions/`` as well: the tile grid never depends on ``--regions``."""
    backend = model.backend
    dim = embedding_dim(backend.info, settings.pooling)
    t0 = time.perf_counter()
    if settings.coords:  # TRIDENT's or CLAM's tiles, tile for tile
        given, given_size0 = read_coords(_coords_file(settings.coords, slide.name), slide)
        tiles = coords_grid(slide, given, given_size0, settings.tile_size)
    else:
        tiles = tile_grid(slide, settings.mpp, settings.tile_size, settings.min_tissue, rule=settings.grid)
    grid = layout = None
    if settings.regions:
        grid = region_grid(
            slide, settings.regions, tile_size=settings.tile_size, min_tissue=settings.min_tissue
        )
        layout = grid.layout
    record.timings["mask_s"] = time.perf_counter() - t0
    if qc is not None:  # before the model runs: the tiling can be checked while it does
        picture = qc_picture(slide, tiles.mask, tiles.coords, tiles.patch_size_level0)
        with atomic_path(qc) as tmp_png:
            Image.fromarray(picture).save(tmp_png, format="PNG")
    writer = FeatureWriter(tmp, dim, layout)
    streams: list[EmbeddingStream] = []
    write_s = 0.0

    def embed(plan: TilePlan, group: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        stream = EmbeddingStream(slide, backend, plan, pooling=settings.pooling,
                                 batch_size=settings.batch_size, workers=settings.workers,
                                 skip_errors=settings.skip_errors, prefetch_batches=settings.prefetch_batches,
                                 processes=settings.read_processes)  # fmt: skip
        streams.append(stream)
        show = sys.stderr.isatty() if settings.progress is None else settings.progress
        with tqdm(total=len(plan), unit="tile", desc=slide.name, disable=not show, leave=False,
                  dynamic_ncols=True) as bar:  # fmt: skip
            for ids, features in complete_groups(stream, group):  # features (G, group, E)
                bar.update(features.shape[0] * features.shape[1])
                yield ids, features

    try:
        for ids, features in embed(tiles.plan, 1):
            t1 = time.perf_counter()
            writer.append(tiles.coords[ids], features[:, 0])
            write_s += time.perf_counter() - t1
        if grid is not None and layout is not None:
            region_coords = grid.tile_coords()
            for ids, features in embed(grid.plan(slide), layout.tiles_per_region):
                t1 = time.perf_counter()
                writer.append_regions(region_coords[ids], features)  # (G, T, 2), (G, T, E)
                write_s += time.perf_counter() - t1
        failed = sum(s.read_stats.failed for s in streams)
        record.tiles = writer.num_tiles
        record.embedded_tiles = sum(s.read_stats.tiles for s in streams)
        record.regions = writer.num_regions if layout is not None else None
        width, height = slide.dimensions
        info = backend.info
        size0 = tiles.patch_size_level0
        writer.finish(
            {
                "name": slide.name,
                "patch_size": settings.tile_size,
                "patch_size_level0": size0,
                "level0_magnification": nominal_magnification(slide.mpp),
                "target_magnification": nominal_magnification(settings.mpp),
                "overlap": 0,
                "level0_width": width,
                "level0_height": height,
                "encoder": info.variant,
                "pooling": settings.pooling,
                "embedding_dim": dim,
                "model_sha256": model.sha256,
                "model_file": Path(model.file).name,
                "weights_sha256": info.weights_sha256,
                "precision": info.precision,
                "random_weights": bool(info.random_weights),
                "backend": backend.name,
                "reader": slide.reader,
                "slide_path": str(slide.path),
                "slide_size_bytes": slide.path.stat().st_size,
                "level0_mpp": slide.mpp,
                "mpp_source": slide.mpp_source,
                "target_mpp": float(settings.mpp),
                "effective_mpp": size0 * slide.mpp / settings.tile_size,
                "read_level": tiles.level,
                "min_tissue": float(settings.min_tissue),
                "tissue_threshold": tiles.mask.threshold,
                "regions": settings.regions_text,
                "grid_rule": settings.grid,
                "coords_source": str(settings.coords or ""),
                "region_size_level0": layout.region_size0 if layout is not None else 0,
                "skipped_tiles": failed,
                "created": _now(),
                "virchow_rt_version": _version(),
            }
        )
    finally:
        writer.close()
    record.skipped_tiles = failed
    record.skipped_tile_errors = [e for s in streams for e in s.read_stats.errors][:MAX_LISTED_ERRORS]
    record.read_level = tiles.level
    record.timings.update(
        read_s=sum(s.read_stats.read_s for s in streams),
        read_wait_s=sum(s.read_stats.wait_s for s in streams),
        embed_s=sum(s.embed_s for s in streams),
        write_s=write_s,
    )


def _version() -> str:
    from virchow_rt._version import __version__

    return __version__


def _process_one(
    path: Path,
    out_dir: Path,
    model: _Model,
    settings: SlideSettings,
    record: _Record,
    warn: Callable[[str], None],
) -> None:
    out = out_dir / f"{path.stem}.h5"
    start = time.perf_counter()
    try:
        with open_slide(path, slide_mpp=settings.slide_mpp, reader=settings.reader) as slide:
            record.reader, record.level0_mpp = slide.reader, slide.mpp
            if settings.mpp < slide.mpp * 0.99:  # finer than the scan: every tile would be an upsampled one
                record.warnings.append(
                    f"--mpp {settings.mpp:g} is finer than the scan ({slide.mpp:.4g} µm/px): tiles are "
                    f"upsampled {slide.mpp / settings.mpp:.2g}x; use --mpp {slide.mpp:.4g} or coarser"
                )
                warn(f"{path.name}: warning: {record.warnings[-1]}")
            record.timings["open_s"] = time.perf_counter() - start
            qc = out_dir / f"{path.stem}.qc.png" if settings.qc else None
            with atomic_path(out) as tmp:
                _embed_to_file(slide, model, settings, tmp, record, qc)
    except BaseException:
        out.unlink(missing_ok=True)  # an invalid old file must not survive a failed redo
        raise
    record.timings["total_s"] = time.perf_counter() - start
    record.status, record.output = "done", str(out)
    total = record.timings["total_s"]
    record.tiles_per_s = record.embedded_tiles / total if total > 0 else None


def _coords_file(source: str, name: str) -> Path:
    """The coordinates file of slide ``name`` in ``--coords`` (a file, or a TRIDENT/CLAM output folder)."""
    path = Path(source)
    if path.is_file():
        return path
    candidates = [path / sub / f"{name}{tail}" for sub in ("", "patches") for tail in (".h5", "_patches.h5")]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise InputError(
            f"--coords {source} has no coordinates for slide {name} (looked for {name}.h5 and "
            f"{name}_patches.h5, also in patches/); give the folder TRIDENT or CLAM wrote for these slides"
        )
    return found


def _disk_full(err: BaseException | None) -> bool:
    """True when ``err`` (or what caused it: h5py wraps the OS error) says the disk is full or over quota."""
    while err is not None:
        if isinstance(err, OSError) and (
            err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err)
        ):
            return True
        err = err.__cause__ or err.__context__
    return False


def _skip_complete(
    out: Path,
    wanted: dict[str, Any],
    settings: SlideSettings,
    record: _Record,
    prefix: str,
    log: Callable[[str], None],
) -> bool:
    """True (and the record says so) when ``out`` is complete and valid for this run; else note any redo."""
    if not out.exists():
        return False
    reason = resume_problem(out, wanted, settings.slide_mpp)
    if reason is None:
        record.status, record.output = "skipped", str(out)
        record.tiles, record.regions = stored_counts(out)
        log(f"{prefix}: complete, skipped ({record.tiles} tiles in {out.name})")
        return True
    if record.redone_because is None:
        record.redone_because = f"{out.name} {reason}"
        log(f"{prefix}: redoing, {out.name} {reason}")
    return False


def _run_slide(
    path: Path,
    prefix: str,
    out_dir: Path,
    ident: _Model,
    settings: SlideSettings,
    expected: dict[str, Any],
    record: _Record,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> None:
    """One slide under its lock: skipped when complete or locked, else embedded; ``record`` tells how."""
    out = out_dir / f"{path.stem}.h5"
    try:  # the file size tells another slide of the same name apart (its .h5 would be taken)
        wanted = {**expected, "slide_size_bytes": path.stat().st_size}
    except OSError as err:  # gone since it was listed, or not on this node's filesystem
        record.status, record.reason = "failed", f"cannot read {path} here ({err.strerror or err})"
        warn(f"{prefix}: FAILED: {record.reason}")
        return
    with locks.held(out, warn) as other:
        if other is not None:  # another run is writing this slide: leave it to that run
            record.status = "locked"
            record.reason = f"another run is writing it ({other.describe()})"
            log(f"{prefix}: {record.reason}; skipped here")
            return
        # temporary files of a killed run (ours to remove: we hold the slide's lock)
        for stale in out_dir.glob(f".{glob.escape(out.name)}.*.partial"):
            stale.unlink(missing_ok=True)
        if _skip_complete(out, wanted, settings, record, prefix, log):
            if settings.also_pt and not (out_dir / "pt_files" / f"{out.stem}.pt").exists():
                folder.write_pt(out_dir, out)  # from the complete .h5, no model run
            return
        try:
            _process_one(path, out_dir, ident, settings, record, warn)
        except MissingDependency:
            raise  # every other slide would fail the same way
        except Exception as err:  # noqa: BLE001 - one bad slide must not stop the others
            if _disk_full(err):  # every slide after it would fail the same way: stop
                raise OutputError(
                    f"the disk holding {out_dir} is full (or over quota) while writing "
                    f"{out.name}; its temporary file was removed and finished slides are kept: "
                    "free some space and rerun the same command to resume"
                ) from err
            record.status = "failed"
            # our errors carry a full sentence; anything else gets its type, so it reads
            record.reason = str(err) if isinstance(err, VirchowError) else f"{type(err).__name__}: {err}"
            warn(f"{prefix}: FAILED: {record.reason}")
            return
    if settings.also_pt:
        folder.write_pt(out_dir, out)
    t = record.timings
    skipped = f", {record.skipped_tiles} unreadable tiles skipped" if record.skipped_tiles else ""
    log(
        f"{prefix}: {record.embedded_tiles} tiles{skipped} in {t['total_s']:.1f} s "
        f"({record.tiles_per_s or 0:.1f} tiles/s; read {t['read_s']:.1f} s over workers, "
        f"waited {t['read_wait_s']:.1f} s, model {t['embed_s']:.1f} s) -> {out}"
    )


def process_slides(
    slides: Sequence[str | Path],
    model: str | Path | Backend,
    out_dir: str | Path,
    settings: SlideSettings = SlideSettings(),
    *,
    backend: str = "auto",
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict[str, Any]:
    """Embed every slide into ``out_dir/<name>.h5`` and write ``out_dir/summary.json``; returns the summary.

    ``model`` is an exported model file (opened with ``backend``) or an open :class:`Backend`.
    Complete, valid files for this model and these settings are skipped; failures are recorded, not raised.
    """
    settings.check()
    paths = find_slides(slides, recursive=settings.recursive)
    out_dir = check_output(out_dir, "--out", folder=True)  # before any work; made once there is work
    started, wall0 = _now(), time.perf_counter()
    records: list[_Record] = []
    with opened_backend(model, backend) as runner:
        ident = _Model.identify(model, runner)
        info = runner.info
        settings = dataclasses.replace(settings, pooling=settings.pooling or info.pooling)
        out_dir.mkdir(parents=True, exist_ok=True)  # only now: a model that fails to open leaves no folder
        dim = embedding_dim(info, settings.pooling)
        folder.claim(out_dir, {"encoder": info.variant, **_expected_attrs(settings, ident, dim)})
        if info.random_weights:
            warn_random_weights(
                f"{info.variant} has random weights; every output is labelled random_weights=true"
            )
        expected = _expected_attrs(settings, ident, dim)
        try:
            for i, path in enumerate(paths, 1):
                record = _Record(name=path.stem, path=str(path), host=socket.gethostname())
                records.append(record)
                _run_slide(
                    path,
                    f"[{i}/{len(paths)}] {path.name}",
                    out_dir,
                    ident,
                    settings,
                    expected,
                    record,
                    log,
                    warn,
                )
        finally:
            # also after an interrupt: the summary lists every slide given, what was done and what was not
            listed = {r.path for r in records}
            records += [
                _Record(name=p.stem, path=str(p), status="not started") for p in paths if str(p) not in listed
            ]
            block = _model_block(ident, settings, dim)
            summary = write_summary(out_dir, records, settings, block, started, time.perf_counter() - wall0)
    return summary


def write_summary(
    out_dir: Path,
    records: list[_Record],
    settings: SlideSettings,
    model: dict[str, Any],
    started: str,
    wall_s: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the run's ``summary.json`` (earlier runs' slides kept) and return it; the slide in progress
    when the run was stopped is recorded as interrupted."""
    for record in records:
        if record.status == "pending":
            record.status, record.reason = "interrupted", "the run was stopped; rerun to resume"
    summary = {**_summary(records, settings, model, started, wall_s), **(extra or {})}
    summary = folder.merge_summary(out_dir, SUMMARY_NAME, summary)
    write_json(out_dir / SUMMARY_NAME, summary)
    return summary


def _model_block(model: _Model, settings: SlideSettings, dim: int) -> dict[str, Any]:
    """The summary's ``model`` entry."""
    info = model.backend.info
    return {
        "file": model.file,
        "sha256": model.sha256,
        "variant": info.variant,
        "precision": info.precision,
        "backend": model.backend.name,
        "random_weights": bool(info.random_weights),
        "weights_sha256": info.weights_sha256,
        "embedding_dim": dim,
        "pooling": settings.pooling,
    }


def _summary(
    records: list[_Record], settings: SlideSettings, model: dict[str, Any], started: str, wall_s: float
) -> dict[str, Any]:
    done = [r for r in records if r.status == "done"]
    sums = {
        key: sum(r.timings.get(key, 0.0) for r in done)
        for key in ("read_s", "read_wait_s", "embed_s", "write_s")
    }
    busy = sum(r.timings.get("total_s", 0.0) for r in done)
    embedded = sum(r.embedded_tiles for r in done)
    return {
        "schema_version": 1,
        "started": started,
        "finished": _now(),
        "model": model,
        "settings": {**asdict(settings), "regions": settings.regions_text or None},
        "slides": [asdict(r) for r in records],
        "failures": [
            {"name": r.name, "path": r.path, "reason": r.reason} for r in records if r.status == "failed"
        ],
        "totals": {
            "slides": len(records),
            "done": len(done),
            "skipped": sum(r.status == "skipped" for r in records),
            "failed": sum(r.status == "failed" for r in records),
            "not_done": sum(r.status in ("locked", "interrupted", "not started") for r in records),
            "tiles_embedded": embedded,
            "wall_s": wall_s,
            **sums,
            "tiles_per_s": embedded / busy if busy > 0 else None,  # per slide being embedded
            "job_tiles_per_s": embedded / wall_s if wall_s > 0 else None,  # the whole run, all workers
        },
    }
