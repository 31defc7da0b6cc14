"""Outbound HTTP to an address a client named (completion webhooks), written once: which URLs may be called, and
a POST that connects to exactly the address it checked.

The rules (AETHERCORE_WEBHOOK_ALLOW widens them):
* `https` only; `http` only to a host the operator allows by name, or written as an address in an allowed network;
* no credentials in the URL, at most 2048 characters;
* every address the host resolves to is checked, and the POST connects to one that passed: a public (global
  unicast) address, or one in an allowed network. Loopback, private, link-local (cloud metadata), shared,
  reserved, multicast and unspecified addresses are refused unless allowed. The name is resolved once, and the
  connection goes to the checked address (TLS still verifies the certificate for the name), so a DNS answer that
  changes between the check and the connection (rebinding) cannot redirect it;
* a deadline on the whole attempt (connection, TLS, sending, the answer's head), a body size cap (the caller's), no
  redirect followed (a 3xx is a failure), and nothing of the answer read but its status line and headers, at most
  MAX_ANSWER_HEAD bytes of them. The HTTP/1.1 exchange is written here, not with `http.client`: its timeouts are
  per socket operation (a receiver that answers a byte at a time would hold the attempt forever) and it reads an
  unbounded number of header lines.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

MAX_URL_CHARS = 2048
# What a webhook URL looks like (the API's schema documents this pattern, and a URL outside it is malformed): http(s),
# a host name, IPv4 address or [IPv6 address] (so no credentials), an optional port, then a path or query of visible
# ASCII. Whether it may be called is the policy's question (check_url).
URL_PATTERN = r"^https?://(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252})(:[0-9]{1,5})?([/?][\x21-\x7e]*)?$"
_URL = re.compile(URL_PATTERN)
# The most of an answer read (its status line and headers; the body is never read), and what one send may carry.
MAX_ANSWER_HEAD = 65536
SEND_CHUNK = 65536
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])[ \r]")
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ForbiddenDestination(ValueError):
    """The URL or the address it leads to may not be called: final, never retried."""


class MalformedUrl(ForbiddenDestination):
    """Not a URL of the documented shape (URL_PATTERN)."""


class DeliveryFailed(Exception):
    """The attempt failed on the way (DNS, connection, TLS, timeout): worth retrying."""


@dataclass(frozen=True)
class OutboundPolicy:
    hosts: frozenset[str] = frozenset()  # host names http may go to
    networks: tuple[IpNetwork, ...] = ()  # networks whose addresses may be reached even if not public
    tls_context: ssl.SSLContext | None = field(default=None, compare=False)

    @classmethod
    def from_entries(cls, entries: tuple[str, ...] | list[str], tls_context: ssl.SSLContext | None = None):
        """From AETHERCORE_WEBHOOK_ALLOW's entries (config/settings.py checked their syntax)."""
        hosts, networks = set(), []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks), tls_context)

    # -- the checks -------------------------------------------------------------------------------------------
    def address_allowed(self, address: IpAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        if any(address in network for network in self.networks):
            return True
        return address.is_global and not address.is_multicast and not address.is_unspecified

    def check_url(self, url: str) -> SplitResult:
        """The URL split, or ForbiddenDestination saying why it may not be called (no DNS here: the API checks this
        on the request path)."""
        if not isinstance(url, str) or len(url) > MAX_URL_CHARS or not _URL.fullmatch(url):
            raise MalformedUrl(
                f"must be an https URL (scheme, host, optional port, path) of at most {MAX_URL_CHARS} visible ASCII "
                "characters, without credentials"
            )
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ForbiddenDestination(f"is not a usable URL ({exc})") from None
        host = (parts.hostname or "").rstrip(".")
        if not host or ".." in host:
            raise ForbiddenDestination(f"has no usable host ({host!r})")
        if port == 0:
            raise ForbiddenDestination("has port 0")
        literal = _literal(host)
        if literal is not None and not self.address_allowed(literal):
            raise ForbiddenDestination(
                f"leads to {literal}, a loopback, private, link-local or reserved address; an operator may allow it "
                "in AETHERCORE_WEBHOOK_ALLOW"
            )
        if parts.scheme == "http":
            allowed = host in self.hosts or (
                literal is not None and any(literal in network for network in self.networks)
            )
            if not allowed:
                raise ForbiddenDestination(
                    f"must be https: plain http goes only to hosts an operator allows (AETHERCORE_WEBHOOK_ALLOW), "
                    f"and {host!r} is not one"
                )
        return parts

    def resolve(self, host: str, port: int) -> str:
        """One address of `host` that may be called (resolved once; the connection goes there)."""
        literal = _literal(host)
        if literal is not None:
            candidates = [literal]
        else:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:
                raise DeliveryFailed(f"cannot resolve {host!r}: {exc}") from None
            candidates = []
            for info in infos:
                address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                if address not in candidates:
                    candidates.append(address)
        for address in candidates:
            if self.address_allowed(address):
                return str(address)
        shown = ", ".join(str(a) for a in candidates)
        raise ForbiddenDestination(
            f"{host!r} resolves only to addresses webhooks may not reach ({shown}); an operator may allow them in "
            "AETHERCORE_WEBHOOK_ALLOW"
        )

    # -- the call ---------------------------------------------------------------------------------------------
    def post(self, url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
        """POST `body` to `url` (checked, resolved once, connected to as checked); the answer's status. No redirect
        is followed and the answer's body is not read. ForbiddenDestination: final; DeliveryFailed: retry.

        `timeout_s` bounds the whole attempt after the name's resolution: connection, TLS handshake, sending, and
        the answer's head. Each socket operation gets what is left of it (a receiver that answers a byte at a time
        cannot make each wait short and the sum long), and the head is read into at most MAX_ANSWER_HEAD bytes."""
        parts = self.check_url(url)
        host = (parts.hostname or "").rstrip(".")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        address = self.resolve(host, port)
        deadline = time.monotonic() + timeout_s
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        sock: socket.socket | None = None
        try:
            sock = socket.create_connection((address, port), _left(deadline))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls:
                sock.settimeout(_left(deadline))  # CPython's handshake keeps one deadline over all its steps
                sock = (self.tls_context or ssl.create_default_context()).wrap_socket(sock, server_hostname=host)
            _send(sock, _request_head(host, port, tls, path, headers, len(body)) + body, deadline)
            return _read_status(sock, deadline)
        except DeliveryFailed as exc:
            raise DeliveryFailed(f"POST {parts.scheme}://{host}:{port}{parts.path or '/'} failed: {exc}") from None
        except (OSError, ValueError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError | socket.timeout) else f"{type(exc).__name__}: {exc}"
            raise DeliveryFailed(f"POST {parts.scheme}://{host}:{port}{parts.path or '/'} failed: {reason}") from None
        finally:
            if sock is not None:
                sock.close()


def _literal(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeliveryFailed("timed out")
    return left


def _request_head(host: str, port: int, tls: bool, path: str, headers: dict[str, str], length: int) -> bytes:
    default_port = 443 if tls else 80
    authority = f"[{host}]" if ":" in host else host
    if port != default_port:
        authority += f":{port}"
    lines = [f"POST {path} HTTP/1.1", f"Host: {authority}", f"Content-Length: {length}", "Connection: close"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    """All of `data` by the deadline (a receiver that reads slowly gets what is left of it, not a fresh timeout per
    chunk)."""
    view = memoryview(data)
    while view:
        sock.settimeout(_left(deadline))
        sent = sock.send(view[:SEND_CHUNK])
        view = view[sent:]


def _read_status(sock: socket.socket, deadline: float) -> int:
    """The answer's status, from its status line and headers read by the deadline, at most MAX_ANSWER_HEAD bytes in
    all (an interim 1xx head and the final one after it)."""
    buffer, read = b"", 0
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            status = _status(buffer)
            if status >= 200:
                return status
            buffer = buffer[end + 4 :]  # 100 Continue and the like: the final answer follows
            continue
        if read >= MAX_ANSWER_HEAD:
            raise DeliveryFailed(f"the answer's head exceeds {MAX_ANSWER_HEAD} bytes")
        sock.settimeout(_left(deadline))
        chunk = sock.recv(MAX_ANSWER_HEAD - read)
        if not chunk:
            raise DeliveryFailed("the connection closed before the answer's head ended")
        buffer += chunk
        read += len(chunk)


def _status(head: bytes) -> int:
    match = _STATUS_LINE.match(head)
    if match is None:
        raise DeliveryFailed(f"not an HTTP answer: {head[:40]!r}")
    return int(match.group(1))
