"""How many connections may be in their opening handshake at once, in total and per address.

A connection costs a descriptor from its ``accept(2)`` on, but proves nothing (not even that
it speaks HTTP) until its handshake is over. Without a bound, a few thousand half-finished
upgrade requests use up the descriptor table and a client with a valid token cannot get in.
So the listener asks :meth:`HandshakeAdmission.enter` for each new connection, in accept
order: past ``max_total`` connections in their handshake, or past ``max_per_address`` from
one remote address, the new connection is closed at once, before a byte of it is read, and
the refusal is logged once per episode (:mod:`runtime.log_throttle`). A client sees its
connection closed (end of stream) without a response, and may retry.

Addresses in ``trusted`` (``EXAI_TRUSTED_PROXIES``) are exempt from the per-address bound,
never from the total: behind a reverse proxy every client arrives from the proxy's address,
so counting per address there would let one client lock out all the others. Loopback is
trusted by default (``127.0.0.1`` and ``::1``, where a proxy on the same host connects from);
an operator who sets the list replaces that default.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable

import structlog

from runtime.listener import Peer, Release
from runtime.log_throttle import LogThrottle

log = structlog.get_logger("listener")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"10.0.0.5, 192.168.0.0/24, ::1"``: comma-separated IP addresses or CIDR networks
    (Python's :mod:`ipaddress`, non-strict: host bits are ignored); ``ValueError`` naming the
    entry that is neither."""
    networks: list[Network] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
    return tuple(networks)


class HandshakeAdmission:
    """Counts connections in their handshake; the :class:`~runtime.listener.Gate` of the
    MCP listener."""

    def __init__(self, *, max_total: int, max_per_address: int, trusted: Iterable[Network]):
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.trusted = tuple(trusted)
        self._by_address: Counter[ipaddress.IPv4Address | ipaddress.IPv6Address] = Counter()
        self.in_progress = 0
        #: Connections refused since start, by reason ("total", "per address").
        self.refused: Counter[str] = Counter()
        self._throttle = LogThrottle()

    def is_trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        candidate = mapped or address
        return any(candidate in network for network in self.trusted)

    def enter(self, peer: Peer) -> Release | None:
        """A place in the handshake for ``peer``'s new connection, or ``None`` (refused)."""
        address = peer.address
        if self.in_progress >= self.max_total:
            self._refuse(peer, "total", self.max_total)
            return None
        counted = not self.is_trusted(address)
        if counted and self._by_address[address] >= self.max_per_address:
            self._refuse(peer, "per address", self.max_per_address)
            return None
        self.in_progress += 1
        if counted:
            self._by_address[address] += 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.in_progress -= 1
            if counted:
                self._by_address[address] -= 1
                if not self._by_address[address]:
                    del self._by_address[address]

        return release

    def _refuse(self, peer: Peer, reason: str, limit: int) -> None:
        self.refused[reason] += 1
        self._throttle.emit(
            log.warning,
            "handshake.refused",
            key=f"handshake.refused:{reason}",
            reason=f"handshakes in progress ({reason})",
            limit=limit,
            peer=str(peer),
        )
