"""The ``tl-circuits`` command line (also ``python -m tl_circuits``).

Commands: ``trace`` (prompt -> attribution graph files and a picture), ``heads`` (head
loadings of a graph's edges), ``qk`` (QK terms of a head at a query and key positions),
``serve`` (the interactive viewer for traced graphs), ``trace-many`` and ``recurrence``
(many prompts on Ray, and what recurs across their graphs), ``train-transcoders`` and ``info``
(what the embedded default model contains). With no ``--model`` every command uses the
embedded default model, so they work offline right after install. ``tl-circuits COMMAND
--help`` for each.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tl_circuits.cli import heads, info, many, qk, serve, trace, train
from tl_circuits.errors import TLCircuitsError

COMMANDS = (trace, many, heads, qk, serve, train, info)

EXIT_CODES = """\
exit status: 0 done; 1 a file could not be read or written (the message names it: an
unwritable folder, a read-only file system, a full disk); 2 bad input (options, prompt,
targets, model or transcoders, a missing file or folder); 130 interrupted (Ctrl-C)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-circuits",
        description=__doc__,
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for command_parser in sub.choices.values():
        command_parser.epilog = EXIT_CODES
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (see :data:`EXIT_CODES`: 0 ok, 1 a
    file could not be read or written, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (TLCircuitsError, FileNotFoundError, NotADirectoryError) as exc:
        _error(args.command, str(exc))
        return 2
    except OSError as exc:
        _error(args.command, _os_message(exc))
        return 1
    except KeyboardInterrupt:
        _error(args.command, "interrupted")
        return 130


def _os_message(exc: OSError) -> str:
    """One line naming the path(s) and the reason of a failed file operation."""
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    reason = exc.strerror or str(exc) or type(exc).__name__
    if not paths:
        return f"cannot read or write a file: {reason}"
    return f"cannot write or read {' -> '.join(str(p) for p in paths)}: {reason}"


def _error(command: str, message: str) -> None:
    line = f"tl-circuits {command}: error: {message}"
    # a path or prompt from argv may hold undecodable bytes (surrogates): never fail here
    sys.stderr.write(line.encode("utf-8", "backslashreplace").decode("utf-8") + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
