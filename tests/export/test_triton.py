"""Triton model repositories: config.pbtxt parsed back with Triton's own schema, models placed for Triton
(copies checked by sha256, never links), nothing a manifest says trusted (paths, names)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from virchow_rt.backends import open_backend
from virchow_rt.cli import main as cli
from virchow_rt.contract import MANIFEST_NAME
from virchow_rt.errors import InputError, ModelFileError, OutputError
from virchow_rt.files import sha256_file

pb = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2",
    reason="the triton extra is not installed: pip install 'virchow-rt[triton]'",
)
text_format = pytest.importorskip("google.protobuf.text_format")
from virchow_rt.serve import triton  # noqa: E402 - a broken product import must fail

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.errors.RandomWeightsWarning")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from virchow_rt.export import pipeline as export
    out = tmp_path_factory.mktemp("tiny-export")
    export.export_model(
        "virchow2g-mini-tiny", out, random_weights=True, precisions=["fp32", "fp16"], parity_tiles=2
    )
    return out


def _config(folder):
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())


def _max_batch(config):
    """max_batch_size, read as a field (.ci/typecheck refuses the attribute: TensorRT's removed API)."""
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(config, preserving_proto_field_name=True)["max_batch_size"]


def test_onnx_entry_parses_with_tritons_schema_and_runs(tiny_export, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert (
        cli.main(["triton", str(tiny_export), str(repo), "--instance-kind", "cpu", "--instances", "2"]) == 0
    )
    assert "tritonserver --model-repository" in capsys.readouterr().out
    manifest = json.loads((tiny_export / MANIFEST_NAME).read_text())
    onnx = next(a for a in manifest["artifacts"] if a["format"] == "onnx" and a["precision"] == "fp32")
    model = repo / "virchow2g-mini-tiny"
    assert sorted(p.name for p in model.rglob("*")) == ["1", "config.pbtxt", "model.onnx"]
    config = _config(model)
    assert config.name == "virchow2g-mini-tiny" and config.platform == "onnxruntime_onnx"
    assert _max_batch(config) == manifest["batch"]["max"]
    (tile,), (embedding,) = config.input, config.output
    assert tile.data_type == pb.TYPE_UINT8 and list(tile.dims) == [224, 224, 3] and tile.name == "tiles"
    assert embedding.data_type == pb.TYPE_FP32 and list(embedding.dims) == [manifest["embedding"]["dim"]]
    assert list(config.dynamic_batching.preferred_batch_size) == [manifest["batch"]["opt"]]
    (group,) = config.instance_group
    assert group.kind == pb.ModelInstanceGroup.KIND_CPU and group.count == 2
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["variant"] == "virchow2g-mini-tiny" and params["random_weights"] == "true"
    assert params["pooling"] == "cls_mean" and params["precision"] == "fp32"
    assert params["parity"].startswith("PASS")
    assert params["tile_size"] == "224" and "does not resize" in params["resize"]  # a number, as serve's
    assert params["version_compatible"] == "false"
    assert (params["crop_pct"], params["interpolation"]) == ("1.0", "bicubic")  # to resize on the client
    placed = model / "1" / "model.onnx"
    assert sha256_file(placed) == onnx["sha256"]
    assert placed.stat().st_nlink == 1 and not placed.samefile(tiny_export / onnx["path"])  # a copy
    # the placed model is the export's: same embeddings through ONNX Runtime
    tiles = np.random.default_rng(0).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    import onnxruntime as ort

    session = ort.InferenceSession(str(placed), providers=["CPUExecutionProvider"])
    with open_backend(tiny_export / onnx["path"]) as backend:
        np.testing.assert_allclose(session.run(None, {"tiles": tiles})[0], backend.run(tiles), atol=1e-5)
    # what the docs say: Triton's model takes 224x224 tiles only (no resize in the graph; serve resizes)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {"tiles": np.zeros((1, 256, 256, 3), np.uint8)})


def test_an_existing_entry_is_refused_and_a_missing_precision_named(tiny_export, tmp_path):
    repo = tmp_path / "repo"
    triton.write_triton_repository(tiny_export, repo, precision="fp16", name="mini-fp16")
    assert _config(repo / "mini-fp16").parameters["precision"].string_value == "fp16"
    with pytest.raises(OutputError, match="exists; remove it first"):
        triton.write_triton_repository(tiny_export, repo, precision="fp16", name="mini-fp16")
    with pytest.raises(InputError, match="no int8 ONNX model .*it has: fp16, fp32"):
        triton.write_triton_repository(tiny_export, repo, precision="int8")
    with pytest.raises(InputError, match="no TensorRT engine"):
        triton.write_triton_repository(tiny_export, repo, platform="tensorrt")
    assert sorted(p.name for p in repo.iterdir()) == ["mini-fp16"]  # nothing half-made


def test_tensorrt_engines_for_two_gpus_become_cc_model_filenames(tiny_export, tmp_path):
    """A simulated engine entry (TensorRT cannot be installed here): two engines, two compute capabilities."""
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    manifest = json.loads((export / MANIFEST_NAME).read_text())
    onnx = manifest["artifacts"][0]
    for cc in ("9.0", "8.9"):
        name = f"engine-sm{cc}.engine"
        (export / name).write_bytes(f"plan for {cc}".encode())
        manifest["artifacts"].append(
            {
                **onnx,
                "path": name,
                "format": "tensorrt",
                "precision": "fp16",
                "sha256": sha256_file(export / name),
                "compute_capability": cc,
                "profile": {"min": 1, "opt": 32, "max": 128},
            }  # fmt: skip
        )
    (export / MANIFEST_NAME).write_text(json.dumps(manifest))
    target = triton.write_triton_repository(export, tmp_path / "repo")  # auto: the engines
    config = _config(target)
    assert config.platform == "tensorrt_plan" and _max_batch(config) == 128
    assert list(config.dynamic_batching.preferred_batch_size) == [32]
    assert dict(config.cc_model_filenames) == {"9.0": "model_sm90.plan", "8.9": "model_sm89.plan"}
    assert (target / "1" / "model_sm89.plan").read_bytes() == b"plan for 8.9"
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert config.parameters["precision"].string_value == "fp16"
    with pytest.raises(InputError, match="TensorRT engines run on a GPU"):
        triton.write_triton_repository(export, tmp_path / "repo", name="cpu", instance_kind="cpu")


def _with_engine(tmp_path, tiny_export, **facts):
    """A copy of the export with one simulated TensorRT engine entry carrying ``facts``."""
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    manifest = json.loads((export / MANIFEST_NAME).read_text())
    (export / "model.engine").write_bytes(b"a version-compatible plan")
    manifest["artifacts"].append(
        {**manifest["artifacts"][0], "path": "model.engine", "format": "tensorrt", "precision": "fp16",
         "sha256": sha256_file(export / "model.engine"), "compute_capability": "9.0",
         "profile": {"min": 1, "opt": 8, "max": 16}, **facts}
    )  # fmt: skip
    (export / MANIFEST_NAME).write_text(json.dumps(manifest))
    return export


def test_version_compatible_engines_need_the_host_code_flag_and_triton_is_told(tiny_export, tmp_path, capsys):
    """Triton loads them only with --backend-config=tensorrt,version-compatible=true, which runs the native
    code stored in every engine of the repository: refused without --allow-engine-host-code; with it, the
    flag is printed and recorded."""
    export = _with_engine(tmp_path, tiny_export, version_compatible=True, lean_runtime="embedded")
    repo = tmp_path / "repo"
    with pytest.raises(
        InputError, match="version-compatible engine: it runs native code .*--allow-engine-host"
    ):
        triton.write_triton_repository(export, repo)
    assert cli.main(["triton", str(export), str(repo)]) == 2
    assert triton.HOST_CODE_FLAG in capsys.readouterr().err
    assert cli.main(["triton", str(export), str(repo), "--allow-engine-host-code"]) == 0
    out = capsys.readouterr().out
    assert f"tritonserver --model-repository {repo} {triton.HOST_CODE_FLAG}" in out and "you trust" in out
    target = repo / "virchow2g-mini-tiny"
    assert triton.needs_host_code(target) and _config(target).platform == "tensorrt_plan"
    assert _config(target).parameters["version_compatible"].string_value == "true"
    excluded = _with_engine(tmp_path / "lean", tiny_export, version_compatible=True, lean_runtime="excluded")
    with pytest.raises(InputError, match="lean runtime excluded, which Triton cannot supply"):
        triton.write_triton_repository(excluded, tmp_path / "repo2", allow_engine_host_code=True)
    plain = _with_engine(tmp_path / "plain", tiny_export, version_compatible=False)
    assert not triton.needs_host_code(triton.write_triton_repository(plain, tmp_path / "repo3"))


def test_an_export_with_patch_tokens_serves_the_embedding(tiny_export, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    manifest = json.loads((export / MANIFEST_NAME).read_text())
    for artifact in manifest["artifacts"]:
        artifact["outputs"] = [
            {"name": "patch_tokens", "dtype": "float32", "shape": ["batch", 256, 96]},
            *artifact["outputs"],
        ]
    (export / MANIFEST_NAME).write_text(json.dumps(manifest))
    (output,) = _config(triton.write_triton_repository(export, tmp_path / "repo")).output
    assert output.name == "embedding" and list(output.dims) == [192]


def test_without_tritonclient_the_error_names_the_extra(tiny_export, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "tritonclient.grpc", None)
    assert cli.main(["triton", str(tiny_export), str(tmp_path / "repo")]) == 3
    assert "pip install 'virchow-rt[triton]'" in capsys.readouterr().err


def test_export_triton_writes_the_entry_after_the_export(tmp_path, capsys):
    pytest.importorskip("virchow_rt.export.pipeline")
    out, repo = tmp_path / "export", tmp_path / "repo"
    argv = ["export", "virchow2g-mini-tiny", "--random-weights", "--out", str(out), "--parity-tiles", "2"]
    assert cli.main([*argv, "--precision", "fp32", "--triton", str(repo)]) == 0
    assert f"Triton model: {repo / 'virchow2g-mini-tiny'}" in capsys.readouterr().out
    assert _config(repo / "virchow2g-mini-tiny").platform == "onnxruntime_onnx"


def _copy(tiny_export, tmp_path, change=None):
    """A copy of the export whose manifest ``change(manifest)`` edits; returns its folder."""
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    manifest = json.loads((export / MANIFEST_NAME).read_text())
    if change:
        change(manifest)
    (export / MANIFEST_NAME).write_text(json.dumps(manifest))
    return export


def test_a_model_file_is_placed_as_embed_and_serve_take_it(tiny_export, tmp_path, capsys):
    repo = tmp_path / "repo"
    fp16 = tiny_export / "virchow2g-mini-tiny.fp16.onnx"
    assert cli.main(["triton", str(fp16), str(repo), "--name", "mini16"]) == 0
    assert "does not resize" in capsys.readouterr().out
    config = _config(repo / "mini16")
    assert config.platform == "onnxruntime_onnx" and config.parameters["precision"].string_value == "fp16"
    assert sha256_file(repo / "mini16" / "1" / "model.onnx") == sha256_file(fp16)
    with pytest.raises(InputError, match="is the fp16 onnx model: drop --platform and --precision"):
        triton.write_triton_repository(fp16, repo, name="other", precision="fp32")
    lone = tmp_path / "lone" / "model.onnx"
    lone.parent.mkdir()
    shutil.copy(fp16, lone)
    assert cli.main(["triton", str(lone), str(repo)]) == 2  # no manifest beside it: one line, no traceback
    assert "no manifest.json" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="not an export folder or a model file"):
        triton.write_triton_repository(tmp_path / "notes.txt", repo)
    assert sorted(p.name for p in repo.iterdir()) == ["mini16"]


def _with_int8(manifest):
    fp32 = next(a for a in manifest["artifacts"] if a["precision"] == "fp32")
    manifest["artifacts"].append({**fp32, "precision": "int8"})  # the fp32 file stands in for the int8 one


def test_the_int8_model_runs_on_cpu_instances_by_default(tiny_export, tmp_path):
    export = _copy(tiny_export, tmp_path, _with_int8)
    target = triton.write_triton_repository(export, tmp_path / "repo", precision="int8", name="int8")
    assert _config(target).instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    with pytest.warns(UserWarning, match="int8 ONNX model is made for the CPU"):
        on_gpu = triton.write_triton_repository(
            export, tmp_path / "repo", precision="int8", instance_kind="gpu"
        )
    assert _config(on_gpu).instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    fp32 = triton.write_triton_repository(export, tmp_path / "repo", name="fp32")
    assert _config(fp32).instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU


def _fp32(manifest):
    return next(a for a in manifest["artifacts"] if a["precision"] == "fp32")


@pytest.mark.parametrize(
    ("change", "error", "reason"),
    [
        (lambda m: _fp32(m).update(path="../outside/model.onnx"), ModelFileError, "climbs out with '..'"),
        (lambda m: _fp32(m).update(path="OUTSIDE"), ModelFileError, "an absolute path"),
        (lambda m: _fp32(m).update(path="link.onnx"), ModelFileError, "through a symlink"),
        (lambda m: _fp32(m).update(external_data="../outside/model.onnx", external_data_sha256="0"),
         ModelFileError, "climbs out with '..'"),
        (lambda m: _fp32(m).update(external_data="model.onnx", external_data_sha256="0"), ModelFileError,
         "external data 'model.onnx', a name Triton reserves"),
        (lambda m: _fp32(m).update(external_data="./config.pbtxt", external_data_sha256="0"), ModelFileError,
         "a name Triton reserves"),
        (lambda m: m.update(variant="./../escaped"), InputError, "the variant .*cannot be used as a name"),
        (lambda m: _fp32(m).update(sha256="0" * 64), ModelFileError, "does not match the sha256"),
    ],
    ids=["dotdot", "absolute", "symlink-out", "external-data", "data-model.onnx", "data-config.pbtxt",
         "variant", "tampered"],
)  # fmt: skip
def test_nothing_a_manifest_says_takes_the_repository_outside(tiny_export, tmp_path, change, error, reason):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tiny_export / "virchow2g-mini-tiny.fp32.onnx", outside / "model.onnx")

    def edit(manifest):
        change(manifest)
        if _fp32(manifest)["path"] == "OUTSIDE":
            _fp32(manifest)["path"] = str(outside / "model.onnx")

    export = _copy(tiny_export, tmp_path, edit)
    os.symlink(outside / "model.onnx", export / "link.onnx")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(error, match=reason):
        triton.write_triton_repository(export, tmp_path / "repo")
    assert {p.name for p in tmp_path.iterdir()} <= {*before, "repo"}  # nothing escaped
    assert not (tmp_path / "repo").exists() or list((tmp_path / "repo").iterdir()) == []  # nothing half-made
    assert sorted(p.name for p in outside.iterdir()) == ["model.onnx"]
