"""The ``tl-circuits`` command line (also ``python -m tl_circuits``).

Commands: ``trace`` (prompt -> attribution graph files and a picture), ``heads`` (head
loadings of a graph's edges), ``qk`` (QK terms of a head at a query and key positions),
``train-transcoders`` and ``info`` (what the embedded default model contains). With no
``--model`` every command uses the embedded default model, so they work offline right
after install. ``tl-circuits COMMAND --help`` for each.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tl_circuits.cli import heads, info, qk, trace, train
from tl_circuits.errors import TLCircuitsError

COMMANDS = (trace, heads, qk, train, info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-circuits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (TLCircuitsError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"tl-circuits {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
