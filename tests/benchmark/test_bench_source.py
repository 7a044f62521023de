"""Settings defaults and where the model comes from (variant name or export folder)."""

from __future__ import annotations

import json

import pytest

from virchow_rt.benchmark.source import (
    Settings,
    Source,
    reference_weights,
    resolve_settings,
    resolve_source,
)
from virchow_rt.errors import InputError, ModelFileError
from virchow_rt.registry import get_variant


def test_defaults_per_device_and_capped_at_the_variants_max_batch() -> None:
    cpu = resolve_settings("cpu", get_variant("virchow2g-mini"))
    assert cpu.batch_sizes == (1, 8, 32) and cpu.repeats >= 3 and cpu.warmup >= 1
    gpu = resolve_settings("cuda", get_variant("virchow2"))
    assert max(gpu.batch_sizes) == get_variant("virchow2").batch.max == 64
    given = resolve_settings(
        "cpu", get_variant("virchow2"), batch_sizes=[8, 1, 8], tiles=5, repeats=2, warmup=0
    )
    assert given == Settings(batch_sizes=(1, 8), tiles=5, repeats=2, warmup=0)
    assert [given.tiles_for(b) for b in given.batch_sizes] == [5, 8]  # whole batches only


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_sizes": [0, 8]}, "batch sizes must be positive"),
        ({"tiles": 0}, "--tiles"),
        ({"repeats": 0}, "--repeats"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, match) -> None:
    with pytest.raises(InputError, match=match):
        resolve_settings("cpu", get_variant("virchow2g-mini"), **kwargs)


def _manifest(tmp_path, random: bool = True, source: str = "random (seed 0)"):
    variant = get_variant("virchow2-tiny")
    manifest = {
        "variant": variant.name,
        "timm_arch": variant.timm_arch,
        "model_args": {**variant.model_args, "depth": 3},  # an export of a config.json-updated variant
        "mlp": variant.mlp,
        "preprocess": {
            "size": 224,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
        },
        "weights": {"random": random, "sha256": "random" if random else "ab" * 32, "source": source},
        "artifacts": [],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_an_export_folder_gives_the_exact_variant_it_was_made_from(tmp_path) -> None:
    _manifest(tmp_path)
    source = resolve_source(str(tmp_path))
    assert source.folder == tmp_path and source.manifest is not None
    v = source.variant
    assert v.name == "virchow2-tiny" and v.model_args["depth"] == 3 and v.num_registers == 4
    assert v.preprocess.mean == (0.5, 0.5, 0.5)
    assert source.manifest.to_variant() == v
    # the reference is rebuilt with the export's random weights when the caller gives none
    assert reference_weights(source, None, False) == (None, True)


def test_reference_weights_of_real_exports(tmp_path) -> None:
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"x")
    _manifest(tmp_path, random=False, source=str(weights))
    source = resolve_source(str(tmp_path))
    assert reference_weights(source, None, False) == (str(weights), False)
    assert reference_weights(source, "other.bin", False) == ("other.bin", False)
    _manifest(tmp_path, random=False, source="hf://paige-ai/Virchow2@abc (pytorch_model.bin)")
    with pytest.raises(InputError, match="pass --weights PATH"):
        reference_weights(resolve_source(str(tmp_path)), None, False)


def test_unknown_names_and_missing_paths() -> None:
    assert resolve_source("virchow2g-mini") == Source(get_variant("virchow2g-mini"))
    with pytest.raises(ModelFileError, match="no such export folder or model file: out/nothing.onnx"):
        resolve_source("out/nothing.onnx")
    with pytest.raises(InputError, match="unknown variant 'virchow3'"):
        resolve_source("virchow3")
