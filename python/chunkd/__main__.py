"""``python -m chunkd``: the package's server and command-line tool.

    python -m chunkd serve --store=memory:// --listen=127.0.0.1:7878   # the chunkd server
    python -m chunkd ctl get KEY                                       # chunkctl
    python -m chunkd where                                             # the binaries used

``chunkd`` and ``chunkctl`` (console scripts installed with the package) are the same two
binaries. Flags are the binaries' own (``--help`` lists them).
"""

from __future__ import annotations

import os
import sys

from chunkd.server import binary_path

USAGE = """\
usage: python -m chunkd COMMAND [ARGS...]

commands:
  serve [FLAGS...]   run the chunkd server (the chunkd binary; `serve --help` lists its flags)
  ctl ARGS...        run chunkctl, the command-line client (`ctl --help`)
  where              print the paths of the chunkd and chunkctl binaries this package runs

The binaries are the ones `pip install` put into the package ($CHUNKD_BIN / $CHUNKCTL_BIN
override them). From Python, chunkd.Server(store=..., **flags) starts a server for a notebook
or a test and stops it at the end of a `with` block.
"""


def _exec(name: str, args: list[str]) -> None:
    try:
        path = binary_path(name)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        sys.exit(1)
    sys.stdout.flush()
    os.execv(path, [name, *args])


def chunkd_main() -> None:
    """The ``chunkd`` console script."""
    _exec("chunkd", sys.argv[1:])


def chunkctl_main() -> None:
    """The ``chunkctl`` console script."""
    _exec("chunkctl", sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "serve":
        _exec("chunkd", rest)
    elif command == "ctl":
        _exec("chunkctl", rest)
    elif command == "where":
        status = 0
        for name in ("chunkd", "chunkctl"):
            try:
                print(f"{name}: {binary_path(name)}")
            except FileNotFoundError as e:
                print(e, file=sys.stderr)
                status = 1
        return status
    print(f"python -m chunkd: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
