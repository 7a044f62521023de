"""Exporting into a folder that already holds an export: the same model's other artifacts stay.

An export adds precisions to a folder (fp16 after fp32, int8 after both) instead of dropping the ones it
was not asked for: an artifact of a precision asked again is rebuilt and replaced, every other one stays
listed in ``manifest.json`` with its own hashes and parity. Only the same model may share a folder (same
variant, architecture, preprocessing, weights; kept artifacts with the same opset and I/O), else the export
is refused before any work. :func:`commit` moves the staged files into place and writes the manifest last,
putting back what it replaced if anything fails on the way.

Plain module: standard library and the contract only (no torch, no ONNX).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from virchow_rt.contract import MANIFEST_NAME, Artifact, Manifest
from virchow_rt.errors import ModelFileError, OutputError
from virchow_rt.files import exclusive_lock
from virchow_rt.paths import outside_reason

#: the manifest fields that say which model a folder holds (besides the weights)
MODEL_FACTS = ("variant", "timm_arch", "model_args", "mlp", "norm_eps", "preprocess", "embedding")
_ROOM = "export into a new folder, or pass --overwrite to list only this export in its manifest.json"
#: held (flock) for a whole export, removed after it: a second export into the folder fails at once
LOCK_NAME = ".export.lock"


@contextlib.contextmanager
def locked_folder(out_dir: Path) -> Iterator[Path]:
    """Create ``out_dir`` if needed and hold its export lock for the block; a second export into it meanwhile
    is an :class:`OutputError` at once. Folders created here are removed again if the block fails and
    leaves them empty (bad weights leave no empty folder behind)."""
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(
            out_dir / LOCK_NAME, f"another export is writing {out_dir}; wait for it or export elsewhere"
        ):
            yield out_dir
    except BaseException:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty one
        raise


def previous_export(out_dir: Path, overwrite: bool) -> Manifest | None:
    """The manifest of the export already in ``out_dir``, or None (no manifest, or ``overwrite``).

    An unreadable manifest is an :class:`OutputError`: the run could neither add to it nor keep it.
    """
    if overwrite or not (out_dir / MANIFEST_NAME).exists():
        return None
    try:
        return Manifest.read(out_dir)
    except ModelFileError as err:
        raise OutputError(
            f"{out_dir / MANIFEST_NAME} cannot be read, so this export cannot add to it: {_ROOM} ({err})"
        ) from err


def check_kept(previous: Manifest, out_dir: Path, variant: str, replaced: Sequence[str]) -> None:
    """Refuse (:class:`OutputError`, one line, before the model is built) to keep what ``previous`` lists
    unless it is ``variant``'s export and each artifact not in ``replaced`` is there as recorded: file names
    inside ``out_dir``, none listed twice, each file present with its recorded size (a run killed while
    moving files in leaves some missing or of another size)."""
    if previous.variant != variant:
        raise OutputError(
            f"{out_dir} holds an export of another model: variant {previous.variant} (this run {variant}). "
            f"An export adds precisions only to the same model's folder: {_ROOM}"
        )
    seen: set[str] = set()
    for artifact in previous.artifacts:
        kept = artifact.path not in replaced
        files = [(artifact.path, artifact.size_bytes)]
        if artifact.external_data is not None:
            files.append((artifact.external_data, artifact.extra.get("external_data_size_bytes")))
        for name, size in files:
            reason = outside_reason(out_dir, name) or ("listed twice" if name in seen else None)
            seen.add(name)
            if reason is None and kept:
                reason = _file_problem(out_dir / name, size)
            if reason is not None:
                raise OutputError(
                    f"{out_dir / MANIFEST_NAME} lists {name!r} ({reason}), so this export cannot keep it: "
                    f"{_ROOM}"
                )


def _file_problem(path: Path, size: object) -> str | None:
    """Why ``path`` is not the file of ``size`` bytes a manifest records (any size if none), or None."""
    if not path.is_file():
        return "a folder, not a file" if path.is_dir() else "no such file"
    actual = path.stat().st_size
    return None if size is None or actual == size else f"{actual} bytes, recorded {size}"


def _plain(value: Any) -> Any:
    """A manifest value as JSON would hold it (tuples -> lists, records -> objects), for comparisons."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _weights_difference(previous: Manifest, new: Manifest) -> str | None:
    old, now = previous.weights, new.weights
    if old is None or now is None:
        return "weights not recorded in its manifest.json"
    if old.random != now.random:
        return f"{'random' if old.random else 'real'} weights, this run {'random' if now.random else 'real'}"
    if old.sha256 != now.sha256 or (old.random and old.source != now.source):
        shown = (old.source, now.source) if old.random else (f"{old.sha256[:12]}…", f"{now.sha256[:12]}…")
        return f"other weights ({shown[0]}; this run {shown[1]})"
    return None


def model_differences(previous: Manifest, new: Manifest) -> list[str]:
    """What says ``previous`` (a folder's manifest) describes another model than ``new``; [] when none."""
    if previous.variant != new.variant:
        return [f"variant {previous.variant} (this run {new.variant})"]
    found = [d for d in (_weights_difference(previous, new),) if d]
    for name in MODEL_FACTS[1:]:
        old, now = getattr(previous, name), getattr(new, name)
        found.extend(_changes(name, _plain(old), _plain(now)))
    return found


def _changes(name: str, old: Any, now: Any) -> list[str]:
    """``name old (this run now)`` for each differing value; objects compared key by key, a key the folder's
    manifest does not record (an older version's) is not compared, nor the embedding's prose."""
    if old is None or name == "embedding.layout":
        return []
    if isinstance(old, dict) and isinstance(now, dict):
        keys = sorted(set(old) | set(now))
        return [c for k in keys for c in _changes(f"{name}.{k}", old.get(k), now.get(k))]
    return [] if old == now else [f"{name} {json.dumps(old)} (this run {json.dumps(now)})"]


def check_same_model(
    previous: Manifest,
    new: Manifest,
    out_dir: Path,
    replaced: Sequence[str],
    io: Mapping[str, Any],
) -> None:
    """Refuse (:class:`OutputError`, one line) to add ``new``'s artifacts to ``out_dir`` unless it holds the
    same model, and its artifacts that this run keeps (not in ``replaced``) have the ``io`` this run's have
    ("opset", "inputs", "outputs"; a key an artifact does not record is not compared)."""
    found = model_differences(previous, new)
    if found:
        raise OutputError(
            f"{out_dir} holds an export of another model: {'; '.join(found)}. An export adds precisions "
            f"only to the same model's folder: {_ROOM} (its other files are kept, unlisted)"
        )
    for artifact in previous.artifacts:
        if artifact.path in replaced:
            continue
        recorded = {"opset": artifact.extra.get("opset"), "inputs": artifact.inputs}
        recorded["outputs"] = artifact.outputs
        rebuild = (
            "pass --tensorrt to rebuild it"
            if artifact.format == "tensorrt"
            else f"add {artifact.precision} to --precision to rebuild it too"
        )
        for key, value in io.items():
            if recorded.get(key) is not None and _plain(recorded[key]) != _plain(value):
                was, now = _shown(recorded[key]), _shown(value)
                found.append(f"{artifact.path} with {key} {was} (this run {now}; {rebuild})")
    if found:
        raise OutputError(
            f"{out_dir} holds an export with other inputs/outputs: {'; '.join(found)}. Artifacts kept in a "
            f"folder share this run's inputs and outputs: {_ROOM} (its other files are kept, unlisted)"
        )


def _shown(value: Any) -> str:
    """An opset as a number, inputs or outputs by their names only (``embedding,patch_tokens``)."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v.get("name")) if isinstance(v, Mapping) else str(v) for v in value)
    return json.dumps(_plain(value))


def merge(previous: Manifest | None, new: Manifest, keep_batch: bool, warn_stale: bool = True) -> Manifest:
    """``new`` (this run's facts and artifacts) with ``previous``'s artifacts it does not replace.

    Replaced entries keep their place, new ones are appended. A kept artifact made with other package
    versions keeps its own ``versions`` and ``created``. ``keep_batch``: keep the folder's batch profile
    (no --max-batch given). A kept engine built from another ONNX than the one now listed is dropped, with
    a warning unless not ``warn_stale`` (--tensorrt: this run builds the engine next); one built from the
    ONNX still listed stays, so a failed build leaves the folder's valid engine listed.
    """
    if previous is None:
        return new
    made = {a.path: a for a in new.artifacts}
    artifacts = [made.pop(a.path) if a.path in made else _kept(a, previous, new) for a in previous.artifacts]
    artifacts = _without_stale_engines([*artifacts, *made.values()], warn_stale)
    batch = previous.batch if keep_batch and previous.batch is not None else new.batch
    return dataclasses.replace(new, artifacts=tuple(artifacts), batch=batch)


def _without_stale_engines(artifacts: list[Artifact], warn: bool) -> list[Artifact]:
    """``artifacts`` without the engines built from another ONNX than the one listed (its recorded
    ``onnx_sha256``): the engine file stays, unlisted, with one warning if ``warn``."""
    onnx = {a.path: a.sha256 for a in artifacts if a.format != "tensorrt"}
    stale = [
        a
        for a in artifacts
        if a.format == "tensorrt"
        and a.extra.get("onnx_sha256") is not None
        and onnx.get(a.extra.get("onnx_path")) not in (None, a.extra["onnx_sha256"])
    ]
    if stale and warn:
        names = ", ".join(f"{a.path} (from {a.extra['onnx_path']})" for a in stale)
        warnings.warn(
            f"{names}: built from an earlier ONNX than the one now listed, so no longer listed in "
            "manifest.json (the file is kept); rebuild it with `virchow-rt export ... --tensorrt`",
            stacklevel=3,
        )
    return [a for a in artifacts if a not in stale]


def _kept(artifact: Artifact, previous: Manifest, new: Manifest) -> Artifact:
    if "versions" in artifact.extra or previous.versions in (None, new.versions):
        return artifact
    extra = {**artifact.extra, "versions": dict(previous.versions or {}), "created": previous.created}
    return dataclasses.replace(artifact, extra=extra)


class RollbackFailed(OutputError):
    """A failed export could not put the folder's old files back; they are kept where the message says."""


def check_targets(out_dir: Path, names: Sequence[str]) -> None:
    """Refuse (:class:`OutputError`, one line) when a file this export would write in ``out_dir`` is there
    as a folder: a run moves aside and replaces files only, never a folder it did not make."""
    for name in names:
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            raise OutputError(
                f"{target} is a folder, where this export writes a file; move or rename it, or export "
                "into a new folder"
            )


def commit(staging: Path, out_dir: Path, artifacts: Sequence[Artifact], manifest: Manifest) -> None:
    """Move staged ``artifacts`` from ``staging`` into ``out_dir``, then write ``manifest`` (atomically).

    External data go first, so a graph never points at a missing file; a file replaced (and the stale
    external data of a graph that now has none) is moved aside into ``staging``, not deleted, so that a
    failure anywhere before the manifest is renamed into place puts every old file back and removes the new
    ones: the folder then holds the old export exactly as its old manifest lists it. Once the new manifest is
    in place the commit is done: an interrupt after it (during the folder's fsync) is raised, nothing undone,
    so the manifest and the files agree. If putting them back fails too, :class:`RollbackFailed` names where
    they are (``staging`` must then be kept).
    """
    names = [n for a in artifacts for n in (a.path, a.external_data or f"{a.path}.data")]
    check_targets(out_dir, names)  # before anything moves
    aside = Path(staging) / ".replaced"
    aside.mkdir()
    old_manifest = _identity(out_dir / MANIFEST_NAME)
    moves: list[tuple[Path, Path | None]] = []  # (a target in out_dir, the old file moved aside or None)

    def move_aside(target: Path) -> None:
        old = None
        if os.path.lexists(target):
            old = aside / target.name
            os.replace(target, old)
        moves.append((target, old))

    try:
        for entry in artifacts:
            if entry.external_data:
                move_aside(out_dir / entry.external_data)
                os.replace(staging / entry.external_data, out_dir / entry.external_data)
        for entry in artifacts:
            move_aside(out_dir / entry.path)
            os.replace(staging / entry.path, out_dir / entry.path)
            if not entry.external_data and os.path.lexists(out_dir / f"{entry.path}.data"):
                move_aside(out_dir / f"{entry.path}.data")  # the old graph's weights: not this one's
        manifest.write(out_dir)
    except BaseException as err:
        if _identity(out_dir / MANIFEST_NAME) != old_manifest:
            raise  # the new manifest is in place (a Ctrl-C during the folder's fsync): done, nothing to undo
        try:
            for target, old in reversed(moves):
                if old is not None:
                    os.replace(old, target)
                else:
                    target.unlink(missing_ok=True)  # created by this run: nothing was there
        except BaseException as undo:  # a second Ctrl-C, a full disk: the old files must not be deleted
            raise RollbackFailed(
                f"the export into {out_dir} failed ({type(err).__name__}: {err}) and putting its old files "
                f"back failed too ({type(undo).__name__}: {undo}); they are kept in {aside}: move them "
                f"back into {out_dir}, then delete {staging}"
            ) from undo
        raise


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` is (device, inode), or None: the new manifest, written beside the old one and
    renamed onto it, is another file."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino
