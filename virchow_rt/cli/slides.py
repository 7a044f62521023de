"""``virchow-rt slides``: the command-line adapter over :func:`~virchow_rt.slides.process_slides`.

The tiling and embedding flags come from :class:`~virchow_rt.slides.SlideSettings`' fields (flag, default,
help: one place); this module adds what is not a setting (slides, model, output folder, backend, Ray), turns
parsed arguments into settings, makes a scheduler's SIGTERM stop the run as Ctrl-C does, and prints the
run's totals.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virchow_rt.cli.common import Help, add_backend, add_engine_host_code, csv_ints, sigterm_as_interrupt
from virchow_rt.slides.settings import SlideSettings

#: argparse types of the settings' annotations (a bool is a switch)
_TYPES = {"float": float, "int": int, "str": str, "tuple[float, ...]": csv_ints}


def _add_settings(p: argparse.ArgumentParser, target: Any) -> None:
    """One flag per :class:`SlideSettings` field that has one (``--mpp`` in ``target``, beside ``--mag``)."""
    for f in dataclasses.fields(SlideSettings):
        flag = f.metadata.get("flag")
        if flag is None:
            continue
        cli = dict(f.metadata["cli"])
        kwargs: dict[str, Any] = {"dest": f.name, "default": cli.pop("cli_default", f.default),
                                  "help": f.metadata["help"], **cli}  # fmt: skip
        kind = str(f.type).removesuffix(" | None")
        if kind == "bool":
            kwargs.setdefault("action", "store_true")
        elif "action" not in kwargs:
            kwargs["type"] = _argument_type(kwargs.get("type", _TYPES[kind]))
        (target if f.name == "mpp" else p).add_argument(flag, **kwargs)


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its :class:`InputError` becomes argparse's one-line usage error."""
    from virchow_rt.errors import InputError

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except InputError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in its own errors
    return convert


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slides",
        formatter_class=Help,
        help="whole slides -> tissue tiles -> embeddings (.h5, TRIDENT/CLAM layout)",
    )
    p.add_argument(
        "slides", nargs="+", help="slide files (any format OpenSlide or tifffile reads) or folders"
    )
    p.add_argument(
        "--model", required=True, help="exported model: an export folder, an .onnx or a TensorRT .engine"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="<slide>.h5 files and summary.json go here")
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--mag", type=float, default=None, help="target magnification, TRIDENT's spelling: 20 is --mpp 0.5"
    )
    _add_settings(p, target)
    add_backend(p)
    add_engine_host_code(p)
    p.add_argument(
        "--clear-stale-locks",
        action="store_true",
        help="first remove the slide locks in --out whose holders are gone (their lease ran out, or their "
        "process ended on this machine); live locks are kept. Runs take such locks over anyway",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="spread the slides over Ray workers: local (a new Ray instance: every GPU of this machine), "
        "auto (the cluster started with `ray start`) or a Ray address; needs pip install 'virchow-rt[ray]'",
    )
    p.add_argument(
        "--ray-workers",
        type=int,
        default=None,
        help="Ray workers, each with the model open (default: one per GPU; without GPUs one per 8 CPUs)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs each Ray worker takes (default 1 where there are GPUs)",
    )
    p.set_defaults(handler=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """``virchow-rt slides``: returns 0 when every slide is done or skipped, 1 when any failed."""
    from virchow_rt.errors import InputError
    from virchow_rt.slides import locks, process_slides, process_slides_ray
    from virchow_rt.slides.grid import magnification_to_mpp
    from virchow_rt.slides.summary import SUMMARY_NAME

    settings = SlideSettings.from_options(vars(args))
    if args.mag is not None:
        settings = dataclasses.replace(settings, mpp=magnification_to_mpp(args.mag))
    if args.ray and settings.cache_dir:
        raise InputError(
            "--cache-dir is not used by Ray workers (each reads its slides in place); run without --ray, or "
            "without --cache-dir"
        )
    if args.ray and args.allow_engine_host_code:
        raise InputError(
            "--allow-engine-host-code is not passed on to Ray workers; run without --ray, or build the "
            "engine without --version-compatible (it then needs no host code)"
        )
    if args.clear_stale_locks and Path(args.out).is_dir():
        settings.check()  # a lease that makes no sense must not judge anyone's lock
        removed, kept = locks.clear_stale_locks(Path(args.out), settings.lock_lease)
        for path, _, why in removed:  # named under --out: a mirrored slide's lock is in its sub-folder
            what = "lock" if path.name.endswith(".lock") else "file"
            print(f"virchow-rt slides: removed {what} {path.relative_to(args.out)} ({why})", file=sys.stderr)
        for path, holder in kept:
            print(
                f"virchow-rt slides: kept lock {path.relative_to(args.out)}: its run is live "
                f"({holder.describe()})",
                file=sys.stderr,
            )
    try:
        with sigterm_as_interrupt():
            if args.ray:
                summary = process_slides_ray(
                    args.slides,
                    args.model,
                    args.out,
                    settings,
                    address=args.ray,
                    workers=args.ray_workers,
                    gpus_per_worker=args.gpus_per_worker,
                    backend=args.backend,
                )
            elif args.allow_engine_host_code:  # opened here, the one way such an engine is allowed
                from virchow_rt.backends import open_backend

                with open_backend(args.model, args.backend, allow_engine_host_code=True) as backend:
                    summary = process_slides(args.slides, backend, args.out, settings)
            else:
                summary = process_slides(args.slides, args.model, args.out, settings, backend=args.backend)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"nothing half-written was left in {args.out}; rerun the same command to resume (complete slides "
            "are kept and skipped)"
        ) from None
    totals = summary["totals"]
    rate = f", {totals['job_tiles_per_s']:.1f} tiles/s" if totals["tiles_embedded"] else ""
    print(
        f"{totals['done']} done, {totals['skipped']} skipped (complete), {totals['failed']} failed; "
        f"{totals['tiles_embedded']} tiles embedded{rate}; summary: {Path(args.out) / SUMMARY_NAME}"
    )
    return 1 if totals["failed"] else 0  # each failure was printed once, as it happened
