"""The contracts' one home: manifest.json read and written as typed records without losing a byte or a key,
ModelInfo built from each source with the same fallbacks, embedding_dim, and the Backend interface."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from virchow_rt.backends.base import Backend
from virchow_rt.benchmark.backends import compute_only
from virchow_rt.contract import (
    Artifact,
    Manifest,
    ModelInfo,
    WeightsInfo,
    embedding_dim,
)
from virchow_rt.errors import InputError, ModelFileError
from virchow_rt.files import sha256_file
from virchow_rt.registry import get_variant

VARIANT = get_variant("virchow2-tiny")


def _as_exported(**top: object) -> dict:
    """A manifest as ``virchow-rt export`` writes it (its key order), plus ``top`` keys."""
    v, p = VARIANT, VARIANT.preprocess
    onnx = {
        "path": "virchow2-tiny.fp32.onnx", "format": "onnx", "precision": "fp32", "sha256": "a" * 64,
        "size_bytes": 123, "external_data": None, "opset": 17,
        "inputs": [{"name": "tiles", "dtype": "uint8", "shape": ["batch", 224, 224, 3]}],
        "outputs": [{"name": "embedding", "dtype": "float32", "shape": ["batch", 192]}],
        "parity": {"min_cosine": 1.0, "passed": True, "summary": "PASS: min cosine 1.0"},
        "seconds": {"export": 1.0, "parity": 0.5},
    }  # fmt: skip
    engine = {
        **{k: onnx[k] for k in ("path", "format", "precision", "sha256", "size_bytes", "external_data")},
        "path": "virchow2-tiny.fp16.engine", "format": "tensorrt", "precision": "fp16",
        "precision_plan": None, "profile": {"min": 1, "opt": 8, "max": 16}, "lean_runtime": None,
        "tensorrt_version": "10.13.0.35", "written_by_a_newer_virchow_rt": [1, 2],
    }  # fmt: skip
    return {
        "schema_version": 1, "variant": v.name, "timm_arch": v.timm_arch, "model_args": dict(v.model_args),
        "mlp": v.mlp, "norm_eps": v.norm_eps, "preprocess": dataclasses.asdict(p),
        "batch": {"min": 1, "opt": 8, "max": 16},
        "embedding": {"pooling": "cls_mean", "recommended": "cls", "dim": 192, "width": 96, "layout": "…"},
        "weights": {"random": True, "sha256": "random", "source": "random (seed 0)", "file": None},
        "versions": {"virchow_rt": "0"}, "created": "2026-01-01T00:00:00+00:00",
        "artifacts": [onnx, engine], "warning": "RANDOM WEIGHTS", **top,
    }  # fmt: skip


def test_a_manifest_is_written_back_byte_for_byte_with_every_key(tmp_path: Path) -> None:
    data = _as_exported(another_tools_key={"kept": True})
    text = json.dumps(data, indent=2) + "\n"  # how manifest.json has always been written
    (tmp_path / "manifest.json").write_text(text)
    manifest = Manifest.read(tmp_path)
    assert manifest.extra == {"another_tools_key": {"kept": True}}
    assert manifest.artifacts[1].extra["written_by_a_newer_virchow_rt"] == [1, 2]
    manifest.write(tmp_path)
    assert (tmp_path / "manifest.json").read_text() == text
    # a hand-written one keeps its own order and leaves absent keys absent
    (tmp_path / "manifest.json").write_text(json.dumps({"artifacts": [{"path": "m.onnx"}], "variant": "x"}))
    Manifest.read(tmp_path).write(tmp_path)
    written = json.loads((tmp_path / "manifest.json").read_text())
    assert written == {
        "schema_version": 1,
        "artifacts": [{"path": "m.onnx", "external_data": None}],
        "variant": "x",
    }


def test_typed_fields_read_from_the_file() -> None:
    manifest = Manifest.from_dict(_as_exported())
    onnx, engine = manifest.artifacts
    assert manifest.batch is not None and (manifest.batch.opt, manifest.batch.max) == (8, 16)
    assert manifest.preprocess == VARIANT.preprocess and manifest.pooling == "cls"
    assert manifest.weights == WeightsInfo(random=True, sha256="random", source="random (seed 0)")
    assert onnx.output_dim() == 192 and onnx.parity_summary == "PASS: min cosine 1.0"
    assert engine.profile is not None and engine.profile.max == 16 and engine.parity_summary is None
    assert manifest.artifact_for("/elsewhere/virchow2-tiny.fp16.engine") == engine
    assert manifest.select("onnx") == [onnx] and manifest.select("onnx", "fp16") == []
    assert manifest.to_variant() == VARIANT
    replaced = manifest.with_artifact(dataclasses.replace(engine, sha256="b" * 64))
    assert [a.sha256 for a in replaced.artifacts] == ["a" * 64, "b" * 64]
    added = manifest.with_artifact(Artifact(path="other.engine", format="tensorrt"))
    assert [a.path for a in added.artifacts][-1] == "other.engine" and len(added.artifacts) == 3


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, "no manifest.json at"),
        ("{not json", "cannot read .* as JSON"),
        ('{"variant": "virchow2"}', "has no 'artifacts' list"),
        ('{"artifacts": [{"format": "onnx"}]}', "not a manifest virchow-rt can read"),
        ('{"artifacts": {"path": "m.onnx"}}', "not a list"),
        ('{"artifacts": [], "batch": "big"}', "not a manifest virchow-rt can read"),
        ('{"artifacts": [], "preprocess": {"crop_pct": 1.0}}', "preprocess.size"),
    ],
)
def test_a_manifest_that_does_not_fit_is_one_line(tmp_path: Path, text: str | None, match: str) -> None:
    if text is not None:
        (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ModelFileError, match=match) as err:
        Manifest.read(tmp_path / "model.onnx")  # the manifest beside a model file
    assert "\n" not in str(err.value) and "virchow-rt export" in str(err.value)


def test_model_info_from_every_source_agrees() -> None:
    weights = WeightsInfo(random=True, sha256="random", source="seed 0")
    torch_side = ModelInfo.from_variant(VARIANT, "fp32", weights)
    assert ModelInfo.from_onnx(torch_side.onnx_metadata(), None, None) == torch_side
    manifest = Manifest.from_dict(_as_exported())
    onnx, engine = manifest.artifacts
    # an ONNX file without metadata: the manifest beside it fills in what the graph does not say
    assert ModelInfo.from_onnx({}, 224, 192, manifest, onnx) == dataclasses.replace(torch_side, pooling="cls")
    assert ModelInfo.from_manifest(manifest, engine) == dataclasses.replace(
        torch_side, precision="fp16", pooling="cls"
    )
    # nothing but the graph: its sizes
    bare = ModelInfo.from_onnx({}, 256, 64, None, None)
    assert (bare.variant, bare.tile_size, bare.embedding_dim, bare.width, bare.precision) == (
        "unknown",
        256,
        64,
        32,
        "unknown",
    )
    thin = dataclasses.replace(manifest, preprocess=None, model_args={})
    with pytest.raises(ModelFileError, match="lacks preprocess, model_args.embed_dim needed to describe"):
        ModelInfo.from_manifest(thin, engine)


def test_embedding_dim_per_pooling() -> None:
    info = ModelInfo.from_variant(VARIANT, "fp32", WeightsInfo(random=True, sha256="random"))
    assert embedding_dim(info, "cls_mean") == 192 and embedding_dim(info, "cls") == 96
    with pytest.raises(InputError, match="unknown pooling 'mean'"):
        embedding_dim(info, "mean")


class _Plain(Backend):
    """A backend that implements only what it must."""

    name = "plain"

    def __init__(self, path: Path | None = None) -> None:
        self.info = ModelInfo.from_variant(VARIANT, "fp32", WeightsInfo())
        self.path = path

    def run(self, tiles: np.ndarray) -> np.ndarray:
        return np.zeros((len(tiles), 192), np.float32)


def test_the_backend_interface_says_what_a_backend_does_not_have(tmp_path: Path) -> None:
    plain = _Plain()
    assert plain.path is None and plain.model_sha256 is None and plain.optimization is None
    assert not plain.transforms_tiles and plain.time_compute(np.zeros((1, 224, 224, 3), np.uint8)) is None
    stats, reason = compute_only(plain, [np.zeros((1, 224, 224, 3), np.uint8)], "cuda", repeats=2, warmup=1)
    assert stats is None and reason == "plain offers no device-only timing"
    model = tmp_path / "model.onnx"
    model.write_bytes(b"graph")
    assert _Plain(model).model_sha256 == sha256_file(model)


def _read_in_thread(folder: Path, fifo: Path | None = None) -> BaseException | Manifest:
    """Manifest.read(folder), failing the test (not hanging it) if it blocks; a FIFO is then released."""
    import threading

    result: list = []

    def read() -> None:
        try:
            result.append(Manifest.read(folder))
        except BaseException as err:  # noqa: BLE001 - returned to the test
            result.append(err)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        if fifo is not None:
            import os

            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer came and went: the read ends
        pytest.fail("Manifest.read blocked")
    return result[0]


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "huge"])
def test_a_manifest_that_is_no_small_file_is_one_line_error_without_reading_it(tmp_path, monkeypatch, kind):
    import os

    from virchow_rt import contract

    target, fifo = tmp_path / "manifest.json", None
    if kind == "fifo":
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        target.symlink_to(fifo)
    elif kind == "device":
        target.symlink_to("/dev/zero")
    elif kind == "folder":
        target.mkdir()
        tmp_path = tmp_path / "model.onnx"  # the manifest beside a model file
    else:
        target.write_text(json.dumps({"artifacts": [], "pad": "x" * 100}))
        monkeypatch.setattr(contract, "MANIFEST_MAX_BYTES", 64)
    err = _read_in_thread(tmp_path, fifo)
    assert isinstance(err, ModelFileError), err
    reason = "more than 64 bytes" if kind == "huge" else "not a regular file"
    assert reason in str(err) and "\n" not in str(err)
