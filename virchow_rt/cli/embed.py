"""``virchow-rt embed``: tiles -> embeddings ``FILE.npy`` (N, E) float32 + ``FILE.json`` metadata.

Both files are written atomically (temporary file + rename) and only after every tile was embedded,
so an error leaves no output behind, never a half-written ``.npy``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from virchow_rt._version import __version__
from virchow_rt.backends import open_backend
from virchow_rt.backends.capabilities import package_version
from virchow_rt.cli.common import Help, add_backend, add_engine_host_code
from virchow_rt.embed import open_tiles
from virchow_rt.embed.embedder import Embedder
from virchow_rt.embed.tiles import plural
from virchow_rt.errors import InputError, warn_random_weights
from virchow_rt.files import atomic_path, check_output, sha256_file
from virchow_rt.registry import POOLINGS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", formatter_class=Help, help="embed tiles with an exported model")
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
    add_backend(p)
    add_engine_host_code(p)
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
    p.set_defaults(handler=embed_command)


def _out_paths(out: str) -> tuple[Path, Path]:
    path = Path(out)
    if path.suffix != ".npy":
        raise InputError(
            f"--out {out!r} must end in .npy (embeddings are saved with numpy); e.g. --out {path.stem}.npy"
        )
    check_output(path, "--out", folder=False)  # before any work: a run must not fail at its end
    return path, path.with_suffix(".json")


def embed_command(args: argparse.Namespace) -> int:
    """Run ``virchow-rt embed`` from parsed arguments; returns the exit code."""
    out_npy, out_json = _out_paths(args.out)
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch {args.batch} must be >= 1")
    # inputs are checked before the model loads: a wrong array fails in milliseconds, not after a model load
    source = open_tiles(args.tiles, skip_errors=args.skip_errors, recursive=args.recursive)
    options = {}
    if args.weights is not None:
        if args.backend != "torch-cuda":
            raise InputError(
                f"--weights is only read by --backend torch-cuda (which rebuilds the model); --backend "
                f"{args.backend} runs the exported file as it is: drop --weights"
            )
        options["weights"] = args.weights
    if args.allow_engine_host_code:
        options["allow_engine_host_code"] = True
    with open_backend(args.model, args.backend, **options) as backend:
        embedder = Embedder(backend, batch_size=args.batch, progress=sys.stderr.isatty(), resize=args.resize)
        info = embedder.info
        if info.random_weights:
            warn_random_weights(f"{args.model} was exported with random weights")
        start = time.perf_counter()
        pooling = embedder.pooling(args.pooling)  # None: the model's own
        embeddings = embedder.embed(source, pooling=pooling)  # (N, E) float32
        elapsed = time.perf_counter() - start
        model_file = Path(backend.path or args.model)
        model_sha = backend.model_sha256 or (sha256_file(model_file) if model_file.is_file() else None)
    meta = {
        "embeddings": out_npy.name,
        "shape": list(embeddings.shape),
        "dtype": "float32",
        "pooling": pooling,
        "embedding_dim": int(embeddings.shape[1]),
        "model": {
            "path": str(model_file.resolve()),
            "sha256": model_sha,
            "variant": info.variant,
            "precision": info.precision,
            "tile_size": info.tile_size,
            "weights_sha256": info.weights_sha256,
        },
        "random_weights": info.random_weights,
        "backend": backend.name,
        "batch_size": embedder.batch_size,
        "resize": embedder.resize,
        "tiles": int(embeddings.shape[0]),
        "sources": source.sources,
        "skipped": [{"name": name, "reason": reason} for name, reason in source.skipped],
        "ignored": source.ignored,  # files of the folders given that are not tiles by their suffix
        # inputs that were not square RGB tiles, and what was done to them
        "converted": [{"name": name, "conversion": what} for name, what in source.converted],
        "elapsed_s": round(elapsed, 3),
        "tiles_per_s": round(embeddings.shape[0] / max(elapsed, 1e-9), 2),
        "versions": {
            "virchow_rt": __version__,
            "python": platform.python_version(),
            "onnxruntime": package_version("onnxruntime"),
            **({"openvino": package_version("openvino")} if backend.name.startswith("openvino") else {}),
            "numpy": np.__version__,
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if info.random_weights:
        meta["warning"] = "RANDOM WEIGHTS: these embeddings mean nothing (tests and demos only)"
    # both files appear together, after everything succeeded (the .json is renamed first, then the .npy)
    with atomic_path(out_npy) as tmp_npy, atomic_path(out_json) as tmp_json:
        with open(tmp_npy, "wb") as fh:
            np.save(fh, embeddings)  # a file handle: np.save(path) would append ".npy" to the temporary name
        tmp_json.write_text(json.dumps(meta, indent=2) + "\n")
    skipped = f", {len(source.skipped)} skipped (see {out_json.name})" if source.skipped else ""
    if source.ignored:
        skipped += f", {plural(len(source.ignored), 'file')} ignored (not tiles; see {out_json.name})"
    if source.converted:
        skipped += f", {plural(len(source.converted), 'input')} converted (see {out_json.name})"
    print(
        f"embedded {embeddings.shape[0]} tiles in {elapsed:.2f} s ({meta['tiles_per_s']} tiles/s) with "
        f"{backend.name} ({info.variant} {info.precision}, {pooling} {embeddings.shape[1]}-d, "
        f"resizing on the {embedder.resize.upper()}){skipped} "
        f"-> {out_npy}"
    )
    return 0
