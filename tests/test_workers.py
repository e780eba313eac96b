"""
Tests for C{twistd portal-relay --workers}: its option checks and the other workers' command line.
"""

from __future__ import annotations

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from portal.relay.service import workerCommand
from portal.tap.relay import Options


class WorkerOptionsTests(SynchronousTestCase):
    """
    What C{--workers} needs.
    """

    def test_needsCluster(self) -> None:
        """
        More than one worker without C{--cluster} is a usage error saying why.
        """
        with self.assertRaises(usage.UsageError) as e:
            Options().parseOptions(["--workers", "2"])
        self.assertIn("--cluster", str(e.exception))

    def test_noRawModes(self) -> None:
        """
        Raw TCP and UDP ports are refused with workers (not built yet), and so are listeners that
        cannot be shared.
        """
        cluster = ["--workers", "2", "--cluster", "etcd://127.0.0.1:2379"]
        for extra in (["--tcp-ports", "20000-20010"], ["--public", "ssl:443"]):
            self.assertRaises(usage.UsageError, Options().parseOptions, [*cluster, *extra])

    def test_config(self) -> None:
        """
        The options reach the relay's configuration, with the command line kept for the others.
        """
        options = Options()
        argv = ["--workers", "3", "--cluster", "etcd://127.0.0.1:2379"]
        options.parseOptions(argv)
        config = options.config()
        self.assertEqual((config.workers, config.workerIndex), (3, None))
        self.assertEqual(config.workerArgs, tuple(argv))


class WorkerCommandTests(SynchronousTestCase):
    """
    The command line of the other workers.
    """

    def test_replacesListenersAndState(self) -> None:
        """
        The listeners get the first worker's actual ports, the state directory its own, and the
        worker its index; every other option is kept, in either spelling.
        """
        argv = workerCommand(
            (
                "--public=tcp:0",
                "--control",
                "tcp:0:interface=127.0.0.1",
                "--state-dir",
                "/s",
                "--workers",
                "2",
                "--cluster=etcd://e:1",
            ),
            1,
            public="tcp:8443",
            control="tcp:4017:interface=127.0.0.1",
            stateDir="/s/worker-1",
        )
        options = argv[argv.index("portal-relay") + 1 :]
        self.assertEqual(
            options,
            [
                "--workers",
                "2",
                "--cluster=etcd://e:1",
                "--public",
                "tcp:8443",
                "--control",
                "tcp:4017:interface=127.0.0.1",
                "--state-dir",
                "/s/worker-1",
                "--worker-index",
                "1",
            ],
        )
