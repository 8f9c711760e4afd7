"""How long to wait before retry number `attempt`: the one backoff of the gateway.

Reopening a lost CAN bus, reconnecting to the broker, retrying a refused event, restarting
a task that died and `watch` reconnecting all wait this long. Jittered so that gateways
restarted together do not hammer a broker in step (aiomqtt's reconnect does the same),
capped so that a long outage is noticed within `cap` seconds of its end, and never
shorter than 0.1 s, so that a failure that repeats at once is not a busy loop.

Any stage may import this module: it imports nothing of the gateway.
"""

from __future__ import annotations

import random

MIN_S = 0.1


def backoff(attempt: int, cap: float = 30.0) -> float:
    """Seconds before retry `attempt` (1, 2, ...): uniform between 0.1 s and
    0.5 * 1.5**attempt, at most `cap`."""
    # the exponent is bounded: 1.5 ** 1800 overflows a float, and 20 is past any cap here
    return random.uniform(MIN_S, min(cap, 0.5 * 1.5 ** min(attempt, 20)))
