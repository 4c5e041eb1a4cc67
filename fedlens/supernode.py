"""Deployment, at a site: Flower's `flower-supernode`, polling the coordinator with a backoff instead of every 3 s.

Flower 1.41/1.42's SuperNode sleeps a fixed 3 s whenever a pull from the SuperLink brings no message, and 0.5 s
between looks for its ClientApp's reply (flwr/supernode/start_client_internal.py). A round has two exchanges, and
each waits for the slowest site's next pull: on loopback, with the ClientApp warm in the site's runner, that waiting
was most of a round (9.4 s against 1.8 s in simulation; docs/PERFORMANCE.md). Here the same SuperNode runs with a
backoff: right after it handled a message it looks again after 0.05 s, doubling while nothing comes, up to 0.2 s
for a minute after its last message (a run is under way: the next instruction follows within seconds) and then up
to Flower's 3 s, so an idle site polls as rarely as before and a busy run is not held up; its reply is looked for
after 0.02 s, doubling to 0.1 s (Flower: every 0.5 s; a check of its own memory, not a request); and a message's
objects the link does not have yet are asked for again after 0.02 s, not Flower's first 1 s (the same total time
bounds it). With `--heartbeat-interval S` (fedlens site --heartbeat; Flower's is 30 s, its least 10 s) it declares
and keeps that interval: the link declares a site that stopped answering offline after 2 intervals, so at 10 s a
crashed site holds its round up for ~20 s rather than ~60 s before the ServerApp gets Flower's "unavailable" reply
and goes on without it (at the price of a site on a flaky network being dropped from a round sooner).
Nothing else of Flower changes; the arguments are flower-supernode's. The loop's sleeps are recognised by their
values, so this runs only on the Flower release it was read on (FLOWER): on another, Flower's own polling is kept.

    python -m fedlens.supernode --superlink link.example.org:8000 ...   (as flower-supernode)
"""

from __future__ import annotations

import time as _time
from typing import Any

IDLE_S = 3.0  # Flower's wait after an empty pull: the backoff's ceiling once idle
FIRST_S = 0.05  # the first wait after a message was handled
BUSY_S, BUSY_WINDOW_S = 0.2, 60.0  # the ceiling while the last message is less than a minute old
REPLY_S, REPLY_MAX_S = 0.02, 0.1  # looks for the ClientApp's reply: after 0.02 s, doubling to 0.1 s (Flower: 0.5 s)
OBJECT_BACKOFF_S = 0.02  # first wait for a message's object the link does not have yet (Flower: 1 s)
FLOWER = ("1.42.0",)  # the releases whose start_client_internal.py this was read on


class BackoffClock:
    """Stands in for the `time` module inside Flower's SuperNode loop: its two fixed sleeps become a backoff."""

    def __init__(self) -> None:
        self.wait = FIRST_S
        self.reply_wait = REPLY_S
        self.busy_at = -BUSY_WINDOW_S  # monotonic time of the last message handled

    def sleep(self, seconds: float) -> None:
        if seconds == IDLE_S:  # an empty pull: wait, then wait longer next time
            _time.sleep(self.wait)
            busy = _time.monotonic() - self.busy_at < BUSY_WINDOW_S
            self.wait = min(2 * self.wait, BUSY_S if busy else IDLE_S)
            self.reply_wait = REPLY_S
        elif seconds == 0.5:  # a message is being handled: the next pull comes soon
            self.wait, self.busy_at = FIRST_S, _time.monotonic()
            _time.sleep(self.reply_wait)
            self.reply_wait = min(2 * self.reply_wait, REPLY_MAX_S)
        else:
            _time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def main() -> None:
    import functools
    import logging
    import sys

    import flwr
    from flwr.supercore import heartbeat
    from flwr.supercore.inflatable.inflatable_utils import pull_objects
    from flwr.supernode import fleet_http_connection, start_client_internal
    from flwr.supernode.cli import flower_supernode

    interval = None
    if "--heartbeat-interval" in sys.argv:  # ours, not flower-supernode's: taken out before Flower parses the rest
        i = sys.argv.index("--heartbeat-interval")
        interval = int(sys.argv[i + 1])
        del sys.argv[i:i + 2]
    if flwr.__version__ in FLOWER:
        if interval is not None:
            fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = interval  # declared to the link at activation ...
            heartbeat.HEARTBEAT_DEFAULT_INTERVAL = interval  # ... and kept by the sender
        start_client_internal.time = BackoffClock()  # type: ignore[assignment]
        start_client_internal.pull_objects = functools.partial(pull_objects, initial_backoff=OBJECT_BACKOFF_S,
                                                               backoff_cap=1.0, max_tries_per_object=None)
    else:
        logging.getLogger("fedlens").warning("flwr %s: the SuperNode keeps Flower's own polling (fedlens.supernode "
                                             "was read on %s)", flwr.__version__, ", ".join(FLOWER))
    flower_supernode()


if __name__ == "__main__":
    main()
