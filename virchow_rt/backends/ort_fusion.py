"""CPU graph rewrite for ONNX Runtime: timm's packed-qkv attention -> ``com.microsoft.Attention``.

Measured +7 % on the 2-core build machine (see :mod:`virchow_rt.backends.onnxruntime`). The fused
copy is made once into a cache folder, checked against the original graph, and used only when it matches.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from virchow_rt._deps import optional_import
from virchow_rt.files import write_json

INPUT, OUTPUT = "tiles", "embedding"
CPU = ["CPUExecutionProvider"]
FUSION_VERSION = 2  # bump when fuse_attention changes: old cache entries are then ignored
MAX_ENTRIES = 4  # fused models kept in the cache folder (least recently used go first)
FUSED_MIN_COSINE = 0.99999  # the fused graph must match the original like an fp32 export matches torch


# --- CPU graph optimization: timm's packed-qkv attention -> com.microsoft.Attention ----------------
_LAYOUT_OPS = {"Squeeze", "Split", "Gather", "Transpose", "Reshape", "Mul", "Div", "Identity"}


def fuse_attention(model: Any) -> int:
    """Rewrite timm attention blocks of an ONNX ``ModelProto`` in place; returns how many were fused.

    Pattern (timm ``Attention`` with packed qkv, as exported by torch): ``x @ W_qkv + b`` -> reshape
    (B, N, 3, H, hd) -> transpose/split -> ``softmax(q k^T * scale) @ v`` -> transpose -> reshape (B, N, D).
    The whole chain becomes one ``com.microsoft.Attention(x, W_qkv, b, num_heads=H, scale=s)`` (its
    weight layout is timm's: q, k, v concatenated along the output dimension, heads major). ``s`` is the
    product of the constant factors on the q and k paths; when torch computed it at run time (its SDPA
    export), the op's default 1/sqrt(hd) is SDPA's too. :func:`_build_entry` checks the result anyway.
    """
    onnx = optional_import("onnx", "to optimize ONNX graphs")
    from onnx import helper, numpy_helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {i.name: i for i in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity"}  # torch dedups weights

    def const(name: str) -> np.ndarray | None:
        while name in alias:
            name = alias[name]
        node = producer.get(name)
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def qkv_add(name: str) -> tuple[Any, float | None]:
        """Walk up layout ops to the Add of the qkv projection; also the product of constant scale
        factors met on the way (Mul/Div by a constant), or None when one was computed at run time."""
        factor: float | None = 1.0
        for _ in range(10):
            node = producer.get(name)
            if node is None or node.op_type not in _LAYOUT_OPS | {"Add"}:
                return None, factor
            if node.op_type == "Add":
                return node, factor
            walkable = _LAYOUT_OPS | {"Add"}
            data = [i for i in node.input if const(i) is None and producer.get(i, node).op_type in walkable]
            if node.op_type in ("Mul", "Div"):
                # Mul: either side may be the constant; Div: only the divisor scales
                candidates = node.input if node.op_type == "Mul" else node.input[1:]
                value = next((v for v in map(const, candidates) if v is not None), None)
                if value is None or value.size != 1:
                    factor = None  # e.g. torch's SDPA export: sqrt(scale) computed from the shape
                elif factor is not None:
                    factor *= float(value.reshape(-1)[0]) ** (1 if node.op_type == "Mul" else -1)
            name = data[0] if data else ""
        return None, factor

    def only(name: str, op: str) -> Any:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    replacements: list[tuple[Any, Any]] = []  # (output Reshape node, Attention node replacing the chain)
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        scores, attn_v = producer.get(softmax.input[0]), only(softmax.output[0], "MatMul")
        merge = attn_v and only(attn_v.output[0], "Transpose")
        out = merge and only(merge.output[0], "Reshape")
        if scores is None or scores.op_type != "MatMul" or out is None:
            continue
        (add, q_scale), (k_add, k_scale), (v_add, v_scale) = (
            qkv_add(n) for n in (scores.input[0], scores.input[1], attn_v.input[1])
        )
        if add is None or k_add is not add or v_add is not add or v_scale != 1.0:
            continue
        bias = next((i for i in add.input if const(i) is not None), None)
        proj = next(
            (producer[i] for i in add.input if i in producer and producer[i].op_type == "MatMul"), None
        )
        split_shape = only(add.output[0], "Reshape")
        if bias is None or proj is None or const(proj.input[1]) is None or split_shape is None:
            continue
        heads = _num_heads(split_shape.input[1], const, producer)
        if heads is None:
            continue
        # constant factors on q and k (timm: q * scale) give the exact scale; a run-time one is SDPA's
        # default 1/sqrt(head dim), which is also the op's default
        fused = helper.make_node(
            "Attention", [proj.input[0], proj.input[1], bias], [out.output[0]],
            domain="com.microsoft", name=f"virchow_rt_attention_{len(replacements)}", num_heads=heads,
        )  # fmt: skip
        if q_scale is not None and k_scale is not None:
            fused.attribute.append(helper.make_attribute("scale", q_scale * k_scale))
        replacements.append((out, fused))
    for old, new in replacements:
        index = list(graph.node).index(old)
        graph.node.remove(old)
        graph.node.insert(index, new)
    if replacements:
        _drop_dead_nodes(graph)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return len(replacements)


def check_tiles_for(size: int) -> np.ndarray:
    """4 deterministic uint8 tiles (4, S, S, 3) with structure at several scales: blocks, a gradient, noise.

    Pure noise is not enough: averaged over a patch or a row it is nearly constant, so attention turns
    uniform and a wrong softmax scale would go unnoticed.
    """
    rng = np.random.default_rng(0)
    tiles = np.empty((4, size, size, 3), np.uint8)
    for i, cells in enumerate((7, 16)):  # random blocks of S/7 and S/16 px
        coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        index = np.arange(size) * cells // size
        tiles[i] = coarse[index][:, index]
    y, x = np.meshgrid(np.linspace(0, 255, size), np.linspace(0, 255, size), indexing="ij")  # (S, S)
    tiles[2] = np.stack([y, x, 255 - y], axis=-1).round()  # gradients
    tiles[3] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return tiles


def _num_heads(shape_name: str, const: Any, producer: dict[str, Any]) -> int | None:
    """H from the 5-d reshape (B, N, 3, H, hd) of the qkv projection: a constant, or a Concat of parts."""
    shape = const(shape_name)
    if shape is not None:
        return int(shape[3]) if shape.size == 5 else None
    concat = producer.get(shape_name)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 5:
        return None
    part = const(concat.input[3])
    return int(part.reshape(-1)[0]) if part is not None else None


def _check_fused(original: Any, fused_path: Path, ort: Any) -> dict[str, Any]:
    """Run the original and the fused graph on :func:`check_tiles_for`; ``use`` when they agree like fp32."""
    dims = original.get_inputs()[0].shape  # (batch, S, S, 3)
    tiles = check_tiles_for(dims[1] if isinstance(dims[1], int) else 224)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        fused = ort.InferenceSession(str(fused_path), so, providers=CPU)
        b = fused.run([OUTPUT], {INPUT: tiles})[0].astype(np.float64)  # (4, E)
    except Exception as err:  # noqa: BLE001 - e.g. an op this ORT build lacks: recorded, not raised
        return {"use": False, "reason": f"ONNX Runtime cannot run the fused graph ({err})"}
    a = original.run([OUTPUT], {INPUT: tiles})[0].astype(np.float64)  # (4, E)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    cos = float(np.min(np.sum(a * b, axis=1) / norms))
    if cos >= FUSED_MIN_COSINE:
        return {"use": True, "min_cosine": cos}
    return {
        "use": False,
        "min_cosine": cos,
        "reason": f"fused graph disagrees with the original (cosine {cos:.7f})",
    }


def read_result(entry: Path) -> dict[str, Any] | None:
    """The outcome recorded in a cache entry, or None; marks the entry as just used (for :func:`evict`)."""
    try:
        result: dict[str, Any] = json.loads((entry / "result.json").read_text())
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):
        os.utime(entry / "result.json")
    return result


def evict(folder: Path, keep: Path, limit: int = MAX_ENTRIES) -> list[Path]:
    """Delete the least recently used cache entries of ``folder`` beyond ``limit`` (``keep`` always stays).

    Each entry holds a whole fused copy of a model (2.5 GB for an fp32 ViT-H), so the cache is bounded.
    Returns the entries removed.
    """

    def used(entry: Path) -> float:
        try:
            return (entry / "result.json").stat().st_mtime
        except OSError:
            return 0.0  # half-made or damaged: the first to go

    others = [e for e in folder.iterdir() if e.is_dir() and not e.name.startswith(".") and e != keep]
    removed = sorted(others, key=used, reverse=True)[max(0, limit - 1) :]
    for entry in removed:
        shutil.rmtree(entry, ignore_errors=True)
    return removed


def _drop_dead_nodes(graph: Any) -> None:
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    used = [i for i in graph.initializer if i.name in live]
    del graph.initializer[:]
    graph.initializer.extend(used)


def build_entry(path: Path, original: Any, entry: Path, ort: Any) -> None:
    """Fuse ``path`` into the cache folder ``entry`` (atomically: temp folder + rename), checked for parity.

    ``entry/result.json`` records the outcome; ``entry/model.onnx`` exists only when the fused graph
    matched the original (min cosine >= FUSED_MIN_COSINE on the check tiles) and is to be used.
    """
    onnx = optional_import("onnx", "to optimize ONNX graphs")
    model = onnx.load(str(path))  # external data, if any, is read from beside the file
    fused = fuse_attention(model)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        result: dict[str, Any] = {"source": str(path), "fused_attention": fused, "use": False}
        if fused == 0:
            result["reason"] = "no timm attention pattern found"
        else:
            big = sum(len(t.raw_data) for t in model.graph.initializer) > 1_800_000_000  # protobuf: < 2 GB
            onnx.save_model(
                model, str(tmp / "model.onnx"), save_as_external_data=big, location="model.onnx.data"
            )
            del model  # the fused proto: one copy of the weights fewer while the check runs
            result.update(_check_fused(original, tmp / "model.onnx", ort))
            if not result["use"]:
                (tmp / "model.onnx").unlink()
                (tmp / "model.onnx.data").unlink(missing_ok=True)
        write_json(tmp / "result.json", result)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process made the same entry first: use theirs
            if not (entry / "result.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
