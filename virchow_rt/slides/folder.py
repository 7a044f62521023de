"""One output folder, one configuration: ``<out>/run_config.json``; CLAM's ``pt_files`` beside the ``.h5``.

Mixing configurations in one folder (another model, pooling, µm/px, tile size or regions) would leave
files of different dimensions and grids side by side. The first run writes the configuration; a later
run with another one is refused with both named (TRIDENT keeps each configuration in its own folder;
so does virchow-rt: use another ``--out``). What became of each slide is kept per slide and summed up
in ``summary.json`` (:mod:`virchow_rt.slides.summary`). Runs with per-slide coordinates files
(``--coords``, one slide at a time) share a folder: the configuration records that coordinates are
given, not which file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
import time
import unicodedata
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from virchow_rt.errors import InputError, OutputError
from virchow_rt.files import read_limited
from virchow_rt.slides.keys import slide_file
from virchow_rt.slides.settings import SlideSettings
from virchow_rt.slides.summary import state_path

CONFIG_NAME = "run_config.json"
#: compared by kind only (given or not): each slide may bring its own coordinates file
_BY_KIND = ("coords_source",)
#: the most bytes a run_config.json may hold (a configuration is a few hundred)
CONFIG_MAX_BYTES = 1 << 20
#: what a configuration recorded before the key existed meant (a folder of older runs is not "changed")
_UNRECORDED = {"mirror_folders": False}


@contextlib.contextmanager
def writing(out_dir: Path) -> Iterator[None]:
    """An OS error writing the run's own files in ``out_dir`` (a full disk, permissions) as one line."""
    try:
        yield
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        fix = _FIXES.get(err.errno, "fix that")
        raise OutputError(
            f"cannot write in --out {out_dir} ({where}{err.strerror or err}); {fix}, then rerun the same "
            "command to resume"
        ) from err


_FIXES = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.EACCES: "fix the folder's permissions",
    errno.EPERM: "fix the folder's permissions",
    errno.EROFS: "give a writable --out",
}


def _same(key: str, recorded: Any, wanted: Any) -> bool:
    return bool(recorded) == bool(wanted) if key in _BY_KIND else recorded == wanted


def claim(out_dir: Path, config: dict[str, Any]) -> None:
    """Record ``config`` for ``out_dir``, or check it against the recorded one (else :class:`OutputError`).

    Of runs claiming one folder at once, exactly one records its configuration (the file is created
    exclusively); the others compare theirs with it.
    """
    path = out_dir / CONFIG_NAME
    if _create(path, json.dumps(config, indent=2) + "\n"):
        return
    recorded = _read(path)
    recorded = {**_UNRECORDED, **recorded}
    changed = [
        f"{key} {recorded.get(key)!r} -> {config[key]!r}"
        for key in config
        if not _same(key, recorded.get(key), config[key])
    ]
    if changed:
        raise OutputError(
            f"--out {out_dir} holds features of another configuration ({'; '.join(changed)}); one folder "
            "holds one configuration: give this run another --out (or empty the folder to start over)"
        )


def _create(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` unless a file is there (then False); the file appears complete, at once."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # unlike a rename, fails when another run's file is there
        except FileExistsError:
            return False
        except OSError:  # no hard links on this filesystem: create exclusively, write at once
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Any]:
    """The recorded configuration; one being written by another run (no hard links) is read again."""
    for attempt in range(6):
        try:
            recorded = json.loads(read_limited(path, CONFIG_MAX_BYTES))  # a FIFO or a huge file: refused
            if isinstance(recorded, dict):
                return recorded
            err: Exception = ValueError("not a JSON object")
        except (ValueError, RecursionError) as error:  # empty or half-written for a moment (no hard links)
            err = error
        except OSError as error:
            raise OutputError(
                f"{path} cannot be read ({error}); remove it if the folder is yours to reuse"
            ) from error
        time.sleep(0.02 * 2**attempt)
    raise OutputError(f"{path} cannot be read ({err}); remove it if the folder is yours to reuse") from err


def check_layout(out_dir: Path, keyed: dict[Path, str], settings: SlideSettings) -> None:
    """Before any work: every file a slide of ``keyed`` (path -> key) may write in ``out_dir`` (``.h5``,
    state, QC image, ``pt_files`` entry) stays inside it, and no two slides share one: a symlinked sub-folder
    of ``--out`` (``caseA -> caseB``) or a file system that ignores case would make them one file."""
    seen: dict[str, tuple[Path, Path]] = {}
    folded = ignores_case(out_dir)
    for slide, key in keyed.items():
        files = [slide_file(out_dir, key, ".h5"), state_path(out_dir, key)]
        files += [slide_file(out_dir, key, ".qc.png")] if settings.qc else []
        files += [pt_path(out_dir, key)] if settings.also_pt else []
        for file in files:
            real = file.resolve()
            name = unicodedata.normalize("NFC", str(real).casefold()) if folded else str(real)
            other, named = seen.setdefault(name, (slide, file))
            if other != slide:
                raise InputError(
                    f"slides {other} and {slide} would both write {real} (as {named} and {file}: a symlinked "
                    "sub-folder of --out, or names that differ only in case); remove the link, or run them "
                    "into different --out folders"
                )


def ignores_case(folder: Path) -> bool:
    """True when file names in ``folder`` (or its nearest existing parent) ignore case, as on macOS, Windows
    and SMB shares: a probe file of this run's, removed at once. False where none can be made."""
    place = Path(folder)
    while not place.is_dir() and place != place.parent:
        place = place.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".virchow-rt-case-probe-", dir=place)
    except OSError:
        return False
    os.close(fd)
    try:
        return os.path.lexists(Path(name).with_name(Path(name).name.upper()))
    finally:
        os.unlink(name)


def pt_path(out_dir: Path, key: str) -> Path:
    """``<out>/pt_files/<key>.pt``: CLAM's features file of the slide with key ``key``."""
    return slide_file(out_dir / "pt_files", key, ".pt")


def write_pt(out_dir: Path, h5: Path, key: str | None = None) -> Path:
    """:func:`pt_path` (``key`` default: the ``.h5``'s name) from a complete ``.h5``: its features as one
    (N, E) float32 tensor, the file CLAM's MIL loader reads (``torch.load``). Written atomically; torch is
    needed (the export extra)."""
    from virchow_rt._deps import optional_import
    from virchow_rt.files import atomic_path
    from virchow_rt.slides.writer import read_features

    torch = optional_import("torch", "to write CLAM's pt_files (--also-pt)")
    target = pt_path(out_dir, key or h5.stem)
    features = read_features(h5)["features"]  # (N, E) float32
    with atomic_path(target) as tmp:
        torch.save(torch.from_numpy(features), tmp)
    return target
