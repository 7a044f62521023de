"""One export at a time writes a folder, and what its manifest says is checked before it is kept."""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import pytest

from virchow_rt.contract import MANIFEST_NAME, Manifest
from virchow_rt.errors import OutputError
from virchow_rt.export import pipeline
from virchow_rt.export.pipeline import export_model

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.model.weights.RandomWeightsWarning")
NAME = "virchow2-tiny"


def _export(folder: Path, precisions: list[str], **kwargs) -> Manifest:
    kwargs.setdefault("random_weights", True)
    return export_model(NAME, folder, precisions=precisions, parity_tiles=4, **kwargs)


def test_a_second_export_into_a_folder_being_written_fails_at_once(tmp_path, monkeypatch):
    building, release, results = threading.Event(), threading.Event(), {}
    real = pipeline.build_model

    def held_build(*args, **kwargs):
        if not building.is_set():  # the first export: hold it here, its lock taken
            building.set()
            assert release.wait(60), "the second export never finished"
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build_model", held_build)

    def first() -> None:
        try:
            results["first"] = _export(tmp_path, ["fp32"])
        except BaseException as err:  # noqa: BLE001 - reported by the test below
            results["first"] = err

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert building.wait(60), "the first export never started building"
        with pytest.raises(OutputError, match="another export is writing .*; wait for it or export"):
            _export(tmp_path, ["fp16"])
    finally:
        release.set()
        thread.join(120)
    manifest = results["first"]
    assert isinstance(manifest, Manifest), manifest
    assert [a.precision for a in manifest.artifacts] == ["fp32"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", f"{NAME}.fp32.onnx"]  # no lock
    assert [a.precision for a in _export(tmp_path, ["fp16"]).artifacts] == ["fp32", "fp16"]  # free again


def test_a_refused_export_into_a_new_folder_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "export"
    with pytest.raises(Exception, match="weights"):
        export_model(NAME, out, weights=tmp_path / "missing.pt", precisions=["fp32"], parity_tiles=4)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> Path:
    """A random-weights fp32 + fp16 export, copied by the tests that change it."""
    folder = tmp_path_factory.mktemp("both")
    _export(folder, ["fp32", "fp16"])
    return folder


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_entry(folder: Path, index: int, **changes) -> None:
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["artifacts"][index].update(changes)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))


FP32, FP16 = f"{NAME}.fp32.onnx", f"{NAME}.fp16.onnx"


@pytest.mark.parametrize(
    "damage, problem",
    [
        ("outside", r"'\.\./elsewhere\.onnx' \(it climbs out with '\.\.'\)"),
        ("twice", rf"'{FP32}' \(listed twice\)"),
        ("missing", rf"'{FP32}' \(no such file\)"),
        ("size", rf"'{FP32}' \(\d+ bytes, recorded \d+\)"),
        ("data size", rf"'{FP32}\.data' \(\d+ bytes, recorded 1\)"),
        ("folder", rf"'{FP32}' \(a folder, not a file\)"),
    ],
)
def test_a_kept_artifact_not_there_as_listed_is_refused_before_any_work(
    both, tmp_path, monkeypatch, damage, problem
):
    folder = _copy(both, tmp_path / "export")
    if damage == "outside":
        _edit_entry(folder, 0, path="../elsewhere.onnx")
    elif damage == "twice":
        _edit_entry(folder, 1, external_data=FP32)
    elif damage in ("missing", "folder"):
        (folder / FP32).unlink()
        if damage == "folder":
            (folder / FP32).mkdir()
    elif damage == "size":
        with open(folder / FP32, "ab") as fh:
            fh.write(b"\0")
    else:  # a graph with external data whose size is not the recorded one
        (folder / f"{FP32}.data").write_bytes(b"12")
        _edit_entry(folder, 0, external_data=f"{FP32}.data", external_data_size_bytes=1)
    before = (folder / MANIFEST_NAME).read_text()
    monkeypatch.setattr(pipeline, "build_model", lambda *a: pytest.fail("built the model"))
    with pytest.raises(OutputError, match=problem) as err:
        _export(folder, ["fp16"])
    assert "\n" not in str(err.value) and "--overwrite" in str(err.value)
    assert (folder / MANIFEST_NAME).read_text() == before


def test_an_artifact_made_again_may_be_missing(both, tmp_path):
    folder = _copy(both, tmp_path / "export")
    (folder / FP16).unlink()  # e.g. a run killed while moving it in: exporting fp16 again repairs the folder
    manifest = _export(folder, ["fp16"])
    assert [a.path for a in manifest.artifacts] == [FP32, FP16] and (folder / FP16).is_file()


@pytest.mark.parametrize("name", [FP16, f"{FP16}.data"])
def test_a_folder_where_a_file_goes_is_refused_before_any_work_and_kept(both, tmp_path, monkeypatch, name):
    from virchow_rt.export.merge import commit

    folder = _copy(both, tmp_path / "export")
    (folder / FP16).unlink()
    (folder / name).mkdir(exist_ok=True)
    (folder / name / "mine.txt").write_text("not the export's")
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "build_model", lambda *a: pytest.fail("built the model"))
        with pytest.raises(OutputError, match=f"{name} is a folder, where this export writes a file; move"):
            _export(folder, ["fp16"])
    staging = tmp_path / "staging"
    (staging / FP16).parent.mkdir()
    (staging / FP16).write_bytes(b"graph")
    manifest = Manifest.read(folder)
    with pytest.raises(OutputError, match="is a folder"):  # commit itself refuses before moving anything
        commit(staging, folder, [manifest.artifact_for(FP16)], manifest)
    assert (folder / name / "mine.txt").read_text() == "not the export's" and (staging / FP16).exists()


def test_a_rollback_that_fails_keeps_the_old_files_and_names_them(both, tmp_path, monkeypatch):
    from virchow_rt.export import merge

    folder = _copy(both, tmp_path / "export")
    old = (folder / FP32).read_bytes()
    real_replace = merge.os.replace

    def replace(src, dst):
        if ".replaced" in Path(src).parts:  # putting an old file back: a second Ctrl-C arrives
            raise KeyboardInterrupt
        real_replace(src, dst)

    def fail_write(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(merge.os, "replace", replace)
    monkeypatch.setattr(Manifest, "write", fail_write)
    with pytest.raises(
        merge.RollbackFailed, match="planted failure.*putting its old files back failed"
    ) as err:
        _export(folder, ["fp32"])
    aside = Path(str(err.value).split("they are kept in ")[1].split(":")[0])
    assert aside.parent.parent == folder and (aside / FP32).read_bytes() == old
    assert "\n" not in str(err.value)


_STOPPED_CHILD = """
import sys
from virchow_rt.cli.main import main
from virchow_rt.export import pipeline

def parity(*args, **kwargs):  # the new graph is staged: stop here until the parent's SIGTERM
    print("staged", flush=True)
    sys.stdin.read()

pipeline._parity = parity
sys.exit(main(["export", "virchow2-tiny", "--out", sys.argv[1], "--random-weights", "--precision", "fp32",
               "--parity-tiles", "4"]))
"""


def test_sigterm_during_an_export_rolls_it_back_as_ctrl_c_does(both, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    folder = _copy(both, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(Path(pipeline.__file__).parents[2])}
    child = subprocess.Popen(
        [sys.executable, "-c", _STOPPED_CHILD, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout.readline() == "staged\n", child.stderr.read()
        assert [p for p in folder.iterdir() if p.name.startswith(".staging-")]
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130 and "interrupted" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no staging, no lock, old files


def test_tensorrt_missing_is_refused_before_any_work(both, tmp_path, monkeypatch):
    from virchow_rt.backends.tensorrt_module import is_real_tensorrt
    from virchow_rt.errors import MissingDependency

    if is_real_tensorrt("tensorrt"):
        pytest.skip("TensorRT is installed here: nothing is missing")
    folder = _copy(both, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(pipeline, "build_model", lambda *a: pytest.fail("built the model"))
    with pytest.raises(MissingDependency, match="TensorRT is needed to build TensorRT engines"):
        _export(folder, ["fp16"], tensorrt=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_an_engine_of_an_onnx_no_longer_listed_is_unlisted_with_one_warning():
    from virchow_rt.contract import Artifact
    from virchow_rt.export.merge import merge

    def onnx(precision: str, sha: str) -> Artifact:
        return Artifact(path=f"m.{precision}.onnx", format="onnx", precision=precision, sha256=sha)

    engine = Artifact.from_dict(
        {"path": "m.fp16.engine", "format": "tensorrt", "onnx_path": "m.fp16.onnx", "onnx_sha256": "a"}
    )
    previous = Manifest(variant="m", artifacts=(onnx("fp32", "f"), onnx("fp16", "a"), engine))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp16 not rebuilt: the engine stays listed, nothing said
        kept = merge(previous, Manifest(variant="m", artifacts=(onnx("fp32", "g"),)), keep_batch=True)
    assert [a.path for a in kept.artifacts] == ["m.fp32.onnx", "m.fp16.onnx", "m.fp16.engine"]
    with pytest.warns(
        UserWarning, match=r"m\.fp16\.engine \(from m\.fp16\.onnx\): built from an earlier"
    ) as w:
        rebuilt = merge(previous, Manifest(variant="m", artifacts=(onnx("fp16", "b"),)), keep_batch=True)
    assert [a.path for a in rebuilt.artifacts] == ["m.fp32.onnx", "m.fp16.onnx"] and len(w) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # --tensorrt: an engine is built next; the stale one unlisted quietly
        now = Manifest(variant="m", artifacts=(onnx("fp16", "b"),))
        rebuilding = merge(previous, now, keep_batch=True, warn_stale=False)
        same = Manifest(variant="m", artifacts=(onnx("fp16", "a"),))  # the same graph made again
        unchanged = merge(previous, same, keep_batch=True, warn_stale=False)
    assert [a.path for a in rebuilding.artifacts] == ["m.fp32.onnx", "m.fp16.onnx"]
    assert unchanged.artifacts[2] == engine  # still valid: listed even if the build fails


def test_a_failed_tensorrt_build_leaves_an_engine_of_the_same_fp16_graph_listed(both, tmp_path, monkeypatch):
    from virchow_rt.backends import tensorrt_module
    from virchow_rt.contract import Artifact
    from virchow_rt.errors import BackendError

    folder = _copy(both, tmp_path / "export")
    engine_file = folder / f"{NAME}.fp16.engine"
    engine_file.write_bytes(b"an engine built from this fp16 graph")
    fp16 = Manifest.read(folder).artifact_for(FP16)
    engine = Artifact.from_dict(
        {"path": engine_file.name, "format": "tensorrt", "precision": "fp16", "sha256": "e" * 64,
         "size_bytes": engine_file.stat().st_size, "onnx_path": FP16, "onnx_sha256": fp16.sha256}
    )  # fmt: skip
    Manifest.read(folder).with_artifact(engine).write(folder)

    def build_fails(*args, **kwargs):
        raise BackendError("planted: the TensorRT build failed")

    monkeypatch.setattr(tensorrt_module, "import_tensorrt", lambda *a: None)  # none here: never used
    monkeypatch.setattr(pipeline, "_build_engine", build_fails)
    with pytest.raises(BackendError, match="planted"):
        _export(folder, ["fp16"], tensorrt=True)  # the same weights: the same fp16 graph again
    listed = Manifest.read(folder)
    assert listed.artifact_for(FP16).sha256 == fp16.sha256 and listed.artifact_for(engine.path) == engine


def test_a_folder_where_the_engine_goes_is_refused_before_any_work(both, tmp_path, monkeypatch):
    from virchow_rt.backends import tensorrt_module

    folder = _copy(both, tmp_path / "export")
    (folder / f"{NAME}.fp16.engine").mkdir()
    (folder / f"{NAME}.fp16.engine" / "mine.txt").write_text("not the export's")
    before = (folder / MANIFEST_NAME).read_text()
    monkeypatch.setattr(tensorrt_module, "import_tensorrt", lambda *a: None)  # none here: never used
    monkeypatch.setattr(pipeline, "build_model", lambda *a: pytest.fail("built the model"))
    with pytest.raises(OutputError, match=rf"{NAME}\.fp16\.engine is a folder, where this export writes"):
        _export(folder, ["fp16"], tensorrt=True)
    assert (folder / MANIFEST_NAME).read_text() == before
    assert (folder / f"{NAME}.fp16.engine" / "mine.txt").read_text() == "not the export's"
