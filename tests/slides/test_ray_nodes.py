"""A ``--ray`` job survives the loss of a node: a ``ray.cluster_utils.Cluster`` of raylets on this machine.

The head holds no CPU (the driver only); each worker node has 1 CPU, so one worker each. A node is removed
without grace while its worker is in the middle of a slide: the worker is frozen first (SIGSTOP, so that
"mid-slide" holds on a busy machine) and dies with its raylet. Few and small: one cluster per test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from slide_helpers import same_outputs

from virchow_rt.slides import SlideSettings, process_slides

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'virchow-rt[ray]'")
cluster_utils = pytest.importorskip("ray.cluster_utils")
distributed = pytest.importorskip("virchow_rt.slides.ray")

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.errors.RandomWeightsWarning")

#: a removed node is known dead in about 1.5 s (Ray's default: about 15 s)
FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                   "health_check_timeout_ms": 500}  # fmt: skip
SETTINGS = SlideSettings(batch_size=4, workers=1, lock_lease=3)
#: tissue over most of it: about 100 tiles, a second or two of work for a worker on the tiny model
BIG = {"width": 2688, "height": 2240, "patches": ((100, 100, 2400, 2000),)}


@pytest.fixture
def cluster():
    head = {"num_cpus": 0, "include_dashboard": False, "_system_config": FAST_NODE_DEATH}
    c = cluster_utils.Cluster(initialize_head=True, head_node_args=head)
    nodes = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def wait_for(done: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + 180
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@contextlib.contextmanager
def lose_node_mid_slide(c, nodes, out: Path, name: str) -> Iterator[int]:
    """Wait until a worker is embedding ``name``; freeze it and remove its node; yields the worker's pid.

    Ray ends a removed node's workers with their raylet; whatever is left of this one (frozen, it may not
    have been reaped yet: then its lock is taken over by its lease) is killed on the way out."""
    wait_for(lambda: list(out.glob(f".{name}.h5.*.partial")), f"{name} to start")
    pid = json.loads((out / f".{name}.h5.lock").read_text())["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        node = next(n for n in nodes if n.all_processes["raylet"][0].process.pid == _parent(pid))
        c.remove_node(node, allow_graceful=False)
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # the worker this test froze


def run_in_thread(slides, model, out, workers) -> tuple[threading.Thread, dict, list[str]]:
    result: dict = {}
    lines: list[str] = []

    def job() -> None:
        result.update(distributed.process_slides_ray(slides, model, out, SETTINGS, workers=workers,
                                                     log=lines.append, warn=lines.append))  # fmt: skip

    thread = threading.Thread(target=job)
    thread.start()
    return thread, result, lines


def check_done_once_as_locally(slides, model, out: Path, tmp_path: Path, lines: list[str]) -> dict:
    """Every slide done exactly once, equal to a single-process run, and nothing left behind; the records."""
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["this_run"]] == ["done"] * len(slides), summary["this_run"]
    for slide in slides:  # one worker reported it done: the lost one never finished it
        assert len([line for line in lines if re.search(rf"\] {slide.name}: \d+ tiles", line)]) == 1, lines
    local = tmp_path / "local"
    process_slides(slides, model, local, SETTINGS, log=lambda line: None)
    for slide in slides:
        same_outputs(local / f"{slide.stem}.h5", out / f"{slide.stem}.h5")
    assert not list(out.glob(".*")), list(out.glob(".*"))  # no lock, no .partial, nothing aside
    return {r["name"]: r for r in summary["slides"]}


def test_a_node_lost_mid_slide_moves_its_slide_to_the_worker_left(cluster, tiny_onnx, make_slide, tmp_path):
    c, nodes = cluster
    slides = [make_slide(f"big{i}.tif", **BIG).path for i in range(2)]
    slides += [make_slide(f"s{i}.tif").path for i in range(2)]  # queued when the node goes
    out = tmp_path / "ray"
    job, result, lines = run_in_thread(slides, tiny_onnx, out, workers=2)
    with lose_node_mid_slide(c, nodes, out, "big1") as lost:
        job.join(timeout=300)
    assert not job.is_alive() and result, lines

    records = check_done_once_as_locally(slides, tiny_onnx, out, tmp_path, lines)
    moved = records["big1"]
    assert moved["attempts"] == 2 and f":{lost}" not in moved["worker"], lines
    assert {records[n]["attempts"] for n in ("big0", "s0", "s1")} == {1}
    reports = [line for line in lines if "lost Ray node" in line]
    assert len(reports) == 1 and "1 slide moved back to the queue (big1.tif)" in reports[0], lines
    assert "1 of 2 workers left" in reports[0]
    [gone] = result["ray"]["lost_workers"]
    assert gone["slide"] == "big1.tif" and gone["worker"].endswith(f":{lost}")
    assert result["ray"]["workers"] == 2 and result["ray"]["workers_left"] == 1


def test_the_only_worker_lost_is_restarted_on_another_node_and_finishes_the_job(
    cluster, tiny_onnx, make_slide, tmp_path
):
    c, nodes = cluster
    slides = [make_slide("big0.tif", **BIG).path, make_slide("s0.tif").path, make_slide("s1.tif").path]
    out = tmp_path / "ray"
    job, result, lines = run_in_thread(slides, tiny_onnx, out, workers=1)
    with lose_node_mid_slide(c, nodes, out, "big0") as lost:
        job.join(timeout=300)
    assert not job.is_alive() and result, lines

    records = check_done_once_as_locally(slides, tiny_onnx, out, tmp_path, lines)
    [worker] = {r["worker"] for r in records.values()}  # the restarted worker ran them all
    assert f":{lost}" not in worker
    assert [records[n]["attempts"] for n in ("big0", "s0", "s1")] == [2, 1, 1]
    assert len([line for line in lines if "no Ray worker is left" in line]) == 1, lines
    assert len([line for line in lines if f"Ray worker {worker} is back" in line]) == 1, lines
    reports = [line for line in lines if "lost Ray node" in line]
    assert len(reports) == 1 and "1 slide moved back to the queue (big0.tif)" in reports[0], lines
