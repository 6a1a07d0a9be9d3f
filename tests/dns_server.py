"""A small real DNS server on loopback UDP, whose answers a test changes while the gateway asks it.

    server = DnsServer()                      # 127.0.0.1:<free port>, serving in a thread
    server.set("triton.test", ["127.0.0.2"])  # A records (AAAA for IPv6 addresses)
    server.set("triton.test", [])             # the name exists, with no address (a Service at zero)
    server.silent = True                      # drop every query: the resolver times out
    server.refuse = True                      # answer SERVFAIL

Names not set answer NXDOMAIN. Queries and answers are DNS wire format (dnspython builds and parses
them), so the gateway's resolver talks to it exactly as it would to CoreDNS. `queries` counts the
questions seen per name.
"""

from __future__ import annotations

import ipaddress
import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self, host: str = "127.0.0.1", ttl: int = 1) -> None:
        self.ttl = ttl
        self.silent = False
        self.refuse = False
        self.queries: dict[str, int] = {}
        self._records: dict[dns.name.Name, list[str]] = {}
        self._lock = threading.Lock()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind((host, 0))
        self._socket.settimeout(0.2)
        self.address = "%s:%d" % self._socket.getsockname()
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<DnsServer {self.address} names={len(self._records)} queries={sum(self.queries.values())}>"

    def set(self, name: str, addresses: list[str]) -> None:
        with self._lock:
            self._records[dns.name.from_text(name)] = list(addresses)

    def remove(self, name: str) -> None:
        with self._lock:
            self._records.pop(dns.name.from_text(name), None)

    def close(self) -> None:
        self._running = False
        self._thread.join(5)
        self._socket.close()

    def _serve(self) -> None:
        while self._running:
            try:
                data, peer = self._socket.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:  # not DNS: ignore, as a server would
                continue
            if self.silent:
                continue
            self._socket.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self.refuse:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        question = query.question[0]
        key = question.name.to_text()
        with self._lock:
            self.queries[key] = self.queries.get(key, 0) + 1
            addresses = self._records.get(question.name)
        if addresses is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        version = 4 if question.rdtype == dns.rdatatype.A else 6 if question.rdtype == dns.rdatatype.AAAA else None
        matching = [a for a in addresses if version is not None and ipaddress.ip_address(a).version == version]
        if matching:
            response.answer.append(
                dns.rrset.from_text_list(question.name, self.ttl, dns.rdataclass.IN, question.rdtype, matching)
            )
        return response
