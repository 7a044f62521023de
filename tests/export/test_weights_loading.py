"""Offline weight loading: published folder layout, state-dict files, the local HF cache, mismatches."""

from __future__ import annotations

import fractions
import shutil
import socket

import pytest
import torch
from export_helpers import random_state_dict, write_checkpoint

from virchow_rt.errors import WeightsError
from virchow_rt.files import sha256_file
from virchow_rt.model.vit import build_model
from virchow_rt.model.weights import guess_variant, load_weights, read_state_dict
from virchow_rt.registry import VARIANTS, get_variant

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("files", [("pytorch_model.bin",), ("model.safetensors",)])
def test_published_folder_layout_loads(tmp_path, files):
    state = write_checkpoint(tmp_path / "Virchow2", "virchow2-tiny", files)
    # the registry's full-size virchow2, settled by config.json model_args into the tiny model
    loaded, variant, info = load_weights(tmp_path / "Virchow2", get_variant("virchow2"))
    assert _same(loaded, state)
    assert (variant.width, variant.model_args["depth"], variant.num_registers) == (96, 2, 4)
    assert info.random is False and info.sha256 == sha256_file(tmp_path / "Virchow2" / files[0])
    assert info.source == str(tmp_path / "Virchow2") and info.file == files[0]


def test_folder_prefers_safetensors_and_model_matches(checkpoint_dir):
    model, variant, info = build_model(get_variant("virchow2"), weights=checkpoint_dir)
    assert info.sha256 == sha256_file(checkpoint_dir / "model.safetensors")
    assert variant.width == 96
    reference = random_state_dict("virchow2-tiny")
    assert _same({k: v for k, v in model.state_dict().items()}, reference)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_single_state_dict_file(tmp_path, suffix):
    import safetensors.torch

    state = random_state_dict("virchow-tiny")
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # wrapped, DDP prefix
    model, variant, info = build_model("virchow-tiny", weights=path)
    assert variant.name == "virchow-tiny" and info.sha256 == sha256_file(path)
    assert _same(model.state_dict(), state)


def _fake_cache(root, checkpoint_dir):
    repo = root / "models--paige-ai--Virchow2"
    snapshot = repo / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint_dir / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_model_id_from_local_hf_cache(tmp_path, monkeypatch, checkpoint_dir, no_network, env):
    root = tmp_path / "hf"
    cache = root / "hub" if env == "HF_HOME" else root
    snapshot = _fake_cache(cache, checkpoint_dir)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(env, str(root))
    state, variant, info = load_weights("paige-ai/Virchow2", get_variant("virchow2"))
    assert (info.source, info.file) == (f"hf://paige-ai/Virchow2@{SNAPSHOT}", "model.safetensors")
    assert load_weights(info.source, get_variant("virchow2"))[2] == info  # a manifest's source loads again
    assert info.sha256 == sha256_file(snapshot / "model.safetensors")
    assert variant.width == 96 and _same(state, read_state_dict(checkpoint_dir / "model.safetensors"))


def test_model_id_not_cached_says_how_to_download(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(WeightsError) as err:
        load_weights("paige-ai/Virchow2", get_variant("virchow2"))
    text = str(err.value)
    assert "not in the local Hugging Face cache" in text and str(tmp_path / "empty") in text
    assert "hf download paige-ai/Virchow2" in text and "huggingface-cli download paige-ai/Virchow2" in text


def test_wrong_variant_names_the_one_the_weights_look_like(tmp_path):
    torch.save(random_state_dict("virchow-tiny"), tmp_path / "virchow.bin")
    with pytest.raises(WeightsError) as err:
        build_model("virchow2-tiny", weights=tmp_path / "virchow.bin")
    text = str(err.value)
    assert "'virchow2-tiny'" in text and "missing keys (1): reg_token" in text
    assert "pos_embed (1, 257, 96) vs (1, 261, 96)" in text
    assert "look like virchow-tiny" in text


def test_long_key_lists_are_truncated(tmp_path):
    state = random_state_dict("virchow2-tiny")
    state = {f"encoder.{k}": v for k, v in state.items()}  # every key renamed: nothing matches
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(WeightsError) as err:
        build_model("virchow2-tiny", weights=tmp_path / "renamed.pt")
    text = str(err.value)
    assert f"missing keys ({len(state)}):" in text and "more)" in text and "unexpected keys" in text
    assert len(text) < 2500


@pytest.mark.parametrize("name", list(VARIANTS))
def test_guess_variant_from_full_size_shapes(name):
    variant = get_variant(name)
    from virchow_rt.model.vit import MLP_LAYERS, timm

    with torch.device("meta"):  # shapes only: no memory, no init time
        model = timm.create_model(variant.timm_arch, **variant.model_args, **MLP_LAYERS[variant.mlp])
    guess = guess_variant({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert name in guess.split(" or ")  # some share an architecture (UNI and Phikon-v2 are ViT-L/16)
    assert name not in guess_variant({k: tuple(v.shape) for k, v in model.state_dict().items()}, refused=name)


def test_missing_weights_refused_without_random_flag():
    with pytest.raises(WeightsError, match="--random-weights"):
        build_model("virchow2-tiny")


def test_pickled_code_is_never_executed(tmp_path):
    torch.save({"state": torch.zeros(1), "payload": fractions.Fraction(1, 3)}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError) as err:
        read_state_dict(tmp_path / "evil.pt")
    text = str(err.value)  # one plain line: what was refused, never advice to unpickle
    assert "Unsupported global: GLOBAL fractions.Fraction" in text and "never pickled code" in text
    assert "\n" not in text and "\x1b" not in text and "weights_only" not in text


@pytest.mark.parametrize(
    "spec,message",
    [("does/not/exist/anywhere.bin", "neither a file"), ("no such thing", "neither a file")],
)
def test_bad_specs(spec, message):
    with pytest.raises(WeightsError, match=message):
        load_weights(spec, get_variant("virchow2"))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "shard-00001.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match="shard-00001.safetensors: pass that file"):
        load_weights(tmp_path, get_variant("virchow2"))
