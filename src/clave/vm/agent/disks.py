"""The guest's virtio-blk disks, found by serial: device order is not stable, serials are."""

from __future__ import annotations

import os
import time

# A host serial -> the serial of the template slot that carries it (SetDiskSerials: a clone's disks sit in the
# slots its template reserved).
SLOTS: dict[str, str] = {}


def find(serial: str, timeout: float = 0.0) -> str | None:
    """The /dev/vdX carrying ``serial`` (or the slot standing for it), waiting up to ``timeout`` for it to
    appear; None if it does not."""
    serial = SLOTS.get(serial, serial)
    deadline = time.monotonic() + timeout
    while True:
        for name in sorted(os.listdir("/sys/block")):
            try:
                with open(f"/sys/block/{name}/serial") as f:
                    if f.read().strip() == serial:
                        return f"/dev/{name}"
            except OSError:
                continue
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)
