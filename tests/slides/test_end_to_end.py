"""End to end with a real exported model: `virchow-rt slides` on synthetic slides, tiny mini variant."""

from __future__ import annotations

import json

import numpy as np
import pytest
from slide_helpers import cosine_rows

from virchow_rt.cli import main as cli
from virchow_rt.errors import RandomWeightsWarning
from virchow_rt.files import sha256_file
from virchow_rt.slides import embed_slide, read_features

tifffile = pytest.importorskip("tifffile")

VARIANT = "virchow2g-mini-tiny"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from virchow_rt.export.pipeline import export_model  # a broken product import fails, never skips

    out = tmp_path_factory.mktemp("tiny-model")
    manifest = export_model(VARIANT, out, random_weights=True, precisions=["fp32"], parity_tiles=4)
    onnx = manifest.select("onnx", "fp32")
    return out / onnx[0].path


def test_cli_slides_with_an_exported_model(make_slide, tmp_path, tiny_model, capsys):
    from virchow_rt.backends import open_backend
    synth = make_slide()
    out = tmp_path / "out"
    argv = ["slides", str(synth.path), "--model", str(tiny_model), "--out", str(out), "--workers", "2"]
    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS: virchow2g-mini-tiny has random weights"):
        assert cli.main([*argv, "--batch", "8"]) == 0
    data = read_features(out / "slide.h5")
    feats, coords, attrs = data["features"], data["coords"], data["attrs"]
    assert feats.shape == (len(coords), 2 * 96) and len(coords) >= 10 and np.isfinite(feats).all()
    assert attrs["encoder"] == VARIANT and attrs["random_weights"] and attrs["precision"] == "fp32"
    assert attrs["model_sha256"] == sha256_file(tiny_model) and attrs["model_file"] == tiny_model.name

    # the same tiles read by hand from level 0 and embedded by the same exported model
    level0 = tifffile.imread(synth.path, key=0)
    tiles = np.stack([level0[y : y + 224, x : x + 224] for x, y in coords])
    with open_backend(tiny_model) as backend:
        direct = np.concatenate([backend.run(tiles[i : i + 8]) for i in range(0, len(tiles), 8)])
    assert cosine_rows(feats, direct).min() > 0.99999

    mtime = (out / "slide.h5").stat().st_mtime_ns
    assert cli.main(argv) == 0  # a rerun is a no-op
    assert (out / "slide.h5").stat().st_mtime_ns == mtime
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"][0]["status"] == "skipped" and summary["model"]["random_weights"] is True

    # an export folder runs its fp32 ONNX: same hash, so the complete file is still valid
    assert cli.main(["slides", str(synth.path), "--model", str(tiny_model.parent), "--out", str(out)]) == 0
    assert (out / "slide.h5").stat().st_mtime_ns == mtime


def test_python_api_cls_pooling_with_a_model_file(make_slide, tiny_model):
    synth = make_slide()
    full = embed_slide(synth.path, tiny_model, workers=2)
    cls = embed_slide(synth.path, tiny_model, pooling="cls", workers=2)
    assert cls.features.shape == (len(full.coords), 96) and full.model.random_weights
    assert cosine_rows(cls.features, full.features[:, :96]).min() > 0.99999
