"""One output folder, one configuration: of runs claiming a folder at once, exactly one records its own."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from virchow_rt.errors import OutputError
from virchow_rt.slides import folder


def config(model: str) -> dict:
    return {"encoder": model, "patch_size": 224, "coords_source": ""}


def test_a_claim_that_lands_between_the_check_and_the_write_of_another_wins_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run A checks the folder, run B claims it meanwhile: A must be refused, not write over B's record."""
    real = json.dumps
    raced: list[str] = []

    def dumps(data, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - json.dumps' signature
        if data == config("a") and not raced:  # A is about to write its record: B's claim lands now
            raced.append("b")
            folder.claim(tmp_path, config("b"))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", dumps)
    with pytest.raises(OutputError, match=r"holds features of another configuration \(encoder 'b' -> 'a'\)"):
        folder.claim(tmp_path, config("a"))
    assert raced and json.loads((tmp_path / folder.CONFIG_NAME).read_text()) == config("b")
    assert [p.name for p in tmp_path.iterdir()] == [folder.CONFIG_NAME]  # no temporary file left


def claim_at_once(out: Path, models: list[str]) -> tuple[list[str], list[str]]:
    """Each model's run claims ``out`` in its own thread, all released at the same moment."""
    start, claimed, refused = threading.Barrier(len(models)), [], []

    def claim(model: str) -> None:
        start.wait()
        try:
            folder.claim(out, config(model))
            claimed.append(model)
        except OutputError:
            refused.append(model)

    threads = [threading.Thread(target=claim, args=(model,)) for model in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return claimed, refused


def test_of_many_runs_claiming_one_folder_at_once_exactly_one_records_its_configuration(
    tmp_path: Path,
) -> None:
    for trial in range(5):
        out = tmp_path / str(trial)
        out.mkdir()
        claimed, refused = claim_at_once(out, [f"m{i}" for i in range(6)])
        assert len(claimed) == 1 and len(refused) == 5, (claimed, refused)
        assert json.loads((out / folder.CONFIG_NAME).read_text()) == config(claimed[0])


def test_without_hard_links_the_record_is_still_created_exclusively(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src, dst):  # noqa: ANN001, ANN202 - os.link's signature
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    folder.claim(tmp_path, config("a"))
    folder.claim(tmp_path, config("a"))  # the same configuration: the folder is reused
    with pytest.raises(OutputError, match="encoder 'a' -> 'b'"):
        folder.claim(tmp_path, config("b"))
    assert [p.name for p in tmp_path.iterdir()] == [folder.CONFIG_NAME]


def test_a_record_that_is_not_a_configuration_is_one_line(tmp_path: Path) -> None:
    (tmp_path / folder.CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(OutputError, match=r"run_config.json cannot be read \(not a JSON object\); remove it"):
        folder.claim(tmp_path, config("a"))


def test_a_record_that_is_a_pipe_or_huge_is_one_line_not_a_hang(tmp_path: Path, monkeypatch) -> None:
    os.mkfifo(tmp_path / folder.CONFIG_NAME)  # no writer: reading it would block for ever
    monkeypatch.setattr(folder.time, "sleep", lambda s: None)  # its retries, at once
    with pytest.raises(OutputError, match=r"run_config.json cannot be read \(not a regular file"):
        folder.claim(tmp_path, config("a"))
    os.unlink(tmp_path / folder.CONFIG_NAME)
    (tmp_path / folder.CONFIG_NAME).write_text(" " * (folder.CONFIG_MAX_BYTES + 1))
    with pytest.raises(OutputError, match=r"cannot be read \(more than"):
        folder.claim(tmp_path, config("a"))
