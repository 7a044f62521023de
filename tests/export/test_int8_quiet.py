"""An int8 export prints nothing of ONNX Runtime's quantizer (its root-logger pre-processing advice), and
leaves the process's logging as it found it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.errors.RandomWeightsWarning")


def test_the_quantizers_advice_is_not_shown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    export = pytest.importorskip("virchow_rt.export.pipeline")
    pytest.importorskip("onnxruntime.quantization")
    root = logging.getLogger()
    handlers, filters = list(root.handlers), list(root.filters)
    with caplog.at_level(logging.INFO):
        manifest = export.export_model(
            "virchow2g-mini-tiny", tmp_path, random_weights=True, precisions=["fp32", "int8"], parity_tiles=2
        )
    assert manifest.artifacts[1].precision == "int8"
    assert not [r for r in caplog.records if "pre-processing" in r.getMessage()], caplog.text
    assert (root.handlers, root.filters) == (handlers, filters)
