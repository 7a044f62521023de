"""export_model end to end: weights, parity gate, atomic results, external data, TensorRT, full size."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import types

import onnx
import pytest

import virchow_rt.export
from virchow_rt.contract import Artifact, Manifest, WeightsInfo
from virchow_rt.errors import BackendError, InputError, ParityError, WeightsError
from virchow_rt.export import onnx_export as onnx_export_module
from virchow_rt.export.pipeline import export_model
from virchow_rt.files import sha256_file
from virchow_rt.registry import Tolerance, get_variant

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.model.weights.RandomWeightsWarning")


def test_real_weights_folder_is_recorded(tmp_path, checkpoint_dir, recwarn):
    manifest = export_model(
        "virchow2-tiny", tmp_path, weights=checkpoint_dir, precisions=["fp32"], parity_tiles=4
    )
    sha = sha256_file(checkpoint_dir / "model.safetensors")
    assert manifest.weights == WeightsInfo(
        random=False, sha256=sha, source=str(checkpoint_dir), file="model.safetensors"
    )
    assert manifest.warning is None and not [w for w in recwarn if "RANDOM" in str(w.message)]
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "virchow2-tiny.fp32.onnx")).metadata_props}
    assert props["virchow_rt.random_weights"] == "false" and props["virchow_rt.weights_sha256"] == sha
    assert [a.path for a in manifest.artifacts] == ["virchow2-tiny.fp32.onnx"]


def test_missing_weights_refused_and_nothing_written(tmp_path):
    with pytest.raises(WeightsError, match="--random-weights"):
        export_model("virchow2-tiny", tmp_path / "out")
    assert not list((tmp_path / "out").glob("*")) and not (tmp_path / "out").exists()


def test_failed_parity_leaves_no_artifact_and_keeps_the_previous_export(tmp_path):
    before = export_model("virchow-tiny", tmp_path, random_weights=True, precisions=["fp32"], parity_tiles=4)
    fp32_sha = sha256_file(tmp_path / "virchow-tiny.fp32.onnx")
    impossible = dataclasses.replace(get_variant("virchow-tiny"), tolerance=Tolerance(0.99999, 1.5))
    with pytest.raises(ParityError) as err:
        export_model(impossible, tmp_path, random_weights=True, parity_tiles=4)
    text = str(err.value)
    assert (
        "FAIL: min cosine" in text
        and "tolerance 1.5" in text
        and "virchow-tiny.fp16.onnx was not written" in text
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "virchow-tiny.fp32.onnx"]
    assert sha256_file(tmp_path / "virchow-tiny.fp32.onnx") == fp32_sha and Manifest.read(tmp_path) == before


def test_fp16_only_export(tmp_path):
    manifest = export_model(
        "virchow2g-mini-tiny", tmp_path, random_weights=True, precisions=["fp16"], parity_tiles=4
    )
    assert [a.path for a in manifest.artifacts] == ["virchow2g-mini-tiny.fp16.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "virchow2g-mini-tiny.fp16.onnx"]


def test_external_data_path(tmp_path, monkeypatch):
    """Force the > 2 GB path on a tiny model: weights in one <name>.onnx.data file beside the graph."""
    monkeypatch.setattr(onnx_export_module, "EXTERNAL_DATA_THRESHOLD", 0)
    manifest = export_model("virchow2-tiny", tmp_path, random_weights=True, parity_tiles=4)
    for artifact in manifest.artifacts:
        data = tmp_path / f"{artifact.path}.data"
        assert artifact.external_data == data.name and data.stat().st_size > 100_000
        assert artifact.extra["external_data_sha256"] == sha256_file(data)
        assert artifact.parity is not None and artifact.parity["passed"]
        onnx.checker.check_model(str(tmp_path / artifact.path), full_check=True)
        graph = onnx.load(str(tmp_path / artifact.path), load_external_data=False).graph
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"precisions": ["int4"]}, "precisions"),
        ({"precisions": []}, "precisions"),
        ({"outputs": ["patch_tokens"]}, "outputs"),
        ({"parity_tiles": 0}, "parity_tiles"),
        ({"max_batch": 0}, "max_batch"),
        ({"tensorrt": True, "precisions": ["fp32"]}, "fp16"),
        ({"weights": "x.bin"}, "only one"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message):
        export_model("virchow2-tiny", tmp_path, random_weights=True, **kwargs)


@pytest.fixture(params=[True, False], ids=["builder-writes-manifest", "builder-returns-entry"])
def fake_tensorrt(request, monkeypatch):
    """Stands in for virchow_rt.export.tensorrt_build (TensorRT is absent here)."""
    calls = []

    def build_engine(onnx_path, out_dir, variant, max_batch=None):
        calls.append((onnx_path, out_dir, variant.name, max_batch))
        if max_batch == 13:
            raise BackendError("TensorRT builder failed (fake)")
        entry = Artifact(path=f"{variant.name}.fp16.engine", format="tensorrt", precision="fp16")
        if request.param:  # like the real builder: record the engine in manifest.json itself
            Manifest.read(out_dir).with_artifact(entry).write(out_dir)
        return entry

    module = types.ModuleType("virchow_rt.export.tensorrt_build")
    module.build_engine = build_engine
    monkeypatch.setitem(sys.modules, "virchow_rt.export.tensorrt_build", module)
    monkeypatch.setattr(virchow_rt.export, "tensorrt_build", module, raising=False)
    from virchow_rt.backends import tensorrt_module

    monkeypatch.setattr(tensorrt_module, "import_tensorrt", lambda *a: None)  # checked before any work
    return calls


def test_tensorrt_builder_called_lazily(tmp_path, fake_tensorrt):
    manifest = export_model(
        "virchow2-tiny", tmp_path, random_weights=True, tensorrt=True, max_batch=8, parity_tiles=4
    )
    assert fake_tensorrt == [(tmp_path / "virchow2-tiny.fp16.onnx", tmp_path, "virchow2-tiny", 8)]
    assert manifest == Manifest.read(tmp_path) and manifest.batch is not None and manifest.batch.max == 8
    assert [a.format for a in manifest.artifacts] == ["onnx", "onnx", "tensorrt"]


def test_tensorrt_errors_propagate_after_onnx_is_saved(tmp_path, fake_tensorrt):
    with pytest.raises(BackendError, match="fake"):
        export_model(
            "virchow2-tiny", tmp_path, random_weights=True, tensorrt=True, max_batch=13, parity_tiles=4
        )
    assert len(Manifest.read(tmp_path).artifacts) == 2


def test_progress_bar_only_when_asked(tmp_path, capsys):
    export_model("virchow-tiny", tmp_path / "quiet", random_weights=True, precisions=["fp32"], parity_tiles=2)
    assert "stage" not in capsys.readouterr().err
    export_model(
        "virchow-tiny",
        tmp_path / "loud",
        random_weights=True,
        precisions=["fp32"],
        parity_tiles=2,
        progress=True,
    )
    err = capsys.readouterr().err
    assert "export virchow-tiny" in err and "5/5" in err


def _full_size(name, tmp_path, parity_tiles):
    start = time.perf_counter()
    manifest = export_model(name, tmp_path, random_weights=True, parity_tiles=parity_tiles)
    seconds = time.perf_counter() - start
    variant = get_variant(name)
    for artifact in manifest.artifacts:
        assert artifact.parity["min_cosine"] >= variant.tolerance.min_cosine(artifact.precision)
        assert artifact.outputs[0]["shape"] == ["batch", variant.embedding_dim()]
        print(f"{artifact.path}: {artifact.extra['seconds']} {artifact.parity_summary}")
    print(f"{name}: {seconds:.1f} s total (this 2-core CPU, random weights)")
    return manifest


def test_full_size_mini_end_to_end(tmp_path):
    manifest = _full_size("virchow2g-mini", tmp_path, parity_tiles=16)
    assert json.loads((tmp_path / "manifest.json").read_text())["model_args"]["embed_dim"] == 384
    assert all(a.external_data is None for a in manifest.artifacts)


@pytest.mark.slow
def test_full_size_virchow2(tmp_path):
    manifest = _full_size("virchow2", tmp_path, parity_tiles=16)
    fp32, fp16 = manifest.artifacts
    assert fp32.external_data == "virchow2.fp32.onnx.data"  # 2.5 GB: over the protobuf limit
    assert fp16.external_data is None  # 1.3 GB
    assert fp16.extra["precision_plan"]["verified"]["fp32_nodes"] == {
        "LayerNormalization": 65,
        "Softmax": 32,
        "ReduceMean": 1,
    }


def test_files_left_by_an_earlier_export_are_named(tmp_path):
    import warnings as _warnings

    from virchow_rt.export.pipeline import export_model

    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")  # RANDOM WEIGHTS
        export_model("virchow2-tiny", tmp_path, random_weights=True, parity_tiles=4)
    with pytest.warns(UserWarning, match=r"virchow2-tiny\.fp16\.onnx from an earlier export"):
        manifest = export_model(
            "virchow2-tiny",
            tmp_path,
            random_weights=True,
            precisions=["fp32"],
            parity_tiles=4,
            overwrite=True,
        )
    assert [a.path for a in manifest.artifacts] == ["virchow2-tiny.fp32.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "external"), [("uni", False), ("h-optimus-0", True)])
def test_full_size_public_encoders(tmp_path, name, external):
    """UNI (ViT-L/16, 303M) and H-optimus-0 (ViT-g/14 with registers, 1.1B: fp32 over 2 GB)."""
    manifest = _full_size(name, tmp_path, parity_tiles=8)
    fp32, fp16 = manifest.artifacts
    assert (fp32.external_data is not None) == external
    assert fp32.parity["passed"] and fp16.parity["passed"]
    assert manifest.pooling == "cls"
    print(f"{name}: fp32 {fp32.parity_summary}; fp16 {fp16.parity_summary}")


def test_demo_runs_on_real_weights_when_given(checkpoint_dir, tmp_path, capsys):
    from virchow_rt.cli.main import main

    args = ["demo", "--variant", "virchow2-tiny", "--out", str(tmp_path / "demo"), "--tiles", "8"]
    assert main([*args, "--weights", str(checkpoint_dir)]) == 0
    out = capsys.readouterr().out
    assert f"with the weights in {checkpoint_dir}" in out and "RANDOM WEIGHTS" not in out
    assert Manifest.read(tmp_path / "demo").weights.random is False
