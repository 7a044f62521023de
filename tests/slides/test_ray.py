"""``virchow-rt slides --ray``: a local Ray instance on this CPU machine, two workers on the CPU backend.

Few and small (Ray starts in seconds, not milliseconds): one module-wide Ray instance and one tiny export.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest

from virchow_rt.cli import main as cli
from virchow_rt.slides import SlideSettings, process_slides, read_features

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'virchow-rt[ray]'")
distributed = pytest.importorskip("virchow_rt.slides.ray")

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.errors.RandomWeightsWarning")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    export = pytest.importorskip("virchow_rt.export.pipeline")
    out = tmp_path_factory.mktemp("tiny-model")
    manifest = export.export_model(
        "virchow2g-mini-tiny", out, random_weights=True, precisions=["fp32"], parity_tiles=2
    )
    onnx = manifest.select("onnx", "fp32")
    return out / onnx[0].path


def _same_outputs(a, b):
    x, y = read_features(a), read_features(b)
    np.testing.assert_array_equal(x["coords"], y["coords"])
    np.testing.assert_allclose(x["features"], y["features"], rtol=0, atol=1e-5)
    skip = {"created", "model_file", "timings"}
    assert {k: v for k, v in x["attrs"].items() if k not in skip} == {
        k: v for k, v in y["attrs"].items() if k not in skip
    }


def test_ray_matches_a_local_run_and_a_corrupt_slide_fails_alone(
    ray_local, tiny_onnx, make_slide, tmp_path, capsys
):
    slides = [make_slide(name).path for name in ("a.tif", "b.tif", "c.tif")]
    (tmp_path / "slides" / "broken.svs").write_bytes(b"not a slide at all")
    local, remote = tmp_path / "local", tmp_path / "ray"
    process_slides(slides, tiny_onnx, local, SlideSettings(batch_size=8, workers=1))
    argv = ["slides", str(tmp_path / "slides"), "--model", str(tiny_onnx), "--out", str(remote)]
    assert cli.main([*argv, "--batch", "8", "--workers", "1", "--ray", "--ray-workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "broken.svs: FAILED" in err and err.count("FAILED") == 1
    for slide in slides:
        _same_outputs(local / f"{slide.stem}.h5", remote / f"{slide.stem}.h5")
    summary = json.loads((remote / "summary.json").read_text())
    status = {r["name"]: r["status"] for r in summary["slides"]}
    assert status == {"a": "done", "b": "done", "c": "done", "broken": "failed"}
    assert len({r["worker"] for r in summary["slides"] if r["status"] == "done"}) >= 1
    assert summary["ray"]["workers"] == 2 and summary["totals"]["job_tiles_per_s"] > 0
    assert not [p for p in remote.iterdir() if p.name.endswith((".partial", ".lock"))]


def test_a_worker_killed_mid_slide_leaves_no_complete_file_and_the_retry_writes_it_once(
    ray_local, tiny_onnx, make_slide, tmp_path
):
    slide = make_slide("big.tif", width=3584, height=2688).path
    out = tmp_path / "out"
    result = {}
    job = threading.Thread(
        target=lambda: result.update(
            distributed.process_slides_ray(
                [slide], tiny_onnx, out, SlideSettings(batch_size=4, workers=1), workers=1, log=print
            )
        )
    )
    job.start()
    lock = out / ".big.h5.lock"
    deadline = time.monotonic() + 120
    while not list(out.glob(".big.h5.*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(out.glob(".big.h5.*.partial")), "the slide never started"
    killed = json.loads(lock.read_text())["pid"]
    os.kill(killed, signal.SIGKILL)  # the worker dies mid-slide
    assert not (out / "big.h5").exists()  # nothing that looks complete
    job.join(timeout=300)
    record = result["slides"][0]
    assert record["status"] == "done" and str(killed) not in record["worker"]
    assert read_features(out / "big.h5")["attrs"]["complete"]
    assert not [p for p in out.iterdir() if p.name.endswith((".partial", ".lock"))]


def test_two_jobs_at_once_write_each_slide_exactly_once(ray_local, tiny_onnx, make_slide, tmp_path):
    slides = [make_slide(f"s{i}.tif").path for i in range(4)]
    out = tmp_path / "out"
    results: list[dict] = []

    def job():
        results.append(
            distributed.process_slides_ray(slides, tiny_onnx, out, SlideSettings(workers=1), workers=1)
        )

    jobs = [threading.Thread(target=job) for _ in range(2)]
    for t in jobs:
        t.start()
    for t in jobs:
        t.join(timeout=300)
    assert len(results) == 2
    for slide in slides:
        outcomes = sorted(
            r["status"] for summary in results for r in summary["this_run"] if r["name"] == slide.stem
        )
        assert outcomes.count("done") == 1 and set(outcomes) <= {"done", "locked", "skipped"}, outcomes
        assert read_features(out / f"{slide.stem}.h5")["attrs"]["complete"]


def test_without_ray_the_flag_names_the_extra(monkeypatch, capsys, tmp_path, make_slide):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    slide = make_slide().path
    assert cli.main(["slides", str(slide), "--model", "x.onnx", "--out", str(tmp_path / "o"), "--ray"]) != 0
    assert "pip install 'virchow-rt[ray]'" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


def test_a_model_that_does_not_open_is_its_own_one_line_error(ray_local, make_slide, tmp_path):
    from virchow_rt.errors import ModelFileError

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"no")
    with pytest.raises(ModelFileError, match="cannot load .*bad.onnx"):
        distributed.process_slides_ray([make_slide().path], bad, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()


def test_more_workers_than_the_cluster_holds_is_refused_not_a_hang(
    ray_local, tiny_onnx, make_slide, tmp_path
):
    from virchow_rt.errors import InputError

    with pytest.raises(InputError, match="3 Ray workers .* do not fit this cluster"):
        distributed.process_slides_ray([make_slide().path], tiny_onnx, tmp_path / "out", workers=3)
    with pytest.raises(InputError, match="GPUs"):
        distributed.process_slides_ray(
            [make_slide().path], tiny_onnx, tmp_path / "out", workers=1, gpus_per_worker=1
        )
