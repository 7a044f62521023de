"""The contracts every layer shares, each in one place: what a model computes (:class:`ModelInfo`, with one
constructor per source), what a batch of tiles is, an engine's I/O tensors, and ``manifest.json``
(:class:`Manifest` and :class:`Artifact`: the only reader and writer of that file).

Imports only the standard library, numpy and the plain modules (errors, files, paths, registry).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from virchow_rt.errors import BackendError, InputError, ModelFileError
from virchow_rt.files import read_limited, write_json
from virchow_rt.paths import inside_folder
from virchow_rt.registry import BatchProfile, Preprocess, Variant, check_pooling, get_variant

#: the names of an exported model's input (uint8 tiles) and output (float32 embeddings), in every format
INPUT, OUTPUT = "tiles", "embedding"
MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
MANIFEST_MAX_BYTES = 16 << 20  # a manifest is a few kB; bounds what a hostile one can make us read
_REEXPORT = "re-export the model with `virchow-rt export`"
_META = "virchow_rt."  # prefix of the ONNX metadata_props an export writes
_J = TypeVar("_J", bound="_Json")


# --- records of manifest.json ----------------------------------------------------------------------
@dataclass(frozen=True)
class _Json:
    """A frozen record of one JSON object that loses nothing: keys it does not type stay in ``extra``, and
    a record read from a file is written back in the file's key order (absent keys stay absent)."""

    #: every key this record does not type, as read (format-specific ones: a TensorRT entry's build key)
    extra: Mapping[str, Any] = field(default_factory=dict, kw_only=True, repr=False)
    key_order: tuple[str, ...] = field(default=(), kw_only=True, repr=False, compare=False)
    #: how a typed key's JSON value is read (others are taken as they are)
    _readers: ClassVar[Mapping[str, Any]] = {}
    #: typed keys written even when None (other None keys are written only if the file had them)
    _always: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _typed(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "key_order")]

    @classmethod
    def from_dict(cls: type[_J], data: Any) -> _J:
        """The record of a JSON object; TypeError / ValueError / KeyError name what does not fit."""
        if not isinstance(data, Mapping):
            raise TypeError(f"expected a JSON object for {cls.__name__}, got {type(data).__name__}")
        typed = cls._typed()
        read = {
            k: None if data[k] is None else cls._readers.get(k, _same)(data[k]) for k in typed if k in data
        }
        extra = {k: v for k, v in data.items() if k not in typed}
        return cls(**read, extra=extra, key_order=tuple(data))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: typed keys (in the file's order when read from one), then ``extra``."""
        out = {}
        for name in self._typed():
            value = getattr(self, name)
            if value is not None or name in self.key_order or name in self._always:
                out[name] = _plain(value)
        out.update(self.extra)
        first = [k for k in self.key_order if k in out]
        return {k: out[k] for k in [*first, *(k for k in out if k not in first)]}


def _same(value: Any) -> Any:
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, _Json):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # Preprocess, BatchProfile
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"an artifact path is {value!r}, not a file name")
    return value


def _objects(value: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, Mapping) for v in value):
        raise TypeError(f"expected a list of JSON objects, got {value!r}")
    return tuple(dict(v) for v in value)


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a JSON object, got {value!r}")
    return dict(value)


def _batch(value: Any) -> BatchProfile:
    value = _object(value)
    return BatchProfile(**{k: int(value[k]) for k in ("min", "opt", "max") if k in value})


def _preprocess(value: Any) -> Preprocess:
    value = _object(value)
    if "size" not in value:
        raise KeyError("preprocess.size")
    known = {f.name for f in dataclasses.fields(Preprocess)}
    read: dict[str, Any] = {k: tuple(v) if k in ("mean", "std") else v for k, v in value.items()}
    return Preprocess(**{k: v for k, v in read.items() if k in known})


@dataclass(frozen=True)
class WeightsInfo(_Json):
    """Where a model's weights came from; recorded in every manifest."""

    random: bool = False
    sha256: str = "unknown"  # hex SHA-256 of the weights file, or "random"
    # what to pass as ``weights`` to load them again (folder, file, "hf://<repo>@<commit>"),
    # or how the random weights were drawn
    source: str = ""
    file: str | None = None  # the weights file read (name inside a folder / snapshot); None when random
    _readers = {"random": bool, "sha256": str, "source": str}
    _always = ("file",)


@dataclass(frozen=True)
class EmbeddingLayout(_Json):
    """What the graph's ``embedding`` output holds and which pooling the model's authors use."""

    pooling: str = "cls_mean"  # the output: class token ‖ mean of patch tokens
    recommended: str | None = None  # the model's own pooling ("cls_mean" or "cls")
    dim: int | None = None
    width: int | None = None
    layout: str | None = None


@dataclass(frozen=True)
class Artifact(_Json):
    """One model file of an export folder, as its ``manifest.json`` entry describes it."""

    path: str  # file name inside the export folder
    format: str | None = None  # "onnx" | "tensorrt"
    precision: str | None = None  # "fp32" | "fp16" | "int8"
    sha256: str | None = None
    size_bytes: int | None = None
    external_data: str | None = None  # the graph's weights file beside it (models > 2 GB)
    inputs: tuple[dict[str, Any], ...] | None = None  # {"name", "dtype", "shape"}; "batch": dynamic axis
    outputs: tuple[dict[str, Any], ...] | None = None
    parity: Mapping[str, Any] | None = None  # the check against the reference; "summary": one line
    profile: BatchProfile | None = None  # TensorRT: the engine's batch optimization profile
    _readers = {"path": _name, "size_bytes": int, "inputs": _objects, "outputs": _objects,
                "parity": _object, "profile": _batch}  # fmt: skip
    _always = ("external_data",)

    def file(self, folder: str | os.PathLike[str], what: str = "artifact") -> Path:
        """``folder / path``, refused (:class:`ModelFileError`) unless it stays inside ``folder``: a manifest
        is not trusted (no absolute path, no ``..``, no symlink out; see :mod:`virchow_rt.paths`)."""
        return inside_folder(folder, self.path, what)

    def data_file(self, folder: str | os.PathLike[str]) -> Path | None:
        """The graph's external data file inside ``folder`` (checked as :meth:`file`), or None."""
        data = self.external_data
        return None if data is None else inside_folder(folder, data, "external data")

    def output_dim(self, name: str = OUTPUT) -> int | None:
        """Columns of output ``name`` as recorded, or None."""
        shape = next((o.get("shape") for o in self.outputs or () if o.get("name") == name), None)
        return shape[-1] if shape and isinstance(shape[-1], int) else None

    @property
    def parity_summary(self) -> str | None:
        """The parity check's one line (``min cosine ... PASS``), or None when none was recorded."""
        return None if self.parity is None else self.parity.get("summary")

    def describe(self) -> dict[str, Any]:
        """What a report shows of it: path, format, precision, size, sha256 and the seconds it took."""
        names = ("path", "format", "precision", "size_bytes", "sha256")
        return {**{k: getattr(self, k) for k in names}, "seconds": self.extra.get("seconds")}


def _artifacts(value: Any) -> tuple[Artifact, ...]:
    if not isinstance(value, list):
        raise TypeError(f"'artifacts' is {type(value).__name__}, not a list")
    return tuple(Artifact.from_dict(a) for a in value)


@dataclass(frozen=True)
class Manifest(_Json):
    """``manifest.json``: what an export folder holds and what it was made from. Every field but the
    artifacts may be missing (None) in a hand-written file; :meth:`read` and :meth:`write` are the only
    code that opens the file."""

    schema_version: int = SCHEMA_VERSION
    variant: str | None = None
    timm_arch: str | None = None
    model_args: Mapping[str, Any] | None = None  # timm VisionTransformer kwargs
    mlp: str | None = None
    norm_eps: float | None = None
    preprocess: Preprocess | None = None
    batch: BatchProfile | None = None
    embedding: EmbeddingLayout | None = None
    weights: WeightsInfo | None = None
    versions: Mapping[str, str] | None = None
    created: str | None = None
    artifacts: tuple[Artifact, ...] = ()
    warning: str | None = None
    _readers = {"schema_version": int, "model_args": _object, "norm_eps": float, "preprocess": _preprocess,
                "batch": _batch, "embedding": EmbeddingLayout.from_dict, "weights": WeightsInfo.from_dict,
                "versions": _object, "artifacts": _artifacts}  # fmt: skip

    @classmethod
    def read(cls, folder_or_file: str | os.PathLike[str]) -> Manifest:
        """The ``manifest.json`` of an export folder, or the one beside a model file."""
        p = Path(folder_or_file)
        path = p / MANIFEST_NAME if p.is_dir() else p.parent / MANIFEST_NAME
        try:
            data = json.loads(read_limited(path, MANIFEST_MAX_BYTES))
        except FileNotFoundError as err:
            raise ModelFileError(f"no {MANIFEST_NAME} at {path}; {_REEXPORT}") from err
        except (OSError, ValueError) as err:  # JSON and UTF-8 errors are ValueErrors
            raise ModelFileError(f"cannot read {path} as JSON ({err}); {_REEXPORT}") from err
        if not isinstance(data, dict) or "artifacts" not in data:
            raise ModelFileError(f"{path} has no 'artifacts' list; {_REEXPORT}")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(
                f"{path} is not a manifest virchow-rt can read ({err}); {_REEXPORT}"
            ) from err

    def write(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``folder/manifest.json`` atomically and durably (schema version first); returns its path."""
        path = Path(folder) / MANIFEST_NAME
        data = self.to_dict()
        data.pop("schema_version", None)
        write_json(path, {"schema_version": SCHEMA_VERSION, **data})
        return path

    def artifact_for(self, model_path: str | os.PathLike[str]) -> Artifact | None:
        """The entry describing ``model_path`` (matched by file name), or None."""
        name = Path(model_path).name
        return next((a for a in self.artifacts if Path(a.path).name == name), None)

    def select(self, format: str, precision: str | None = None) -> list[Artifact]:
        """The artifacts of ``format`` (and ``precision``, if given), in manifest order."""
        return [a for a in self.artifacts if a.format == format and precision in (None, a.precision)]

    def with_artifact(self, artifact: Artifact) -> Manifest:
        """This manifest with ``artifact`` in place of the entry of the same path (appended if none)."""
        kept = tuple(a for a in self.artifacts if a.path != artifact.path)
        return dataclasses.replace(self, artifacts=(*kept, artifact))

    @property
    def pooling(self) -> str:
        """The model's own pooling (what its authors use); "cls_mean" when the manifest does not say."""
        return (self.embedding.recommended if self.embedding else None) or "cls_mean"

    def to_variant(self) -> Variant:
        """The variant it was made from, exactly (its model_args and preprocessing beat the registry's)."""
        if self.variant is None:
            raise ModelFileError(f"{MANIFEST_NAME} names no variant; {_REEXPORT}")
        base = get_variant(self.variant)
        args = {**(self.model_args or {}), "mlp": self.mlp or base.mlp}
        args["norm_eps"] = base.norm_eps if self.norm_eps is None else self.norm_eps
        config: dict[str, Any] = {"model_args": args}
        if self.timm_arch:
            config["architecture"] = self.timm_arch
        variant = base.with_config(config)
        return (
            variant if self.preprocess is None else dataclasses.replace(variant, preprocess=self.preprocess)
        )


# --- what a model computes -------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model computes; built here only, one constructor per source: :meth:`from_variant` (a
    PyTorch module), :meth:`from_manifest` (a TensorRT engine), :meth:`from_onnx` (an ONNX graph)."""

    variant: str
    embedding_dim: int  # E: columns of the "embedding" output (class token ‖ patch mean = 2·width)
    width: int  # D: the class token alone is embedding[:, :width]
    tile_size: int  # S: the model's input is uint8 (N, S, S, 3)
    precision: str  # "fp32" | "fp16"
    random_weights: bool
    weights_sha256: str  # "random" for random weights
    pooling: str = "cls_mean"  # the embedding the model's authors use: what embed() returns by default
    # timm's eval geometry for tiles: shorter side to floor(S / crop_pct) with this filter, centre crop S
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    @classmethod
    def from_variant(cls, variant: Variant, precision: str, weights: WeightsInfo) -> ModelInfo:
        """What a PyTorch module of ``variant`` computes."""
        p = variant.preprocess
        return cls(
            variant.name,
            variant.embedding_dim(),
            variant.width,
            p.size,
            precision,
            weights.random,
            weights.sha256,
            variant.pooling,
            p.crop_pct,
            p.interpolation,
        )

    @classmethod
    def from_manifest(cls, manifest: Manifest, artifact: Artifact) -> ModelInfo:
        """What an engine computes, from its export's manifest: a TensorRT plan carries no metadata and no
        graph to fall back on, so a fact the manifest lacks is a :class:`ModelFileError`."""
        facts = {"variant": manifest.variant, "preprocess": manifest.preprocess,
                 "model_args.embed_dim": (manifest.model_args or {}).get("embed_dim")}  # fmt: skip
        missing = [k for k, v in facts.items() if v is None]
        if missing:
            raise ModelFileError(
                f"{MANIFEST_NAME} lacks {', '.join(missing)} needed to describe {artifact.path}; {_REEXPORT}"
            )
        return cls.from_onnx({}, None, artifact.output_dim(), manifest, artifact)

    @classmethod
    def from_onnx(
        cls,
        metadata: Mapping[str, str],
        graph_size: int | None,
        graph_dim: int | None,
        manifest: Manifest | None = None,
        artifact: Artifact | None = None,
    ) -> ModelInfo:
        """What an ONNX graph computes: its metadata (:meth:`onnx_metadata`), else the manifest beside it,
        else the graph's own input size and output width (the fallbacks every source shares)."""
        meta = {k.removeprefix(_META): v for k, v in metadata.items() if k.startswith(_META)}
        m = manifest or Manifest()
        pre, weights = m.preprocess or Preprocess(size=graph_size or 224), m.weights or WeightsInfo()
        width = int(meta.get("width") or (m.model_args or {}).get("embed_dim") or (graph_dim or 0) // 2)
        return cls(
            variant=meta.get("variant") or m.variant or "unknown",
            embedding_dim=int(meta.get("embedding_dim") or graph_dim or 2 * width),
            width=width,
            tile_size=int(meta.get("tile_size") or pre.size),
            precision=meta.get("precision") or (artifact and artifact.precision) or "unknown",
            random_weights=meta.get("random_weights") == "true" or weights.random,
            weights_sha256=meta.get("weights_sha256") or weights.sha256,
            pooling=meta.get("pooling") or m.pooling,
            crop_pct=float(meta.get("crop_pct") or pre.crop_pct),
            interpolation=meta.get("interpolation") or pre.interpolation,
        )

    def onnx_metadata(self) -> dict[str, str]:
        """The ``metadata_props`` that make an exported ONNX file describe itself (:meth:`from_onnx`)."""
        values = {
            "variant": self.variant,
            "width": str(self.width),
            "embedding_dim": str(self.embedding_dim),
            "tile_size": str(self.tile_size),
            "crop_pct": str(self.crop_pct),
            "interpolation": self.interpolation,
            "pooling": self.pooling,
            "precision": self.precision,
            "random_weights": "true" if self.random_weights else "false",
            "weights_sha256": self.weights_sha256,
        }
        return {_META + k: v for k, v in values.items()}


def embedding_dim(info: ModelInfo, pooling: str) -> int:
    """Columns of the embedding for ``pooling``: E ("cls_mean": class token ‖ patch mean) or D ("cls")."""
    return info.embedding_dim if check_pooling(pooling) == "cls_mean" else info.width


# --- tiles and tensors -----------------------------------------------------------------------------
def check_tile_array(tiles: Any, what: str = "tiles") -> None:
    """Raise :class:`InputError` unless ``tiles`` is uint8 (N, H, W, 3); ``what`` names it in the message.

    ``tiles``: anything with numpy's ``dtype`` and ``shape`` (a numpy array, or a GPU array's description).
    """
    if tiles.dtype != np.uint8:
        raise InputError(
            f"{what}: dtype {tiles.dtype}; tiles must be uint8 RGB (0-255): convert with "
            "np.clip(x, 0, 255).astype(np.uint8) (multiply 0-1 floats by 255 first; normalization "
            "happens inside the model)"
        )
    if len(tiles.shape) != 4 or tiles.shape[-1] != 3:
        raise InputError(
            f"{what}: shape {tuple(tiles.shape)}; expected (N, H, W, 3) uint8 RGB, channels last "
            "(channels-first: x.transpose(0, 2, 3, 1); one tile: x[None]; RGBA: x[..., :3])"
        )


def check_batch(shape: Sequence[int], dtype: Any, tile_size: int, max_batch: int) -> int:
    """Rows of a batch of tiles for an engine, or an :class:`InputError` that says what is wrong with it."""
    s = tile_size
    if len(shape) != 4 or tuple(shape[1:]) != (s, s, 3):
        raise InputError(
            f"tiles of shape {tuple(shape)} given; this engine takes (batch, {s}, {s}, 3) uint8 RGB: resize "
            f"them first (virchow_rt.kernels.resize.resize_tiles(tiles, {s}))"
        )
    if np.dtype(dtype) != np.uint8:
        raise InputError(f"tiles of dtype {np.dtype(dtype)} given; this engine takes uint8 RGB (0-255)")
    if shape[0] > max_batch:
        raise InputError(
            f"a batch of {shape[0]} tiles exceeds the engine's max batch {max_batch}; use batches of at most "
            f"{max_batch} or rebuild the engine with --max-batch {shape[0]}"
        )
    return int(shape[0])


@dataclass(frozen=True)
class TensorSpec:
    """One I/O tensor of an engine: shape with -1 for the dynamic batch."""

    name: str
    is_input: bool
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    def nbytes(self, rows: int) -> int:
        return buffer_nbytes(self.shape, rows, self.dtype.itemsize)


def buffer_nbytes(shape: Sequence[int], rows: int, itemsize: int) -> int:
    """Bytes of a tensor of ``shape`` with its first (batch) dimension set to ``rows``."""
    rest = [int(d) for d in shape[1:]]
    if not shape or any(d < 0 for d in rest) or rows < 0:
        raise BackendError(
            f"tensor shape {tuple(shape)} has a dynamic dimension besides the batch; cannot size it"
        )
    return int(rows) * int(np.prod(rest, dtype=np.int64)) * int(itemsize)
