"""``--coords``: another tool's tiling read as that tool reads it, described as it describes it (issue 21),
and checked before it is trusted (issue 20, item 3)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from slide_helpers import FakeBackend, resize_square

from virchow_rt.errors import InputError, OutputError
from virchow_rt.slides import SlideSettings, open_slide, process_slides
from virchow_rt.slides.coords import coords_grid, read_coords
from virchow_rt.slides.tiles import read_tile
from virchow_rt.slides.writer import read_features

QUIET = {"log": lambda s: None}
DESCRIBED = ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "overlap")


def write_coords(path, coords, **attrs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords)).attrs.update(attrs)
    return path


def trident_attrs(name, slide_wh, mag, level0=40, patch_size=224):
    """What TRIDENT's ``coords_to_h5`` writes."""
    return {
        "patch_size": patch_size, "patch_size_level0": patch_size * level0 // mag, "overlap": 0,
        "level0_magnification": level0, "target_magnification": mag, "name": name, "savetodir": "job",
        "level0_width": slide_wh[0], "level0_height": slide_wh[1],
    }  # fmt: skip


def test_trident_10x_coords_keep_their_attributes(make_slide, tmp_path):
    """TRIDENT's 10x coords of 256-px tiles on a 0.263 µm/px scan, embedded by a 224-px model, no --mpp:
    the output says 256 px at 10x, 1024 px, 40x, as the source does, so TRIDENT's feature code re-reads
    the squares that were embedded."""
    synth = make_slide("gt450.tif", 3584, 2688, ((400, 300, 2600, 2000),), mpp=0.263)
    given = [[0, 0], [1024, 1024], [2048, 1024], [2560, 1536]]  # 256 px at 10x: 1024 level-0 px
    src = write_coords(tmp_path / "job" / "patches" / "gt450_patches.h5", given,
                       **trident_attrs("gt450", (3584, 2688), 10, patch_size=256))  # fmt: skip
    out = tmp_path / "out"
    summary = process_slides([synth.path], FakeBackend(), out, SlideSettings(coords=str(src.parent)), **QUIET)
    assert summary["slides"][0]["status"] == "done", summary["slides"][0]
    with h5py.File(out / "gt450.h5") as f, h5py.File(src) as s:
        for key in DESCRIBED:
            assert f["coords"].attrs[key] == s["coords"].attrs[key], key
        np.testing.assert_array_equal(f["coords"][()], s["coords"][()])
        assert f.attrs["target_mpp"] == 1.0 and f.attrs["edge_fill"] == 0
        assert f.attrs["level0_magnification"] == 40 and f.attrs["target_magnification"] == 10
        assert f.attrs["patch_size"] == 224 and f["coords"].attrs["patch_size"] == 256  # ours, the source's


def test_a_target_that_contradicts_the_coords_is_refused(make_slide, tmp_path):
    synth = make_slide("gt450.tif", 3584, 2688, ((400, 300, 2600, 2000),), mpp=0.263)
    src = write_coords(tmp_path / "gt450.h5", [[0, 0]], **trident_attrs("gt450", (3584, 2688), 10))
    with open_slide(synth.path) as slide:
        given = read_coords(src, slide)
        with pytest.raises(
            InputError, match=r"--mpp 0.5 \(20x\) contradicts --coords .* tiled at 10x"
        ) as err:
            coords_grid(slide, given, mpp=0.5)
        assert "\n" not in str(err.value)
        assert coords_grid(slide, given, mpp=1.0).patch_size_level0 == 896  # --mag 10 agrees


def test_past_the_edge_tiles_read_black_as_trident_does(make_slide, tmp_path):
    synth = make_slide("edge.tif", 1900, 1400, ((1500, 200, 400, 900),))
    given = np.array([[1792, 448], [1344, 448]])  # the first runs 116 px past the right edge
    src = write_coords(tmp_path / "edge.h5", given, **trident_attrs("edge", (1900, 1400), 20, level0=20))
    out = tmp_path / "out"
    process_slides([synth.path], FakeBackend(), out, SlideSettings(coords=str(src)), **QUIET)
    expected = np.zeros((2, 224, 224, 3), np.uint8)
    expected[0, :, :108] = synth.image[448:672, 1792:1900]
    expected[1] = synth.image[448:672, 1344:1568]
    features = read_features(out / "edge.h5")["features"]
    np.testing.assert_allclose(features, FakeBackend().run(expected), rtol=1e-5, atol=1e-5)


def test_clam_level0_files_are_read_at_level_0(make_slide, tmp_path):
    """CLAM's ``patch_level 0, patch_size 448`` on a 40x scan: 448 px of level 0, resized; with
    ``custom_downsample 2``: 896 px of level 0 (TRIDENT's legacy reader reads the same squares)."""
    synth = make_slide("clam.tif", 2240, 1792, ((300, 250, 1500, 1200),), mpp=0.25)
    given = [[448, 448], [896, 448]]
    for custom, size0 in ((None, 448), (2, 896)):
        extra = {"custom_downsample": custom} if custom else {}
        src = write_coords(tmp_path / f"clam{custom}.h5", given, patch_size=448, patch_level=0,
                           downsample=[1.0, 1.0], level_dim=[2240, 1792], name="clam", **extra)  # fmt: skip
        with open_slide(synth.path) as slide:
            grid = coords_grid(slide, read_coords(src, slide), tile_size=224)
            assert (
                grid.level == 0
                and grid.patch_size_level0 == size0
                and grid.target_magnification == 40 // (custom or 1)
            )
            tile = read_tile(slide, 448, 448, size0, grid.level, 224, grid.edge_fill)
        np.testing.assert_array_equal(tile, resize_square(synth.crop(448, 448, size0), 224))
        assert grid.coords_attrs()["patch_level"] == 0 and grid.coords_attrs()["patch_size"] == 448


def test_a_coords_file_of_another_slide_is_refused(make_slide, tmp_path):
    synth = make_slide("a.tif")
    src = write_coords(tmp_path / "b_patches.h5", [[0, 0]], **trident_attrs("b", (1792, 1344), 20, level0=20))
    summary = process_slides(
        [synth.path], FakeBackend(), tmp_path / "out", SlideSettings(coords=str(src)), **QUIET
    )
    reason = summary["slides"][0]["reason"]
    assert summary["slides"][0]["status"] == "failed" and "tiling of slide 'b', not of 'a'" in reason
    assert "\n" not in reason


def test_one_coords_file_for_several_slides_is_refused(make_slide, tmp_path):
    slides = [make_slide("a.tif").path, make_slide("b.tif").path]
    src = write_coords(tmp_path / "a.h5", [[0, 0]], **trident_attrs("a", (1792, 1344), 20, level0=20))
    with pytest.raises(InputError, match="one slide's coordinates file, given for 2 slides"):
        process_slides(slides, FakeBackend(), tmp_path / "out", SlideSettings(coords=str(src)), **QUIET)
    assert not (tmp_path / "out").exists()


def test_per_slide_coords_files_share_one_output_folder(make_slide, tmp_path):
    out = tmp_path / "out"
    for name, given in (("a", [[0, 0], [224, 224]]), ("b", [[448, 448]])):
        slide = make_slide(f"{name}.tif").path
        src = write_coords(tmp_path / f"{name}_patches.h5", given,
                           **trident_attrs(name, (1792, 1344), 20, level0=20))  # fmt: skip
        summary = process_slides([slide], FakeBackend(), out, SlideSettings(coords=str(src)), **QUIET)
        assert {s["name"]: s["status"] for s in summary["slides"]}[name] == "done"
        np.testing.assert_array_equal(read_features(out / f"{name}.h5")["coords"], given)
    own_grid = "coords_source '.*a_patches.h5' -> ''"  # our own grid is another configuration
    with pytest.raises(OutputError, match=own_grid):
        process_slides([make_slide("c.tif").path], FakeBackend(), out, SlideSettings(), **QUIET)


def test_a_rerun_redoes_a_slide_whose_coords_file_changed(make_slide, tmp_path):
    """Same --coords path, new tiles in it: the rerun redoes the slide (it used to keep the stale
    features, since only the path was compared); an unchanged file is skipped."""
    slide = make_slide("a.tif").path
    src = tmp_path / "coords" / "a_patches.h5"
    out, settings = tmp_path / "out", SlideSettings(coords=str(src.parent))
    for given, status in (([[0, 0]], "done"), (None, "skipped"), ([[224, 224], [448, 0]], "done")):
        if given is not None:  # None: the file as it was
            write_coords(src, given, **trident_attrs("a", (1792, 1344), 20, level0=20))
        given = given or [[0, 0]]
        summary = process_slides([slide], FakeBackend(), out, settings, **QUIET)
        assert [s["status"] for s in summary["this_run"]] == [status]
        np.testing.assert_array_equal(read_features(out / "a.h5")["coords"], given)
    assert "coords_sha256" in summary["slides"][0]["redone_because"]


def test_a_coords_file_is_bounded_and_stays_in_its_folder(make_slide, tmp_path, monkeypatch):
    """Its size is checked before it is hashed (a link to a huge file took seconds a slide), and a file
    linked from outside the --coords folder is refused."""
    from virchow_rt.slides import coords

    slide = make_slide("a.tif").path
    elsewhere = write_coords(tmp_path / "elsewhere" / "a.h5", [[0, 0]],
                             **trident_attrs("a", (1792, 1344), 20, level0=20))  # fmt: skip
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "a.h5").symlink_to(elsewhere)
    summary = process_slides([slide], FakeBackend(), tmp_path / "out1", SlideSettings(coords=str(linked)),
                             **QUIET)  # fmt: skip
    reason = summary["slides"][0]["reason"]
    assert (
        summary["slides"][0]["status"] == "failed"
        and "not inside" in reason
        and "through a symlink" in reason
    )

    monkeypatch.setattr(coords, "MAX_COORDS_BYTES", elsewhere.stat().st_size - 1)
    settings = SlideSettings(coords=str(elsewhere.parent))
    summary = process_slides([slide], FakeBackend(), tmp_path / "out2", settings, **QUIET)
    reason = summary["slides"][0]["reason"]
    assert summary["slides"][0]["status"] == "failed" and "more than 0 MiB; not a coordinates file" in reason


# --- issue 20, item 3: what a coordinates file says about itself is checked before it is used ---


def _bad(tmp_path, make, **attrs):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        make(f)
        if isinstance(f.get("coords", getlink=True), h5py.HardLink) and isinstance(f["coords"], h5py.Dataset):
            f["coords"].attrs.update(attrs or {"patch_size": 224, "patch_size_level0": 224})
    return path


BAD = {
    "a (4, 3) array": (lambda f: f.create_dataset("coords", data=np.zeros((4, 3), np.int64)), "shape"),
    "NaN": (
        lambda f: f.create_dataset("coords", data=np.array([[0.0, np.nan]])),
        "non-integral or non-finite",
    ),
    "fractions": (lambda f: f.create_dataset("coords", data=np.array([[0.5, 2.0]])), "non-integral"),
    "text": (lambda f: f.create_dataset("coords", data=np.array([[b"0", b"1"]])), "not integers or floats"),
    "outside the slide": (
        lambda f: f.create_dataset("coords", data=[[0, 0], [1792, 0]]),
        "must lie inside it",
    ),
    "negative": (lambda f: f.create_dataset("coords", data=[[-224, 0]]), "must lie inside it"),
    "10 M rows": (
        lambda f: f.create_dataset("coords", shape=(10_000_000, 2), dtype="int64", compression="gzip"),
        "holds at most",
    ),
    "a soft link": (
        lambda f: (f.create_dataset("real", data=[[0, 0]]), f.__setitem__("coords", h5py.SoftLink("/real"))),
        "SoftLink",
    ),
    "an external link": (
        lambda f: f.__setitem__("coords", h5py.ExternalLink("/etc/other.h5", "c")),
        "ExternalLink",
    ),
    "a group": (lambda f: f.create_group("coords"), "not a dataset"),
    "a null dataspace": (lambda f: f.create_dataset("coords", data=h5py.Empty("<i8")), "shape"),
    "compressed": (  # a few bytes on disk may expand ~1000x: compression is refused before reading
        lambda f: f.create_dataset("coords", data=[[0, 0], [224, 0]], compression="gzip"),
        "compressed",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_coords_files_are_one_line_errors(make_slide, tmp_path, case):
    make, message = BAD[case]
    path = _bad(tmp_path, make)
    with open_slide(make_slide().path) as slide, pytest.raises(InputError, match=message) as err:
        read_coords(path, slide)
    assert str(err.value).startswith(f"--coords {path}") and "\n" not in str(err.value)


def test_external_storage_is_not_read(make_slide, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(8, dtype=np.int64).tobytes())  # any local file, read as coordinates
    path = _bad(
        tmp_path,
        lambda f: f.create_dataset("coords", shape=(4, 2), dtype="<i8", external=[(str(secret), 0, 64)]),
    )
    with open_slide(make_slide().path) as slide, pytest.raises(InputError, match="external storage"):
        read_coords(path, slide)


@pytest.mark.parametrize(
    "attrs, message",
    [
        ({"patch_size_level0": 2e9}, "not a tile of a 1792x1344-px slide"),
        ({"patch_size": 224, "level0_magnification": 20, "target_magnification": 1e-6}, "not a tile"),
        ({"patch_size": 224, "level0_magnification": 1e300, "target_magnification": 1e-300}, "not a tile"),
        ({"patch_size": 224, "patch_level": 0, "custom_downsample": 1e-320}, "not a tile"),
        (
            {
                "patch_size": 224,
                "level0_magnification": 20,
                "target_magnification": 20,
                "patch_size_level0": 448,
            },
            "inconsistent",
        ),  # fmt: skip
        ({"patch_size": 0, "patch_level": 0}, "positive whole number"),
        ({"patch_size": 224, "patch_level": 7}, "not a level of slide"),
        ({"patch_size": 224, "patch_level": 1, "downsample": [4.0, 4.0]}, "another scan"),
        ({"patch_size": 224, "patch_level": 0, "custom_downsample": 40}, "not a tile"),
        (
            {"patch_size": 224, "level0_magnification": 20, "target_magnification": 20, "overlap": 224},
            "overlap",
        ),
        ({"patch_size": 224, "patch_size_level0": 224, "level0_width": 900, "level0_height": 900}, "900x900"),
        ({"patch_size": 224, "patch_size_level0": 224, "name": np.arange(10)}, "holds 10 values"),
        ({"patch_size": 224}, "cannot tell"),
    ],
)
def test_bad_tile_sides_and_sources_are_refused(make_slide, tmp_path, attrs, message):
    path = _bad(tmp_path, lambda f: f.create_dataset("coords", data=[[0, 0]]), **attrs)
    with open_slide(make_slide().path) as slide, pytest.raises(InputError, match=message) as err:
        coords_grid(slide, read_coords(path, slide))
    assert "\n" not in str(err.value)


def test_integral_floats_are_coordinates(make_slide, tmp_path):
    path = _bad(tmp_path, lambda f: f.create_dataset("coords", data=np.array([[224.0, 448.0]])))
    with open_slide(make_slide().path) as slide:
        given = read_coords(path, slide)
    assert given.coords.dtype == np.int64 and given.coords.tolist() == [[224, 448]]


def test_a_tile_too_large_to_read_is_refused(make_slide, tmp_path, monkeypatch):
    from virchow_rt.slides import coords

    monkeypatch.setattr(coords, "MAX_TILE_SIDE", 300)  # real slides are larger than the 4096-px limit
    path = _bad(tmp_path, lambda f: f.create_dataset("coords", data=[[0, 0]]), patch_size=224, patch_level=0,
                custom_downsample=2)  # fmt: skip
    with open_slide(make_slide().path) as slide:
        given = read_coords(path, slide)
        assert given.patch_size_level0 == 448 and given.level == 0
        with pytest.raises(InputError, match="span 448 px at level 0 .more than 300.; not a tile size"):
            coords_grid(slide, given)


def test_a_gzip_chunk_bomb_is_refused_before_it_is_read(make_slide, tmp_path):
    """One declared 64-byte chunk whose stored data inflates to megabytes: refused from its filters."""
    import zlib

    path = tmp_path / "bomb.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", shape=(4, 2), dtype="<i8", chunks=(4, 2), compression="gzip")
        ds.id.write_direct_chunk((0, 0), zlib.compress(bytes(1 << 22), 9))
        ds.attrs.update({"patch_size": 224, "patch_size_level0": 224})
    with open_slide(make_slide().path) as slide, pytest.raises(InputError, match="compressed"):
        read_coords(path, slide)


def test_tiles_too_small_for_their_side_are_refused(make_slide, tmp_path):
    path = _bad(tmp_path, lambda f: f.create_dataset("coords", data=[[0, 0], [1, 0]]),
                patch_size=224, patch_size_level0=1)  # fmt: skip
    with open_slide(make_slide().path) as slide, pytest.raises(InputError, match="upsampled"):
        read_coords(path, slide)


def test_a_name_that_is_not_one_name_is_refused(make_slide, tmp_path):
    path = _bad(tmp_path, lambda f: f.create_dataset("coords", data=[[0, 0]]),
                patch_size=224, patch_size_level0=224, name=np.array(["a", "b"]).astype("S"))  # fmt: skip
    with open_slide(make_slide().path) as slide, pytest.raises(InputError, match="must be one slide name"):
        read_coords(path, slide)
