"""virchow-rt: fast, offline inference for pathology foundation models (Virchow, UNI, H-optimus, ...).

Each command is a module of this package with its parser (``add_parser``) and its body together; this
module assembles them. Errors from the :mod:`virchow_rt.errors` hierarchy become one line on stderr and
a non-zero exit code (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from virchow_rt._version import __version__
from virchow_rt.cli import bench, demo, embed, export, info, serve, slides, triton
from virchow_rt.errors import RandomWeightsWarning, VirchowError

#: each command's parser, in the order ``--help`` lists them
PARSERS = (
    export.add_parser,
    triton.add_parser,
    embed.add_parser,
    info.add_info_parser,
    info.add_list_parser,
    demo.add_parser,
    bench.add_parser,
    slides.add_parser,
    serve.add_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virchow-rt", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"virchow-rt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    for command in sub.choices.values():  # `virchow-rt embed ... --debug` as well as `--debug embed`
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
        )
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - warnings API
    return f"virchow-rt: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.formatwarning = _one_line_warning
    shown, original = [], warnings.showwarning

    def show_once(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202 - warnings API
        if issubclass(category, RandomWeightsWarning):  # one RANDOM WEIGHTS line per command
            if shown:
                return
            shown.append(message)
        original(message, category, filename, lineno, file, line)

    warnings.showwarning = show_once
    try:
        return int(args.handler(args) or 0)
    except VirchowError as err:
        if args.debug:
            raise
        print(f"virchow-rt {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except BrokenPipeError:  # `virchow-rt list | head`: the reader left; Python's documented remedy
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as err:
        print(f"virchow-rt {args.command}: interrupted{f': {err}' if str(err) else ''}", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = original


if __name__ == "__main__":
    sys.exit(main())
