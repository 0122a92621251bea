#!/usr/bin/env python3
"""Run integration test modules; exit non-zero on any failure.

    python3 run.py [--crossdock PATH] [-k PATTERN] [MODULE ...]

MODULE is a test module name in this directory (test_mirror, test_harness);
default: every test_*.py here.  --crossdock sets $CROSSDOCK_BIN (the binary
under test); -k is passed to unittest (substring / glob of test names).
Prints a closing line "N passed, N failed, N skipped".
"""

import argparse
import os
import signal
import sys
import time
import unittest

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _terminate(signum, frame):
    # meson/CI timeouts send SIGTERM: unwind so registries and temp dirs are cleaned up.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crossdock", help="path of the crossdock binary ($CROSSDOCK_BIN)")
    ap.add_argument("-k", dest="patterns", action="append", default=[],
                    help="only run tests matching this pattern (repeatable)")
    ap.add_argument("-q", "--quiet", action="store_true")
    ap.add_argument("modules", nargs="*")
    a = ap.parse_args(argv)

    if a.crossdock:
        os.environ["CROSSDOCK_BIN"] = os.path.abspath(a.crossdock)
    signal.signal(signal.SIGTERM, _terminate)

    modules = [m[:-3] if m.endswith(".py") else m for m in a.modules]
    modules = [os.path.basename(m) for m in modules]
    if not modules:
        modules = sorted(f[:-3] for f in os.listdir(HERE)
                         if f.startswith("test_") and f.endswith(".py"))

    loader = unittest.TestLoader()
    if a.patterns:
        loader.testNamePatterns = [p if "*" in p else f"*{p}*" for p in a.patterns]
    suite = unittest.TestSuite()
    for m in modules:
        suite.addTests(loader.loadTestsFromName(m))

    start = time.monotonic()
    runner = unittest.TextTestRunner(stream=sys.stdout, verbosity=1 if a.quiet else 2)
    result = runner.run(suite)
    elapsed = time.monotonic() - start

    def key(t):  # a failing subtest counts as its test
        return getattr(t, "test_case", t).id()

    bad = [t for t, _ in result.failures + result.errors] + list(result.unexpectedSuccesses)
    holders = {t.id() for t in bad if isinstance(t, unittest.suite._ErrorHolder)}
    bad_tests = {key(t) for t in bad if not isinstance(t, unittest.suite._ErrorHolder)}
    skipped = len(result.skipped)
    failed = len(bad_tests) + len(holders)      # setUpClass/Module errors count too
    passed = max(0, result.testsRun - skipped - len(bad_tests))
    print(f"# {', '.join(modules)} in {elapsed:.1f}s")
    print(f"{passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return 0 if result.wasSuccessful() and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
