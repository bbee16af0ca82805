"""``python -m loraplex`` and the ``loraplex`` console command: the CLI of loraplex.backend.cli,
with one message naming the extra to install when a command needs an extra that is missing."""

from __future__ import annotations

import sys

from loraplex.extras import missing_extra

# The commands that need an optional extra (the others need only the client-only install).
COMMAND_EXTRAS = {"serve": "server", "gateway": "gateway"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else ""
    try:
        from loraplex.backend.cli import main as cli_main

        return cli_main(argv)
    except ModuleNotFoundError as exc:
        extra = COMMAND_EXTRAS.get(command)
        error = missing_extra(exc, extra, f"`loraplex {command}`") if extra else None
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
