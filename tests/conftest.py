"""Shared test settings: the ``slow``, ``gpu`` and ``tensorrt`` markers skip, with the reason, where the
hardware or library is missing.

Only real markers count (``item.get_closest_marker``), never keywords: a test's keywords include the
names of its folders, so a folder named like a marker would skip everything in it. TensorRT counts only
when the real package imports (:func:`is_real_tensorrt`), not a folder or stubs that happen to share its
name (``tests/`` and its folders are on ``sys.path``; ``tests/test_layout.py`` checks that none of their
names shadows a package).
"""

from __future__ import annotations

import faulthandler
import os
from collections.abc import Callable, Iterator

import pytest

from virchow_rt.backends.cuda.api import device_count
from virchow_rt.backends.tensorrt_module import is_real_tensorrt

pytest_plugins = ("pytester",)  # tests/test_layout.py runs this file's skips on planted test folders


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow (full-size models)")


def _skip_reasons(config: pytest.Config) -> dict[str, Callable[[], str | None]]:
    """marker -> what says why its tests cannot run here (None: they can); asked only if a test has it."""
    return {
        "slow": lambda: (
            None
            if config.getoption("--runslow")
            else "slow (full-size model or torch.compile): run with --runslow"
        ),
        "tensorrt": lambda: (
            None
            if is_real_tensorrt()
            else "TensorRT is not importable on this machine (at most its type stubs are)"
        ),
        "gpu": lambda: (
            None if device_count() > 0 else "no CUDA GPU visible (cuda-python missing or no device)"
        ),
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    probes = _skip_reasons(config)
    reasons: dict[str, str | None] = {}
    for item in items:
        for marker, probe in probes.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in reasons:
                reasons[marker] = probe()
            reason = reasons[marker]
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


#: seconds one test may take before the run dumps every thread's stack and ends (the slow tier's full-size
#: exports take minutes; anything far past that is a hang); the GPU check sets a shorter one
HANG_S = float(os.environ.get("VIRCHOW_RT_TEST_HANG_S", 1800))
# stderr as it is now: pytest captures fd 2 during a test, and a dump written there would be lost
_STDERR = os.fdopen(os.dup(2), "w")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """A test that hangs in native code holding the GIL (a deadlock in a runtime's threads) cannot be stopped
    by a Python timer; faulthandler's watchdog thread can: it prints where every thread is and exits, so a
    hang costs minutes, not the CI's whole time."""
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=_STDERR)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
