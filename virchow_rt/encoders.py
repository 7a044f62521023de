"""``virchow-rt list``: the registered encoders as rows a person (or a script, with ``--json``) reads.

Everything comes from the registry (:mod:`virchow_rt.registry`); this module imports only the standard
library.
"""

from __future__ import annotations

from typing import Any

from virchow_rt.registry import VARIANTS, Preprocess, Variant

COLUMNS = (
    "name",
    "architecture",
    "params",
    "embedding",
    "preprocessing",
    "magnification",
    "licence",
    "checked",
)


def describe(v: Variant) -> dict[str, Any]:
    """One encoder's row: architecture, size, embedding, preprocessing, magnification, licence, checks."""
    a, p = v.model_args, v.preprocess
    registers = f", {v.num_registers} registers" if v.num_registers else ""
    blocks = ("SwiGLU" if v.mlp == "swiglu_packed" else "GELU MLP") + (
        ", LayerScale" if a.get("init_values") else ""
    )
    resize = f"{p.size} px as is" if p.crop_pct == 1.0 else f"{int(p.size / p.crop_pct)} + crop {p.size}"
    imagenet = (p.mean, p.std) == (Preprocess.mean, Preprocess.std)
    return {
        "name": v.name,
        "architecture": f"ViT {v.width}/{a['depth']}/{a['num_heads']}/{a['patch_size']}{registers}, {blocks}",
        "timm_arch": v.timm_arch,
        "params": v.parameters(),
        "embedding": f"{v.embedding_dim(v.pooling)} ({v.pooling})",
        "poolings": {"cls_mean": v.embedding_dim("cls_mean"), "cls": v.embedding_dim("cls")},
        "preprocessing": f"{p.interpolation}, {resize}, {'ImageNet' if imagenet else 'own'} mean/std",
        "mean": list(p.mean),
        "std": list(p.std),
        "magnification": v.magnification,
        "licence": f"{v.license or 'unknown'}{', gated' if v.gated else ''}",
        "source": v.hf_repo or v.weights_url or "no public weights",
        "weights_layout": v.weights_layout,
        "unconfirmed": list(v.unconfirmed),
        "precision_note": v.precision_note or None,
        "checked": "on published weights" if v.checked_on_published_weights else "random weights only",
    }


def table() -> str:
    """The encoders as an aligned text table."""
    rows = [describe(v) for v in VARIANTS.values()]
    cells = [[_cell(r, c) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    notes = [f"{r['name']}: {r['precision_note']}" for r in rows if r["precision_note"]]
    return "\n".join(lines + [""] + notes)


def _cell(row: dict[str, Any], column: str) -> str:
    if column == "params":
        return f"{row['params'] / 1e6:,.0f}M"
    return str(row[column])
