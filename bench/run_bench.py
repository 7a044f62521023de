#!/usr/bin/env python
"""Thin entry point: ``python bench/run_bench.py MODEL [bench options] [--machine TEXT] [--warmup N]``.

Same as ``virchow-rt bench``, plus two options the CLI may not have yet: ``--machine`` (a name for
the machine, written into the report) and ``--warmup`` (warm-up batches per row). All the work is
done by :mod:`virchow_rt.benchmark`.
"""

from __future__ import annotations

import argparse
import sys

from virchow_rt.benchmark import run_cli
from virchow_rt.cli import build_parser
from virchow_rt.errors import VirchowError


def main(argv: list[str] | None = None) -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--machine", default=None, help="name of the machine for the report")
    extra.add_argument("--warmup", type=int, default=None, help="warm-up batches per row")
    known, rest = extra.parse_known_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(["bench", *rest])
    args.machine, args.warmup = known.machine, known.warmup
    try:
        return run_cli(args)
    except VirchowError as err:
        print(f"run_bench: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
