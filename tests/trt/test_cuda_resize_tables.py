"""The GPU resize's weight tables, checked on the CPU: a numpy resample with them must equal PIL's.

The CUDA kernels run exactly this integer arithmetic with these tables (``test_cuda_gpu.py`` checks
the kernels themselves on a GPU); NVRTC compiles the kernel source here without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from virchow_rt._deps import is_importable
from virchow_rt.errors import InputError
from virchow_rt.kernels.cuda_resize import (
    PRECISION_BITS,
    bicubic,
    compile_kernels,
    crop_offsets,
    fixed_point,
    pil_coefficients,
    resample_numpy,
    resize_plan,
    resized_size,
)
from virchow_rt.tissue import tissue_tiles

# (height, width): down by 2 (20x -> 10x), non-integer factors, up-sampling, odd crops, already 224
SIZES = [(448, 448), (512, 512), (300, 500), (1000, 700), (231, 517), (225, 224), (150, 300), (112, 112)]
SIZES += [(224, 224)]


def pil_resize(tile: np.ndarray, size: int = 224) -> np.ndarray:
    """PIL's antialiased bicubic resize + torchvision's crop arithmetic (no code shared with the tables)."""
    h, w = tile.shape[:2]
    new_h, new_w = resized_size(h, w, size)
    image = Image.fromarray(tile)
    if (new_h, new_w) != (h, w):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = crop_offsets(new_h, new_w, size)
    return np.asarray(image)[top : top + size, left : left + size]


def tiles_of(h: int, w: int, n: int = 2, seed: int = 0) -> np.ndarray:
    """Real tissue (tiled to size) plus noise, whose sharp edges exercise the negative lobes and clipping."""
    tissue = tissue_tiles(1, 512, seed=seed)[0]
    real = np.tile(tissue, (h // 512 + 1, w // 512 + 1, 1))[:h, :w]
    noise = np.random.default_rng(seed).integers(0, 256, (n - 1, h, w, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.concatenate([real[None], noise]))


def test_bicubic_kernel_is_pils() -> None:
    x = np.array([0.0, 0.5, 1.0, 1.5, 2.0, -0.5, -1.5, 2.5])
    np.testing.assert_allclose(bicubic(x), [1.0, 0.5625, 0.0, -0.0625, 0.0, 0.5625, -0.0625, 0.0])


def test_support_widens_with_the_downscale_factor() -> None:
    _, counts_up, w_up = pil_coefficients(112, 224)  # up-sampling: support 2 -> 5 taps max
    _, counts_down, w_down = pil_coefficients(1000, 224)  # down by 4.46: support 8.9 -> 19 taps max
    assert w_up.shape[1] == 5 and counts_up.max() <= 5
    assert w_down.shape[1] == 19 and counts_down.max() >= 17
    for w in (w_up, w_down):
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)  # normalised per output pixel


def test_fixed_point_rounds_half_away_from_zero() -> None:
    one = 1 << PRECISION_BITS
    w = np.array([0.5 / one, -0.5 / one, 1.0, -0.25, 1.4 / one, -1.4 / one])
    np.testing.assert_array_equal(fixed_point(w), [1, -1, one, -one // 4, 1, -1])
    assert fixed_point(w).dtype == np.int32


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_numpy_resample_with_the_tables_equals_pil(h: int, w: int) -> None:
    tiles = tiles_of(h, w)
    got = resample_numpy(tiles, resize_plan(h, w, 224))
    want = np.stack([pil_resize(t) for t in tiles])
    assert got.shape == (len(tiles), 224, 224, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1, f"max abs diff {diff.max()} vs PIL for {h}x{w}"
    assert (diff == 0).mean() > 0.999  # in practice bit-exact


def test_plan_reads_only_the_rows_the_crop_needs() -> None:
    plan = resize_plan(300, 500, 224)  # shorter side is the height: crop is along the width
    assert plan.resized == (224, 373) and plan.offsets == (0, 74)
    assert plan.rows.first == 0 and plan.rows.span == 300  # every row feeds the 224 output rows
    assert plan.cols.first > 0 and plan.cols.first + plan.cols.span < 500  # cropped-away sides unread
    assert plan.rows.weights.dtype == np.int32 and plan.rows.starts.min() == 0


def test_geometry_matches_torchvision_and_the_reference_resize() -> None:
    from virchow_rt.kernels.resize import resize_geometry

    for h, w in SIZES:
        new = resized_size(h, w, 224)
        assert (*new, *crop_offsets(*new, 224)) == resize_geometry(h, w, 224)
    assert crop_offsets(225, 224, 224) == (0, 0)  # round(0.5) = 0: halves go to even, as in Python
    assert crop_offsets(227, 224, 224) == (2, 0)  # round(1.5) = 2


@pytest.mark.parametrize(("h", "w"), [(448, 448), (231, 517)])
def test_numpy_resample_equals_timm_transform(h: int, w: int) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    bicubic_mode = transforms.InterpolationMode.BICUBIC
    tv = transforms.Compose([transforms.Resize(224, interpolation=bicubic_mode), transforms.CenterCrop(224)])
    tiles = tiles_of(h, w)
    want = np.stack([np.asarray(tv(Image.fromarray(t))) for t in tiles])
    got = resample_numpy(tiles, resize_plan(h, w, 224))
    assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1


def test_numpy_resample_equals_the_cpu_reference_resize_tiles() -> None:
    from virchow_rt.kernels.resize import resize_tiles

    for h, w in [(448, 448), (300, 500), (112, 112)]:
        tiles = tiles_of(h, w)
        got = resample_numpy(tiles, resize_plan(h, w, 224))
        assert np.abs(got.astype(np.int16) - resize_tiles(tiles, 224).astype(np.int16)).max() <= 1


def test_bad_sizes() -> None:
    with pytest.raises(InputError, match="0x10"):
        resize_plan(0, 10, 224)


def _nvrtc_usable() -> bool:
    if not is_importable("cuda.bindings.nvrtc"):
        return False
    from cuda.bindings import nvrtc

    try:
        return int(nvrtc.nvrtcVersion()[0]) == 0
    except Exception:  # noqa: BLE001 - libnvrtc not found: cuda-python raises its own loader errors
        return False


@pytest.mark.skipif(not _nvrtc_usable(), reason="NVRTC (cuda-python + libnvrtc) is not available")
@pytest.mark.parametrize("arch", ["sm_80", "sm_89"])
def test_kernel_source_compiles_with_nvrtc(arch: str) -> None:
    cubin = compile_kernels(arch)
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 1000
    assert b"resize_horizontal" in cubin and b"resize_vertical" in cubin
