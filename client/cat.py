"""``tidings``: the command-line companion of the broker (the netcat-style tool).

The console script ``tidings = client.cat:main`` lives here; the commands
are in :mod:`client.cli`. ``python -m client.cat`` is the same command.
"""

from __future__ import annotations

import sys

from .cli import build_parser, main
from .cli.commands import render_status

__all__ = ["build_parser", "main", "render_status"]

if __name__ == "__main__":
    sys.exit(main())
