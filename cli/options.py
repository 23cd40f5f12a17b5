"""Argument types shared by every command, so that one option is checked the same way
wherever it appears (``--batch-size 0`` is refused by segment, cohort, evaluate and train
alike, in one line)."""

from __future__ import annotations

import argparse
import math


def _number(kind, text: str, low: float, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what} (got {text})")
    return value


def positive_int(text: str) -> int:
    """1, 2, 3, ..."""
    return _number(int, text, 1, "a whole number of at least 1")


def non_negative_int(text: str) -> int:
    """0, 1, 2, ..."""
    return _number(int, text, 0, "a whole number of 0 or more")


def positive_float(text: str) -> float:
    value = _number(float, text, 0.0, "a positive number")
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a positive number (got {text})")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line on stderr (``wsiproto: error: argument --mpp: ...; see
    `wsiproto info --help```), exit code 2, as every other user error."""

    def error(self, message: str):
        self.exit(2, f"wsiproto: error: {message}; see `{self.prog} --help`\n")


def non_negative_float(text: str) -> float:
    return _number(float, text, 0.0, "a number of 0 or more")
