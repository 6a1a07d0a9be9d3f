"""Backends found by DNS: the addresses a name resolves to now (a Kubernetes headless Service).

A headless Service's name resolves to one A record per ready pod, so asking again every few seconds
tells which Tritons exist now. `DnsDiscovery.resolve()` answers with the set of `ip:port` backend
addresses, or None when the answer could not be had (timeout, server failure): the fleet then keeps
the backends it has, because a DNS outage is not an outage of the Tritons. A name that does not
exist (NXDOMAIN) or has no address is an answer: no backends (a Service scaled to zero).

dnspython's asyncio resolver is used rather than `loop.getaddrinfo`: getaddrinfo runs in a thread
of the default executor, gives no way to name the DNS server (tests run their own on loopback, and
an operator may point the gateway at a cluster DNS of their choice), and cannot tell "no such name"
from "no answer in time", which decide whether backends leave or stay.
"""

from __future__ import annotations

import logging

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from gateway.upstream.config import DiscoveryConfig, nameserver_address, parse_address

log = logging.getLogger(__name__)


def backend_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class DnsDiscovery:
    """Resolves one pool's `dns: name:port` into backend addresses."""

    def __init__(self, target: str, config: DiscoveryConfig) -> None:
        self.target = target
        self.name, self.port = parse_address(target, "dns")
        if config.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*nameserver_address(server, "nameservers"))
                for server in config.nameservers
            ]
        else:
            resolver = dns.asyncresolver.Resolver()  # /etc/resolv.conf: nameservers, search, ndots
        resolver.lifetime = config.timeout_s
        resolver.timeout = config.timeout_s
        resolver.cache = None  # every resolution asks: the interval is the refresh rate
        self._resolver = resolver
        self.resolutions = 0  # answers had (an empty one included)
        self.failures = 0  # resolutions that gave no answer (the pool was kept as it was)
        self.last_error = ""

    def __repr__(self) -> str:
        return f"<DnsDiscovery {self.target} resolutions={self.resolutions} failures={self.failures}>"

    async def resolve(self) -> frozenset[str] | None:
        """The backend addresses the name has now; None if DNS gave no answer (keep what you have)."""
        try:
            addresses = await self._lookup("A")
            if not addresses:
                addresses = await self._lookup("AAAA")
        except dns.exception.DNSException as error:  # timeout, SERVFAIL, no nameserver answered
            self.failures += 1
            message = str(error) or type(error).__name__
            if message != self.last_error:
                log.warning("DNS discovery of %s: no answer (%s); keeping the backends it had", self.target, message)
            self.last_error = message
            return None
        self.resolutions += 1
        self.last_error = ""
        return frozenset(backend_address(ip, self.port) for ip in addresses)

    async def _lookup(self, record_type: str) -> list[str]:
        try:
            answer = await self._resolver.resolve(self.name, record_type, search=True, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        return [record.address for record in answer.rrset or ()]
