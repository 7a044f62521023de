"""What several commands share: list-valued options, ``--help`` with defaults, weights options, SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import Callable, Iterator
from typing import Any

from virchow_rt.backends import BACKENDS


def csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def csv_ints(text: str) -> list[int]:
    try:
        return [int(part) for part in csv(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


class Help(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless it has none (None, off) or its help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or action.required:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def add_weights(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--weights",
        metavar="PATH",
        help="Hugging Face-layout folder (config.json + pytorch_model.bin or model.safetensors), "
        "a state-dict file, or a model id in the local Hugging Face cache (never downloaded)",
    )
    g.add_argument(
        "--random-weights", action="store_true", help="use random weights (for tests and demos only)"
    )


def add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", metavar="BACKEND", help=f"one of: {', '.join(BACKENDS)}")


def add_engine_host_code(p: argparse.ArgumentParser) -> None:
    """``--allow-engine-host-code``: the one way to load a version-compatible TensorRT engine."""
    p.add_argument(
        "--allow-engine-host-code",
        action="store_true",
        help="load version-compatible TensorRT engines, which run native code stored in the engine file: "
        "only for engines you built or trust (a manifest's sha256 proves the file unchanged, not who wrote "
        "it)",
    )


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[Callable[[], None]]:
    """A scheduler's SIGTERM stops the command as Ctrl-C does (KeyboardInterrupt), so its cleanup runs: the
    slide in progress is abandoned cleanly, an export's staging folder removed and the old files restored.

    Yields ``release``: it puts the previous SIGTERM disposition back at once, for a stage with nothing to
    clean up that runs in one long C call (a TensorRT build), which a Python handler would wait for."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield lambda: None
        return
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            signal.signal(signal.SIGTERM, previous)
            released = True

    try:
        yield release
    finally:
        release()
