#!/usr/bin/env python3
"""Emulated links between the test hosts, in user space: what ``tc netem`` does, for kernels built
without it (``CONFIG_NET_SCH_NETEM``, as on our CI machines).

``testhosts.sh up N PREFIX tap`` gives each host a TAP device as eth0 instead of a veth. This
program holds every host's TAP and is the switch between them: each frame a host sends leaves its
cable at the link's rate (one frame after another), arrives ``delay`` (plus normal ``jitter``,
never out of order) later at the host whose MAC it is for (every other host if broadcast), or is
lost with probability ``loss``. Run it for as long as the hosts should talk; SIGTERM ends it.

    python3 scripts/linkemu.py PREFIX N PROFILE      # PROFILE: none, gigabit, fast-ethernet, wifi
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import os
import random
import selectors
import signal
import struct
import sys
import time

PROFILES = {  # rate (bit/s), one-way delay (s), jitter (s, standard deviation), loss
    "none": (None, 0.0, 0.0, 0.0),
    "gigabit": (1e9, 0.2e-3, 0.0, 0.0),
    "fast-ethernet": (100e6, 1e-3, 0.0, 0.0),
    "wifi": (50e6, 4e-3, 2e-3, 0.001),
}
TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
CLONE_NEWNET = 0x40000000
FRAME = 65536
QUEUE = 1000  # frames a cable holds before it drops (netem's default limit)


def open_tap(netns: str) -> int:
    """Open the TAP device eth0 inside network namespace ``netns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"eth0", IFF_TAP | IFF_NO_PI))
    finally:
        libc.setns(own, CLONE_NEWNET)
        os.close(own)
        os.close(target)
    return fd


def run(prefix: str, n: int, profile: str) -> None:
    rate, delay, jitter, loss = PROFILES[profile]
    taps = [open_tap(f"{prefix}-h{i}") for i in range(1, n + 1)]
    where: dict[bytes, int] = {}  # MAC -> host index, learnt from the frames they send
    free_at = [0.0] * n  # when each host's cable has sent its last queued frame
    last_arrival = [0.0] * n  # frames of one cable arrive in the order they left
    pending: list[tuple[float, int, int, int, bytes]] = []  # (arrival, sequence, source, destination, frame)
    queued = [0] * n  # frames on each host's cable
    sel = selectors.SelectSelector()  # select() waits to the microsecond; epoll only to the millisecond
    for i, fd in enumerate(taps):
        sel.register(fd, selectors.EVENT_READ, i)
    rng = random.Random(0)
    seq = 0
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    print("ready", flush=True)
    while running[0]:
        timeout = max(0.0, pending[0][0] - time.monotonic()) if pending else 0.5
        for key, _ in sel.select(timeout):
            src = key.data
            while True:
                try:
                    frame = os.read(taps[src], FRAME)
                except BlockingIOError:
                    break
                now = time.monotonic()
                where[frame[6:12]] = src
                if (loss and rng.random() < loss) or (rate and queued[src] >= QUEUE):
                    continue
                leave = max(now, free_at[src]) + (len(frame) * 8 / rate if rate else 0.0)
                free_at[src] = leave
                arrive = max(leave + delay + (abs(rng.gauss(0.0, jitter)) if jitter else 0.0), last_arrival[src])
                last_arrival[src] = arrive
                dst = where.get(frame[0:6])
                for d in [dst] if dst is not None and dst != src else [j for j in range(n) if j != src]:
                    heapq.heappush(pending, (arrive, seq, src, d, frame))
                    queued[src] += 1
                    seq += 1
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, src, d, frame = heapq.heappop(pending)
            queued[src] -= 1
            try:
                os.write(taps[d], frame)
            except (BlockingIOError, OSError):
                pass  # a full or downed device drops the frame, as a cable would


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[3] not in PROFILES:
        sys.exit(__doc__.split("\n\n")[-1].strip() + "\n")
    run(sys.argv[1], int(sys.argv[2]), sys.argv[3])
