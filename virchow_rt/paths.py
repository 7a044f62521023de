"""Paths and names that come from a file (a manifest) or a request: kept inside their folder.

A manifest lists its artifacts by path, and a name (a variant, ``--name``) can become a folder name.
Whoever can write the folder can write the manifest, so neither is trusted: a path must be relative,
without ``..``, and must still be inside the folder once symlinks are resolved; a name must be one plain
folder name. Standard library only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from virchow_rt.errors import InputError, ModelFileError

#: a name that may become one folder (a Triton model, a URL segment): letters, digits, ``._-``
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def inside_folder(folder: str | os.PathLike[str], relative: object, what: str = "artifact") -> Path:
    """``folder / relative``, refused (:class:`ModelFileError`) unless it stays inside ``folder``.

    Refused: a non-string or empty path, an absolute path (POSIX or Windows), any ``..`` part, and a path
    that leaves the folder through a symlink. The file need not exist."""
    folder = Path(folder)
    path = folder / str(relative)
    reason = outside_reason(folder, relative)
    if reason is not None:
        raise ModelFileError(
            f"{folder / 'manifest.json'} lists the {what} {relative!r}, which is not a file inside {folder} "
            f"({reason}); a manifest's paths must stay in its folder: re-export the model "
            "(`virchow-rt export --overwrite`), and do not run export folders you do not trust"
        )
    return path


def outside_reason(folder: str | os.PathLike[str], relative: object) -> str | None:
    """Why ``folder / relative`` is not a path inside ``folder`` (the rules of :func:`inside_folder`), or
    None when it is. For callers that word their own one-line error."""
    reason = _escape(relative)
    if reason is not None:
        return reason
    folder = Path(folder)
    path = folder / str(relative)
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError) as err:  # a symlink loop
        return f"it cannot be resolved ({err})"
    return None if inside else f"it leads to {path.resolve()} through a symlink"


def _escape(relative: object) -> str | None:
    """Why ``relative`` is not a plain relative path, or None."""
    if not isinstance(relative, str) or not relative.strip():
        return "not a file name"
    if "\x00" in relative:
        return "it holds a NUL character"
    posix, windows = PurePosixPath(relative), PureWindowsPath(relative)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        return "an absolute path"
    if ".." in posix.parts or ".." in windows.parts:
        return "it climbs out with '..'"
    return None


def check_name(name: object, option: str) -> str:
    """``name`` if it is one plain folder name (letters, digits, ``._-``; no ``/``, no ``..``), else an
    :class:`InputError` naming ``option`` and the fix."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InputError(
            f"{option} {name!r} cannot be used as a name: give 1 to 128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name
