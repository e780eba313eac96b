"""
Tests for L{benchmarks.lab.parseH2load}, which reads scenario 5's h2load figures.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from benchmarks.lab import parseH2load

#: The summary h2load (nghttp2 1.52) prints, as captured from a run.
OUTPUT = """\
starting benchmark...
finished in 5.00s, 1,147.60 req/s, 1.17MB/s
requests: 5738 total, 5754 started, 5738 done, 5736 succeeded, 1 failed, 1 errored, 0 timeout
status codes: 5738 2xx, 0 3xx, 0 4xx, 0 5xx
time for request:     1.56ms    182.73ms     13.76ms     12.73ms    93.45%
time for connect:     4.12ms      9.45ms      6.61ms      1.64ms    62.50%
"""


class ParseH2loadTests(SynchronousTestCase):
    """
    L{parseH2load} reads requests/s, counts and times per request, and refuses output without them.
    """

    def test_summary(self) -> None:
        """
        The rate, the requests done and failed (failed plus errored) and the minimum, largest and
        mean time per request in microseconds are read.
        """
        self.assertEqual(
            parseH2load(OUTPUT),
            {
                "requestsPerSecond": 1147.6,
                "done": 5738.0,
                "failed": 2.0,
                "minUs": 1560.0,
                "maxUs": 182730.0,
                "meanUs": 13760.0,
            },
        )

    def test_noResult(self) -> None:
        """
        Output without a summary (h2load could not connect) is an error quoting it.
        """
        error = self.assertRaises(RuntimeError, parseH2load, "no protocol negotiated\n")
        self.assertIn("no protocol negotiated", str(error))
