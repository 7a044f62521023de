"""What a TensorRT engine is tied to and what it computes; when it can be used here or must be rebuilt.

Pure logic (stdlib and numpy), unit-tested on the CPU; the TensorRT backend and builder use it.

A serialized engine is tied to what it was built from and for. :class:`EngineKey` names all of it:
the ONNX graph (sha256), the TensorRT version, the GPU's compute capability, the batch profile,
whether it was built version-compatible (with or without the lean runtime) and the builder's
optimization level. :func:`stale_reasons` compares the key recorded in a
manifest with the key wanted now (rebuild only when the list is non-empty), and
:func:`runtime_problems` says whether this machine's TensorRT and GPU can load an engine at all.

Rules (NVIDIA's engine compatibility guide): an engine runs only on the TensorRT version that built
it, unless it was built with ``BuilderFlag.VERSION_COMPATIBLE``, in which case any later runtime
(including the lean runtime, ``tensorrt_lean``) can run it; and only on GPUs of the same compute
capability (we never build hardware-compatible engines). Another GPU model of the same compute
capability loads it, with tactics tuned for the original one: a warning, not an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt.contract import INPUT, OUTPUT, Artifact, Manifest, ModelInfo, TensorSpec
from virchow_rt.errors import BackendError, ModelFileError

#: oldest TensorRT whose API (strong typing, name-based tensors, execute_async_v3) this package targets
MIN_TENSORRT = (10, 12)
#: TensorRT DataType names -> numpy dtypes (types without a numpy twin are refused at load)
NUMPY_TYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "INT8": "int8",
               "UINT8": "uint8", "BOOL": "bool"}  # fmt: skip
#: TensorRT module names that can deserialize engines (full, lean, dispatch runtimes)
RUNTIME_MODULES = ("tensorrt", "tensorrt_lean", "tensorrt_dispatch")
#: runtimes without the builder: they load only version-compatible engines
LEAN_MODULES = ("tensorrt_lean", "tensorrt_dispatch")


def parse_version(text: str) -> tuple[int, ...]:
    """``"10.13.0.35"`` -> ``(10, 13, 0, 35)``; a suffix (``"11.0.0rc1"``) ends the numbers."""
    match = re.match(r"\s*(\d+(?:\.\d+)*)", str(text))
    if not match:
        raise ModelFileError(f"cannot read a version number from {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def release(text: str) -> tuple[int, int, int]:
    """major.minor.patch of a TensorRT version string (the build number does not change engines)."""
    v = parse_version(text) + (0, 0, 0)
    return v[0], v[1], v[2]


def check_version(version: str) -> tuple[int, ...]:
    """Parse a TensorRT version and refuse ones older than :data:`MIN_TENSORRT`."""
    parsed = parse_version(version)
    if parsed[:2] < MIN_TENSORRT:
        raise BackendError(
            f"TensorRT {version} is too old: virchow-rt needs {'.'.join(map(str, MIN_TENSORRT))} or newer "
            "(strongly typed networks, name-based tensors); pip install -U 'tensorrt>=10.12'"
        )
    return parsed


def lean_runtime(version_compatible: bool, exclude_lean_runtime: bool) -> str | None:
    """What a plan carries of the lean runtime: "embedded", "excluded", or None (not version-compatible)."""
    if not version_compatible:
        return None
    return "excluded" if exclude_lean_runtime else "embedded"


@dataclass(frozen=True)
class EngineKey:
    """Everything a built engine depends on; equal keys mean the engine can be reused as it is."""

    onnx_sha256: str
    tensorrt_version: str
    compute_capability: str
    profile: tuple[int, int, int]  # (min, opt, max) batch
    version_compatible: bool
    onnx_data_sha256: str | None = None  # the graph's external data (> 2 GB models), which holds the weights
    optimization_level: int = 3  # the builder's level, 0-5 (TensorRT's default 3)
    lean_runtime: str | None = None  # version-compatible engines: "embedded" or "excluded"; else None

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> EngineKey:
        """The key recorded in a manifest's TensorRT artifact entry (its build facts, in ``extra``)."""
        built, prof = artifact.extra, artifact.profile
        try:
            if prof is None:
                raise KeyError("profile")
            return cls(
                onnx_sha256=str(built["onnx_sha256"]),
                tensorrt_version=str(built["tensorrt_version"]),
                compute_capability=str(built["compute_capability"]),
                profile=(prof.min, prof.opt, prof.max),
                version_compatible=bool(built.get("version_compatible", False)),
                onnx_data_sha256=built.get("onnx_external_data_sha256"),
                optimization_level=int(built.get("builder_optimization_level", 3)),
                lean_runtime=built.get("lean_runtime"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(
                f"TensorRT artifact {artifact.path!r} in the manifest lacks {err} (build "
                "metadata); rebuild the engine with `virchow-rt export ... --tensorrt`"
            ) from err

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profile"] = dict(zip(("min", "opt", "max"), self.profile, strict=True))
        return d

    def digest(self) -> str:
        """Short stable hash of the key (for cache file names)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def stale_reasons(built: EngineKey, wanted: EngineKey) -> list[str]:
    """Why an engine built as ``built`` is not the one ``wanted`` now; empty when it can be reused."""
    reasons = []
    if built.onnx_sha256 != wanted.onnx_sha256:
        reasons.append(
            f"the ONNX graph changed (sha256 {built.onnx_sha256[:12]}… -> {wanted.onnx_sha256[:12]}…)"
        )
    if built.onnx_data_sha256 != wanted.onnx_data_sha256:
        reasons.append("the ONNX graph's external data (its weights) changed")
    if built.version_compatible != wanted.version_compatible:
        reasons.append(
            f"version_compatible is {built.version_compatible}, wanted {wanted.version_compatible}"
        )
    if built.version_compatible and wanted.version_compatible:
        if release(wanted.tensorrt_version) < release(built.tensorrt_version):
            reasons.append(
                f"it was built with TensorRT {built.tensorrt_version}, "
                f"newer than this {wanted.tensorrt_version}"
            )
    elif release(built.tensorrt_version) != release(wanted.tensorrt_version):
        reasons.append(
            f"it was built with TensorRT {built.tensorrt_version}, this is {wanted.tensorrt_version}"
        )
    if built.compute_capability != wanted.compute_capability:
        reasons.append(
            f"it was built for compute capability {built.compute_capability}, "
            f"this GPU is {wanted.compute_capability}"
        )
    if built.profile != wanted.profile:
        reasons.append(f"its batch profile (min, opt, max) is {built.profile}, wanted {wanted.profile}")
    if built.optimization_level != wanted.optimization_level:
        level, want = built.optimization_level, wanted.optimization_level
        reasons.append(f"it was built at optimization level {level}, wanted {want}")
    if built.version_compatible and wanted.version_compatible and built.lean_runtime != wanted.lean_runtime:
        reasons.append(f"its lean runtime is {built.lean_runtime}, wanted {wanted.lean_runtime}")
    return reasons


def runtime_problems(
    artifact: Artifact,
    runtime_module: str,
    runtime_version: str,
    gpu_name: str,
    compute_capability: str,
    lean_library: str | None = None,
) -> tuple[list[str], list[str]]:
    """(errors, warnings) about loading the engine described by ``artifact`` with this runtime on this GPU.

    ``lean_library``: a lean runtime library the caller will load with ``IRuntime.load_runtime``, which
    is what a newer TensorRT needs to run a version-compatible engine built with the lean runtime excluded.
    """
    errors: list[str] = []
    warnings: list[str] = []
    built = artifact.extra  # the build facts of a TensorRT entry
    built_version = str(built.get("tensorrt_version", "unknown"))
    vc = bool(built.get("version_compatible", False))
    if runtime_module in LEAN_MODULES and not vc:
        errors.append(
            f"the {runtime_module} runtime loads only version-compatible engines and this one is not "
            "(build it with version_compatible=True)"
        )
    try:
        release_built, here = release(built_version), release(runtime_version)
    except ModelFileError:
        errors.append(f"the manifest does not record which TensorRT built the engine ({built_version!r})")
    else:
        if vc and here < release_built:
            errors.append(
                f"it was built (version-compatible) with TensorRT {built_version}, newer than this runtime "
                f"{runtime_version}; version compatibility only works forwards"
            )
        elif vc and built.get("lean_runtime") == "excluded" and here != release_built and not lean_library:
            errors.append(
                f"it was built (version-compatible) with TensorRT {built_version} and the lean runtime "
                f"excluded, so TensorRT {runtime_version} can load it only with that version's lean runtime "
                f"library (pass lean_library=PATH to libnvinfer_lean of {built_version}) or a build that "
                "embeds it"
            )
        elif not vc and here != release_built:
            errors.append(f"it was built with TensorRT {built_version} and this runtime is {runtime_version}")
    built_cc = str(built.get("compute_capability", "unknown"))
    if built_cc != compute_capability:
        errors.append(
            f"it was built for a GPU of compute capability {built_cc} ({built.get('gpu', 'unknown GPU')}) "
            f"and this is {gpu_name}, compute capability {compute_capability}"
        )
    elif built.get("gpu") and built.get("gpu") != gpu_name:
        warnings.append(
            f"it was tuned on a {built['gpu']} and runs on a {gpu_name} (same compute capability "
            f"{compute_capability}): it works but may be slower; rebuild it here for the best speed"
        )
    return errors, warnings


def read_plan(path: Path) -> tuple[Manifest, Artifact, bytes]:
    """(manifest, the engine's artifact entry, the plan's bytes), the plan checked against its sha256."""
    manifest = Manifest.read(path)
    artifact = manifest.artifact_for(path)
    if artifact is None or artifact.format != "tensorrt":
        raise ModelFileError(
            f"{path.parent / 'manifest.json'} has no TensorRT entry for {path.name}; rebuild it: "
            f"{rebuild_command(manifest, path.parent)}"
        )
    try:
        plan = path.read_bytes()
    except OSError as err:
        raise ModelFileError(f"cannot read the engine {path} ({err})") from err
    if hashlib.sha256(plan).hexdigest() != artifact.sha256:
        raise ModelFileError(
            f"{path.name} does not match the sha256 in its manifest (changed or truncated since it was "
            f"built); rebuild it: {rebuild_command(manifest, path.parent)}"
        )
    return manifest, artifact, plan


def rebuild_command(manifest: Manifest, folder: str | os.PathLike[str], options: str = "--tensorrt") -> str:
    """The command that rebuilds the export folder's engine on this machine (``options``: what to export,
    e.g. ``--precision fp16``; the folder's other artifacts stay, see :mod:`virchow_rt.export.merge`), its
    parts quoted for a shell, with the ``--outputs`` the folder's artifacts were made with."""
    weights = manifest.weights
    if weights is not None and weights.random:
        source = "--random-weights"
    else:
        path = weights.source if weights is not None else ""
        source = (
            f"--weights {shlex.quote(path)}"
            if path and (path.startswith("hf://") or Path(path).exists())  # hf://: a cached model id
            else "--weights <the weights it was made from>"
        )
    variant = shlex.quote(manifest.variant) if manifest.variant else "<variant>"
    outputs = next((names for a in manifest.artifacts if (names := _output_names(a))), [OUTPUT])
    shown = "" if outputs == [OUTPUT] else f" --outputs {shlex.quote(','.join(outputs))}"
    return f"virchow-rt export {variant} --out {shlex.quote(os.fspath(folder))} {source}{shown} {options}"


def _output_names(artifact: Artifact) -> list[str]:
    return [str(o.get("name")) for o in artifact.outputs or () if isinstance(o, Mapping)]


# --- engine I/O and what it computes ---------------------------------------------------------------
def check_io(specs: Mapping[str, TensorSpec], info: ModelInfo) -> None:
    """The engine must take uint8 ``tiles`` (B, S, S, 3) and give float32 ``embedding`` (B, E)."""
    s, e = info.tile_size, info.embedding_dim
    tiles, emb = specs.get(INPUT), specs.get(OUTPUT)
    if tiles is None or not tiles.is_input or tiles.dtype != np.uint8 or tiles.shape[1:] != (s, s, 3):
        raise ModelFileError(
            f"engine input {INPUT!r} is {tiles}, expected uint8 (batch, {s}, {s}, 3); re-export it"
        )
    if emb is None or emb.is_input or emb.dtype != np.float32 or emb.shape[1:] != (e,):
        raise ModelFileError(
            f"engine output {OUTPUT!r} is {emb}, expected float32 (batch, {e}); re-export it"
        )
    extra = [n for n, t in specs.items() if t.is_input and n != INPUT]
    if extra:
        raise ModelFileError(f"engine has inputs {extra} besides {INPUT!r}; it is not a virchow-rt export")
