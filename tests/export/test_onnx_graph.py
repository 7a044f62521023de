"""Exported graphs (every variant, tiny config): checker, I/O contract, metadata, dynamic batch, parity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from virchow_rt.backends.torch_reference import TorchBackend
from virchow_rt.compare import compare
from virchow_rt.kernels.resize import resize_tiles
from virchow_rt.model.vit import build_model
from virchow_rt.registry import get_variant
from virchow_rt.tissue import tissue_tiles

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.model.weights.RandomWeightsWarning")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_checker_and_io_contract(tiny_export, precision):
    name, out, _ = tiny_export
    variant = get_variant(name)
    path = out / f"{name}.{precision}.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert any(n.op_type == "LayerNormalization" for n in model.graph.node)

    def described(values):
        return [
            (
                v.name,
                v.type.tensor_type.elem_type,
                [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        ]

    d, size = variant.width, variant.preprocess.size
    assert described(model.graph.input) == [("tiles", onnx.TensorProto.UINT8, ["batch", size, size, 3])]
    assert described(model.graph.output) == [
        ("embedding", onnx.TensorProto.FLOAT, ["batch", 2 * d]),
        ("patch_tokens", onnx.TensorProto.FLOAT, ["batch", variant.num_patches, d]),
    ]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_metadata_props(tiny_export, precision):
    name, out, _ = tiny_export
    variant = get_variant(name)
    props = {p.key: p.value for p in onnx.load(str(out / f"{name}.{precision}.onnx")).metadata_props}
    assert props == {
        "virchow_rt.variant": name,
        "virchow_rt.width": str(variant.width),
        "virchow_rt.embedding_dim": str(2 * variant.width),
        "virchow_rt.tile_size": "224",
        "virchow_rt.crop_pct": str(variant.preprocess.crop_pct),
        "virchow_rt.interpolation": variant.preprocess.interpolation,
        "virchow_rt.pooling": variant.pooling,
        "virchow_rt.precision": precision,
        "virchow_rt.random_weights": "true",
        "virchow_rt.weights_sha256": "random",
        "virchow_rt.manifest_schema": "1",
    }


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_dynamic_batch_and_parity_on_fresh_tiles(tiny_export, precision):
    """Independent of the manifest: other tiles, other batch sizes, the same tolerance."""
    name, out, _ = tiny_export
    variant = get_variant(name)
    session = ort.InferenceSession(str(out / f"{name}.{precision}.onnx"), providers=["CPUExecutionProvider"])
    tiles = tissue_tiles(5, 224, seed=11)
    model, _, _ = build_model(name, random_weights=True, seed=0)  # the export's seed
    reference = TorchBackend(model, variant).run(tiles)
    pre = variant.preprocess  # the graph takes S×S tiles after the model's transform
    tiles = resize_tiles(tiles, pre.size, pre.crop_pct, pre.interpolation)
    parts = [session.run(None, {"tiles": tiles[:1]}), session.run(None, {"tiles": tiles[1:]})]
    embedding = np.concatenate([p[0] for p in parts])
    patch_tokens = np.concatenate([p[1] for p in parts])
    assert parts[0][0].shape == (1, 2 * variant.width) and parts[1][0].shape == (4, 2 * variant.width)
    assert patch_tokens.shape == (5, variant.num_patches, variant.width)
    assert embedding.dtype == np.float32 and patch_tokens.dtype == np.float32
    result = compare(embedding, reference, variant.tolerance.min_cosine(precision))
    assert result, str(result)
    # the embedding is class token ‖ mean of the patch tokens (registers excluded)
    np.testing.assert_allclose(embedding[:, variant.width :], patch_tokens.mean(axis=1), rtol=1e-4, atol=1e-4)


def test_manifest_records_each_artifact(tiny_export):
    from virchow_rt.contract import Manifest
    from virchow_rt.files import sha256_file

    name, out, returned = tiny_export
    assert Manifest.read(out) == returned
    manifest = json.loads((out / "manifest.json").read_text())  # the file itself: its format is the contract
    variant = get_variant(name)
    assert manifest["schema_version"] == 1 and manifest["variant"] == name
    assert manifest["model_args"] == dict(variant.model_args) and manifest["mlp"] == variant.mlp
    assert manifest["preprocess"]["size"] == 224 and manifest["batch"]["max"] == variant.batch.max
    assert manifest["weights"] == {
        "random": True,
        "sha256": "random",
        "source": manifest["weights"]["source"],
        "file": None,
    }
    assert "RANDOM WEIGHTS" in manifest["warning"]
    assert {"virchow_rt", "python", "torch", "timm", "onnx", "onnxruntime"} <= set(manifest["versions"])
    assert manifest["created"].endswith("+00:00")
    assert [(a["path"], a["precision"], a["format"]) for a in manifest["artifacts"]] == [
        (f"{name}.fp32.onnx", "fp32", "onnx"),
        (f"{name}.fp16.onnx", "fp16", "onnx"),
    ]
    for artifact in manifest["artifacts"]:
        path = out / artifact["path"]
        assert artifact["sha256"] == sha256_file(path) and artifact["size_bytes"] == path.stat().st_size
        assert artifact["external_data"] is None
        assert artifact["inputs"] == [{"name": "tiles", "dtype": "uint8", "shape": ["batch", 224, 224, 3]}]
        assert [o["name"] for o in artifact["outputs"]] == ["embedding", "patch_tokens"]
        parity = artifact["parity"]
        tolerance = variant.tolerance.min_cosine(artifact["precision"])
        assert parity["passed"] and parity["min_cosine"] >= tolerance == parity["tolerance"]
        assert parity["reference"] == "torch-eager-fp32" and parity["summary"].startswith("PASS: min cosine")
        assert parity["n"] == 8 and "tissue_tiles(8, 224" in parity["tiles"]
        assert ("precision_plan" in artifact) == (artifact["precision"] == "fp16")
    assert not list(out.glob(".staging-*")) and not list(out.glob("*.partial"))
