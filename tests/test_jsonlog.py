"""
Tests for the JSON log lines of L{portal.cli.jsonlog}.
"""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from portal.cli.jsonlog import eventAsJSON, jsonLogObserver


class JSONLogTests(SynchronousTestCase):
    """
    L{portal.cli.jsonlog}: one JSON object per log event, with stable field names.
    """

    def test_line(self) -> None:
        """
        A line has the time (UTC), level, logger, formatted message and the event's own fields;
        values JSON cannot hold become text.
        """
        out = io.StringIO()
        log = Logger(namespace="portal.relay.public", observer=LogPublisher(jsonLogObserver(out)))
        log.info("refused visitor {peer}: {reason}", peer="192.0.2.1", reason=b"bytes", n=object)
        (line,) = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(sorted(record), ["fields", "level", "logger", "message", "time"])
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["logger"], "portal.relay.public")
        self.assertEqual(record["message"], "refused visitor 192.0.2.1: b'bytes'")
        self.assertEqual(record["fields"]["peer"], "192.0.2.1")
        self.assertEqual(record["fields"]["reason"], "bytes")
        self.assertEqual(record["fields"]["n"], "<class 'object'>")
        self.assertTrue(record["time"].endswith("Z"))

    def test_levelAndFailure(self) -> None:
        """
        Events below the level are left out; a failure's traceback is in C{error}.
        """
        out = io.StringIO()
        log = Logger(observer=LogPublisher(jsonLogObserver(out, LogLevel.warn)))
        log.info("quiet")
        log.failure("it broke", Failure(ValueError("boom")))
        (line,) = out.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(record["level"], "critical")
        self.assertIn("ValueError: boom", record["error"])

    def test_eventAsJSON(self) -> None:
        """
        An event without time or level still makes a record.
        """
        record = eventAsJSON({"log_format": "hello {who}", "who": "you"})
        self.assertEqual((record["message"], record["level"]), ("hello you", "info"))
        self.assertEqual(record["time"], "1970-01-01T00:00:00.000Z")
