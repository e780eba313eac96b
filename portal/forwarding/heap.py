"""
The cyclic garbage collector and a long-running forwarder.

CPython's cyclic garbage collector stops the process while it scans, and a full collection (the
oldest generation) visits every tracked object. In the attack benchmark a relay of some 90,000
objects spent 30 to 43 ms in each full collection, every visitor's bytes waiting meanwhile: the
largest single stalls of the event loop, and a direct hit on time to first byte. Most of those
objects are the program itself (modules, classes, functions) and what it built at start, which
never become garbage.

L{freezeStartupHeap} collects once and moves every object alive then into the permanent generation
(C{gc.freeze}), which later collections skip; objects made afterwards (connections, leases) are
collected as before. The relay calls it once it listens, the tunnel once it starts.
"""

from __future__ import annotations

import gc


def freezeStartupHeap() -> int:
    """
    Collect, then leave every object alive now out of later collections.

    @return: How many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
