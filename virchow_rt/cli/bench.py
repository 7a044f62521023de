"""``virchow-rt bench``: throughput and parity of every backend here against the PyTorch reference."""

from __future__ import annotations

import argparse

from virchow_rt.benchmark.source import DEFAULTS
from virchow_rt.cli.common import Help, add_weights, csv, csv_ints


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        formatter_class=Help,
        help="throughput and parity of every available backend against the PyTorch reference",
    )
    p.add_argument("model", help="a variant name (exported on the fly) or an export folder / .onnx")
    add_weights(p)
    p.add_argument(
        "--backends",
        type=csv,
        default=None,
        help="comma-separated rows: a backend as `embed --backend` names it (onnxruntime-cpu, tensorrt, "
        "torch-cuda, ...; torch-eager and torch-compile for the PyTorch reference) or backend/precision "
        "(default: every row this machine can run)",
    )
    cpu, gpu = DEFAULTS["cpu"], DEFAULTS["cuda"]

    def default(field: str) -> str:
        show = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
        return f"default: {show(getattr(cpu, field))} on a CPU, {show(getattr(gpu, field))} on a GPU"

    p.add_argument(
        "--batch-sizes",
        type=csv_ints,
        default=None,
        help=f"comma-separated batch sizes ({default('batch_sizes')})",
    )
    p.add_argument("--tiles", type=int, default=None, help=f"tiles per timed run ({default('tiles')})")
    p.add_argument("--repeats", type=int, default=None, help=f"timed repeats per row ({default('repeats')})")
    p.add_argument("--warmup", type=int, default=None, help=f"warm-up batches per row ({default('warmup')})")
    p.add_argument("--machine", default=None, metavar="TEXT", help="machine name for the report")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="report.json, report.md, plots and rows.jsonl (each row as it is measured) go here",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from virchow_rt.benchmark import run_cli

    return run_cli(args)
