#!/usr/bin/env python
"""Thin entry point of the GPU-truth check (see ``virchow_rt/benchmark/gpu_check.py`` for the steps).

    python bench/gpu_check.py --out DIR [--budget SECONDS]   on a GPU machine
    python bench/gpu_check.py --dry-run --out DIR            the same steps, tiny, on any machine

``bench/gpu_check.sh`` installs the project (without network) and calls this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from virchow_rt.benchmark.gpu_check import run_gpu_check


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/gpu-check"), help="at most 8 files are written here")
    p.add_argument("--dry-run", action="store_true", help="tiny configs on any machine; GPU steps skipped")
    p.add_argument("--budget", type=float, default=None, help="seconds the steps may take (default 480)")
    args = p.parse_args(argv)
    result = run_gpu_check(args.out, dry_run=args.dry_run, budget_s=args.budget)
    failed = [name for name, step in result["steps"].items() if step["status"] == "failed"]
    print(
        f"gpu check: {len(result['steps'])} steps in {result['duration_s']} s on {result['machine']}; "
        f"failed: {', '.join(failed) or 'none'}; results in {args.out}/"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
