"""What ``--help`` shows a first-time user: defaults, a help line for every option, no markup."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from virchow_rt import cli
from virchow_rt.cli.main import build_parser, main


def _help(capsys, *args: str) -> str:
    with pytest.raises(SystemExit):
        main([*args, "--help"])
    return capsys.readouterr().out


def test_defaults_are_shown(capsys) -> None:
    slides = " ".join(_help(capsys, "slides").split())  # as read, whatever the line breaks
    for shown in ("(default: 0.5)", "(default: 224)", "tissue fraction of a kept tile (default: 0.5)"):
        assert shown in slides
    assert "(default: 512)" in _help(capsys, "demo")
    assert "(default: None)" not in slides and "(default: False)" not in slides  # no noise
    assert "``" not in _help(capsys)  # the top-level description is plain text


def _commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_module_is_assembled() -> None:
    """Each ``virchow_rt/cli/<command>.py`` that defines ``add_parser`` is a command of ``virchow-rt``."""
    modules = {p.stem for p in Path(cli.__file__).parent.glob("*.py") if "\ndef add_parser(" in p.read_text()}
    assert {"export", "serve", "triton"} <= modules <= set(_commands())
    assert {"info", "list"} <= set(_commands())  # info.py adds two


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_option_has_help(command: str) -> None:
    parser = _commands()[command]
    missing = [a.option_strings or [a.dest] for a in parser._actions if not a.help]
    assert missing == [], f"{command}: options without help text: {missing}"


def test_python_dash_m_is_the_command(tmp_path: Path) -> None:
    """``python -m virchow_rt`` (no console script needed): the same commands, exit codes, one-line errors."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "virchow_rt", *args], capture_output=True, text=True, cwd=tmp_path
        )

    shown = run("--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: virchow-rt")
    assert all(command in shown.stdout for command in _commands())
    listed = run("list")
    assert listed.returncode == 0 and "virchow2" in listed.stdout
    refused = run(
        "embed", str(tmp_path / "missing.onnx"), str(tmp_path / "t.npy"), "--out", str(tmp_path / "e.npy")
    )
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode != 0 and len(lines) == 1 and lines[0].startswith("virchow-rt embed: error:"), (
        lines
    )
    assert not (tmp_path / "e.npy").exists()
