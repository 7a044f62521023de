"""One RANDOM WEIGHTS line per command, in one format, however many parts of the command notice it."""

from __future__ import annotations

import warnings

import numpy as np

from virchow_rt.cli.main import main
from virchow_rt.errors import RandomWeightsWarning, warn_random_weights


def test_one_notice_per_command(tmp_path) -> None:
    from virchow_rt.export.pipeline import export_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(
            "virchow2-tiny", tmp_path / "m", random_weights=True, precisions=["fp32"], parity_tiles=2
        )
    np.save(tmp_path / "t.npy", np.zeros((3, 224, 224, 3), np.uint8))
    args = ["embed", str(tmp_path / "m"), str(tmp_path / "t.npy"), "--out", str(tmp_path / "e.npy")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # even so: the command shows its first notice only
        assert main(args) == 0
    notices = [str(w.message) for w in caught if w.category is RandomWeightsWarning]
    assert len(notices) == 1 and notices[0].startswith("RANDOM WEIGHTS: "), notices
    assert "its embeddings are meaningless (tests and demos only; --weights for real ones)" in notices[0]


def test_the_notice_is_a_warning_of_its_own_category() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_random_weights("a test model")
    assert [w.category for w in caught] == [RandomWeightsWarning]
    assert str(caught[0].message).startswith("RANDOM WEIGHTS: a test model: its embeddings are meaningless")
