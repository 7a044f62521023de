"""``virchow-rt export``: a variant's weights -> ONNX (fp32, fp16, int8) and TensorRT engines, with parity."""

from __future__ import annotations

import argparse
import sys

from virchow_rt.cli.common import Help, add_weights, csv, sigterm_as_interrupt
from virchow_rt.registry import VARIANTS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", formatter_class=Help, help="export a variant to ONNX (fp32, fp16) and optionally TensorRT"
    )
    p.add_argument("variant", help=f"one of: {', '.join(VARIANTS)} (NAME-tiny for a tiny test config)")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output folder (manifest.json is written there); a folder holding an export of the same model "
        "keeps its other precisions: --precision adds or rebuilds only those asked for",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="--out holds another model's export: list only this export in its manifest.json (no file is "
        "deleted; same-named files are replaced)",
    )
    add_weights(p)
    p.add_argument(
        "--precision",
        type=csv,
        default=["fp32", "fp16"],
        help="comma-separated: fp32,fp16 (default), int8 (ONNX Runtime on a CPU: faster, less exact)",
    )
    p.add_argument("--max-batch", type=int, default=None, help="largest batch of the TensorRT profile")
    p.add_argument("--outputs", type=csv, default=["embedding"], help="embedding[,patch_tokens]")
    p.add_argument("--parity-tiles", type=int, default=32, help="real-tissue tiles used for the parity check")
    p.add_argument(
        "--tensorrt", action="store_true", help="also build a TensorRT fp16 engine from the fp16 ONNX"
    )
    p.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT builder workspace limit")
    p.add_argument(
        "--version-compatible", action="store_true", help="engine runs on later TensorRT and the lean runtime"
    )
    p.add_argument(
        "--exclude-lean-runtime", action="store_true", help="with --version-compatible: omit the lean runtime"
    )
    p.add_argument(
        "--triton",
        metavar="REPO",
        default=None,
        help="also write a Triton model repository entry, REPO/<variant> (defaults of `virchow-rt triton`)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from virchow_rt.errors import InputError
    from virchow_rt.export.pipeline import export_model

    if args.exclude_lean_runtime and not (args.tensorrt and args.version_compatible):
        raise InputError("--exclude-lean-runtime needs --tensorrt --version-compatible")

    with sigterm_as_interrupt() as release:  # a killed export rolls back (old files back, staging removed)
        manifest = export_model(
            args.variant,
            args.out,
            weights=args.weights,
            random_weights=args.random_weights,
            precisions=args.precision,
            max_batch=args.max_batch,
            outputs=args.outputs,
            parity_tiles=args.parity_tiles,
            tensorrt=args.tensorrt,
            tensorrt_options={
                "workspace_gib": args.workspace_gib,
                "version_compatible": args.version_compatible,
                "exclude_lean_runtime": args.exclude_lean_runtime,
            },
            progress=sys.stderr.isatty(),
            overwrite=args.overwrite,
            before_tensorrt=release,  # the ONNX is committed: SIGTERM may stop the build (minutes in C)
        )
    for artifact in manifest.artifacts:
        print(f"{artifact.path}: {artifact.precision} {artifact.format}, parity {artifact.parity_summary}")
    print(f"manifest: {args.out}/manifest.json")
    if args.triton:
        from virchow_rt.serve.triton import write_triton_repository

        print(f"Triton model: {write_triton_repository(args.out, args.triton)}")
    return 0
