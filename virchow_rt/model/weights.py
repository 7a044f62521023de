"""Offline weight loading: a Hugging Face-layout folder, a state-dict file, or a model id in the local cache.

Nothing here executes code from a checkpoint: safetensors files are read as tensors, pickles with
``torch.load(weights_only=True)``. Nothing here touches the network: a model id is resolved from the
local Hugging Face cache only (``local_files_only=True``), honouring ``HF_HUB_CACHE`` / ``HF_HOME``.

When keys or shapes do not fit the variant, :func:`check_state_dict` says which keys are missing or
unexpected and which registered variant the weights look like (read from their shapes).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from virchow_rt._deps import optional_import
from virchow_rt.contract import WeightsInfo
from virchow_rt.errors import RandomWeightsWarning, WeightsError, warn_random_weights  # noqa: F401 - re-exported
from virchow_rt.files import sha256_file
from virchow_rt.model.transformers_layout import architecture, is_transformers_config, to_timm
from virchow_rt.registry import VARIANTS, Variant

#: file names of the published checkpoints, in the order they are preferred (safetensors: no pickle at all)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LIST_LIMIT = 8  # keys shown per list in an error message


# --- locating the files --------------------------------------------------------------------------
def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):  # older spelling, still honoured by huggingface_hub
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _from_hf_cache(repo_id: str) -> Path:
    """The cached snapshot folder of ``repo_id``; never downloads."""
    hub = optional_import("huggingface_hub", "to find weights in the local Hugging Face cache")
    cache = hf_cache_dir()
    try:
        return Path(hub.snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True))
    except Exception as err:  # noqa: BLE001 - every failure here means "not usable from the cache"
        raise WeightsError(
            f"{repo_id} is not in the local Hugging Face cache ({cache}; set HF_HUB_CACHE or HF_HOME to use "
            f"another); virchow-rt never downloads: fetch it once while online with `hf download {repo_id}` "
            f"(huggingface_hub < 1.0: `huggingface-cli download {repo_id}`; gated models need the licence "
            f"accepted on huggingface.co and `hf auth login`), or pass a folder or file path "
            f"({type(err).__name__}: {err})"
        ) from err


def _weights_in_folder(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir() if p.suffix in STATE_DICT_SUFFIXES)
    hint = f"; it holds {', '.join(found)}: pass that file instead" if found else ""
    raise WeightsError(f"weights folder {folder} has neither {' nor '.join(WEIGHT_FILES)}{hint}")


def resolve_weights(spec: str | os.PathLike) -> tuple[Path, Path | None, str]:
    """Turn ``spec`` into (weights file, config.json or None, source label) without reading the weights."""
    path = Path(spec).expanduser()
    if path.is_dir():
        config = path / "config.json"
        return _weights_in_folder(path), config if config.is_file() else None, str(path)
    if path.is_file():
        if not path.name.endswith(STATE_DICT_SUFFIXES):
            raise WeightsError(
                f"weights file {path} has an unknown suffix; use a state dict ending in "
                f"{', '.join(STATE_DICT_SUFFIXES)} or a Hugging Face-layout folder"
            )
        return path, None, str(path)
    if isinstance(spec, str) and spec.startswith("hf://"):  # a manifest's source: hf://<repo>@<commit>
        spec = spec.removeprefix("hf://").split("@")[0]
    if isinstance(spec, str) and _HF_ID.match(spec):
        folder = _from_hf_cache(spec)
        config = folder / "config.json"
        return (
            _weights_in_folder(folder),
            config if config.is_file() else None,
            f"hf://{spec}@{folder.name}",
        )
    raise WeightsError(
        f"weights {str(spec)!r} is neither a file, a folder, nor a Hugging Face model id (owner/name); "
        "pass a folder with config.json + pytorch_model.bin or model.safetensors, or a state-dict file"
    )


# --- reading -------------------------------------------------------------------------------------
def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    """The flat tensor mapping inside a checkpoint (some training code nests it under "state_dict")."""
    torch = optional_import("torch", "to read PyTorch weights")
    for _ in range(2):
        if isinstance(obj, Mapping) and obj and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next(
                (obj[k] for k in ("state_dict", "model", "teacher") if isinstance(obj.get(k), Mapping)), None
            )
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"{path} holds {type(obj).__name__}, not a state dict of tensors; save model.state_dict()"
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"{path} holds no tensors; save model.state_dict()")
    # torch.nn.DataParallel / DDP prefix every key with "module."
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state dict on the CPU without executing code (safetensors, or torch.load weights_only)."""
    path = Path(path)
    if path.name.endswith(".safetensors"):
        st = optional_import("safetensors.torch", "to read .safetensors weights")
        try:
            return dict(st.load_file(str(path), device="cpu"))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise WeightsError(
                f"cannot read {path} as safetensors ({err}); is the download complete?"
            ) from err
    torch = optional_import("torch", "to read PyTorch weights")
    try:
        try:  # mmap keeps a multi-GB checkpoint out of RAM until it is copied into the model
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:  # noqa: BLE001 - unpickling raises many types
        raise WeightsError(
            f"cannot read {path} as a plain state dict ({_load_reason(err)}); virchow-rt loads only tensors, "
            "never pickled code: re-save it with torch.save(model.state_dict())"
        ) from err
    return _unwrap(obj, path)


def _load_reason(err: BaseException) -> str:
    """torch.load's refusal in one plain line: what it found, without ANSI codes or its advice to unpickle."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global| Please use|\n|$)", text)
    line = found.group(1) if found else text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"{type(err).__name__}: {line.strip().rstrip('.')}"


def load_weights(spec: str | os.PathLike, variant: Variant) -> tuple[dict[str, Any], Variant, WeightsInfo]:
    """Load weights named by ``spec`` for ``variant``.

    ``spec``: a folder in the Hugging Face layout of the published checkpoints (``config.json`` in timm's
    hub format, or a transformers ViTModel / Dinov2Model config, + ``model.safetensors`` or
    ``pytorch_model.bin``), a single state-dict file, or a model id such as ``paige-ai/Virchow2`` found
    in the local Hugging Face cache. ``config.json`` settles the architecture over the registry's
    (:meth:`Variant.with_config`); transformers tensors are converted to timm's keys
    (:mod:`virchow_rt.model.transformers_layout`). Returns (timm state dict, updated variant, info).
    Keys are checked against a model later, by :func:`check_state_dict`.
    """
    weights_file, config_file, source = resolve_weights(spec)
    config: dict[str, Any] = {}
    if config_file is not None:
        try:
            config = json.loads(config_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise WeightsError(f"cannot read {config_file} ({err}); expected timm's hub config.json") from err
        if not isinstance(config, dict):
            raise WeightsError(f"{config_file} is not a JSON object; expected timm's hub config.json")
    transformers = is_transformers_config(config)
    if config:
        variant = variant.with_config(
            architecture(config, variant.preprocess.size) if transformers else config
        )
    state = read_state_dict(weights_file)
    if transformers:
        state = to_timm(state, config, variant.preprocess.size)
    elif "embeddings.cls_token" in state:
        raise WeightsError(
            f"{weights_file} holds transformers keys (embeddings.*, encoder.layer.*) but no transformers "
            "config.json is beside it; pass the folder transformers saved (config.json + weights)"
        )
    info = WeightsInfo(random=False, sha256=sha256_file(weights_file), source=source, file=weights_file.name)
    return state, variant, info


# --- checking against a model --------------------------------------------------------------------
def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in value.shape)


def weights_signature(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Architecture facts read from state-dict shapes (timm ViT key names)."""
    sig: dict[str, Any] = {}
    if "cls_token" in shapes:
        sig["width"] = shapes["cls_token"][-1]
    sig["registers"] = shapes["reg_token"][1] if "reg_token" in shapes else 0
    if "pos_embed" in shapes:
        sig["tokens"] = shapes["pos_embed"][1]
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    sig["depth"] = max(blocks) + 1 if blocks else 0
    if "patch_embed.proj.weight" in shapes:
        sig["patch_size"] = shapes["patch_embed.proj.weight"][-1]
    fc1, fc2 = shapes.get("blocks.0.mlp.fc1.weight"), shapes.get("blocks.0.mlp.fc2.weight")
    if fc1 and fc2:
        # SwiGLU packs gate and value into fc1: fc1 makes 2x what fc2 reads; a GELU MLP reads what fc1 makes
        sig["mlp"] = "swiglu_packed" if fc1[0] == 2 * fc2[1] else "gelu"
        sig["mlp_hidden"] = fc1[0]
    sig["layer_scale"] = "blocks.0.ls1.gamma" in shapes
    return sig


def _variant_signature(v: Variant) -> dict[str, Any]:
    return {
        "width": v.width,
        "registers": v.num_registers,
        # pos_embed covers the prefix tokens unless no_embed_class (DINOv2 with registers, UNI2-h)
        "tokens": v.num_patches if v.model_args.get("no_embed_class") else v.num_tokens,
        "depth": int(v.model_args["depth"]),
        "patch_size": int(v.model_args["patch_size"]),
        "mlp": v.mlp,
        "mlp_hidden": v.mlp_hidden,
        "layer_scale": bool(v.model_args.get("init_values")),
    }


def guess_variant(shapes: Mapping[str, tuple[int, ...]], refused: str | None = None) -> str:
    """Which registered variants (or tiny test configs) state-dict shapes look like, in words.

    ``refused``: the variant the weights were just refused for, never named as a match.
    """
    sig = weights_signature(shapes)
    candidates = [v for base in VARIANTS.values() for v in (base, base.tiny())]
    matches = [v.name for v in candidates if _variant_signature(v) == sig and v.name != refused]
    if matches:
        return " or ".join(matches)
    facts = ", ".join(f"{k} {v}" for k, v in sig.items())
    return f"no registered variant ({facts})"


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f", ... ({len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else "")


def check_state_dict(
    expected: Mapping[str, tuple[int, ...]], state: Mapping[str, Any], variant: Variant
) -> None:
    """Raise :class:`WeightsError` unless ``state`` has exactly the keys and shapes in ``expected``.

    ``expected`` maps key -> shape (from ``model.state_dict()``). The message lists missing, unexpected and
    mis-shaped keys (truncated) and names the variant the weights look like.
    """
    shapes = {k: _shape(v) for k, v in state.items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if tuple(expected[k]) != shapes[k])
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
    if wrong:
        shown = [f"{k} {shapes[k]} vs {tuple(expected[k])}" for k in wrong]
        parts.append(f"shape mismatches (weights vs model) ({len(wrong)}): {_listed(shown)}")
    raise WeightsError(
        f"weights do not fit variant {variant.name!r}: {'; '.join(parts)}. These weights look like "
        f"{guess_variant(shapes, refused=variant.name)}: pass the matching variant, or a config.json whose "
        "model_args describe them"
    )
