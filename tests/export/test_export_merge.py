"""Exporting into a folder that holds an export: precisions added, others kept, another model refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from export_helpers import random_state_dict

from virchow_rt.backends import open as runtime
from virchow_rt.backends import open_backend
from virchow_rt.contract import MANIFEST_NAME, Manifest
from virchow_rt.errors import ModelFileError, OutputError
from virchow_rt.export import pipeline
from virchow_rt.export.pipeline import export_model

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.model.weights.RandomWeightsWarning")
NAME = "virchow2-tiny"


def _export(folder: Path, precisions: list[str], **kwargs) -> Manifest:
    kwargs.setdefault("random_weights", "weights" not in kwargs)
    return export_model(NAME, folder, precisions=precisions, parity_tiles=4, **kwargs)


def _state(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file in ``folder`` (hidden ones too): (inode, bytes): what a refused or failed run must keep."""
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def fp32_folder(tmp_path_factory) -> tuple[Path, Manifest]:
    """A random-weights fp32-only export, copied by the tests that change it."""
    folder = tmp_path_factory.mktemp("fp32")
    return folder, _export(folder, ["fp32"])


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("added", ["fp16", "int8"])
def test_a_precision_is_added_and_fp32_still_opens_on_a_cpu(fp32_folder, tmp_path, monkeypatch, added):
    folder = _copy(fp32_folder[0], tmp_path / "export")
    before, fp32 = fp32_folder[1], f"{NAME}.fp32.onnx"
    old = _state(folder)[fp32]
    manifest = _export(folder, [added])
    assert [a.path for a in manifest.artifacts] == [fp32, f"{NAME}.{added}.onnx"]
    assert manifest == Manifest.read(folder)
    assert manifest.artifact_for(fp32) == before.artifact_for(fp32)  # its hashes and parity, as made
    assert _state(folder)[fp32] == old  # the same file, untouched
    assert manifest.artifact_for(f"{NAME}.{added}.onnx").parity["passed"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(runtime, "_ort_has_gpu", lambda: False)
    assert runtime._pick_from_folder(folder, "auto").name == fp32
    with open_backend(folder) as backend:  # OpenVINO bf16 on this CPU (AVX-512 BF16), else ORT fp32
        assert backend.info.precision in ("fp32", "bf16") and backend.path.name == fp32
    monkeypatch.setattr(runtime, "_ort_has_gpu", lambda: True)
    expected = f"{NAME}.fp16.onnx" if added == "fp16" else fp32  # a GPU runs fp16; int8 is for a CPU
    assert runtime._pick_from_folder(folder, "auto").name == expected


def test_fp16_is_opened_on_a_cpu_only_when_nothing_else_is_there(tmp_path, monkeypatch, caplog):
    _export(tmp_path, ["fp16"])
    manifest = _export(tmp_path, ["int8"])
    assert [a.precision for a in manifest.artifacts] == ["fp16", "int8"]
    monkeypatch.setattr(runtime, "_ort_has_gpu", lambda: False)
    assert runtime._pick_from_folder(tmp_path, "auto").name == f"{NAME}.int8.onnx"
    with caplog.at_level("WARNING"), open_backend(tmp_path) as backend:
        assert (backend.name, backend.info.precision) == ("onnxruntime-cpu", "int8")
    assert "OpenVINO" not in caplog.text  # not even tried: it compiles fp32 graphs only
    for backend in ("openvino", "openvino-bf16", "openvino-fp32"):  # asked for: refused, not given int8
        with pytest.raises(
            ModelFileError, match=f"no fp32 ONNX in .*--backend {backend} runs only that; add"
        ):
            runtime._pick_from_folder(tmp_path, backend)
    monkeypatch.setattr(runtime, "_ort_has_gpu", lambda: True)
    assert runtime._pick_from_folder(tmp_path, "auto").name == f"{NAME}.fp16.onnx"


def test_a_precision_asked_again_is_rebuilt_and_only_it(tmp_path):
    first = _export(tmp_path, ["fp32", "fp16"], max_batch=8)
    fp16, fp32 = f"{NAME}.fp16.onnx", f"{NAME}.fp32.onnx"
    old = _state(tmp_path)
    manifest = _export(tmp_path, ["fp32"])
    assert [a.path for a in manifest.artifacts] == [fp32, fp16]  # the replaced entry keeps its place
    assert manifest.artifact_for(fp16) == first.artifact_for(fp16) and _state(tmp_path)[fp16] == old[fp16]
    assert _state(tmp_path)[fp32][0] != old[fp32][0]  # a new file, renamed into place
    assert manifest.artifact_for(fp32).sha256 == pipeline.sha256_file(tmp_path / fp32)
    assert manifest.created >= first.created and sorted(_state(tmp_path)) == sorted(old)
    assert (
        manifest.batch == first.batch and first.batch.max == 8
    )  # no --max-batch: the folder's profile stays


def test_another_models_folder_is_refused_before_any_work(checkpoint_dir, tmp_path, monkeypatch):
    other, tmp_path = tmp_path / "other.pt", tmp_path / "export"
    _export(tmp_path, ["fp32"], weights=checkpoint_dir)
    old = _state(tmp_path)
    torch.save(random_state_dict(NAME, seed=2), other)
    cases = [
        ({"weights": other}, r"other weights \([0-9a-f]{12}…; this run [0-9a-f]{12}…\)"),
        ({"random_weights": True}, "real weights, this run random"),
    ]
    for kwargs, problem in cases:
        with pytest.raises(OutputError, match=problem) as err:
            _export(tmp_path, ["fp16"], **kwargs)
        assert "\n" not in str(err.value) and "new folder, or pass --overwrite" in str(err.value)
        assert _state(tmp_path) == old
    with monkeypatch.context() as patch:  # another variant: known from the manifest, no model is built
        patch.setattr(pipeline, "build_model", lambda *a: pytest.fail("built the model"))
        with pytest.raises(OutputError, match="variant virchow2-tiny \\(this run virchow-tiny\\)"):
            export_model("virchow-tiny", tmp_path, random_weights=True, precisions=["fp32"], parity_tiles=4)
    assert _state(tmp_path) == old
    with pytest.warns(UserWarning, match=f"{NAME}.fp32.onnx from an earlier export"):
        manifest = export_model(
            "virchow-tiny", tmp_path, random_weights=True, precisions=["fp32"], parity_tiles=4, overwrite=True
        )
    assert [a.path for a in manifest.artifacts] == ["virchow-tiny.fp32.onnx"]
    assert _state(tmp_path)[f"{NAME}.fp32.onnx"] == old[f"{NAME}.fp32.onnx"]  # overwrite deletes nothing


def test_kept_artifacts_must_have_the_same_outputs(fp32_folder, tmp_path):
    folder = _copy(fp32_folder[0], tmp_path / "export")
    old = _state(folder)
    with pytest.raises(OutputError) as err:
        _export(folder, ["fp16"], outputs=("embedding", "patch_tokens"))
    assert (
        f"holds an export with other inputs/outputs: {NAME}.fp32.onnx with outputs embedding (this run "
        "embedding,patch_tokens; add fp32 to --precision to rebuild it too)" in str(err.value)
    )
    assert "another model" not in str(err.value) and "{" not in str(err.value)
    assert _state(folder) == old
    both = _export(folder, ["fp32", "fp16"], outputs=("embedding", "patch_tokens"))
    assert [len(a.outputs) for a in both.artifacts] == [2, 2]


def test_an_unreadable_manifest_is_refused_before_the_model_is_built(tmp_path, monkeypatch):
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    monkeypatch.setattr(pipeline, "build_model", lambda *a: pytest.fail("built the model"))
    with pytest.raises(OutputError, match="cannot be read, so this export cannot add to it.*--overwrite"):
        _export(tmp_path, ["fp32"])
    assert (tmp_path / MANIFEST_NAME).read_text() == "{not json"


def _fail(*args, **kwargs):
    raise RuntimeError("planted failure")


@pytest.mark.parametrize("where", ["making int8", "parity", "writing the manifest"])
def test_a_failure_midway_keeps_the_old_export(fp32_folder, tmp_path, monkeypatch, where):
    folder = _copy(fp32_folder[0], tmp_path / "export")
    old = _state(folder)
    if where == "making int8":
        monkeypatch.setattr(pipeline, "quantize_int8", _fail)
    elif where == "parity":
        real = pipeline._parity
        monkeypatch.setattr(
            pipeline, "_parity", lambda path, *a: _fail() if "int8" in path.name else real(path, *a)
        )
    else:  # every new file is in place by then: the old ones must come back
        monkeypatch.setattr(Manifest, "write", _fail)
    with pytest.raises(RuntimeError, match="planted failure"):
        _export(folder, ["fp32", "int8"])
    assert _state(folder) == old  # same files (inodes), same bytes, same manifest; nothing left behind
    assert Manifest.read(folder) == fp32_folder[1]


def test_a_kept_artifact_made_with_other_versions_keeps_its_own():
    from virchow_rt.contract import Artifact
    from virchow_rt.export.merge import merge

    old_fp32, fp16 = Artifact(path="m.fp32.onnx", sha256="a"), Artifact(path="m.fp16.onnx", sha256="b")
    previous = Manifest(variant="m", versions={"onnx": "1.16"}, created="2025-01-01", artifacts=(old_fp32,))
    new = Manifest(variant="m", versions={"onnx": "1.17"}, created="2026-01-01", artifacts=(fp16,))
    merged = merge(previous, new, keep_batch=True)
    assert [a.path for a in merged.artifacts] == [
        "m.fp32.onnx",
        "m.fp16.onnx",
    ] and merged.versions == new.versions
    kept = merged.artifact_for("m.fp32.onnx")
    assert kept.extra == {"versions": {"onnx": "1.16"}, "created": "2025-01-01"} and kept.sha256 == "a"
    assert merged.artifact_for("m.fp16.onnx") == fp16
    same = merge(previous, Manifest(variant="m", versions={"onnx": "1.16"}), keep_batch=True)
    assert same.artifacts == (old_fp32,)  # same versions: nothing to record per artifact


def test_model_differences_name_each_value_and_skip_what_the_folder_does_not_record():
    from virchow_rt.contract import EmbeddingLayout, WeightsInfo
    from virchow_rt.export.merge import model_differences

    weights = WeightsInfo(random=True, sha256="random", source="random (seed 0)")
    old = Manifest(
        variant="m", weights=weights, model_args={"depth": 2}, embedding=EmbeddingLayout(layout="a")
    )
    new = Manifest(
        variant="m",
        weights=weights,
        model_args={"depth": 2, "new_key": 1},
        embedding=EmbeddingLayout(layout="b"),
    )
    assert model_differences(old, new) == []  # a key an older manifest lacks, and prose, are not compared
    deeper = dataclasses.replace(old, model_args={"depth": 3}, mlp="swiglu")
    assert model_differences(old, deeper) == ["model_args.depth 2 (this run 3)"]
    reseeded = dataclasses.replace(old, weights=dataclasses.replace(weights, source="random (seed 1)"))
    assert model_differences(old, reseeded) == ["other weights (random (seed 0); this run random (seed 1))"]


def test_a_kept_engine_with_other_outputs_is_rebuilt_with_tensorrt():
    from virchow_rt.contract import Artifact, WeightsInfo
    from virchow_rt.export.merge import check_same_model

    weights = WeightsInfo(random=True, sha256="random", source="random (seed 0)")
    engine = Artifact(
        path="m.fp16.engine", format="tensorrt", precision="fp16", outputs=({"name": "embedding"},)
    )
    previous = Manifest(variant="m", weights=weights, artifacts=(engine,))
    io = {"outputs": [{"name": "embedding"}, {"name": "patch_tokens"}]}
    with pytest.raises(
        OutputError, match=r"\(this run embedding,patch_tokens; pass --tensorrt to rebuild it\)"
    ):
        check_same_model(previous, Manifest(variant="m", weights=weights), Path("out"), [], io)
    check_same_model(previous, Manifest(variant="m", weights=weights), Path("out"), ["m.fp16.engine"], io)
