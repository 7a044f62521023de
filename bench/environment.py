#!/usr/bin/env python
"""Thin entry point: print the environment block a benchmark report records (CPU, GPU, driver, versions)."""

from __future__ import annotations

import json

from virchow_rt.benchmark.environment import collect_environment

if __name__ == "__main__":
    print(json.dumps(collect_environment(), indent=2))
