"""What a slide is called: the slides of the paths given, each one's key, and its files in ``--out``.

A slide's key (its name, or with ``--mirror-folders`` its path under the folder given, without the suffix)
names everything of the slide: ``<out>/<key>.h5``, its lock, state, QC image, ``pt_files`` entry, its
``--coords`` lookup and its summary entry. Standard library only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path, PureWindowsPath

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
#: a key's part (a file name) longest in bytes: its lock's set-aside name adds 48 (``.<name>.h5.lock.stale-``
#: and 32 hex digits) and file systems allow 255
MAX_KEY_PART_BYTES = 200
#: what a slide's files add to its key (``.h5``, QC image, ``pt_files/``, ``slide_states/``): a key that is
#: another key plus one of these and ``/`` would need that slide's file as a folder
KEY_SUFFIXES = (".h5", ".qc.png", ".pt", ".json")


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
    Refused before any work, naming the slide (:class:`InputError`): two slides with the same key, or keys
    equal but for case or Unicode form (one file on macOS, Windows, SMB), a key that is another's output
    folder (``k/a`` and ``k/a.h5/x``), a key part ``.``, ``..`` or over :data:`MAX_KEY_PART_BYTES`, and
    with ``mirror_folders`` a path given inside a folder also given (its key would depend on the order).
    ``recursive`` does not enter symlinked sub-folders: a warning names them.
    """
    if mirror_folders:
        _refuse_nested(inputs)
    found: dict[Path, str] = {}  # unresolved path -> its path relative to its input, without suffix
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(p.rglob("*") if recursive else p.iterdir())
            found.update(
                (f, _without_suffix(f.relative_to(p))) for f in files if _is_slide(f) and f not in found
            )
            if recursive:
                _warn_links(p, [f for f in files if f.is_symlink() and f.is_dir()])
            folders = [] if recursive else [d for d in p.iterdir() if d.is_dir()]
            # the first slide found says enough: a GDC download's tree is not walked just for a warning
            nested = bool(found) and any(_is_slide(f) for d in folders for f in d.rglob("*"))
            if nested:  # none at all is the error below, with the same hint
                warnings.warn(
                    f"sub-folders of {p} hold more slides, not included; pass --recursive to include them",
                    stacklevel=2,
                )
        elif p.exists():
            found.setdefault(p, _without_suffix(Path(p.name)))
        else:
            raise InputError(f"slide path {p} does not exist; check the path")
    unique: dict[Path, str] = {}
    for f, relative in found.items():
        first = unique.setdefault(f.resolve(), relative)
        if mirror_folders and first != relative:  # links to one file: one key kept
            why = f"are one file ({f.resolve()}): embedded once, as {first}"
            warnings.warn(f"slides {first} and {relative} {why}", stacklevel=2)
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
        key = relative if mirror_folders else _without_suffix(Path(f.name))
        other = owners.setdefault(key, f)
        if other != f:
            raise InputError(_collision(other, f, key, unique, mirror_folders))
        keys[f] = key
    for f, key in keys.items():
        problem = _key_problem(key, owners)
        if problem:
            raise InputError(f"slide {f} cannot be named in --out: its key {key!r} {problem}")
    return keys


def _refuse_nested(inputs: Sequence[str | Path]) -> None:
    """With ``--mirror-folders``, a path given inside a folder also given would be keyed by whichever came
    first: refused."""
    given = [(Path(i), Path(i).resolve()) for i in inputs if Path(i).exists()]
    for folder, inside in [(f, r) for f, r in given if f.is_dir()]:
        for path, resolved in given:
            if resolved != inside and resolved.is_relative_to(inside):
                raise InputError(
                    f"{path} is inside {folder}, also given; with --mirror-folders a slide's key is its path "
                    f"under the folder given: give only {folder} (or only {path})"
                )


def _warn_links(folder: Path, links: list[Path]) -> None:
    if links:
        names = ", ".join(str(d.relative_to(folder)) for d in links[:10])
        more = f" and {len(links) - 10} more" if len(links) > 10 else ""
        warnings.warn(
            f"--recursive does not follow symlinked sub-folders: {names}{more} in {folder} skipped; give "
            "them as folders of their own to include them",
            stacklevel=3,
        )


def _key_problem(key: str, keys: dict[str, Path]) -> str | None:
    """Why ``key`` cannot name a slide's files (among ``keys``), with the fix; None when it can."""
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "has a '.' or '..' part, which names no file of its own; rename the slide"
    windows = PureWindowsPath(key)
    if windows.drive or ".." in windows.parts:
        return "reads as a Windows drive or parent path (':' or '..\\'); rename the slide"
    longest = max(len(part.encode()) for part in parts)
    if longest > MAX_KEY_PART_BYTES:
        return (
            f"has a {longest}-byte name, over the {MAX_KEY_PART_BYTES} bytes its lock's name leaves of the "
            "file system's 255; rename the slide (shorter)"
        )
    for end in range(1, len(parts)):
        folder = "/".join(parts[:end])
        for suffix in KEY_SUFFIXES:
            if folder.endswith(suffix) and folder[: -len(suffix)] in keys:
                return (
                    f"is inside {folder}, the file slide {keys[folder[: -len(suffix)]]} writes; rename the "
                    "folder or run them apart"
                )
    return None


def _without_suffix(relative: Path) -> str:
    """``caseA/slide1`` of ``caseA/slide1.svs`` (POSIX separators, on every system); the suffix is cut from
    the text (``dots/..tif``: ``dots/.``, refused, not ``dots``)."""
    text = relative.as_posix()
    return text[: len(text) - len(relative.suffix)]


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
