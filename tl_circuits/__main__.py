"""``python -m tl_circuits``: the ``tl-circuits`` command line.

With no arguments it runs ``tl-circuits trace`` on the embedded default model's induction
prompt (offline): the attribution graph, its pruning, head loadings, files and picture.
"""

from __future__ import annotations

import sys

from tl_circuits.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["trace"]))
