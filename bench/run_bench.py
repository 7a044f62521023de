#!/usr/bin/env python
"""Thin entry point: ``python bench/run_bench.py MODEL [options]`` is ``virchow-rt bench MODEL [options]``.

All the work is done by :mod:`virchow_rt.benchmark`; see ``virchow-rt bench --help`` (``--machine``
names the machine in the report, ``--warmup`` sets the warm-up batches per row).
"""

from __future__ import annotations

import sys

from virchow_rt.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
