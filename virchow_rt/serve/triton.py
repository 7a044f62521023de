"""A Triton Inference Server model repository from an export (``virchow-rt triton``, ``export --triton``).

Writes ``REPO/<name>/config.pbtxt`` and ``REPO/<name>/1/``: ``model.onnx`` (platform ``onnxruntime_onnx``,
its external data file beside it under the name the graph records) or the TensorRT engines (platform
``tensorrt_plan``: ``model.plan``, or one ``model_sm<CC>.plan`` per compute capability listed in
``cc_model_filenames``). The source is an export folder, or one model file of it (``.onnx``, ``.engine``).

The input is the export's uint8 tile batch, fixed at ``[S, S, 3]`` (S = 224 for most variants): the
normalisation is inside the graph, **the resize is not**, so a Triton client must send S×S tiles (``virchow-rt
serve`` resizes any size; ``virchow_rt.kernels.resize_tiles`` does it on the client). The output is the float
embedding ``[E]``; ``max_batch_size`` is the export's batch profile, with dynamic batching and an instance
group (GPU, except for the int8 ONNX model, which is made for the CPU), and the manifest's facts (variant,
pooling, precision, random weights, parity, tile size) are the model's parameters.

Nothing a manifest says is trusted: every path it lists must stay inside the export folder, the model's
name must be a plain folder name, and each file is copied (never hard-linked: writing the repository's copy
must not change the export) and checked against the manifest's sha256 as it is copied. The configuration
is built with Triton's own schema (``model_config_pb2`` from ``tritonclient[grpc]``) and written as protobuf
text, so a field Triton does not know cannot be written. The entry is assembled in a temporary folder and
renamed into place: an interrupted or refused run leaves no half-made model.

A version-compatible TensorRT engine runs native code stored in it when it loads; Triton loads one only
when started with :data:`HOST_CODE_FLAG`, which lets every engine in the repository do so. Such engines are
placed only with ``allow_engine_host_code=True`` (``--allow-engine-host-code``), and never one built with
its lean runtime excluded (Triton cannot supply that runtime).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from virchow_rt.contract import INPUT, MANIFEST_NAME, OUTPUT, Artifact, EmbeddingLayout, Manifest, WeightsInfo
from virchow_rt.errors import InputError, MissingDependency, ModelFileError, OutputError
from virchow_rt.files import current_umask
from virchow_rt.paths import check_name
from virchow_rt.registry import BatchProfile, Preprocess

#: numpy dtype names of the manifest -> Triton's data types
_TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}
PLATFORMS = ("auto", "onnx", "tensorrt")
INSTANCE_KINDS = ("auto", "gpu", "cpu")
_FORMATS = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
#: what Triton needs to load version-compatible engines (``tritonserver ... HOST_CODE_FLAG``)
HOST_CODE_FLAG = "--backend-config=tensorrt,version-compatible=true"
#: names Triton gives meaning to in a model's folder: an external data file may not take them
_RESERVED = ("model.onnx", "config.pbtxt")


def _schema() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MissingDependency(
            "writing a Triton model repository needs Triton's config schema: pip install 'virchow-rt[triton]'"
        ) from None
    return model_config_pb2


def _source(export: Path) -> tuple[Path, str | None]:
    """(the export folder, the one model file asked for or None) from a folder or a model file of it."""
    if export.is_dir():
        return export, None
    if not export.exists():
        raise InputError(f"{export} does not exist; give an export folder (virchow-rt export ... --out DIR)")
    if export.suffix.lower() not in (".onnx", ".engine", ".plan"):
        raise InputError(f"{export} is not an export folder or a model file of one (.onnx, .engine, .plan)")
    return export.parent, export.name


def _pick(
    manifest: Manifest, platform: str, precision: str | None, chosen: str | None
) -> tuple[str, list[Artifact]]:
    """The platform and its artifacts: the file asked for, else every TensorRT engine, else the ONNX file
    of ``precision`` (fp32 when not given)."""
    if chosen is not None:
        artifact = manifest.artifact_for(chosen)
        kind = _FORMATS.get(artifact.format or "") if artifact else None
        if artifact is None or kind is None:
            raise ModelFileError(f"its {MANIFEST_NAME} lists no ONNX model or TensorRT engine named {chosen}")
        wanted = {"onnx": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}.get(platform, kind)
        if wanted != kind or precision not in (None, artifact.precision):
            raise InputError(
                f"{chosen} is the {artifact.precision} {artifact.format} model: drop --platform "
                "and --precision, or give the export folder"
            )
        return kind, [artifact]
    engines = manifest.select("tensorrt")
    if platform == "tensorrt" or (platform == "auto" and engines and precision is None):
        if not engines:
            raise InputError(
                "this export has no TensorRT engine; build one with `virchow-rt export --tensorrt`, "
                "or give --platform onnx"
            )
        return "tensorrt_plan", engines
    precision = precision or "fp32"
    onnx = manifest.select("onnx", precision)
    if not onnx:
        have = sorted({str(a.precision) for a in manifest.select("onnx")})
        raise InputError(
            f"this export has no {precision} ONNX model (it has: {', '.join(have) or 'none'}); "
            f"give --precision {have[0] if have else 'fp32'} or re-export with --precision {precision}"
        )
    return "onnxruntime_onnx", onnx[:1]


def _copy_checked(folder: Path, src: Path, sha256: Any, dst: Path) -> None:
    """Copy ``src`` (a file of ``folder``, its path already checked to stay inside it) to ``dst``, hashing
    as it goes; refuse a file that does not match the manifest's ``sha256``. A copy, never a link: the
    export stays untouched."""
    if not isinstance(sha256, str) or not sha256:
        raise ModelFileError(
            f"{folder / MANIFEST_NAME} records no sha256 for {src.relative_to(folder)}; re-export the model"
        )
    digest = hashlib.sha256()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            while block := fin.read(1 << 22):
                digest.update(block)
                fout.write(block)
    except FileNotFoundError:
        raise ModelFileError(
            f"{src} is missing (its {MANIFEST_NAME} lists it); re-export the model"
        ) from None
    if digest.hexdigest() != sha256:
        raise ModelFileError(
            f"{src} does not match the sha256 in its {MANIFEST_NAME} (changed since it was exported); "
            "nothing was written: re-export the model"
        )


def _check_host_code(engines: list[Artifact], allowed: bool) -> bool:
    """Whether these engines need Triton's :data:`HOST_CODE_FLAG`; refused unless ``allowed``, and an engine
    whose lean runtime was left out is refused always."""
    compatible = [e for e in engines if e.extra.get("version_compatible")]  # a TensorRT entry's build facts
    for engine in compatible:
        if engine.extra.get("lean_runtime") == "excluded":
            raise InputError(
                f"{engine.path} is version-compatible with its lean runtime excluded, which Triton "
                "cannot supply: rebuild it without --exclude-lean-runtime, or give --platform onnx"
            )
    if compatible and not allowed:
        raise InputError(
            f"{compatible[0].path} is a version-compatible engine: it runs native code stored in it "
            f"when it loads, and Triton loads it only with {HOST_CODE_FLAG}, for every engine of the "
            "repository; give --allow-engine-host-code only for engines you built or trust, or give "
            "--platform onnx"
        )
    return bool(compatible)


def needs_host_code(model: str | os.PathLike) -> bool:
    """Whether the repository entry ``model`` (a folder this module wrote) holds version-compatible
    engines, which Triton loads only when started with :data:`HOST_CODE_FLAG`."""
    from google.protobuf import text_format

    config = _schema().ModelConfig()
    text_format.Parse((Path(model) / "config.pbtxt").read_text(), config)
    return config.parameters["version_compatible"].string_value == "true"


def _instance_kind(requested: str, kind: str, precision: str) -> str:
    """``auto``: GPU, except for the int8 ONNX model (ONNX Runtime's dynamic quantization is for the CPU)."""
    if requested not in INSTANCE_KINDS:
        raise InputError(f"--instance-kind {requested}: give one of {', '.join(INSTANCE_KINDS)}")
    int8 = kind == "onnxruntime_onnx" and precision == "int8"
    if requested == "auto":
        return "cpu" if int8 else "gpu"
    if requested == "gpu" and int8:
        warnings.warn(
            "the int8 ONNX model is made for the CPU (dynamic quantization); on a GPU instance ONNX Runtime "
            "runs most of it on the CPU anyway: give --instance-kind cpu, or serve the fp16 model on the GPU",
            stacklevel=3,
        )
    if kind == "tensorrt_plan" and requested == "cpu":
        raise InputError("TensorRT engines run on a GPU: give --instance-kind gpu, or --platform onnx")
    return requested


def write_triton_repository(
    export_dir: str | os.PathLike,
    repo: str | os.PathLike,
    *,
    name: str | None = None,
    platform: str = "auto",
    precision: str | None = None,
    instances: int = 1,
    instance_kind: str = "auto",
    max_queue_delay_us: int = 2000,
    allow_engine_host_code: bool = False,
) -> Path:
    """Write ``repo/<name>`` (default name: the variant) for Triton from ``export_dir``; returns its folder.

    ``export_dir``: an export folder, or one ``.onnx``/``.engine`` file of it (that model is placed).
    ``platform``: ``auto`` (the TensorRT engines when the export has any and no ``precision`` is asked,
    else ONNX), ``onnx`` or ``tensorrt``. ``precision`` picks the ONNX model (default fp32).
    ``instance_kind``: ``auto`` (GPU; CPU for the int8 model), ``gpu`` or ``cpu``.
    ``allow_engine_host_code``: place version-compatible engines (see the module doc and
    :func:`needs_host_code`).
    """
    pb = _schema()
    from google.protobuf import text_format

    folder, chosen = _source(Path(export_dir))
    manifest = Manifest.read(folder)
    if platform not in PLATFORMS:
        raise InputError(f"--platform {platform}: give one of {', '.join(PLATFORMS)}")
    if instances < 1:
        raise InputError(f"--instances {instances}: give 1 or more")
    kind, artifacts = _pick(manifest, platform, precision, chosen)
    name = check_name(
        manifest.variant if name is None else name, "--name" if name else "the variant (give --name)"
    )
    target = Path(repo) / name
    if target.exists():
        raise OutputError(f"{target} exists; remove it first, or give another --name")
    first = artifacts[0]
    host_code = kind == "tensorrt_plan" and _check_host_code(artifacts, allow_engine_host_code)
    group = _instance_kind(instance_kind, kind, first.precision or "")
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
    group_kind = pb.ModelInstanceGroup.KIND_GPU if group == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(count=instances, kind=group_kind)
    side = tile["shape"][1]
    weights = manifest.weights or WeightsInfo()
    pre = manifest.preprocess or Preprocess(size=side)
    facts = {
        "variant": manifest.variant,
        "pooling": (manifest.embedding or EmbeddingLayout()).pooling,
        "precision": first.precision,
        "random_weights": str(weights.random).lower(),
        "weights_sha256": weights.sha256,
        "parity": first.parity_summary or "not measured",
        "tile_size": side,  # a number, as virchow-rt serve's metadata gives it
        "resize": f"send {side}x{side} tiles: the graph normalises but does not resize",
        # how to resize on the client as the model's transform does: kernels.resize_tiles(tiles, S, these)
        "crop_pct": pre.crop_pct,
        "interpolation": pre.interpolation,
        "version_compatible": str(host_code).lower(),  # Triton then needs HOST_CODE_FLAG
    }
    for key, value in facts.items():
        config.parameters[key].string_value = str(value)

    Path(repo).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=repo))
    try:
        version = staging / "1"
        version.mkdir()
        if kind == "onnxruntime_onnx":
            _copy_checked(folder, first.file(folder, "model"), first.sha256, version / "model.onnx")
            data = first.external_data
            if isinstance(data, str) and os.path.normpath(data).lower() in _RESERVED:
                raise ModelFileError(
                    f"{folder / MANIFEST_NAME} names the external data {data!r}, a name Triton reserves in a "
                    "model's folder; re-export the model"
                )
            data_file = first.data_file(folder)
            if data_file is not None:  # the graph refers to it by the relative name it was saved under
                sha256 = first.extra.get("external_data_sha256")
                _copy_checked(folder, data_file, sha256, version / str(first.external_data))
        elif len(artifacts) == 1:
            _copy_checked(folder, first.file(folder, "engine"), first.sha256, version / "model.plan")
        else:
            for engine in artifacts:
                cc = str(engine.extra.get("compute_capability"))  # a TensorRT entry's build facts
                filename = check_name(f"model_sm{cc.replace('.', '')}.plan", "an engine's compute capability")
                if (version / filename).exists():
                    raise InputError(f"two engines for compute capability {cc} ({engine.path}); keep one")
                _copy_checked(folder, engine.file(folder, "engine"), engine.sha256, version / filename)
                config.cc_model_filenames[cc] = filename
        (staging / "config.pbtxt").write_text(text_format.MessageToString(config))
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it owner-only
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
