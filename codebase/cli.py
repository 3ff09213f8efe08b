"""Entry points behind the scripts: parse flags, run, and turn user errors into one line."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def guarded(main):
    """Run `main(argv)`; a ToolkitError prints `error: <message>` and exits with code 2."""

    def wrapper(argv=None):
        from utils.errors import ToolkitError

        try:
            return main(argv)
        except ToolkitError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
