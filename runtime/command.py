"""How every gemvg command line ends: gemvg, gemvg-export, gemvg-train and the benchmark scripts.

Bad input (any GemvgError, a usage error included) is one line on stderr and exit code 2; Ctrl-C is
exit 130; anything else is a bug: one line and exit 1, or the traceback with GEMVG_DEBUG=1.

    def main(argv=None) -> int:
        return run_command("gemvg-x", lambda: _main(argv))    # parse the arguments inside
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

from .errors import GemvgError, InputError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown option, bad value) are InputErrors, so that run_command turns
    them into one line and exit 2 like any other bad input. Sub-command parsers are of this class too."""

    def error(self, message: str):
        raise InputError(f"{message} (see {self.prog} -h)")


def run_command(prog: str, command: Callable[[], int]) -> int:
    """Run a command's body and turn what it raises into one line and an exit code."""
    try:
        return command()
    except GemvgError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: still one line unless asked for the traceback
        if os.environ.get("GEMVG_DEBUG"):
            raise
        print(f"{prog}: internal error: {type(err).__name__}: {one_line(err)} (set GEMVG_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return 1


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# -- argument types: a bad value is a usage error naming the option -------------------------------


def positive_int(text: str) -> int:
    """An integer of at least 1 (counts, sizes, thread numbers)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def fraction(text: str) -> float:
    """A number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is less than {low}")
    return value
