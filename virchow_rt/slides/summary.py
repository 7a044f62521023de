"""``summary.json`` and the per-slide state files it is built from: the only module that reads or writes them.

A slide's state is ``<out>/slide_states/<key>.json`` (its key: its name, or with ``--mirror-folders`` its
path under the folder given, without the suffix): the :class:`SlideRecord` of the last run that held the
slide's lock (done, failed, interrupted, or skipped when a complete file had no state yet). Only a lock holder
writes it, so runs and hosts sharing a folder never overwrite each other's news; a run that found a slide
locked, or never got to it, writes none, and a "done" state is never replaced by a run that merely skipped
the slide. ``summary.json`` is rebuilt from the states at the end of every run, under a file lock:

    slides      one record per slide of the folder: its state (else this run's record, else the record an
                earlier summary.json kept), this run's slides first in the order given
    this_run    this run's outcome per slide given: name, path, status, reason
    failures    the folder's slides whose state is failed, with their reasons
    totals      this run's counts, tiles and timings
    model, settings, started, finished, runs (how many runs wrote it)
    ray         a --ray job's workers (and those left at the end), their hosts, the workers it lost

State files and the summary are written durably: a temporary file, fsynced, renamed, then the folder fsynced,
so a power cut leaves the old version or the new one, never an empty file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from virchow_rt.files import file_lock, write_json
from virchow_rt.slides.reader import slide_file
from virchow_rt.slides.settings import SlideSettings

SUMMARY_NAME = "summary.json"
STATES_DIR = "slide_states"
SCHEMA_VERSION = 2
#: skipped-tile errors listed per slide (the count is always complete)
MAX_LISTED_ERRORS = 20
#: a state file larger than this is not one of ours: ignored
MAX_STATE_BYTES = 1 << 20
#: what a run records about a slide it did not hold the lock of, or found complete: never a slide's news
NOT_NEWS = ("locked", "not started", "skipped")
NOT_DONE = ("locked", "interrupted", "not started")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class SlideRecord:
    """What happened to one slide (one entry of ``summary.json``'s ``slides``, and a slide's state file)."""

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
    attempts: int | None = None  # a --ray run: times it was handed to a worker (a lost worker's goes on)
    reader: str | None = None
    level0_mpp: float | None = None
    read_level: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    tiles_per_s: float | None = None

    @classmethod
    def for_slide(cls, path: Path, key: str | None = None, **fields: Any) -> SlideRecord:
        """The record of slide ``path``, named by its key (:func:`~virchow_rt.slides.reader.keyed_slides`;
        default: its name)."""
        return cls(name=key or path.stem, path=str(path), **fields)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlideRecord:
        """A record from its JSON form: keys it does not know (another version's) and values of the wrong type
        are left out; a ``TypeError`` when ``name`` or ``path`` is not a string."""
        return cls(**{k: v for k, v in data.items() if k in _KINDS and _is_kind(v, _KINDS[k])})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_kind(value: Any, kind: Any) -> bool:
    """``value`` is of ``kind``: a type or tuple of types (a bool is none of them), or ``"strings"`` (a list
    of strings), ``"numbers"`` (a dict of numbers), ``"objects"`` (a list of dicts of plain values)."""
    if kind == "strings":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "numbers":
        return isinstance(value, dict) and all(_is_kind(v, (int, float)) for v in value.values())
    if kind == "objects":
        plain = (str, int, float, bool, type(None))
        return isinstance(value, list) and all(
            isinstance(v, dict) and all(isinstance(x, plain) for x in v.values()) for v in value
        )
    return isinstance(value, kind) and not isinstance(value, bool)


_OPT_STR, _OPT_INT, _OPT_FLOAT = (str, type(None)), (int, type(None)), (int, float, type(None))
#: the JSON type of each field of a record (what a state file from elsewhere must hold to be read)
_KINDS: dict[str, Any] = {
    "name": str, "path": str, "status": str, "output": _OPT_STR, "reason": _OPT_STR,
    "redone_because": _OPT_STR, "warnings": "strings", "tiles": int, "regions": _OPT_INT,
    "embedded_tiles": int, "skipped_tiles": int, "skipped_tile_errors": "objects", "host": _OPT_STR,
    "worker": _OPT_STR, "attempts": _OPT_INT, "reader": _OPT_STR, "level0_mpp": _OPT_FLOAT,
    "read_level": _OPT_INT, "timings": "numbers", "tiles_per_s": _OPT_FLOAT,
}  # fmt: skip


@dataclass(frozen=True)
class ModelEntry:
    """The summary's ``model``: the file and hash every output records, and what the model is."""

    file: str
    sha256: str
    variant: str
    precision: str
    backend: str
    random_weights: bool
    weights_sha256: str
    embedding_dim: int
    pooling: str


def state_path(out_dir: Path, name: str) -> Path:
    """``<out>/slide_states/<name>.json`` (``name``: the slide's key, which may hold sub-folders)."""
    return slide_file(Path(out_dir) / STATES_DIR, name, ".json")


def read_state(out_dir: Path, name: str) -> SlideRecord | None:
    """The slide's state, or None when it has none (or it cannot be read)."""
    return _read_record(state_path(out_dir, name))


def write_state(out_dir: Path, record: SlideRecord) -> None:
    """Record ``record`` as the slide's state (call only while holding the slide's lock)."""
    path = state_path(out_dir, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"schema_version": 1, **record.to_dict()}, indent=1)


def read_states(out_dir: Path) -> dict[str, SlideRecord]:
    """Every slide's state in ``out_dir`` by slide key (unreadable files are left out)."""
    states = {}
    root = Path(out_dir) / STATES_DIR
    for path in sorted(root.rglob("*.json")):  # a mirrored slide's state is in its sub-folder
        record = _read_record(path)
        if record is not None and record.name == path.relative_to(root).with_suffix("").as_posix():
            states[record.name] = record
    return states


def _read_record(path: Path) -> SlideRecord | None:
    data = _read_json(path, MAX_STATE_BYTES)
    try:
        return SlideRecord.from_dict(data) if isinstance(data, dict) else None
    except TypeError:  # no name or path
        return None


def _read_json(path: Path, limit: int) -> Any:
    """The JSON of the regular file at ``path`` (not a link, a FIFO or a device: those are not ours, and
    would hang or fill memory), or None when it is not one, is over ``limit`` bytes or is not JSON."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            raw = fh.read(limit + 1)
            return json.loads(raw) if len(raw) <= limit else None
        except (OSError, ValueError, RecursionError):  # ValueError: not JSON, not UTF-8
            return None


def write_summary(
    out_dir: Path,
    records: list[SlideRecord],
    settings: SlideSettings,
    model: ModelEntry,
    started: str,
    wall_s: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Rebuild ``summary.json`` from the slides' states and this run's ``records``; returns it.

    A record still pending (the slide in progress when the run was stopped) is recorded as interrupted.
    """
    for record in records:
        if record.status == "pending":
            record.status, record.reason = "interrupted", "the run was stopped; rerun to resume"
    out_dir = Path(out_dir)
    (out_dir / STATES_DIR).mkdir(parents=True, exist_ok=True)
    # one writer at a time: the last one reads every state written before it
    with file_lock(out_dir / STATES_DIR / "summary"):
        earlier = _read_summary(out_dir / SUMMARY_NAME)
        slides = _folder_slides(records, read_states(out_dir), earlier.get("slides", []))
        summary = {
            "schema_version": SCHEMA_VERSION,
            "started": started,
            "finished": now(),
            "model": asdict(model),
            "settings": {**asdict(settings), "regions": settings.regions_text or None},
            "slides": [r.to_dict() for r in slides],
            "this_run": [
                {"name": r.name, "path": r.path, "status": r.status, "reason": r.reason} for r in records
            ],
            "failures": [
                {"name": r.name, "path": r.path, "reason": r.reason} for r in slides if r.status == "failed"
            ],
            "totals": _totals(records, wall_s),
            "runs": _count(earlier.get("runs")) + 1,
            **(extra or {}),
        }
        write_json(out_dir / SUMMARY_NAME, summary)
    return summary


def _folder_slides(
    records: list[SlideRecord], states: dict[str, SlideRecord], earlier: list[Any]
) -> list[SlideRecord]:
    """One record per slide: its state, else this run's, else the earlier summary's ("done" is kept over
    what a run that did not hold the slide says)."""
    before = {}
    for item in earlier if isinstance(earlier, list) else []:
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            try:
                before[item["name"]] = SlideRecord.from_dict(item)
            except TypeError:
                continue
    chosen: dict[str, SlideRecord] = {}
    for record in records:
        kept = before.get(record.name)
        if record.status in NOT_NEWS and kept is not None and kept.status == "done":
            record = kept
        chosen[record.name] = states.get(record.name, record)
    for name in sorted(set(states) | set(before)):
        if name not in chosen:
            chosen[name] = states.get(name) or before[name]
    return list(chosen.values())


def _totals(records: list[SlideRecord], wall_s: float) -> dict[str, Any]:
    done = [r for r in records if r.status == "done"]
    sums = {
        key: sum(r.timings.get(key, 0.0) for r in done)
        for key in ("read_s", "read_wait_s", "embed_s", "write_s")
    }
    busy = sum(r.timings.get("total_s", 0.0) for r in done)
    embedded = sum(r.embedded_tiles for r in done)
    return {
        "slides": len(records),
        "done": len(done),
        "skipped": sum(r.status == "skipped" for r in records),
        "failed": sum(r.status == "failed" for r in records),
        "not_done": sum(r.status in NOT_DONE for r in records),
        "tiles_embedded": embedded,
        "wall_s": wall_s,
        **sums,
        "tiles_per_s": embedded / busy if busy > 0 else None,  # per slide being embedded
        "job_tiles_per_s": embedded / wall_s if wall_s > 0 else None,  # the whole run, all workers
    }


def _read_summary(path: Path) -> dict[str, Any]:
    data = _read_json(path, 64 * MAX_STATE_BYTES)
    return data if isinstance(data, dict) else {}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
