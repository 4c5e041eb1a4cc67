"""Every step: the `fedlens` logger: one line per event on stderr, next to Flower's own `flwr` logger."""

from __future__ import annotations

import logging


def get_logger() -> logging.Logger:
    log = logging.getLogger("fedlens")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s fedlens: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
