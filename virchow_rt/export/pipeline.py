"""weights -> fp32 ONNX -> fp16 ONNX (-> TensorRT engine), each gated on parity, with a manifest beside them.

Every artifact is made in a hidden staging folder inside ``out_dir``, checked (ONNX checker, I/O
contract, precision plan) and measured in ONNX Runtime CPU against the fp32 PyTorch reference on real
tissue tiles. Only when every requested artifact passes are they renamed into place (external data
first, then the graph), and ``manifest.json`` is written last. A failing artifact is never left looking
valid. A folder that already holds an export of the same model keeps its other precisions listed
(:mod:`virchow_rt.export.merge`); one of another model is refused unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt._version import __version__
from virchow_rt.backends.torch_reference import TorchBackend
from virchow_rt.compare import Comparison, compare
from virchow_rt.contract import Artifact, EmbeddingLayout, Manifest, WeightsInfo
from virchow_rt.errors import BackendError, InputError, ParityError
from virchow_rt.export.merge import (
    RollbackFailed,
    check_kept,
    check_same_model,
    check_targets,
    commit,
    locked_folder,
    merge,
    previous_export,
)
from virchow_rt.export.onnx_export import OPSET, check_outputs, export_onnx, io_spec
from virchow_rt.export.precision import DEFAULT_PLAN, convert_fp16
from virchow_rt.export.quantize import INT8_PLAN, quantize_int8
from virchow_rt.export.tensorrt_prep import engine_name
from virchow_rt.files import check_output, sha256_file
from virchow_rt.kernels.resize import resize_tiles
from virchow_rt.model.vit import build_model
from virchow_rt.registry import BatchProfile, Variant, get_variant
from virchow_rt.tissue import tissue_tiles

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_PRECISIONS = ("fp32", "fp16")  # int8 (CPU) only when asked for
REFERENCE = "torch-eager-fp32"
PARITY_SEED = 0
_PARITY_BATCH = 16  # tiles per reference / ONNX Runtime call during the parity check (bounds memory)


def artifact_name(variant: Variant, precision: str) -> str:
    """File name of an exported graph: ``<variant>.<precision>.onnx``."""
    return f"{variant.name}.{precision}.onnx"


def versions() -> dict[str, str]:
    """Versions of everything that shaped an export (recorded in the manifest)."""
    found = {"virchow_rt": __version__, "python": platform.python_version()}
    for module in ("torch", "timm", "onnx", "onnxruntime", "numpy"):
        found[module] = getattr(
            optional_import(module, "to record export versions"), "__version__", "unknown"
        )
    found["platform"] = platform.platform()
    return found


def run_onnx_cpu(path: str | os.PathLike, tiles: np.ndarray, batch: int = _PARITY_BATCH) -> np.ndarray:
    """Embed uint8 tiles (N, S, S, 3) with an exported graph in ONNX Runtime CPU -> (N, E) float32."""
    ort = optional_import("onnxruntime", "to check exported models")
    try:
        session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        outs = [
            session.run(["embedding"], {"tiles": tiles[i : i + batch]})[0]
            for i in range(0, len(tiles), batch)
        ]
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise BackendError(f"ONNX Runtime CPU cannot run {path} ({type(err).__name__}: {err})") from err
    return np.concatenate(outs).astype(np.float32, copy=False)


def _reference_embeddings(backend: TorchBackend, tiles: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [backend.run(tiles[i : i + _PARITY_BATCH]) for i in range(0, len(tiles), _PARITY_BATCH)]
    )


def _check_args(
    precisions: Sequence[str], parity_tiles: int, max_batch: int | None, tensorrt: bool
) -> tuple[str, ...]:
    wanted = tuple(dict.fromkeys(precisions))
    if not wanted or set(wanted) - set(PRECISIONS):
        raise InputError(
            f"precisions {list(precisions)} are not valid; use a non-empty subset of {list(PRECISIONS)}"
        )
    if parity_tiles < 1:
        raise InputError(
            f"parity_tiles is {parity_tiles}; every artifact is checked, use at least 1 (default 32)"
        )
    if max_batch is not None and max_batch < 1:
        raise InputError(f"max_batch is {max_batch}; use a positive batch size")
    if tensorrt and "fp16" not in wanted:
        raise InputError("a TensorRT engine is built from the fp16 ONNX; add fp16 to the precisions")
    return wanted


def _artifact(
    path: Path, precision: str, data_name: str | None, variant: Variant, outputs: Sequence[str]
) -> dict[str, Any]:
    """The manifest entry of an ONNX graph, as JSON (its key order is the file's)."""
    inputs, outs = io_spec(variant, outputs)
    entry: dict[str, Any] = {
        "path": path.name,
        "format": "onnx",
        "precision": precision,
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "external_data": data_name,
        "opset": OPSET,
        "inputs": inputs,
        "outputs": outs,
    }
    if data_name is not None:
        entry["external_data_sha256"] = sha256_file(path.parent / data_name)
        entry["external_data_size_bytes"] = (path.parent / data_name).stat().st_size
    return entry


def _parity(
    path: Path, precision: str, tiles: np.ndarray, reference: np.ndarray, variant: Variant
) -> Comparison:
    p = variant.preprocess  # the graph takes S×S tiles after the model's transform (Prov-GigaPath: 256, crop)
    inputs = resize_tiles(tiles, p.size, p.crop_pct, p.interpolation)
    tolerance = variant.tolerance
    got = run_onnx_cpu(path, inputs)
    result = compare(got, reference, tolerance.min_cosine(precision), tolerance.min_knn10(precision))
    if not result:
        advice = (
            "int8 cannot hold this model's activations (outlier channels, as trained DINOv2-family models "
            "have): use the fp32 export on a CPU"
            if precision == "int8"
            else "Export the other precision, or report this line as a bug"
        )
        raise ParityError(
            f"{precision} ONNX of {variant.name} disagrees with the {REFERENCE} reference in ONNX Runtime "
            f"CPU: {result}; {path.name} was not written. {advice}"
        )
    return result


class _Progress:
    """A tqdm bar of export stages (disabled unless asked)."""

    def __init__(self, variant: Variant, stages: int, enabled: bool) -> None:
        tqdm = optional_import("tqdm", "to show export progress").tqdm
        self.bar = tqdm(total=stages, disable=not enabled, unit="stage", desc=f"export {variant.name}")

    def stage(self, name: str) -> None:
        self.bar.set_postfix_str(name)

    def done(self) -> None:
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def _make_artifacts(
    model: Any,
    variant: Variant,
    weights_info: WeightsInfo,
    wanted: tuple[str, ...],
    outputs: tuple[str, ...],
    parity_tiles: int,
    staging: Path,
    progress: _Progress,
) -> list[Artifact]:
    """Export, check and parity-test each wanted precision in the ``staging`` folder (left there)."""
    size = variant.preprocess.size
    progress.stage("reference")
    tiles = tissue_tiles(parity_tiles, size, seed=PARITY_SEED)
    reference = _reference_embeddings(TorchBackend(model, variant, "fp32", weights=weights_info), tiles)
    progress.done()
    tiles_label = f"virchow_rt.tissue.tissue_tiles({len(tiles)}, {size}, seed={PARITY_SEED})"
    artifacts: list[Artifact] = []
    fp32_path = staging / artifact_name(variant, "fp32")
    # fp16 and int8 are made from the fp32 graph
    for precision in ("fp32", *(p for p in ("fp16", "int8") if p in wanted)):
        path, shown = staging / artifact_name(variant, precision), precision in wanted
        if shown:
            progress.stage(f"export {precision}")
        start = time.perf_counter()
        plan: dict[str, Any] | None = None
        if precision == "fp32":
            data_name = export_onnx(model, variant, path, weights=weights_info, outputs=outputs)
        elif precision == "fp16":
            data_name, counts = convert_fp16(fp32_path, path, variant, weights=weights_info, outputs=outputs)
            plan = {**DEFAULT_PLAN.to_dict(), "verified": counts}
        else:
            data_name, counts = quantize_int8(fp32_path, path, variant, weights=weights_info, outputs=outputs)
            plan = {**INT8_PLAN.to_dict(), "verified": counts}
        export_s = time.perf_counter() - start
        if not shown:  # the fp32 graph was made only as the source of the fp16 one
            continue
        progress.done()
        progress.stage(f"parity {precision}")
        start = time.perf_counter()
        result = _parity(path, precision, tiles, reference, variant)
        parity_s = time.perf_counter() - start
        entry = _artifact(path, precision, data_name, variant, outputs)
        if plan is not None:
            entry["precision_plan"] = plan
        entry["parity"] = {
            **result.to_dict(),
            "reference": REFERENCE,
            "backend": "onnxruntime-cpu",
            "tiles": tiles_label,
            "summary": str(result),
        }
        entry["seconds"] = {"export": round(export_s, 2), "parity": round(parity_s, 2)}
        artifacts.append(Artifact.from_dict(entry))
        progress.done()
    return artifacts


def _manifest(
    variant: Variant, weights_info: WeightsInfo, max_batch: int | None, artifacts: list[Artifact]
) -> Manifest:
    top = max_batch or variant.batch.max
    return Manifest(
        variant=variant.name,
        timm_arch=variant.timm_arch,
        model_args=dict(variant.model_args),
        mlp=variant.mlp,
        norm_eps=variant.norm_eps,
        preprocess=variant.preprocess,
        batch=BatchProfile(variant.batch.min, min(variant.batch.opt, top), top),
        embedding=EmbeddingLayout(
            pooling="cls_mean",
            recommended=variant.pooling,
            dim=variant.embedding_dim(),
            width=variant.width,
            layout="class token ‖ mean of patch tokens (registers excluded); class token = [:, :width]",
        ),
        weights=weights_info,
        versions=versions(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        artifacts=tuple(artifacts),
        warning="RANDOM WEIGHTS: these artifacts embed nothing meaningful (tests and demos only)"
        if weights_info.random
        else None,
    )


def _warn_unlisted(out_dir: Path, manifest: Manifest) -> None:
    """Warn about model files that an earlier export left in ``out_dir``, unlisted (no manifest.json then,
    or ``overwrite``): a run deletes no file it did not make."""
    artifacts = manifest.artifacts
    listed = {a.path for a in artifacts} | {a.external_data for a in artifacts}
    stale = sorted(
        p.name
        for pattern in ("*.onnx", "*.onnx.data", "*.engine", "*.plan")
        for p in out_dir.glob(pattern)
        if p.name not in listed
    )
    if stale:
        warnings.warn(
            f"{out_dir} still holds {', '.join(stale)} from an earlier export, not listed in manifest.json "
            "(and refused by the runtime for engines): delete them or export into an empty folder",
            stacklevel=3,
        )


def _build_engine(variant: Variant, out_dir: Path, max_batch: int, options: Mapping[str, Any]) -> None:
    # imported only now: TensorRT is optional and absent on most machines; its errors propagate
    from virchow_rt.export import tensorrt_build as builder

    engine = builder.build_engine(
        out_dir / artifact_name(variant, "fp16"), out_dir, variant, max_batch=max_batch, **options
    )
    # the builder records its engine in manifest.json itself; add the entry only if it did not
    manifest = Manifest.read(out_dir)
    if isinstance(engine, Artifact) and manifest.artifact_for(engine.path) is None:
        manifest.with_artifact(engine).write(out_dir)


def export_model(
    variant_name: str | Variant,
    out_dir: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    random_weights: bool = False,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
    max_batch: int | None = None,
    outputs: Sequence[str] = ("embedding",),
    parity_tiles: int = 32,
    tensorrt: bool = False,
    tensorrt_options: Mapping[str, Any] | None = None,
    progress: bool = False,
    overwrite: bool = False,
    before_tensorrt: Callable[[], None] | None = None,
) -> Manifest:
    """Export ``variant_name`` to ONNX (``<variant>.fp32.onnx``, ``<variant>.fp16.onnx``) in ``out_dir``.

    Loads ``weights`` (folder, state-dict file or cached model id) or builds ``random_weights``; checks
    each artifact and its parity against the fp32 PyTorch reference in ONNX Runtime CPU on
    ``parity_tiles`` real tissue tiles (:class:`ParityError` below the variant's tolerance, nothing
    written); writes ``manifest.json``; with ``tensorrt=True`` then builds an fp16 engine through
    :mod:`virchow_rt.export.tensorrt_build` (``tensorrt_options``: keyword arguments of its
    ``build_engine``, e.g. ``version_compatible=True``). ``progress`` shows a bar of the stages.

    Into a folder that already holds an export of the same model (same weights, architecture and I/O),
    the precisions asked for are added or rebuilt and the others stay listed; another model's folder is
    an :class:`OutputError` before any work unless ``overwrite`` (the manifest then lists only this
    export; no file is deleted). A failure leaves the folder's old manifest and files as they were.
    ``before_tensorrt``: called once the ONNX is committed, before the engine build (the CLI lets SIGTERM
    end the build: nothing to roll back). Returns the :class:`~virchow_rt.contract.Manifest` written.
    """
    variant = get_variant(variant_name) if isinstance(variant_name, str) else variant_name
    wanted = _check_args(precisions, parity_tiles, max_batch, tensorrt)
    if tensorrt:  # before any work: without TensorRT the ONNX would be rebuilt and no engine made from it
        from virchow_rt.backends.tensorrt_module import import_tensorrt  # lazily: TensorRT is optional

        import_tensorrt("tensorrt", "to build TensorRT engines (--tensorrt)")
    outputs = check_outputs(outputs)
    out_dir = check_output(out_dir, "--out", folder=True)  # before the model is built (seconds to minutes)
    stages = 3 + 2 * len(wanted) + int(tensorrt)  # build, reference, export+parity each, manifest, engine
    with locked_folder(out_dir):  # held to the end (engine included): the manifest read now is written last
        previous = previous_export(out_dir, overwrite)  # an unreadable one: refused before the model is built
        names = [artifact_name(variant, p) for p in wanted]
        engines = [engine_name(variant)] if tensorrt else []
        check_targets(out_dir, [*names, *(f"{n}.data" for n in names), *engines])
        if previous is not None:
            check_kept(previous, out_dir, variant.name, _replaced(previous, variant, wanted, tensorrt))
        return _export_locked(
            variant, out_dir, previous, weights, random_weights, wanted, max_batch, outputs, parity_tiles,
            tensorrt, tensorrt_options, _Progress(variant, stages, progress), before_tensorrt,
        )  # fmt: skip


def _replaced(previous: Manifest, variant: Variant, wanted: Sequence[str], tensorrt: bool) -> list[str]:
    """The files of ``previous`` this run makes again (its precisions' graphs; with ``tensorrt``, engines)."""
    engines = [a.path for a in previous.select("tensorrt")] if tensorrt else []
    return [*(artifact_name(variant, p) for p in wanted), *engines]


def _export_locked(
    variant: Variant,
    out_dir: Path,
    previous: Manifest | None,
    weights: str | os.PathLike | None,
    random_weights: bool,
    wanted: tuple[str, ...],
    max_batch: int | None,
    outputs: tuple[str, ...],
    parity_tiles: int,
    tensorrt: bool,
    tensorrt_options: Mapping[str, Any] | None,
    bar: _Progress,
    before_tensorrt: Callable[[], None] | None,
) -> Manifest:
    try:
        bar.stage("build model")
        model, variant, weights_info = build_model(variant, weights, random_weights)
        bar.done()
        fresh = _manifest(variant, weights_info, max_batch, [])
        if previous is not None:
            inputs, outs = io_spec(variant, outputs)
            io = {"opset": OPSET, "inputs": inputs, "outputs": outs}
            check_same_model(previous, fresh, out_dir, _replaced(previous, variant, wanted, tensorrt), io)
        staging, keep = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir)), False
        try:
            artifacts = _make_artifacts(
                model, variant, weights_info, wanted, outputs, parity_tiles, staging, bar
            )
            del model  # a ViT-H/G holds GBs: free it before the TensorRT build
            bar.stage("manifest")
            made_now = dataclasses.replace(fresh, artifacts=tuple(artifacts))
            manifest = merge(previous, made_now, keep_batch=max_batch is None, warn_stale=not tensorrt)
            commit(staging, out_dir, artifacts, manifest)
        except RollbackFailed:
            keep = True  # it holds the only copies of the old files, named in the error
            raise
        finally:
            if not keep:
                shutil.rmtree(staging, ignore_errors=True)
        bar.done()
        if not tensorrt:
            _warn_unlisted(out_dir, manifest)
        if tensorrt:
            if before_tensorrt is not None:
                before_tensorrt()
            bar.stage("tensorrt")
            _build_engine(variant, out_dir, (manifest.batch or variant.batch).max, tensorrt_options or {})
            bar.done()
    finally:
        bar.close()
    return Manifest.read(out_dir)
