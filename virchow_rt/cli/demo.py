"""The Quick start's main job: export a variant with random weights, check parity, embed real tissue.

Everything runs offline on a CPU: the tiles come from scikit-image's IHC image, the weights are
random (labelled so in every output), the export is checked against the PyTorch reference.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from virchow_rt.cli.common import Help
from virchow_rt.files import atomic_path
from virchow_rt.registry import get_variant
from virchow_rt.tissue import tissue_tiles


def run_demo(variant_name: str, out: str | Path, n_tiles: int = 512, weights: str | None = None) -> int:
    """Export ``variant_name`` (fp32 + fp16; ``weights``, else random ones), then embed ``n_tiles`` tiles."""
    from virchow_rt.embed import Embedder
    from virchow_rt.export.pipeline import export_model

    out = Path(out)
    variant = get_variant(variant_name)
    what = f"the weights in {weights}" if weights else "RANDOM WEIGHTS (demo only)"
    print(f"[1/2] exporting {variant.name} with {what} to {out}/", flush=True)
    start = time.perf_counter()
    manifest = export_model(
        variant.name, out, weights=weights, random_weights=weights is None, progress=sys.stderr.isatty()
    )
    print(f"      export + parity check took {time.perf_counter() - start:.1f} s")
    for artifact in manifest.artifacts:
        print(f"      {artifact.path:<32} parity vs PyTorch fp32: {artifact.parity_summary}")

    tiles = tissue_tiles(n_tiles, variant.preprocess.size, seed=1)
    print(f"[2/2] embedding {n_tiles} real-tissue tiles (scikit-image IHC crops)", flush=True)
    for artifact in manifest.select("onnx"):
        with Embedder(out / artifact.path) as embedder:
            embedder.embed(tiles[: variant.batch.opt])  # warm-up: session start and first-run allocations
            start = time.perf_counter()
            embeddings = embedder.embed(tiles)
            seconds = time.perf_counter() - start
            name = embedder.backend.name
        assert embeddings.shape == (n_tiles, embedder.embedding_dim()) and np.isfinite(embeddings).all()
        target = out / f"embeddings.{artifact.precision}.npy"
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, embeddings)
        print(
            f"      {artifact.path:<32} {n_tiles / seconds:8.1f} tiles/s on {name} "
            f"({embeddings.shape[0]}x{embeddings.shape[1]} float32 -> {target})"
        )
    if weights is None:
        print("note: RANDOM WEIGHTS — the embeddings carry no meaning; pass --weights for real ones.")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        formatter_class=Help,
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
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    return run_demo(args.variant, args.out, n_tiles=args.tiles, weights=args.weights)
