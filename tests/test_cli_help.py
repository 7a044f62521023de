"""What ``--help`` shows a first-time user: defaults, a help line for every option, no markup."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize("command", ["export", "embed", "slides", "bench", "demo", "list", "info"])
def test_every_option_has_help(command: str) -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    parser = sub.choices[command]
    missing = [a.option_strings or [a.dest] for a in parser._actions if not a.help]
    assert missing == [], f"{command}: options without help text: {missing}"
