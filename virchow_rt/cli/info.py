"""``virchow-rt info`` (what this machine can run) and ``virchow-rt list`` (the encoders)."""

from __future__ import annotations

import argparse
import json

from virchow_rt.cli.common import Help


def add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        formatter_class=Help,
        help="what this machine can run: CPU/GPU, ONNX Runtime providers, TensorRT, CUDA",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run_info)


def run_info(args: argparse.Namespace) -> int:
    from virchow_rt.backends.capabilities import capabilities

    caps = capabilities()
    if args.json:
        print(json.dumps(caps, indent=2))
    else:
        for key, value in caps.items():
            print(f"{key:>24}: {value}")
    return 0


def add_list_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list",
        formatter_class=Help,
        help="the encoders: architecture, size, embedding, preprocessing, magnification, licence",
    )
    p.add_argument("--json", action="store_true", help="print JSON (every field)")
    p.set_defaults(handler=run_list)


def run_list(args: argparse.Namespace) -> int:
    from virchow_rt.encoders import describe, table
    from virchow_rt.registry import VARIANTS

    print(json.dumps([describe(v) for v in VARIANTS.values()], indent=2) if args.json else table())
    return 0
