"""A row whose artifact the export lacks names a command that adds it, and that command works."""

from __future__ import annotations

import re
import shlex

import pytest

from virchow_rt.benchmark.backends import open_row_backend
from virchow_rt.benchmark.rows import ROWS_BY_KEY
from virchow_rt.cli.main import main
from virchow_rt.contract import Artifact, Manifest, WeightsInfo
from virchow_rt.errors import ModelFileError
from virchow_rt.registry import get_variant

pytestmark = pytest.mark.filterwarnings("ignore::virchow_rt.model.weights.RandomWeightsWarning")
NAME = "virchow2-tiny"
FP16 = ROWS_BY_KEY["onnxruntime-cpu/fp16"]


def _hint(folder) -> str:
    with pytest.raises(ModelFileError, match="does not exist; add it to the export") as err:
        open_row_backend(FP16, "cpu", variant=get_variant(NAME), folder=folder)
    return re.search(r"`([^`]+)`", str(err.value)).group(1)


def test_the_hint_adds_the_missing_precision_and_keeps_the_others(tmp_path):
    from virchow_rt.export.pipeline import export_model

    folder = tmp_path / "an export"  # a space: the command must quote it
    outputs = ("embedding", "patch_tokens")
    export_model(NAME, folder, random_weights=True, precisions=["fp32"], parity_tiles=4, outputs=outputs)
    command = _hint(folder)
    assert command.endswith("--random-weights --outputs embedding,patch_tokens --precision fp16")
    argv = shlex.split(command)
    assert argv[0] == "virchow-rt" and main([*argv[1:], "--parity-tiles", "4"]) == 0
    assert [a.precision for a in Manifest.read(folder).artifacts] == ["fp32", "fp16"]
    with open_row_backend(FP16, "cpu", variant=get_variant(NAME), folder=folder) as backend:
        assert backend.info.precision == "fp16"


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("{folder}", "--weights {folder} "),
        ("hf://paige-ai/Virchow2@abc", "--weights hf://paige-ai/Virchow2@abc "),
        ("/nowhere/weights", "--weights <the weights it was made from> "),
    ],
)
def test_the_hint_names_the_weights_the_export_was_made_from(tmp_path, source, shown):
    tmp_path = tmp_path / "with space"
    tmp_path.mkdir()
    quoted = shlex.quote(str(tmp_path))
    source, shown = source.format(folder=tmp_path), shown.format(folder=quoted)
    artifact = Artifact(path=f"{NAME}.fp32.onnx", format="onnx", precision="fp32")
    weights = WeightsInfo(random=False, sha256="0" * 64, source=source)
    Manifest(variant=NAME, weights=weights, artifacts=(artifact,)).write(tmp_path)
    assert f"export {NAME} --out {quoted} {shown}--precision fp16" in _hint(tmp_path)
    (tmp_path / "manifest.json").unlink()  # no manifest: the weights must still be asked for
    assert "--weights <the weights it was made from> --precision fp16" in _hint(tmp_path)
