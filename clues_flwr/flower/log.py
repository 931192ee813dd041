"""The app's console lines: Flower's own logger, each line marked ``[clues]``."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from logging import INFO

from flwr.common.logger import log

FLOWER_LOGGER = "flwr"


def say(text: str) -> None:
    log(INFO, "[clues] %s", text)


class _FinalResults(logging.Filter):
    """Drops the block ``Strategy.start`` logs last: "Final results:" and the lines of its
    ``Result`` after it."""

    def __init__(self):
        super().__init__()
        self.dropping = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Final results:":
            self.dropping = True
        elif self.dropping and record.msg not in ("\t%s", ""):
            self.dropping = False
        return not self.dropping


@contextmanager
def without_final_results() -> Iterator[None]:
    """The trace runs through Flower's ``start``, whose closing summary would read like the
    run's: the selection's own lines say what the trace gave."""
    quiet = _FinalResults()
    logger = logging.getLogger(FLOWER_LOGGER)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
