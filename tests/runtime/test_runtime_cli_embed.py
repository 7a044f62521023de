"""`virchow-rt embed` and `virchow-rt info` through cli.main: outputs, sidecar, one-line errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from runtime_models import WIDTH, expected_embedding

from virchow_rt.cli.main import main
from virchow_rt.errors import RandomWeightsWarning
from virchow_rt.files import sha256_file


def _folder_of_pngs(folder, tiles):
    folder.mkdir(exist_ok=True)
    for i, tile in enumerate(tiles):
        Image.fromarray(tile).save(folder / f"tile{i:03d}.png")
    return folder


def test_embed_npy_writes_embeddings_and_sidecar(models, tissue, tmp_path, capsys):
    np.save(tmp_path / "tiles.npy", tissue[:12])
    out = tmp_path / "out" / "emb.npy"
    args = ["embed", str(models["fp32"]), str(tmp_path / "tiles.npy"), "--out", str(out)]
    with pytest.warns(RandomWeightsWarning, match="RANDOM WEIGHTS: .*fp32.onnx was exported with random"):
        code = main([*args, "--batch", "5"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    emb = np.load(out)
    assert emb.shape == (12, 2 * WIDTH) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, expected_embedding(tissue[:12]), atol=1e-5)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["model"]["sha256"] == sha256_file(models["fp32"])
    assert meta["model"]["variant"] == "virchow2-tiny" and meta["model"]["precision"] == "fp32"
    assert (meta["pooling"], meta["embedding_dim"], meta["tiles"]) == ("cls_mean", 2 * WIDTH, 12)
    assert meta["random_weights"] is True and "RANDOM WEIGHTS" in meta["warning"]
    assert meta["backend"] == "onnxruntime-cpu" and meta["batch_size"] == 5 and meta["skipped"] == []
    assert meta["resize"] == "cpu"  # auto: the backend runs on the CPU
    assert meta["sources"] == [{"path": str(tmp_path / "tiles.npy"), "kind": "npy", "rows": [0, 12]}]
    summary = captured.out.strip().splitlines()
    assert len(summary) == 1 and "embedded 12 tiles" in summary[0] and "tiles/s" in summary[0]
    assert "onnxruntime-cpu" in summary[0] and "resizing on the CPU" in summary[0]
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.json", "emb.npy"]  # no temporary files left


def test_embed_gpu_resize_on_a_cpu_backend_is_a_clear_error(models, tissue, tmp_path, capsys):
    np.save(tmp_path / "tiles.npy", tissue[:2])
    out = tmp_path / "emb.npy"
    args = ["embed", str(models["fp32"]), str(tmp_path / "tiles.npy"), "--out", str(out)]
    code = main([*args, "--resize", "gpu"])
    err = capsys.readouterr().err
    assert code != 0 and "resize='gpu' needs a backend that runs on a GPU" in err
    assert not out.exists()


def test_embed_cls_pooling_real_weights_and_images(models, tissue, tmp_path, capsys):
    folder = _folder_of_pngs(tmp_path / "pngs", tissue[:3])
    out = tmp_path / "cls.npy"
    assert main(["embed", str(models["real"]), str(folder), "--out", str(out), "--pooling", "cls"]) == 0
    captured = capsys.readouterr()
    assert "RANDOM" not in captured.err
    emb = np.load(out)
    np.testing.assert_allclose(emb, expected_embedding(tissue[:3])[:, :WIDTH], atol=1e-5)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["random_weights"] is False and "warning" not in meta and meta["embedding_dim"] == WIDTH
    assert [s["rows"] for s in meta["sources"]] == [[0, 1], [1, 2], [2, 3]]


def test_skip_errors_reports_skipped_files(models, tissue, tmp_path, capsys):
    folder = _folder_of_pngs(tmp_path / "pngs", tissue[:4])
    data = (folder / "tile001.png").read_bytes()
    (folder / "tile001.png").write_bytes(data[: len(data) // 3])
    (folder / "readme.txt").write_text("hello")
    out = tmp_path / "e.npy"
    assert main(["embed", str(models["fp32"]), str(folder), "--out", str(out), "--skip-errors"]) == 0
    captured = capsys.readouterr()
    assert "1 skipped" in captured.out and "1 file ignored (not tiles" in captured.out
    emb = np.load(out)
    np.testing.assert_allclose(emb, expected_embedding(tissue[[0, 2, 3]]), atol=1e-5)
    meta = json.loads(out.with_suffix(".json").read_text())
    skipped = {s["name"].rsplit("/", 1)[-1]: s["reason"] for s in meta["skipped"]}
    assert set(skipped) == {"tile001.png"} and "truncated" in skipped["tile001.png"]
    assert [name.rsplit("/", 1)[-1] for name in meta["ignored"]] == ["readme.txt"]


def _bad_case(kind, models, tissue, tmp_path):
    """(model, tiles, words expected in the error) for one kind of bad input."""
    model, tiles = str(models["fp32"]), tmp_path / "tiles.npy"
    np.save(tiles, tissue[:2])
    if kind == "zero-tiles":
        np.save(tiles, np.zeros((0, 224, 224, 3), np.uint8))
        return model, tiles, ["no tiles to embed"]
    if kind == "dtype":
        np.save(tiles, tissue[:2].astype(np.float32))
        return model, tiles, ["float32", "uint8", "tiles.npy"]
    if kind == "channels":
        np.save(tiles, np.zeros((2, 224, 224, 4), np.uint8))
        return model, tiles, ["(2, 224, 224, 4)", "tiles.npy"]
    if kind == "rank":
        np.save(tiles, tissue[0])
        return model, tiles, ["(224, 224, 3)", "x[None]"]
    if kind == "missing-model":
        return str(tmp_path / "nope.onnx"), tiles, ["nope.onnx does not exist", "virchow-rt export"]
    if kind in ("truncated-model", "garbage-model"):
        bad = tmp_path / "bad.onnx"
        data = models["fp32"].read_bytes()
        bad.write_bytes(data[: len(data) // 2] if kind == "truncated-model" else b"\x13garbage" * 100)
        return str(bad), tiles, ["bad.onnx", "truncated, corrupt or not ONNX"]
    if kind == "non-image":
        folder = _folder_of_pngs(tmp_path / "pngs", tissue[:2])
        (folder / "notes.txt").write_text("x")
        return model, folder / "notes.txt", ["notes.txt is not an image", "--skip-errors"]
    if kind == "corrupt-image":
        folder = _folder_of_pngs(tmp_path / "pngs", tissue[:3])
        data = (folder / "tile002.png").read_bytes()
        (folder / "tile002.png").write_bytes(data[: len(data) // 2])
        return model, folder, ["tile002.png", "corrupt or truncated"]
    if kind == "empty-folder":
        (tmp_path / "empty").mkdir()
        return model, tmp_path / "empty", ["empty has no files of tiles"]
    raise AssertionError(kind)


BAD = [
    "zero-tiles",
    "dtype",
    "channels",
    "rank",
    "missing-model",
    "truncated-model",
    "garbage-model",
    "non-image",
    "corrupt-image",
    "empty-folder",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_line_and_leaves_no_output(kind, models, tissue, tmp_path, capsys):
    model, tiles, words = _bad_case(kind, models, tissue, tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = main(["embed", model, str(tiles), "--out", str(out_dir / "emb.npy")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    lines = [line for line in err.splitlines() if "RANDOM WEIGHTS" not in line]
    assert len(lines) == 1 and lines[0].startswith("virchow-rt embed: error: "), err
    for word in words:
        assert word in lines[0]
    assert list(out_dir.iterdir()) == []  # no .npy, no .json, no temporary file


def test_existing_output_survives_a_failed_run(models, tissue, tmp_path, capsys):
    np.save(tmp_path / "good.npy", tissue[:2])
    out = tmp_path / "emb.npy"
    assert main(["embed", str(models["fp32"]), str(tmp_path / "good.npy"), "--out", str(out)]) == 0
    before = out.read_bytes()
    folder = _folder_of_pngs(tmp_path / "pngs", tissue[:2])
    (folder / "tile000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    assert main(["embed", str(models["fp32"]), str(folder), "--out", str(out)]) == 2
    assert out.read_bytes() == before
    capsys.readouterr()


def test_out_must_be_npy_and_backend_errors(models, tissue, tmp_path, capsys):
    np.save(tmp_path / "t.npy", tissue[:2])
    args = ["embed", str(models["fp32"]), str(tmp_path / "t.npy"), "--out"]
    assert main([*args, str(tmp_path / "e.h5")]) == 2
    assert "must end in .npy" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "e.npy"), "--backend", "x"]) == 2
    assert "unknown backend 'x'" in capsys.readouterr().err
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert main([*args, str(tmp_path / "e.npy"), "--backend", "onnxruntime-cuda"]) == 5
        assert "onnxruntime-cpu" in capsys.readouterr().err
    assert not (tmp_path / "e.npy").exists()


def test_export_folder_as_model(models, tissue, tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    shutil.copy(models["fp32"], folder / "virchow2-tiny.fp32.onnx")
    artifacts = [{"path": "virchow2-tiny.fp32.onnx", "format": "onnx", "precision": "fp32"}]
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 1, "artifacts": artifacts}))
    np.save(tmp_path / "t.npy", tissue[:3])
    assert main(["embed", str(folder), str(tmp_path / "t.npy"), "--out", str(tmp_path / "e.npy")]) == 0
    meta = json.loads((tmp_path / "e.json").read_text())
    assert meta["model"]["path"].endswith("virchow2-tiny.fp32.onnx") and meta["model"]["sha256"]
    capsys.readouterr()


def test_info_text_and_json(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime_providers" in text and "CPUExecutionProvider" in text
    assert main(["info", "--json"]) == 0
    caps = json.loads(capsys.readouterr().out)
    assert caps["cpu_physical_cores"] >= 1 and "onnxruntime-cpu" in caps["backends"]
    for key in ("cpu", "gpus", "onnxruntime", "tensorrt", "cuda_python", "torch", "virchow_rt"):
        assert key in caps
