"""The app's console lines: Flower's own logger, each line marked ``[clues]``."""

from __future__ import annotations

from logging import INFO

from flwr.common.logger import log


def say(text: str) -> None:
    log(INFO, "[clues] %s", text)
