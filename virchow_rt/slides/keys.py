"""What a slide is called: the slides of the paths given, each one's key, and its files in ``--out``.

A slide's key (its name, or with ``--mirror-folders`` its path under the folder given, without the suffix)
names everything of the slide: ``<out>/<key>.h5``, its lock, state, QC image, ``pt_files`` entry, its
``--coords`` lookup and its summary entry. Standard library only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from virchow_rt.errors import InputError
from virchow_rt.paths import outside_reason

#: file suffixes picked up when a folder is given (OpenSlide's formats plus plain/OME TIFF)
SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".czi",
)


def _is_slide(path: Path) -> bool:
    return path.suffix.lower() in SLIDE_SUFFIXES and path.is_file()


def find_slides(
    inputs: Sequence[str | Path], recursive: bool = False, mirror_folders: bool = False
) -> list[Path]:
    """Expand files and folders (by :data:`SLIDE_SUFFIXES`; sub-folders too with ``recursive``, as a
    TCGA/GDC download keeps one case per folder) into a sorted, de-duplicated list (see :func:`keyed_slides`).
    """
    return list(keyed_slides(inputs, recursive, mirror_folders))


def keyed_slides(
    inputs: Sequence[str | Path], recursive: bool = False, mirror_folders: bool = False
) -> dict[Path, str]:
    """Each slide of ``inputs`` (resolved, sorted per input, de-duplicated) and its key: what its outputs
    are named after in ``--out`` (``<key>.h5``) and looked up by in ``--coords``, its summary name.

    A slide's key is its name (file name without the suffix); with ``mirror_folders``, its path relative to
    the input folder it was found under, without the suffix (``caseA/slide1``: ``<out>/caseA/slide1.h5``).
    Two slides with the same key would write the same file: that is an error.
    """
    found: dict[Path, str] = {}  # unresolved path -> its path relative to its input, without suffix
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = p.rglob("*") if recursive else p.iterdir()
            slides = sorted(f for f in files if _is_slide(f))
            found.update((f, _without_suffix(f.relative_to(p))) for f in slides if f not in found)
            folders = [] if recursive else [d for d in p.iterdir() if d.is_dir()]
            # the first slide found says enough: a GDC download's tree is not walked just for a warning
            nested = bool(found) and any(_is_slide(f) for d in folders for f in d.rglob("*"))
            if nested:  # none at all is the error below, with the same hint
                warnings.warn(
                    f"sub-folders of {p} hold more slides, not included; pass --recursive to include them",
                    stacklevel=2,
                )
        elif p.exists():
            found.setdefault(p, p.stem)
        else:
            raise InputError(f"slide path {p} does not exist; check the path")
    unique: dict[Path, str] = {}
    for f, relative in found.items():
        unique.setdefault(f.resolve(), relative)
    if not unique:
        folders = [Path(i) for i in inputs if Path(i).is_dir()]
        nested = not recursive and any(d.is_dir() for f in folders for d in f.iterdir())
        hint = "; they have sub-folders: pass --recursive to look inside them" if nested else ""
        raise InputError(
            f"no slides found in {', '.join(map(str, inputs))}; give slide files or folders holding "
            f"{', '.join(SLIDE_SUFFIXES)} files{hint}"
        )
    keys: dict[Path, str] = {}
    owners: dict[str, Path] = {}
    for f, relative in unique.items():
        key = relative if mirror_folders else f.stem
        other = owners.setdefault(key, f)
        if other != f:
            raise InputError(_collision(other, f, key, unique, mirror_folders))
        keys[f] = key
    return keys


def _without_suffix(relative: Path) -> str:
    """``caseA/slide1`` of ``caseA/slide1.svs`` (POSIX separators, on every system)."""
    return (relative.parent / relative.stem).as_posix()


def _collision(a: Path, b: Path, key: str, relative: dict[Path, str], mirrored: bool) -> str:
    if mirrored:
        return (
            f"slides {a} and {b} would both write {key}.h5 (the same path under the folders given); run "
            "them apart, into different --out folders"
        )
    fix = "rename one or run them apart"
    if relative[a] != relative[b]:  # in different sub-folders of the folders given
        fix = f"pass --mirror-folders to write {relative[a]}.h5 and {relative[b]}.h5 in sub-folders of --out"
    return f"slides {a} and {b} would both write {key}.h5; {fix}"


def slide_file(folder: str | Path, key: str, suffix: str) -> Path:
    """``<folder>/<key><suffix>``: one of a slide's files in ``--out`` (or ``--coords``), refused unless it
    stays inside ``folder`` (no ``..``, no absolute path, no symlinked sub-folder leading out)."""
    reason = outside_reason(folder, f"{key}{suffix}")
    if reason is not None:
        raise InputError(
            f"slide {key!r} would use {Path(folder) / f'{key}{suffix}'}, which is not inside {folder} "
            f"({reason}); a slide's files stay in their folder: remove the link, or give another folder"
        )
    return Path(folder) / f"{key}{suffix}"
