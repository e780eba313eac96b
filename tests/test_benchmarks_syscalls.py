"""
Tests for L{benchmarks.syscalls.parseSummary}: reading C{strace -c}'s table.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from benchmarks.syscalls import parseSummary

SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 35.10    0.012345          10      1200           epoll_ctl
 20.00    0.007000           5      1400       600 connect
  0.50    0.000100           1        90           getpid
------ ----------- ----------- --------- --------- ----------------
100.00    0.035000          12      2690       600 total
"""


class ParseSummaryTests(SynchronousTestCase):
    """
    Calls by system call, with and without an errors column; header, rules and total left out.
    """

    def test_rows(self) -> None:
        """
        Each system call's row gives its calls, whether or not it has errors.
        """
        self.assertEqual(parseSummary(SUMMARY), {"epoll_ctl": 1200, "connect": 1400, "getpid": 90})

    def test_empty(self) -> None:
        """
        No table, no calls.
        """
        self.assertEqual(parseSummary(""), {})
