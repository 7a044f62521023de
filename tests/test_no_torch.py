"""The runtime never imports torch: all a deployment runs works in a process where torch cannot load."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm"):
                raise ImportError(f"torch is blocked in this process (tried to import {name})")
            return None

    sys.meta_path.insert(0, BlockTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the torch block does not work")

    from pathlib import Path

    import numpy as np

    import virchow_rt
    import virchow_rt.kernels
    import virchow_rt.backends
    import virchow_rt.embed
    from virchow_rt.cli.main import main
    from virchow_rt.backends import open_backend
    from virchow_rt.embed import Embedder, open_tiles

    sys.path.insert(0, sys.argv[2])
    from runtime_models import build_attention_onnx, build_tiny_onnx, expected_embedding

    tmp = Path(sys.argv[1])
    model = build_tiny_onnx(tmp / "tiny.fp32.onnx")
    tiles = np.random.default_rng(0).integers(0, 256, (9, 256, 240, 3), dtype=np.uint8)
    with Embedder(model, batch_size=4) as embedder:
        out = embedder.embed(tiles)
    expected = expected_embedding(virchow_rt.kernels.resize_tiles(tiles, 224))
    assert np.abs(out - expected).max() < 1e-5, "wrong embeddings"

    attention = open_backend(build_attention_onnx(tmp / "attn.onnx"))
    assert attention.optimization.get("fused_attention") == 1, attention.optimization
    assert attention.run(tiles[:2, :224, :224].copy()).shape == (2, 32)

    np.save(tmp / "tiles.npy", tiles)
    assert main(["info"]) == 0
    assert main(["embed", str(model), str(tmp / "tiles.npy"), "--out", str(tmp / "emb.npy")]) == 0
    assert np.load(tmp / "emb.npy").shape == (9, 16)
    assert len(open_tiles([str(tmp / "tiles.npy")])) == 9

    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "timm"))
    assert not loaded, loaded
    print("NO-TORCH-OK")
    """
)


def test_runtime_runs_with_torch_blocked(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["VIRCHOW_RT_CACHE"] = str(tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), str(ROOT / "tests" / "runtime")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "NO-TORCH-OK" in result.stdout
    assert "embedded 9 tiles" in result.stdout and "onnxruntime_providers" in result.stdout
