"""How many requests a replica holds at once, and the polite refusal beyond that.

Serve's own queue bound (`max_queued_requests` + `backpressure_config`) answers at the proxy
with a plain-text body, which OpenAI clients can only show as an unparsed error. So medtune
lets every request reach a replica (Serve's per-replica cap is set far above ours) and
admits at most `serve.max_ongoing_requests + serve.max_queued_requests` there: the rest get
an OpenAI-shaped 503 with Retry-After, like every other error of the API.

A held request is released when its answer ends. A stream whose body never starts (the
client left before the first byte) would never release its place, so each place also
expires at the request's own deadline (`serve.request_timeout_s`), after which the engine
has stopped generating for it anyway.
"""

from __future__ import annotations

import time


class Admission:
    """Places in one replica; used from the replica's event loop only (no locking)."""

    def __init__(self, limit: int, hold_s: float):
        self.limit, self.hold_s = limit, hold_s
        self._held: dict[object, float] = {}  # place -> when it expires

    def enter(self) -> object | None:
        """A place for a new request, or None when the replica is full."""
        now = time.monotonic()
        if len(self._held) >= self.limit:
            self._held = {place: expiry for place, expiry in self._held.items() if expiry > now}
        if len(self._held) >= self.limit:
            return None
        place = object()
        self._held[place] = now + self.hold_s
        return place

    def leave(self, place: object | None) -> None:
        self._held.pop(place, None)

    @property
    def held(self) -> int:
        return len(self._held)
