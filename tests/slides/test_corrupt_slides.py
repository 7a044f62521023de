"""A damaged slide file is "not a readable slide" with the reader's own reason: at open time, in one line,
with nothing else on the console, and the same words in summary.json."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from slide_helpers import FakeBackend

from virchow_rt.errors import InputError
from virchow_rt.slides import SlideSettings, process_slides
from virchow_rt.slides.reader import open_slide


def header_only_tiff(path: Path) -> Path:
    """A TIFF cut after its 8-byte header: tifffile opens it with zero pages (an IndexError later)."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((64, 64, 3), np.uint8))
    path.write_bytes(buffer.getvalue()[:8])
    return path


def test_a_truncated_slide_is_refused_at_open_with_the_readers_reason(tmp_path, capfd):
    bad = header_only_tiff(tmp_path / "cut.svs")
    with pytest.raises(InputError) as error:
        open_slide(bad, slide_mpp=0.5)
    message = str(error.value)
    assert message.startswith("cut.svs is not a readable slide") and "invalid offset" in message
    assert "IndexError" not in message
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # tifffile's warning is the reason, not console noise


def test_the_summary_says_why(make_slide, tmp_path):
    good = make_slide("good.tif").path
    bad = header_only_tiff(good.parent / "bad.svs")
    summary = process_slides([good, bad], FakeBackend(), tmp_path / "out", SlideSettings(batch_size=4),
                             log=lambda line: None)  # fmt: skip
    status = {s["name"]: s for s in json.loads((tmp_path / "out" / "summary.json").read_text())["slides"]}
    assert status["good"]["status"] == "done"
    assert status["bad"]["status"] == "failed" and "not a readable slide" in status["bad"]["reason"]
    assert summary["totals"]["failed"] == 1


def test_slides_left_in_sub_folders_are_mentioned(make_slide, tmp_path):
    from virchow_rt.slides.reader import find_slides

    top = make_slide("top.tif").path.parent
    (top / "case2").mkdir()
    (top / "case2" / "deep.tif").write_bytes(make_slide("other.tif").path.read_bytes())
    (top / "other.tif").unlink()
    with pytest.warns(UserWarning, match=r"sub-folders of .* hold more slides, not included; pass --recurs"):
        assert [p.name for p in find_slides([top])] == ["top.tif"]
    assert sorted(p.name for p in find_slides([top], recursive=True)) == ["deep.tif", "top.tif"]


def test_the_sub_folder_hint_stops_at_the_first_slide_found(make_slide, tmp_path, monkeypatch):
    """A GDC download holds thousands of case folders: one slide found in them is enough for the hint."""
    from virchow_rt.slides.reader import find_slides

    top = make_slide("top.tif").path.parent
    for case in ("case1", "case2", "case3"):
        (top / case).mkdir()
        (top / case / f"{case}.svs").write_bytes(b"")
    walked: list[Path] = []
    real = Path.rglob

    def rglob(self, pattern):  # noqa: ANN001, ANN202 - Path.rglob's signature
        for found in real(self, pattern):
            walked.append(found)
            yield found

    monkeypatch.setattr(Path, "rglob", rglob)
    with pytest.warns(UserWarning, match="hold more slides"):
        assert [p.name for p in find_slides([top])] == ["top.tif"]
    assert len(walked) == 1
