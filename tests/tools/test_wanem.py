#!/usr/bin/env python3
"""End-to-end tests for wanem (the loopback WAN emulator), Python 3 standard library only.

    python3 test_wanem.py [-v] [-k PATTERN]          # WANEM_BIN=path/to/wanem
    python3 test_wanem.py --wanem build/tests/tools/wanem [-v]
    python3 test_wanem.py --wanem ... --bench [--streams 8] [--total-rate 1Gbit] [--seconds 5]

Every test starts small upstream servers on 127.0.0.1 (echo, source, sink), runs wanem in front
of them and talks through it. Every wait has a deadline. The whole suite takes about 15 s.

--bench is not a test: it pushes --streams parallel downloads through wanem for --seconds and
prints the aggregate rate and the CPU time wanem used (the endpoints run in a separate process,
so their CPU does not count against wanem's).
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

WANEM = os.environ.get("WANEM_BIN", "")
MBIT = 1_000_000 / 8  # bytes per second in one Mbit/s
DEADLINE_S = 20       # upper bound for any single wait in these tests


# ---------------------------------------------------------------------------------------------
# Upstream servers

class Server:
    """A TCP server on 127.0.0.1:0; handler(conn) runs in a thread per connection."""

    def __init__(self, handler):
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.errors = []
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn):
        try:
            conn.settimeout(DEADLINE_S)
            self.handler(conn)
        except (ConnectionError, TimeoutError, OSError) as e:
            self.errors.append(e)
        finally:
            conn.close()

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def echo_handler(conn):
    """Echoes everything; after the client's FIN, sends b'<bye>' and closes."""
    buf = bytearray(256 * 1024)
    while True:
        n = conn.recv_into(buf)
        if n == 0:
            break
        conn.sendall(memoryview(buf)[:n])
    conn.sendall(b"<bye>")
    conn.shutdown(socket.SHUT_WR)


def pattern(n, seed=0):
    """n deterministic pseudo-random bytes."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (seed, i)).digest() * 64
        i += 1
    return bytes(out[:n])


CHUNK = pattern(1 << 20, seed=7)


def source_handler(conn):
    """Reads an 8-byte length (0 = endless) and sends that many bytes of the repeated CHUNK."""
    header = recv_exact(conn, 8)
    (n,) = struct.unpack("!Q", header)
    view = memoryview(CHUNK)
    sent = 0
    while n == 0 or sent < n:
        k = len(CHUNK) if n == 0 else min(len(CHUNK), n - sent)
        conn.sendall(view[:k])
        sent += k
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)  # wait for the client's FIN


class SinkHandler:
    """Counts bytes until FIN, then answers the count (8 bytes) and closes."""

    def __init__(self):
        self.counts = []

    def __call__(self, conn):
        buf = bytearray(256 * 1024)
        total = 0
        while True:
            n = conn.recv_into(buf)
            if n == 0:
                break
            total += n
        self.counts.append(total)
        conn.sendall(struct.pack("!Q", total))
        conn.shutdown(socket.SHUT_WR)


def recv_exact(sock, n):
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("EOF after %d of %d bytes" % (len(out), n))
        out += chunk
    return bytes(out)


def recv_all(sock):
    out = bytearray()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return bytes(out)
        out += chunk


# ---------------------------------------------------------------------------------------------
# wanem process

class Wanem:
    def __init__(self, upstream_port, *args, stats_file=None):
        cmd = [WANEM, "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:%d" % upstream_port]
        cmd += [str(a) for a in args]
        if stats_file:
            cmd += ["--stats-file", stats_file]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([self.proc.stdout], [], [], 5)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("listening 127.0.0.1:"):
            self.proc.kill()
            raise RuntimeError("wanem did not start: %r %r" % (line, self.proc.stderr.read()))
        self.port = int(line.strip().rsplit(":", 1)[1])

    def connect(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE_S)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def cpu_seconds(self):
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wakeups(self):
        """Voluntary context switches so far: how often wanem went to sleep."""
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        """SIGTERM; returns the exit status (the process must exit within 5 s). What wanem
        wrote on stderr is kept in self.stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(5)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.stderr = self.proc.stderr.read().decode(errors="replace")
            self.proc.stdout.close()
            self.proc.stderr.close()

    def __enter__(self):
        return self

    def finish(self):
        """stop(), and fail unless wanem exited 0 without a sanitizer report."""
        status = self.stop()
        if status != 0 or "runtime error" in self.stderr or "Sanitizer" in self.stderr:
            raise AssertionError("wanem exited with %s: %s" % (status, self.stderr))

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.finish()
        else:
            self.stop()


def parallel_downloads(port, streams, seconds, warmup=0.5):
    """Runs `streams` endless downloads through port; returns each one's Mbit/s, all measured
    over the same window of `seconds` that starts `warmup` after every stream got its first bytes."""
    counts = [0] * streams
    stop = threading.Event()
    started = threading.Barrier(streams + 1)

    def run(i):
        s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
        try:
            s.sendall(struct.pack("!Q", 0))
            buf = bytearray(1 << 20)
            counts[i] += s.recv_into(buf)
            started.wait(DEADLINE_S)
            while not stop.is_set():
                n = s.recv_into(buf)
                if n == 0:
                    break
                counts[i] += n
        finally:
            s.close()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    started.wait(DEADLINE_S)
    time.sleep(warmup)
    c0, t0 = list(counts), time.monotonic()
    time.sleep(seconds)
    c1, t1 = list(counts), time.monotonic()
    stop.set()
    for t in threads:
        t.join(DEADLINE_S)
    return [(b - a) / (t1 - t0) / MBIT for a, b in zip(c0, c1)]


def mbit(nbytes, seconds):
    return nbytes / seconds / MBIT


# ---------------------------------------------------------------------------------------------

class WanemTest(unittest.TestCase):

    def test_bytes_exact_both_ways(self):
        """Random data through echo and source servers arrives byte-exact, 64 connections at once."""
        with Server(echo_handler) as echo, Wanem(echo.port, "--delay-ms", 5) as w:
            data = os.urandom(8 << 20)
            s = w.connect()

            def send():
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)

            t = threading.Thread(target=send)
            t.start()
            got = recv_all(s)
            t.join(DEADLINE_S)
            s.close()
            self.assertEqual(len(got), len(data) + 5)
            self.assertEqual(hashlib.sha256(got[:-5]).digest(), hashlib.sha256(data).digest())
            self.assertEqual(got[-5:], b"<bye>")

            results = [None] * 64

            def one(i):
                payload = os.urandom(256 * 1024 + i)
                c = w.connect()
                sender = threading.Thread(target=lambda: (c.sendall(payload), c.shutdown(socket.SHUT_WR)))
                sender.start()
                back = recv_all(c)
                sender.join(DEADLINE_S)
                c.close()
                results[i] = back == payload + b"<bye>"

            threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(DEADLINE_S)
            self.assertEqual(results, [True] * 64)

        with Server(source_handler) as src, Wanem(src.port, "--delay-ms", 2) as w:
            n = 24 << 20
            s = w.connect()
            s.sendall(struct.pack("!Q", n))
            got = recv_exact(s, n)
            s.shutdown(socket.SHUT_WR)
            self.assertEqual(recv_all(s), b"")
            s.close()
            expected = (CHUNK * (n // len(CHUNK) + 1))[:n]
            self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(expected).digest())

    def test_rtt_is_twice_the_delay(self):
        """A 1-byte (and a 1 KiB) ping-pong through echo takes 2*delay: never less, rarely more.

        The fastest sample checks the model (2*delay plus a little). The median bound leaves room
        for the scheduler: on a loaded 2-core machine a process that sleeps 20 ms may wake several
        ms late, and a round trip has four such wake-ups (wanem twice, both Python endpoints)."""
        delay_ms = 20
        with Server(echo_handler) as echo, Wanem(echo.port, "--delay-ms", delay_ms) as w:
            s = w.connect()
            for size in (1, 1024):
                rtts = []
                for _ in range(20):
                    msg = os.urandom(size)
                    t0 = time.monotonic()
                    s.sendall(msg)
                    self.assertEqual(recv_exact(s, size), msg)
                    rtts.append((time.monotonic() - t0) * 1000)
                lo, med = min(rtts), statistics.median(rtts)
                print("\n  rtt %d B: min %.2f median %.2f max %.2f ms (2*delay = %d)"
                      % (size, lo, med, max(rtts), 2 * delay_ms), file=sys.stderr)
                self.assertGreaterEqual(lo, 2 * delay_ms - 0.1)
                self.assertLessEqual(lo, 2 * delay_ms + 3)
                self.assertLessEqual(med, 2 * delay_ms + 15)
            s.close()
        with Server(echo_handler) as echo, Wanem(echo.port) as w:
            s = w.connect()
            rtts = []
            for _ in range(20):
                t0 = time.monotonic()
                s.sendall(b"x")
                recv_exact(s, 1)
                rtts.append((time.monotonic() - t0) * 1000)
            s.close()
            self.assertLess(statistics.median(rtts), 5, "no delay configured: RTT should be tiny")

    def test_conn_rate_single_stream(self):
        """--conn-rate 100Mbit holds within 10% for one download and one upload."""
        with Server(source_handler) as src, Wanem(src.port, "--delay-ms", 10, "--conn-rate", "100Mbit") as w:
            (rate,) = parallel_downloads(w.port, 1, 3.0)
            print("\n  download: %.1f Mbit/s" % rate, file=sys.stderr)
            self.assertAlmostEqual(rate, 100, delta=10)

        sink = SinkHandler()
        with Server(sink) as srv, Wanem(srv.port, "--delay-ms", 10, "--conn-rate", "12.5MB/s") as w:
            n = 25_000_000  # 2 s at 100 Mbit/s
            s = w.connect()
            t0 = time.monotonic()
            s.sendall(CHUNK * (n // len(CHUNK)) + CHUNK[: n % len(CHUNK)])
            s.shutdown(socket.SHUT_WR)
            (count,) = struct.unpack("!Q", recv_exact(s, 8))
            elapsed = time.monotonic() - t0 - 0.020  # the reply's trip back and the FIN's trip there
            s.close()
            self.assertEqual(count, n)
            rate = mbit(n, elapsed)
            print("  upload: %.1f Mbit/s" % rate, file=sys.stderr)
            self.assertAlmostEqual(rate, 100, delta=10)

    def test_total_rate_is_shared_fairly(self):
        """4 streams, --conn-rate 100Mbit --total-rate 200Mbit: ~200 aggregate, ~50 each."""
        with Server(source_handler) as src, \
                Wanem(src.port, "--delay-ms", 10, "--conn-rate", "100Mbit", "--total-rate", "200Mbit") as w:
            rates = parallel_downloads(w.port, 4, 3.0)
            total = sum(rates)
            print("\n  aggregate %.1f Mbit/s, per stream %s" % (total, ["%.1f" % r for r in rates]),
                  file=sys.stderr)
            self.assertAlmostEqual(total, 200, delta=20)
            for r in rates:
                self.assertAlmostEqual(r, 50, delta=10)

    def test_back_pressure(self):
        """A client that does not read: wanem holds at most --queue-bytes, then the data is intact."""
        with tempfile.TemporaryDirectory() as tmp, Server(source_handler) as src:
            stats = os.path.join(tmp, "stats.json")
            with Wanem(src.port, "--delay-ms", 5, "--queue-bytes", "1MiB", stats_file=stats) as w:
                s = w.connect()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
                s.sendall(struct.pack("!Q", 0))
                time.sleep(1.0)
                w.proc.send_signal(signal.SIGUSR1)
                deadline = time.monotonic() + 5
                while not os.path.exists(stats) and time.monotonic() < deadline:
                    time.sleep(0.01)
                with open(stats) as f:
                    st = json.load(f)
                held = st["upstream_to_client"]["bytes_in"] - st["upstream_to_client"]["bytes_out"]
                print("\n  held by wanem while the client does not read: %d bytes in %d blocks"
                      % (held, st["buffer_blocks_in_use"]), file=sys.stderr)
                self.assertLessEqual(held, 1 << 20)
                self.assertGreater(held, 0)
                self.assertLessEqual(st["buffer_blocks_in_use"], (1 << 20) // 65536 + 2)
                n = 8 << 20
                got = recv_exact(s, n)
                s.close()
                expected = (CHUNK * (n // len(CHUNK) + 1))[:n]
                self.assertEqual(got, expected)

    def test_memory_limit_does_not_deadlock(self):
        """8 echo connections through a 1 MiB --memory-limit still complete, byte-exact: every
        direction keeps a small reserve, so full queues elsewhere cannot starve it."""
        with Server(echo_handler) as echo, \
                Wanem(echo.port, "--delay-ms", 3, "--memory-limit", "1MiB", "--queue-bytes", "256KiB") as w:
            results = [None] * 8

            def one(i):
                data = os.urandom(4 << 20)
                c = w.connect()
                sender = threading.Thread(target=lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)))
                sender.start()
                back = recv_all(c)
                sender.join(DEADLINE_S)
                c.close()
                results[i] = back == data + b"<bye>"

            threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(DEADLINE_S)
            self.assertEqual(results, [True] * 8)

    def test_half_close_client_first(self):
        """The client's FIN reaches the upstream one delay after shutdown(SHUT_WR), after the data."""
        delay_ms = 30
        seen = {}

        def handler(conn):
            data = recv_all(conn)
            seen["eof_at"] = time.monotonic()
            seen["data"] = data
            conn.sendall(b"got %d" % len(data))
            conn.shutdown(socket.SHUT_WR)

        with Server(handler) as srv, Wanem(srv.port, "--delay-ms", delay_ms) as w:
            s = w.connect()
            payload = os.urandom(300_000)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            t_fin = time.monotonic()
            reply = recv_all(s)
            t_reply = time.monotonic()
            s.close()
            self.assertEqual(reply, b"got 300000")
            self.assertEqual(seen["data"], payload)
            self.assertGreaterEqual(seen["eof_at"] - t_fin, delay_ms / 1000 - 0.002)
            self.assertGreaterEqual(t_reply - t_fin, 2 * delay_ms / 1000 - 0.002)

    def test_half_close_upstream_first(self):
        """The upstream's FIN reaches the client while the client can still send."""
        got = {}

        def handler(conn):
            conn.sendall(b"hello")
            conn.shutdown(socket.SHUT_WR)
            got["data"] = recv_all(conn)

        with Server(handler) as srv, Wanem(srv.port, "--delay-ms", 5) as w:
            s = w.connect()
            self.assertEqual(recv_all(s), b"hello")  # EOF seen
            payload = os.urandom(2 << 20)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + DEADLINE_S
            while "data" not in got and time.monotonic() < deadline:
                time.sleep(0.01)
            self.assertEqual(got.get("data"), payload)
            # Both FINs delivered: wanem closes the connection.
            self.assertEqual(s.recv(1), b"")
            s.close()

    def test_upstream_refused(self):
        """A refused upstream connection resets the client, 2*delay after connect."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
        probe.close()
        delay_ms = 25
        with tempfile.TemporaryDirectory() as tmp:
            stats = os.path.join(tmp, "stats.json")
            w = Wanem(dead_port, "--delay-ms", delay_ms, stats_file=stats)
            try:
                t0 = time.monotonic()
                s = w.connect()
                s.sendall(b"anyone there?")
                try:
                    outcome = s.recv(10)
                except ConnectionResetError:
                    outcome = "reset"
                elapsed = time.monotonic() - t0
                s.close()
                self.assertIn(outcome, ("reset", b""))
                self.assertGreaterEqual(elapsed, 2 * delay_ms / 1000 - 0.002)
                self.assertLess(elapsed, 2 * delay_ms / 1000 + 0.5)
            finally:
                w.finish()
            with open(stats) as f:
                st = json.load(f)
            self.assertEqual(st["upstream_refused"], 1)
            self.assertEqual(st["connections_active"], 0)

    def test_reset_propagates(self):
        """An RST from either side reaches the other side (after the delay)."""
        events = []

        def handler(conn):
            try:
                while conn.recv(65536):
                    pass
                events.append("eof")
            except ConnectionResetError:
                events.append(("reset", time.monotonic()))

        with Server(handler) as srv, Wanem(srv.port, "--delay-ms", 20) as w:
            s = w.connect()
            s.sendall(b"x" * 1000)
            time.sleep(0.1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            t_rst = time.monotonic()
            deadline = time.monotonic() + 5
            while not events and time.monotonic() < deadline:
                time.sleep(0.005)
            self.assertTrue(events and events[0][0] == "reset", events)
            self.assertGreaterEqual(events[0][1] - t_rst, 0.020 - 0.002)

        def rst_handler(conn):
            conn.sendall(b"partial")
            time.sleep(0.1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        with Server(rst_handler) as srv, Wanem(srv.port, "--delay-ms", 20) as w:
            s = w.connect()
            self.assertEqual(recv_exact(s, 7), b"partial")
            with self.assertRaises(ConnectionResetError):
                while s.recv(100):
                    pass
            s.close()

    def test_stats_and_signals(self):
        """SIGUSR1 writes the counters; SIGTERM exits 0 and writes them again."""
        with tempfile.TemporaryDirectory() as tmp, Server(echo_handler) as echo:
            stats = os.path.join(tmp, "stats.json")
            w = Wanem(echo.port, stats_file=stats)
            s = w.connect()
            s.sendall(b"a" * 1000)
            recv_exact(s, 1000)
            w.proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while not os.path.exists(stats) and time.monotonic() < deadline:
                time.sleep(0.01)
            with open(stats) as f:
                st = json.load(f)
            self.assertEqual(st["connections_accepted"], 1)
            self.assertEqual(st["connections_active"], 1)
            self.assertEqual(st["client_to_upstream"]["bytes_out"], 1000)
            self.assertEqual(st["upstream_to_client"]["bytes_out"], 1000)
            s.shutdown(socket.SHUT_WR)
            self.assertEqual(recv_all(s), b"<bye>")
            s.close()
            w.finish()
            with open(stats) as f:
                st = json.load(f)
            self.assertEqual(st["connections_active"], 0)
            self.assertEqual(st["connections_closed"], 1)
            self.assertEqual(st["upstream_to_client"]["bytes_out"], 1005)

    def test_command_line(self):
        """Non-loopback addresses and malformed rates are refused with a message; SIGINT exits 0."""
        def run(*args):
            return subprocess.run([WANEM, *args], capture_output=True, timeout=5, text=True)

        for listen, upstream in (("0.0.0.0:0", "127.0.0.1:1"), ("10.1.2.3:0", "127.0.0.1:1"),
                                 ("127.0.0.1:0", "192.168.1.1:80"), ("[::]:0", "127.0.0.1:1"),
                                 ("127.0.0.1:0", "127.0.0.1:0"), ("example.com:0", "127.0.0.1:1")):
            r = run("--listen", listen, "--upstream", upstream)
            self.assertEqual(r.returncode, 2, (listen, upstream, r.stderr))
            self.assertIn("address", r.stderr)
        for rate in ("100", "100Mbps", "fast", "-5Mbit", "10Mbyte"):
            r = run("--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1", "--conn-rate", rate)
            self.assertEqual(r.returncode, 2, (rate, r.stderr))
            self.assertIn("rate", r.stderr)
        for rate in ("0", "100Mbit", "1Gbit", "50MiB/s", "800kbit", "1.5gbit/s", "10MB/s"):
            w = Wanem(1, "--conn-rate", rate, "--total-rate", rate)
            w.proc.send_signal(signal.SIGINT)
            self.assertEqual(w.proc.wait(5), 0, rate)
            w.stop()


# ---------------------------------------------------------------------------------------------
# Benchmark: endpoints in a child process, so only wanem's CPU is measured here.

def bench(args):
    ctx = multiprocessing.get_context("fork")
    to_child, from_child = ctx.Queue(), ctx.Queue()

    def child():
        with Server(source_handler) as src:
            from_child.put(src.port)
            wanem_port = to_child.get(timeout=DEADLINE_S)
            from_child.put(parallel_downloads(wanem_port, args.streams, args.seconds))

    p = ctx.Process(target=child)
    p.start()
    src_port = from_child.get(timeout=DEADLINE_S)
    extra = ["--delay-ms", args.delay_ms, "--total-rate", args.total_rate, "--conn-rate", args.conn_rate]
    with Wanem(src_port, *extra) as w:
        cpu0, wake0, t0 = w.cpu_seconds(), w.wakeups(), time.monotonic()
        to_child.put(w.port)
        rates = from_child.get(timeout=args.seconds + 2 * DEADLINE_S)
        cpu1, wake1, t1 = w.cpu_seconds(), w.wakeups(), time.monotonic()
    p.join(DEADLINE_S)
    total = sum(rates)
    print("streams=%d delay=%sms total-rate=%s conn-rate=%s: aggregate %.0f Mbit/s, per stream %s; "
          "wanem CPU %.0f%% of one core, %.0f wake-ups/s"
          % (args.streams, args.delay_ms, args.total_rate, args.conn_rate, total,
             ["%.0f" % r for r in rates], 100 * (cpu1 - cpu0) / (t1 - t0), (wake1 - wake0) / (t1 - t0)))


def main():
    global WANEM
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--wanem", default=WANEM)
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--delay-ms", default="10")
    ap.add_argument("--total-rate", default="1Gbit")
    ap.add_argument("--conn-rate", default="0")
    args, rest = ap.parse_known_args()
    WANEM = args.wanem
    if not WANEM or not os.access(WANEM, os.X_OK):
        sys.exit("set WANEM_BIN or pass --wanem PATH (the wanem executable)")
    if args.bench:
        bench(args)
        return
    unittest.main(argv=[sys.argv[0]] + rest)


if __name__ == "__main__":
    main()
