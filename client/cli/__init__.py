"""``tidings``: the command-line companion of the broker (the netcat-style tool).

``tidings pub``, ``sub``, ``fetch``, ``status``, ``ping``, ``raw`` and the
admin commands; see ``tidings --help`` and the README ("The ``tidings``
command"). Uses the client library and the sans-I/O ``protocol`` package
only (never ``broker``).
"""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
