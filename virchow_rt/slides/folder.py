"""One output folder, one configuration: ``<out>/run_config.json``, and a summary that accumulates.

Mixing configurations in one folder (another model, pooling, µm/px, tile size or regions) would leave
files of different dimensions and grids side by side. The first run writes the configuration; a later
run with another one is refused with both named (TRIDENT keeps each configuration in its own folder;
so does virchow-rt: use another ``--out``). ``summary.json`` lists every slide any run of the folder
handled, the latest record of each: this run's first, then the earlier ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from virchow_rt.errors import OutputError
from virchow_rt.files import write_json

CONFIG_NAME = "run_config.json"


def claim(out_dir: Path, config: dict[str, Any]) -> None:
    """Record ``config`` for ``out_dir``, or check it against the recorded one (else :class:`OutputError`)."""
    path = out_dir / CONFIG_NAME
    if not path.exists():
        write_json(path, config)
        return
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OutputError(
            f"{path} cannot be read ({err}); remove it if the folder is yours to reuse"
        ) from err
    changed = [
        f"{key} {recorded.get(key)!r} -> {config[key]!r}"
        for key in config
        if recorded.get(key) != config[key]
    ]
    if changed:
        raise OutputError(
            f"--out {out_dir} holds features of another configuration ({'; '.join(changed)}); one folder "
            "holds one configuration: give this run another --out (or empty the folder to start over)"
        )


def merge_summary(out_dir: Path, name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with the slides of earlier runs of the folder kept (this run's record wins per slide)."""
    path = out_dir / name
    try:
        earlier = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        earlier = {}
    now = {s["name"] for s in summary["slides"]}
    kept = [s for s in earlier.get("slides", []) if s.get("name") not in now]
    return {**summary, "slides": summary["slides"] + kept, "runs": int(earlier.get("runs", 0)) + 1}


def write_pt(out_dir: Path, h5: Path) -> Path:
    """``<out>/pt_files/<slide>.pt`` from a complete ``.h5``: its features as one (N, E) float32 tensor, the
    file CLAM's MIL loader reads (``torch.load``). Written atomically; torch is needed (the export extra)."""
    from virchow_rt._deps import optional_import
    from virchow_rt.files import atomic_path
    from virchow_rt.slides.writer import read_features

    torch = optional_import("torch", "to write CLAM's pt_files (--also-pt)")
    target = out_dir / "pt_files" / f"{h5.stem}.pt"
    features = read_features(h5)["features"]  # (N, E) float32
    with atomic_path(target) as tmp:
        torch.save(torch.from_numpy(features), tmp)
    return target
