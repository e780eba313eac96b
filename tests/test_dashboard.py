"""
Tests for the relay's dashboard: L{portal.relay.dashboard} (status, admin check, API, page) and
L{portal.relay.events}, and the C{--admin-token} options of C{twistd portal-relay}.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    globalLogPublisher,
)
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from portal.relay.dashboard import (
    AdminCheck,
    Dashboard,
    StatusAPI,
    dashboardPage,
    refusals,
    relayStatus,
)
from portal.relay.events import RecentEvents
from portal.relay.router import Router
from portal.tap.relay import Options, readAdminToken
from portal.trust.identity import Identity

TOKEN = "a-token-of-sixteen-or-more"


class Holder:
    """
    A stand-in control session holding a lease: no pool, no transport.
    """

    mode = "stream"


def request(token: str | None = None, path: bytes = b"status") -> DummyRequest:
    """
    @return: A GET request from 192.0.2.9, with the token as a bearer token if given.
    """
    req = DummyRequest([path])
    req.client = IPv4Address("TCP", "192.0.2.9", 5000)
    if token is not None:
        req.requestHeaders.addRawHeader(b"authorization", f"Bearer {token}".encode())
    return req


class StatusTests(SynchronousTestCase):
    """
    L{relayStatus}: totals for everyone, leases and events for the operator.
    """

    def setUp(self) -> None:
        """
        A router with one live lease and some counted visitors.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.router = Router(Identity.generate(), self.clock, tunnelDomain="tunnels.example")
        self.router.leases.register("app", "owner-id", Holder())
        self.router.counters.update(visitors=5, routed=3, unknown=2, bytes_to_visitors=1234)

    def test_public(self) -> None:
        """
        The public status has the totals and no lease name, owner or event.
        """
        self.clock.advance(90)
        status = relayStatus(self.router)
        self.assertEqual(status["relay"]["uptime"], 90)
        self.assertEqual(status["leases"], {"recorded": 1, "live": 1})
        self.assertEqual(status["visitors"]["total"], 5)
        self.assertEqual(status["traffic"]["bytesToVisitors"], 1234)
        self.assertEqual(status["refusals"]["no live lease for the name"], 2)
        self.assertFalse(status["admin"])
        text = json.dumps(status)
        self.assertNotIn("app.tunnels.example", text)
        self.assertNotIn("owner-id", text)
        self.assertNotIn("events", status)

    def test_admin(self) -> None:
        """
        The operator's status adds one row per lease and the recent events.
        """
        self.router.events(
            {
                "log_namespace": "portal.relay.control.X",
                "log_level": LogLevel.info,
                "log_format": "lease {name} registered",
                "name": "app",
                "log_time": 1.0,
            }
        )
        status = relayStatus(self.router, admin=True)
        (row,) = status["leaseTable"]
        self.assertEqual(
            (row["hostname"], row["owner"], row["state"], row["mode"]),
            ("app.tunnels.example", "owner-id", "live", "stream"),
        )
        self.assertEqual(status["events"][0]["text"], "lease app registered")

    def test_refusals(self) -> None:
        """
        Known refusal counters get their reason; any other counter named C{refused} counts under its
        own name; others are not refusals; the limits' refusals count under their reasons.
        """
        found = refusals({"unknown": 1, "timeouts": 2, "rate_refused": 4, "visitors": 9})
        self.assertEqual(found["no live lease for the name"], 1)
        self.assertEqual(found["no data session in time"], 2)
        self.assertEqual(found["too many visitors waiting"], 0)
        self.assertEqual(found["rate_refused"], 4)
        self.assertNotIn("visitors", found)
        withLimits = refusals({"unknown": 1}, {"connections_per_source": 5})
        self.assertEqual(withLimits["connections_per_source"], 5)
        self.assertEqual(withLimits["no live lease for the name"], 1)


class AdminTests(SynchronousTestCase):
    """
    L{AdminCheck} and L{StatusAPI}: the token, and what a wrong one gets.
    """

    def setUp(self) -> None:
        """
        A router, and a log observer.
        """
        self.router = Router(Identity.generate(), Clock())
        self.events = EventLoggingObserver.createWithCleanup(
            self,  # type: ignore[arg-type]
            globalLogPublisher,
        )

    def test_token(self) -> None:
        """
        The right bearer token is the operator; no header is the public; neither is counted.
        """
        check = AdminCheck(self.router, TOKEN)
        self.assertTrue(check.isAdmin(request(TOKEN)))
        self.assertFalse(check.isAdmin(request()))
        self.assertEqual(self.router.counters["admin_refused"], 0)

    def test_wrongToken(self) -> None:
        """
        A wrong token is refused with 401, counted and logged with the client's address.
        """
        api = StatusAPI(self.router, AdminCheck(self.router, TOKEN))
        req = request("not-" + TOKEN)
        body = api.render_GET(req)
        self.assertEqual(req.responseCode, 401)
        self.assertIn(b"wrong admin token", body)
        self.assertEqual(self.router.counters["admin_refused"], 1)
        texts = [formatEvent(e) for e in self.events]
        self.assertIn("refused a dashboard request from 192.0.2.9: wrong admin token", texts)

    def test_noTokenSet(self) -> None:
        """
        Without an admin token nobody is the operator: a request bearing one is refused too.
        """
        req = request(TOKEN)
        StatusAPI(self.router, AdminCheck(self.router, None)).render_GET(req)
        self.assertEqual(req.responseCode, 401)
        self.assertEqual(self.router.counters["admin_refused"], 1)

    def test_apiViews(self) -> None:
        """
        C{/api/status} answers the public view without a token and the operator's with it.
        """
        api = StatusAPI(self.router, AdminCheck(self.router, TOKEN))
        public = json.loads(api.render_GET(request()))
        admin = json.loads(api.render_GET(request(TOKEN)))
        self.assertEqual((public["admin"], admin["admin"]), (False, True))
        self.assertIn("leaseTable", admin)


class PageTests(SynchronousTestCase):
    """
    The dashboard page.
    """

    def test_page(self) -> None:
        """
        The page holds the public status as JSON for its script, the totals as text, and refreshes
        from C{/api/status}; it is served with a content security policy.
        """
        router = Router(Identity.generate(), Clock())
        page = dashboardPage(router).decode()
        initial = page.split('<script type="application/json" id="initial">')[1].split("</script>")[
            0
        ]
        self.assertEqual(json.loads(initial)["relay"]["id"], router.identity.id)
        self.assertIn("0 leases, 0 tunnels connected.", page)
        self.assertIn('fetch("/api/status"', page)
        self.assertIn("setInterval(refresh, 2000)", page)
        req = request(path=b"")
        Dashboard(router).render_GET(req)
        self.assertIn(
            b"default-src 'none'", req.responseHeaders.getRawHeaders(b"content-security-policy")[0]
        )


class RecentEventsTests(SynchronousTestCase):
    """
    L{RecentEvents} keeps the relay's last events at info and above.
    """

    def test_keeps(self) -> None:
        """
        Only the relay's own events at info or above are kept, formatted, the newest last, at most
        the limit; a failure's message is added.
        """
        events = RecentEvents(limit=2)
        verifyObject(ILogObserver, events)
        publisher = LogPublisher(events)
        relayLog = Logger(namespace="portal.relay.public.VisitorProtocol", observer=publisher)
        otherLog = Logger(namespace="portal.tunnel.control", observer=publisher)
        relayLog.debug("debug {n}", n=0)
        otherLog.info("tunnel {n}", n=1)
        relayLog.info("first {n}", n=1)
        relayLog.warn("second {n}", n=2)
        relayLog.failure("third", Failure(ValueError("boom")))
        kept = events.recent()
        self.assertEqual([e.text for e in kept], ["second 2", "third: boom"])
        self.assertEqual([e.level for e in kept], ["warn", "critical"])
        self.assertEqual(events.recent(1), kept[1:])


class AdminTokenOptionTests(SynchronousTestCase):
    """
    C{--admin-token} and C{--admin-token-file}.
    """

    def test_token(self) -> None:
        """
        C{--admin-token} reaches the relay's configuration.
        """
        options = Options()
        options.parseOptions(["--admin-token", TOKEN])
        self.assertEqual(options.config().adminToken, TOKEN)
        self.assertNotIn(TOKEN, repr(options.config()))

    def test_file(self) -> None:
        """
        C{--admin-token-file} reads the token from the file's first line.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(TOKEN + "\nignored\n")
        self.assertEqual(readAdminToken(None, path), TOKEN)

    def test_refused(self) -> None:
        """
        Both options at once, a missing file, a short token or one with spaces are usage errors.
        """
        path = self.mktemp()
        for token, file, message in [
            (TOKEN, path, "not both"),
            (None, path, "--admin-token-file"),
            ("short", None, "at least 16 characters"),
            ("with spaces in the token", None, "without spaces"),
        ]:
            e = self.assertRaises(usage.UsageError, readAdminToken, token, file)
            self.assertIn(message, str(e))
