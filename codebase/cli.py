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


def training_main(script: dict, description: str):
    """The `main(argv=None)` of a training script whose own run defaults are `script`."""

    @guarded
    def main(argv=None):
        from codebase.config import parse_config
        from codebase.pipeline import run
        from utils.memory import frozen_heap

        # After the imports: TensorFlow's modules and the toolkit's stay out of every collection of the run.
        with frozen_heap():
            return run(parse_config(argv, script, description=description))

    return main
