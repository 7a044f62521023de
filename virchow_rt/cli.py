"""virchow-rt: fast, offline inference for pathology foundation models (Virchow, UNI, H-optimus, ...).

Each subcommand parses its arguments here and hands them to the library; errors from the
:mod:`virchow_rt.errors` hierarchy become one line on stderr and a non-zero exit code
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from virchow_rt.errors import RandomWeightsWarning, VirchowError
from virchow_rt.registry import POOLINGS, VARIANTS
from virchow_rt.runtime import BACKENDS


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in _csv(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


class _Help(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless it has none (None, off) or its help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or action.required:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _add_weights(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--weights",
        metavar="PATH",
        help="Hugging Face-layout folder (config.json + pytorch_model.bin or model.safetensors), "
        "a state-dict file, or a model id in the local Hugging Face cache (never downloaded)",
    )
    g.add_argument(
        "--random-weights", action="store_true", help="use random weights (for tests and demos only)"
    )


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", formatter_class=_Help, help="export a variant to ONNX (fp32, fp16) and optionally TensorRT"
    )
    p.add_argument("variant", help=f"one of: {', '.join(VARIANTS)} (NAME-tiny for a tiny test config)")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (manifest.json is written there)"
    )
    _add_weights(p)
    p.add_argument(
        "--precision",
        type=_csv,
        default=["fp32", "fp16"],
        help="comma-separated: fp32,fp16 (default), int8 (ONNX Runtime on a CPU: faster, less exact)",
    )
    p.add_argument("--max-batch", type=int, default=None, help="largest batch of the TensorRT profile")
    p.add_argument("--outputs", type=_csv, default=["embedding"], help="embedding[,patch_tokens]")
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
    p.set_defaults(handler=_run_export)


def _add_triton(sub: argparse._SubParsersAction) -> None:
    from virchow_rt.export.triton import PLATFORMS

    p = sub.add_parser(
        "triton",
        formatter_class=_Help,
        help="an export -> a Triton Inference Server model repository entry (config.pbtxt + model)",
    )
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="a folder written by `virchow-rt export`")
    p.add_argument("repo", metavar="REPO", help="the model repository; REPO/<name> is written")
    p.add_argument("--name", default=None, help="the model's name in Triton (default: the variant)")
    p.add_argument(
        "--platform",
        choices=PLATFORMS,
        default="auto",
        help="auto: the TensorRT engines when the export has any, else the ONNX model",
    )
    p.add_argument("--precision", default="fp32", help="which ONNX model (fp32, fp16, int8)")
    p.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    p.add_argument("--instance-kind", choices=("gpu", "cpu"), default="gpu", help="where instances run")
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=2000,
        help="dynamic batching: how long a request may wait for others to fill a batch",
    )
    p.set_defaults(handler=_run_triton)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        formatter_class=_Help,
        help="serve embeddings over HTTP (KServe v2 as Triton speaks it, and POST /embed) on Ray Serve",
    )
    p.add_argument("model", help="exported model: an export folder, an .onnx or a TensorRT .engine")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--name", default=None, help="the model's name in URLs (default: the variant)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=64,
        help="tiles in one request, and in one merged model call, at most",
    )
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others")
    p.add_argument("--replicas", type=int, default=None, help="model replicas (default: one per GPU, else 1)")
    p.add_argument("--backend", default="auto", metavar="BACKEND", help=f"one of: {', '.join(BACKENDS)}")
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from virchow_rt.serve import run_server

    return run_server(
        args.model,
        host=args.host,
        port=args.port,
        name=args.name,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        replicas=args.replicas,
        backend=args.backend,
    )


def _run_triton(args: argparse.Namespace) -> int:
    from virchow_rt.export.triton import write_triton_repository

    target = write_triton_repository(
        args.export_dir,
        args.repo,
        name=args.name,
        platform=args.platform,
        precision=args.precision,
        instances=args.instances,
        instance_kind=args.instance_kind,
        max_queue_delay_us=args.max_queue_delay_us,
    )
    print(f"Triton model: {target} (serve with: tritonserver --model-repository {target.parent})")
    return 0


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", formatter_class=_Help, help="embed tiles with an exported model")
    p.add_argument("model", help="exported model: an export folder, an .onnx or a TensorRT .engine")
    p.add_argument(
        "tiles", nargs="+", help=".npy uint8 (N, H, W, 3) arrays, image files or folders of images"
    )
    p.add_argument(
        "--out", required=True, metavar="FILE.npy", help="embeddings (N, E) float32; FILE.json gets metadata"
    )
    p.add_argument("--batch", type=int, default=None, help="tiles per batch (default: the backend's fastest)")
    p.add_argument(
        "--pooling",
        choices=POOLINGS,
        default=None,
        help="cls_mean: class ‖ patch mean; cls: class token (default: the model's own: virchow-rt list)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        metavar="BACKEND",
        help=f"one of: {', '.join(BACKENDS)}",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="--backend torch-cuda: the export's weights (default: the source its manifest records)",
    )
    p.add_argument(
        "--resize",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="where tiles not of the model's size are resized (auto: the GPU when the backend runs on one)",
    )
    p.add_argument("--skip-errors", action="store_true", help="skip unreadable images and report them")
    p.add_argument(
        "--recursive", action="store_true", help="read sub-folders of the folders given too (TCGA/GDC layout)"
    )
    p.set_defaults(handler=_run_embed)


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        formatter_class=_Help,
        help="what this machine can run: CPU/GPU, ONNX Runtime providers, TensorRT, CUDA",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_run_info)


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list",
        formatter_class=_Help,
        help="the encoders: architecture, size, embedding, preprocessing, magnification, licence",
    )
    p.add_argument("--json", action="store_true", help="print JSON (every field)")
    p.set_defaults(handler=_run_list)


def _run_list(args: argparse.Namespace) -> int:
    import json

    from virchow_rt.encoders import describe, table
    from virchow_rt.registry import VARIANTS

    print(json.dumps([describe(v) for v in VARIANTS.values()], indent=2) if args.json else table())
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        formatter_class=_Help,
        help="export the mini variant (random weights) and embed bundled real-tissue tiles",
    )
    p.add_argument("--variant", default="virchow2g-mini", help="the encoder to export (virchow-rt list)")
    p.add_argument("--out", default="out/demo", metavar="DIR", help="export folder and embeddings")
    p.add_argument("--tiles", type=int, default=512, help="number of bundled tissue tiles to embed")
    p.add_argument(
        "--weights",
        metavar="PATH",
        default=None,
        help="the variant's real weights (folder, state-dict file or cached model id); default: random ones",
    )
    p.set_defaults(handler=_run_demo)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        formatter_class=_Help,
        help="throughput and parity of every available backend against the PyTorch reference",
    )
    p.add_argument("model", help="a variant name (exported on the fly) or an export folder / .onnx")
    _add_weights(p)
    p.add_argument(
        "--backends",
        type=_csv,
        default=None,
        help="comma-separated rows: a backend as `embed --backend` names it (onnxruntime-cpu, tensorrt, "
        "torch-cuda, ...; torch-eager and torch-compile for the PyTorch reference) or backend/precision "
        "(default: every row this machine can run)",
    )
    p.add_argument("--batch-sizes", type=_csv_ints, default=None, help="comma-separated batch sizes")
    p.add_argument("--tiles", type=int, default=None, help="tiles per timed run")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row")
    p.add_argument("--warmup", type=int, default=None, help="warm-up batches per row")
    p.add_argument("--machine", default=None, metavar="TEXT", help="machine name for the report")
    p.add_argument("--out", required=True, metavar="DIR", help="report.json, report.md and plots go here")
    p.set_defaults(handler=_run_bench)


def _add_slides(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slides",
        formatter_class=_Help,
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
    target.add_argument("--mpp", type=float, default=0.5, help="target microns per pixel of the tiles")
    target.add_argument(
        "--mag", type=float, default=None, help="target magnification, TRIDENT's spelling: 20 is --mpp 0.5"
    )
    p.add_argument(
        "--coords",
        metavar="FILE|DIR",
        default=None,
        help="reuse another tool's tiling: a TRIDENT or CLAM coordinates .h5, or the folder they wrote "
        "(<slide>.h5 or <slide>_patches.h5, also in patches/); --mpp, --min-tissue, --grid then do not apply",
    )
    p.add_argument(
        "--grid",
        choices=("magnification", "mpp"),
        default="magnification",
        help="a tile's level-0 side: from the nominal magnifications as TRIDENT does (896 px for 224 px at "
        "10x on a 0.2527 µm/px scan), or exact from the µm/px (886)",
    )
    p.add_argument("--tile-size", type=int, default=224, help="tile side in pixels at --mpp")
    p.add_argument(
        "--slide-mpp", type=float, default=None, help="level-0 µm/px when the slide does not record it"
    )
    p.add_argument(
        "--regions", type=_csv_ints, default=None, help="magnifications for region sequences, e.g. 5,10,20"
    )
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a kept tile")
    p.add_argument("--batch", type=int, default=None, help="tiles per batch (default: the backend's fastest)")
    p.add_argument(
        "--workers", type=int, default=None, help="tile-reading workers (default: one per core, at most 8)"
    )
    p.add_argument(
        "--pooling", choices=POOLINGS, default=None, help="default: the model's own (see `virchow-rt list`)"
    )
    p.add_argument(
        "--backend",
        default="auto",
        metavar="BACKEND",
        help=f"one of: {', '.join(BACKENDS)}",
    )
    p.add_argument(
        "--reader",
        choices=("auto", "openslide", "tiffslide"),
        default="auto",
        help="slide reader (auto: OpenSlide, else tiffslide)",
    )
    p.add_argument(
        "--skip-errors",
        action="store_true",
        help="skip unreadable tiles (a bad slide never stops the others)",
    )
    p.add_argument(
        "--recursive", action="store_true", help="find slides in sub-folders too (a TCGA/GDC download)"
    )
    p.add_argument(
        "--qc", action="store_true", help="also write <slide>.qc.png: thumbnail, tissue outline, kept tiles"
    )
    p.add_argument(
        "--also-pt",
        action="store_true",
        help="also write pt_files/<slide>.pt (CLAM's MIL loader; needs torch)",
    )
    p.add_argument(
        "--read-threads",
        action="store_true",
        help="read tiles with threads instead of worker processes (processes were measured faster)",
    )
    p.add_argument(
        "--clear-stale-locks",
        action="store_true",
        help="remove every slide lock in --out first (after a crashed run; no other run may write there). "
        "Without it, a lock whose process is gone (same host) or is 24 h old is taken over with a warning",
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
    p.set_defaults(handler=_run_slides)


def _run_export(args: argparse.Namespace) -> int:
    from virchow_rt.errors import InputError
    from virchow_rt.export import export_model

    if args.exclude_lean_runtime and not (args.tensorrt and args.version_compatible):
        raise InputError("--exclude-lean-runtime needs --tensorrt --version-compatible")

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
    )
    for artifact in manifest["artifacts"]:
        print(
            f"{artifact['path']}: {artifact['precision']} {artifact['format']}, "
            f"parity {artifact['parity']['summary']}"
        )
    print(f"manifest: {args.out}/manifest.json")
    if args.triton:
        from virchow_rt.export.triton import write_triton_repository

        print(f"Triton model: {write_triton_repository(args.out, args.triton)}")
    return 0


def _run_embed(args: argparse.Namespace) -> int:
    from virchow_rt.runtime.cli import embed_command

    return embed_command(args)


def _run_info(args: argparse.Namespace) -> int:
    import json

    from virchow_rt.runtime import capabilities

    caps = capabilities()
    if args.json:
        print(json.dumps(caps, indent=2))
    else:
        for key, value in caps.items():
            print(f"{key:>24}: {value}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from virchow_rt.demo import run_demo

    return run_demo(args.variant, args.out, n_tiles=args.tiles, weights=args.weights)


def _run_bench(args: argparse.Namespace) -> int:
    from virchow_rt.benchmark import run_cli

    return run_cli(args)


def _run_slides(args: argparse.Namespace) -> int:
    from virchow_rt.slides import run_cli

    return run_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virchow-rt", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_export,
        _add_triton,
        _add_embed,
        _add_info,
        _add_list,
        _add_demo,
        _add_bench,
        _add_slides,
        _add_serve,
    ):
        add(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - warnings API
    return f"virchow-rt: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.formatwarning = _one_line_warning
    shown, original = [], warnings.showwarning

    def show_once(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202 - warnings API
        if issubclass(category, RandomWeightsWarning):  # one RANDOM WEIGHTS line per command
            if shown:
                return
            shown.append(message)
        original(message, category, filename, lineno, file, line)

    warnings.showwarning = show_once
    try:
        return int(args.handler(args) or 0)
    except VirchowError as err:
        if args.debug:
            raise
        print(f"virchow-rt {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        print(f"virchow-rt {args.command}: interrupted{f': {err}' if str(err) else ''}", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = original


if __name__ == "__main__":
    sys.exit(main())
