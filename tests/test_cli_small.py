"""Small command-line promises: --version, --debug on either side of the command, inputs converted on the
way in are recorded, counts in words."""

import numpy as np
import pytest
from PIL import Image

from virchow_rt._version import __version__
from virchow_rt.cli import main as cli
from virchow_rt.embed import open_tiles
from virchow_rt.embed.tiles import plural
from virchow_rt.errors import InputError


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"virchow-rt {__version__}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command_shows_the_error(tmp_path, where):
    args = ["embed", str(tmp_path / "no-model"), str(tmp_path / "no-tiles"), "--out", str(tmp_path / "e.npy")]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    with pytest.raises(InputError, match="does not exist"):  # raised, not turned into one line
        cli.main(args)


def test_without_debug_the_error_is_one_line(tmp_path, capsys):
    args = ["embed", str(tmp_path / "no-model"), str(tmp_path / "no-tiles"), "--out", str(tmp_path / "e.npy")]
    assert cli.main(args) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err


def test_grayscale_rgba_and_non_square_tiles_are_recorded(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (224, 224), dtype=np.uint8), "L").save(tmp_path / "a_gray.png")
    Image.fromarray(rng.integers(0, 256, (224, 224, 4), dtype=np.uint8), "RGBA").save(tmp_path / "b_rgba.png")
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(tmp_path / "c_wide.png")
    Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(tmp_path / "d_plain.png")
    np.save(tmp_path / "e_tall.npy", rng.integers(0, 256, (2, 250, 224, 3), dtype=np.uint8))
    source = open_tiles(tmp_path)
    tiles = source.read_all()
    assert tiles.shape == (6, 224, 224, 3)
    converted = dict(source.converted)
    names = ("a_gray.png", "b_rgba.png", "c_wide.png", "e_tall.npy")
    assert set(converted) == {str(tmp_path / n) for n in names}
    assert converted[str(tmp_path / "a_gray.png")] == "L converted to RGB"
    assert converted[str(tmp_path / "b_rgba.png")] == "RGBA converted to RGB"
    assert "300x200 px, not square" in converted[str(tmp_path / "c_wide.png")]
    assert "224x250 px, not square" in converted[str(tmp_path / "e_tall.npy")]


def test_counts_are_words(tmp_path):
    (tmp_path / "notes.txt").write_text("not a tile")
    with pytest.raises(InputError) as error:
        open_tiles(tmp_path)
    assert "(not tiles: 1 entry)" in str(error.value)
    assert (plural(1, "file"), plural(2, "file"), plural(2, "entry")) == ("1 file", "2 files", "2 entries")


def test_engine_host_code_is_asked_for_on_embed_and_slides(tmp_path, monkeypatch):
    """--allow-engine-host-code reaches open_backend from embed and slides (and nowhere by default)."""
    import numpy as np

    from virchow_rt.cli import embed as embed_cli
    from virchow_rt.errors import BackendError

    seen = []

    def fake_open_backend(model, backend="auto", **options):
        seen.append(options.get("allow_engine_host_code", False))
        raise BackendError("stop here")

    monkeypatch.setattr(embed_cli, "open_backend", fake_open_backend)
    np.save(tmp_path / "t.npy", np.zeros((1, 224, 224, 3), np.uint8))
    base = ["embed", "m.engine", str(tmp_path / "t.npy"), "--out", str(tmp_path / "e.npy")]
    assert cli.main(base) != 0 and cli.main([*base, "--allow-engine-host-code"]) != 0
    assert seen == [False, True]
    ray = ["slides", str(tmp_path), "--model", "m", "--out", str(tmp_path / "o"), "--ray"]
    assert cli.main([*ray, "--allow-engine-host-code"]) == InputError("").exit_code  # refused, one line
