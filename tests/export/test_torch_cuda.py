"""The torch-cuda backend's CPU-checkable parts: its fp16 module, the weights it rebuilds, its errors.

Its GPU run (the CUDA pipeline with torch's kernels) is in ``test_torch_cuda_gpu.py`` (``gpu`` tier).
"""

from __future__ import annotations

import contextlib
import copy
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sim_cuda import Memory

from virchow_rt.compare import compare
from virchow_rt.contract import Manifest
from virchow_rt.errors import BackendError, InputError, WeightsError
from virchow_rt.model.vit import ExportWrapper, build_model, load_export_model
from virchow_rt.registry import get_variant
from virchow_rt.tissue import tissue_tiles


@pytest.fixture(scope="module")
def tiny_random() -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model("virchow2-tiny", random_weights=True)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 0.999), (torch.bfloat16, 0.99)])
def test_reduced_precision_module_matches_fp32(
    tiny_random: tuple, dtype: torch.dtype, tolerance: float
) -> None:
    model, variant, _ = tiny_random
    tiles = torch.from_numpy(tissue_tiles(12, 224, seed=1))  # (12, 224, 224, 3) uint8
    with torch.inference_mode():
        (want,) = ExportWrapper(model, variant)(tiles)
        half = ExportWrapper(copy.deepcopy(model).to(dtype), variant, compute_dtype=dtype)
        (got,) = half(tiles)
    assert got.dtype == torch.float32 and got.shape == want.shape  # pooled in fp32, as the fp16 plan says
    result = compare(got.numpy(), want.numpy(), tolerance)
    assert result, str(result)
    assert not np.array_equal(got.numpy(), want.numpy())  # it did compute in the lower precision


def test_fp32_wrapper_is_unchanged_by_the_compute_dtype(tiny_random: tuple) -> None:
    model, variant, _ = tiny_random
    assert ExportWrapper(model, variant, compute_dtype=torch.float32).compute_dtype is None


def _manifest(folder: Path, variant: str, weights: dict) -> Path:
    v = get_variant(variant)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"variant": v.name, "model_args": dict(v.model_args), "mlp": v.mlp, "weights": weights,
                "batch": {"min": 1, "opt": 8, "max": 16}, "artifacts": []}  # fmt: skip
    Manifest.from_dict(manifest).write(folder)
    return folder


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_exports_are_rebuilt_from_the_same_seed(tiny_random: tuple, tmp_path: Path) -> None:
    model, _, info = tiny_random
    folder = _manifest(tmp_path / "export", "virchow2-tiny", info.to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rebuilt, variant, rebuilt_info, manifest = load_export_model(folder)
    assert _same(rebuilt, model) and rebuilt_info.random and variant.name == "virchow2-tiny"
    assert manifest.batch is not None and manifest.batch.max == 16


def test_real_weights_come_from_the_recorded_source_and_must_match(
    checkpoint_dir: Path, tmp_path: Path
) -> None:
    model, _, info = build_model("virchow2-tiny", checkpoint_dir)
    folder = _manifest(tmp_path / "export", "virchow2-tiny", info.to_dict())
    rebuilt, _, rebuilt_info, _ = load_export_model(folder)
    assert _same(rebuilt, model) and rebuilt_info.sha256 == info.sha256 and not rebuilt_info.random

    moved = _manifest(
        tmp_path / "moved", "virchow2-tiny", {**info.to_dict(), "source": str(tmp_path / "gone")}
    )
    with pytest.raises(WeightsError, match="rebuilds .* pass --weights PATH"):
        load_export_model(moved)
    assert _same(load_export_model(moved, weights=checkpoint_dir)[0], model)  # --weights where they are now

    other = _manifest(tmp_path / "other", "virchow2-tiny", {**info.to_dict(), "sha256": "f" * 64})
    with pytest.raises(WeightsError, match="are not those .* exported from"):
        load_export_model(other)


def test_the_reference_of_an_export_is_the_model_it_was_made_from(tiny_random: tuple, tmp_path: Path) -> None:
    """One factory opens the export's PyTorch reference (what an engine's parity is measured against)."""
    from virchow_rt.backends.open import open_reference
    from virchow_rt.backends.torch_reference import TorchBackend
    from virchow_rt.export.tensorrt_prep import parity_reference

    model, variant, info = tiny_random
    folder = _manifest(tmp_path / "export", "virchow2-tiny", info.to_dict())
    tiles = tissue_tiles(3, 224, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = open_reference(folder, device="cpu")
        backend, label = parity_reference(Manifest.read(folder), folder, None)
    assert reference.transforms_tiles and reference.info.random_weights and reference.path is None
    want = TorchBackend(model, variant).run(tiles)
    np.testing.assert_allclose(reference.run(tiles), want, rtol=0, atol=1e-6)
    assert label == "torch-eager-fp32" and backend.transforms_tiles
    np.testing.assert_allclose(backend.run(tiles), want, rtol=0, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a CUDA GPU")
def test_without_a_gpu_torch_cuda_is_a_one_line_error(tiny_random: tuple, tmp_path: Path, capsys) -> None:
    from virchow_rt.backends import open_backend
    from virchow_rt.cli.main import main

    folder = _manifest(tmp_path / "export", "virchow2-tiny", tiny_random[2].to_dict())
    with warnings.catch_warnings(), pytest.raises(BackendError, match="needs a CUDA GPU and none is visible"):
        warnings.simplefilter("ignore")
        open_backend(folder, "torch-cuda")
    np.save(tmp_path / "tiles.npy", tissue_tiles(2, 224, seed=0))
    args = ["embed", str(folder), str(tmp_path / "tiles.npy"), "--out", str(tmp_path / "e.npy")]
    assert main([*args, "--backend", "torch-cuda"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or all("RANDOM WEIGHTS" in line for line in err[:-1])
    assert "needs a CUDA GPU" in err[-1] and "Traceback" not in "".join(err)
    assert main([*args, "--weights", str(tmp_path)]) != 0
    assert "only read by --backend torch-cuda" in capsys.readouterr().err
    assert not (tmp_path / "e.npy").exists()


def test_torch_cuda_needs_an_export_folder(tmp_path: Path) -> None:
    from virchow_rt.backends import open_backend
    from virchow_rt.errors import ModelFileError

    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(ModelFileError, match="rebuilds a model from its export folder.*no manifest.json"):
        open_backend(tmp_path / "model.onnx", "torch-cuda")
    with pytest.raises(InputError, match="unknown backend 'torch'.*torch-cuda"):
        open_backend(tmp_path, "torch")


class SimulatedTorch:
    """``torch`` as :mod:`virchow_rt.backends.torch_cuda` sees it, over simulated CUDA (``sim_cuda``).

    ``as_tensor`` reads a ``__cuda_array_interface__`` as torch does (address, shape, typestr, strides)
    and gives a CPU tensor over the fake memory at that address, so the executor's own mapping from the
    pipeline's pointers to tensors runs. torch computes at once on the CPU, so entering
    ``torch.cuda.stream(s)`` first runs everything queued on ``s`` (its waits included): the compute
    stream running as early as it may. Everything else is the real torch.
    """

    def __init__(self, mem: Memory, device: int) -> None:
        self._mem, self._device = mem, ("cuda", device)
        self.cuda = types.SimpleNamespace(
            ExternalStream=self._external_stream,
            device=lambda d: contextlib.nullcontext(),
            stream=self._stream,
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def device(self, kind: str, index: int) -> tuple[str, int]:
        return (kind, index)

    def _external_stream(self, ptr: int, device: Any) -> Any:
        assert device == self._device, f"stream on {device}, the executor runs on {self._device}"
        return self._mem.stream(ptr)

    @contextlib.contextmanager
    def _stream(self, stream: Any) -> Iterator[None]:
        stream.synchronize()
        yield

    def as_tensor(self, data: Any, device: Any = None) -> torch.Tensor:
        assert device == self._device, f"a tensor on {device}, the executor runs on {self._device}"
        iface = data.__cuda_array_interface__
        ptr, _ = iface["data"]
        shape, dtype = tuple(iface["shape"]), np.dtype(iface["typestr"])
        nbytes = int(np.prod(shape)) * dtype.itemsize
        strides = iface.get("strides")
        if strides is not None:
            nbytes = sum((n - 1) * st for n, st in zip(shape, strides, strict=True)) + dtype.itemsize
        raw = self._mem.at(ptr, nbytes).view(dtype)
        if strides is None:
            return torch.from_numpy(raw.reshape(shape))
        return torch.from_numpy(np.lib.stride_tricks.as_strided(raw, shape, strides))


def test_torch_executor_in_the_pipeline_on_simulated_cuda(tiny_random: tuple, monkeypatch) -> None:
    """The torch executor inside the CUDA pipeline, with CUDA simulated on the CPU (numpy at fake addresses).

    SIMULATION: torch runs on the CPU over tensors the executor makes from the pipeline's (fake) device
    pointers; copies run only when a wait or synchronize forces them. This checks the data flow (each
    slot's input read, its output written, in order, ragged batches too) and that the compute stream
    waits for each batch's copy in, not CUDA or CUDA graphs (the ``gpu`` tier does).
    """
    from sim_cuda import fake_cuda

    from virchow_rt.backends import torch_cuda
    from virchow_rt.backends.cuda import pipeline as cuda_pipeline
    from virchow_rt.contract import ModelInfo

    mem, log = Memory(), []
    monkeypatch.setattr(cuda_pipeline, "cuda", fake_cuda(mem, log, {}))
    monkeypatch.setattr(torch_cuda, "torch", SimulatedTorch(mem, 0))
    model, variant, info = tiny_random
    module = ExportWrapper(copy.deepcopy(model), variant).eval()
    meta = ModelInfo(variant.name, variant.embedding_dim(), variant.width, 224, "fp32", True, "random")
    executor = torch_cuda.TorchExecutor(module, meta, 0, 8, graphs=False)
    backend = torch_cuda.TorchCudaBackend.__new__(torch_cuda.TorchCudaBackend)  # its __init__ needs a GPU
    backend._start(executor, meta, 0, 3)
    batches = [tissue_tiles(n, 224, seed=i) for i, n in enumerate([8, 3, 8, 8, 1])]
    with torch.inference_mode():
        expected = [module(torch.from_numpy(b))[0].numpy() for b in batches]
    outs = list(backend.pipeline(batches))
    for got, want in zip(outs, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert [e[1] for e in log if e[0] == "copy"].count("h2d") == 5  # each batch copied in once
    backend.close()
