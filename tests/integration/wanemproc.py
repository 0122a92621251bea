"""Starting tests/tools/wanem: it prints "listening 127.0.0.1:PORT" on stdout once it accepts."""

import os
import re
import selectors
import time


def listening_address(proc, timeout=10.0):
    """Reads wanem's first stdout line: its "127.0.0.1:PORT", or None if it exits or stays silent
    for `timeout` s (the caller reports why, from wanem's stderr)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    line = b""
    deadline = time.monotonic() + timeout
    try:
        for _ in range(int(timeout / 0.2) + 10):
            if line.endswith(b"\n") or time.monotonic() >= deadline:
                break
            if not sel.select(timeout=0.2):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                break
            line += chunk
    finally:
        sel.close()
    m = re.match(rb"listening (127\.0\.0\.1:\d+)", line)
    return m.group(1).decode() if m else None
