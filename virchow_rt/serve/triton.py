"""A Triton Inference Server model repository from an export (``virchow-rt triton``, ``export --triton``).

Writes ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/1/``: ``model.onnx`` (platform ``onnxruntime_onnx``,
its external data file beside it under the name the graph records) or the TensorRT engines (platform
``tensorrt_plan``: ``model.plan``, or one ``model_sm<CC>.plan`` per compute capability listed in
``cc_model_filenames``). The input is the export's uint8 tile batch ``[S, S, 3]`` (resizing and
normalisation are inside the graph), the output the float embedding ``[E]``; ``max_batch_size`` is the
export's batch profile, with dynamic batching and an instance group, and the manifest's facts (variant,
pooling, precision, random weights, parity) are the model's parameters.

The configuration is built with Triton's own schema (``model_config_pb2`` from ``tritonclient[grpc]``)
and written as protobuf text, so a field Triton does not know cannot be written. The repository entry is
assembled in a temporary folder and renamed into place: an interrupted run leaves no half-made model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from virchow_rt.contract import INPUT, OUTPUT, Artifact, EmbeddingLayout, Manifest, WeightsInfo
from virchow_rt.errors import InputError, MissingDependency, OutputError
from virchow_rt.files import current_umask
from virchow_rt.registry import BatchProfile

#: numpy dtype names of the manifest -> Triton's data types
_TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
PLATFORMS = ("auto", "onnx", "tensorrt")


def _schema() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MissingDependency(
            "writing a Triton model repository needs Triton's config schema: pip install 'virchow-rt[triton]'"
        ) from None
    return model_config_pb2


def _pick(manifest: Manifest, platform: str, precision: str) -> tuple[str, list[Artifact]]:
    """The platform and its artifacts: every TensorRT engine, or the ONNX file of ``precision``."""
    engines = manifest.select("tensorrt")
    if platform == "tensorrt" or (platform == "auto" and engines):
        if not engines:
            raise InputError(
                "this export has no TensorRT engine; build one with `virchow-rt export --tensorrt`, "
                "or give --platform onnx"
            )
        return "tensorrt_plan", engines
    onnx = manifest.select("onnx", precision)
    if not onnx:
        have = sorted({str(a.precision) for a in manifest.select("onnx")})
        raise InputError(
            f"this export has no {precision} ONNX model (it has: {', '.join(have) or 'none'}); "
            f"give --precision {have[0] if have else 'fp32'} or re-export with --precision {precision}"
        )
    return "onnxruntime_onnx", onnx[:1]


def _place(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` where the filesystem allows (engines and weights are large)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_triton_repository(
    export_dir: str | os.PathLike,
    repo: str | os.PathLike,
    *,
    name: str | None = None,
    platform: str = "auto",
    precision: str = "fp32",
    instances: int = 1,
    instance_kind: str = "gpu",
    max_queue_delay_us: int = 2000,
) -> Path:
    """Write ``repo/<name>`` (default name: the variant) for Triton from ``export_dir``; returns its folder.

    ``platform``: ``auto`` (the TensorRT engines when the export has any, else ONNX), ``onnx`` or
    ``tensorrt``. ``precision`` picks the ONNX model. ``instance_kind``: ``gpu`` or ``cpu``.
    """
    pb = _schema()
    from google.protobuf import text_format

    export_dir = Path(export_dir)
    manifest = Manifest.read(export_dir)
    if platform not in PLATFORMS:
        raise InputError(f"--platform {platform}: give one of {', '.join(PLATFORMS)}")
    if instance_kind not in ("gpu", "cpu") or instances < 1:
        raise InputError(
            f"--instances {instances} --instance-kind {instance_kind}: give 1 or more, gpu or cpu"
        )
    kind, artifacts = _pick(manifest, platform, precision)
    name = name or manifest.variant or export_dir.name
    target = Path(repo) / name
    if target.exists():
        raise OutputError(f"{target} exists; remove it first, or give another --name")

    if kind == "tensorrt_plan" and instance_kind == "cpu":
        raise InputError("TensorRT engines run on a GPU: give --instance-kind gpu, or --platform onnx")
    first = artifacts[0]
    # by name: an export with --outputs embedding,patch_tokens has more; Triton serves the embedding
    tile = next(t for t in first.inputs or () if t["name"] == INPUT)
    embedding = next(t for t in first.outputs or () if t["name"] == OUTPUT)
    batch = manifest.batch or BatchProfile()
    # an engine's own profile; every engine must accept the batch Triton may send
    profiles = [engine.profile or batch for engine in artifacts] if kind == "tensorrt_plan" else [batch]
    max_batch = min(p.max for p in profiles)
    config = pb.ModelConfig(name=name, platform=kind, max_batch_size=max_batch)
    config.input.add(name=tile["name"], data_type=_TRITON_TYPES[tile["dtype"]], dims=tile["shape"][1:])
    config.output.add(
        name=embedding["name"], data_type=_TRITON_TYPES[embedding["dtype"]], dims=embedding["shape"][1:]
    )
    opt = profiles[0].opt
    config.dynamic_batching.preferred_batch_size.append(min(opt, max_batch))
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    group_kind = pb.ModelInstanceGroup.KIND_GPU if instance_kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=instances, kind=group_kind)
    weights = manifest.weights or WeightsInfo()
    facts = {
        "variant": manifest.variant,
        "pooling": (manifest.embedding or EmbeddingLayout()).pooling,
        "precision": first.precision,
        "random_weights": str(weights.random).lower(),
        "weights_sha256": weights.sha256,
        "parity": first.parity_summary or "not measured",
    }
    for key, value in facts.items():
        config.parameters[key].string_value = str(value)

    Path(repo).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=repo))
    try:
        version = staging / "1"
        version.mkdir()
        if kind == "onnxruntime_onnx":
            _place(export_dir / first.path, version / "model.onnx")
            if first.external_data:  # the graph refers to it by its own name
                data = export_dir / first.external_data
                _place(data, version / data.name)
        elif len(artifacts) == 1:
            _place(export_dir / first.path, version / "model.plan")
        else:
            for engine in artifacts:
                cc = str(engine.extra.get("compute_capability"))  # a TensorRT entry's build facts
                filename = f"model_sm{cc.replace('.', '')}.plan"
                if filename in os.listdir(version):
                    raise InputError(f"two engines for compute capability {cc} ({engine.path}); keep one")
                _place(export_dir / engine.path, version / filename)
                config.cc_model_filenames[cc] = filename
        (staging / "config.pbtxt").write_text(text_format.MessageToString(config))
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it owner-only
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
