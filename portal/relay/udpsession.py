"""
The UDP side of one control session in UDP mode: its session id, its sealing keys per direction, and
where the tunnel's datagrams last came from (L{portal.relay.udpmode} uses it).
"""

from __future__ import annotations

from twisted.protocols import amp

from portal.relay.udp import PublicUDP
from portal.wire.udpseal import Direction, Opener, Sealer, deriveKeys


class UDPSession:
    """
    The UDP side of one control session in UDP mode.

    @ivar sessionId: The 8-byte id in every sealed datagram's header.
    @ivar control: The control session (for L{Datagram}, L{FlowOpened}, L{FlowClosed}).
    @ivar address: Where the tunnel's last authenticated datagram came from.
    @ivar heard: When it came.
    @ivar public: The lease's public port, while open.
    """

    address: tuple[str, int] | None = None
    heard = float("-inf")
    public: PublicUDP | None = None

    def __init__(self, control: amp.AMP, sessionId: bytes, secret: bytes) -> None:
        self.control = control
        self.sessionId = sessionId
        toTunnel, toRelay = deriveKeys(secret, sessionId)
        self.sealer = Sealer(toTunnel, sessionId, Direction.RELAY_TO_TUNNEL)
        self.opener = Opener(toRelay, sessionId, Direction.TUNNEL_TO_RELAY)
        self.announced: set[int] = set()
