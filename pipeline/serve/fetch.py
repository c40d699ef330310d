"""The server's own outbound HTTP (a request's image URLs, webhooks): nothing inside the network, a total deadline.

A URL from a request is untrusted. Its host is resolved here, every address it resolves to is checked, and the
connection goes to the checked address (TLS still verifies the host name), so DNS cannot answer differently between
the check and the connection. Loopback, private, link-local, shared (CGNAT), multicast, reserved, unspecified and
cloud-metadata addresses are refused, also when written as ``127.1``, ``2130706433``, ``[::ffff:127.0.0.1]`` or
embedded in a 6to4/NAT64/Teredo address. Redirects are followed only to http(s) URLs, each one checked again.
The operator may allow internal addresses (:class:`Policy`): all of them (``serve --allow-internal-urls``, or
``SDXLCN_SERVE_ALLOW_INTERNAL_URLS=1`` in ComfyUI's environment) or some networks (``--allow-internal-urls
10.0.0.0/8,192.168.1.20``, the same list in the variable).

Every call has one deadline for everything (name lookup, connect, TLS, headers, body): a watchdog shuts the socket
when it passes, so a server trickling bytes cannot stretch it. Errors never tell a refused port from a closed or a
filtered one: the caller sees one message for every failed connection, and none at all reaches an internal address.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
import urllib.parse

from ..images import redact_url

ALLOW_INTERNAL_ENV = "SDXLCN_SERVE_ALLOW_INTERNAL_URLS"
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)
# metadata services that sit on addresses the general rules do not all catch (169.254.169.254 is link-local)
METADATA = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "168.63.129.16", "100.100.100.200", "192.0.0.192", "fd00:ec2::254"))
NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
INTERNAL_MSG = ("is not reachable from this server: its host is an address inside the network (loopback, private, "
                "link-local or metadata), which a request may not make the server fetch; give a public http(s) URL")
CONNECT_MSG = "could not be reached (the connection failed or timed out); check the URL"


class FetchError(Exception):
    """A refused or failed fetch; ``str()`` is a message about the URL (no address, no port state)."""


class Refused(FetchError):
    """The URL is not one a request may make the server fetch (an internal address, a scheme, its form)."""


def _ip(address: str):
    return ipaddress.ip_address(address.split("%", 1)[0].strip("[]"))


def _inner(ip) -> list:
    """IPv4 addresses an IPv6 address carries (mapped, 6to4, Teredo, NAT64)."""
    inner = []
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            inner.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            inner.append(ip.sixtofour)
        if ip.teredo is not None:
            inner.extend(ip.teredo)
        if any(ip in net for net in NAT64):
            inner.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return inner


def is_internal(address: str) -> bool:
    """True for any address a request must not reach (see the module's docstring)."""
    try:
        ip = _ip(address)
    except ValueError:
        return True
    for a in [ip, *_inner(ip)]:
        if a in METADATA or not a.is_global or a.is_multicast or a.is_reserved or a.is_loopback or \
                a.is_link_local or a.is_private or a.is_unspecified:
            return True
    return False


class Policy:
    """Which internal addresses the operator lets requests reach: none (the default), some networks, or all."""

    ALL = ("0.0.0.0/0", "::/0")

    def __init__(self, networks=()):
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    @classmethod
    def parse(cls, text: str | None) -> "Policy":
        """``""`` none; ``"1"``/``"all"``/``"true"`` all; else networks or addresses separated by commas.
        :class:`ValueError` naming the bad entry."""
        text = (text or "").strip()
        if text.lower() in ("", "0", "false", "no", "off", "none"):
            return cls()
        if text.lower() in ("1", "all", "true", "yes", "on"):
            return cls(cls.ALL)
        entries = [e.strip() for e in text.split(",") if e.strip()]
        for e in entries:
            try:
                ipaddress.ip_network(e, strict=False)
            except ValueError:
                raise ValueError(f"{e!r} is not an address or a network (e.g. 10.0.0.0/8, 192.168.1.20, fd00::/8); "
                                 "or give 'all'") from None
        return cls(entries)

    @classmethod
    def from_env(cls) -> "Policy":
        """From ``SDXLCN_SERVE_ALLOW_INTERNAL_URLS`` (an unreadable value allows nothing, and is logged)."""
        try:
            return cls.parse(os.environ.get(ALLOW_INTERNAL_ENV))
        except ValueError as exc:
            import logging

            logging.getLogger("sdxl_controlnet_img2img.serve").error("%s: %s; allowing no internal address",
                                                                      ALLOW_INTERNAL_ENV, exc)
            return cls()

    def refuses(self, address: str) -> bool:
        if not is_internal(address):
            return False
        try:
            ips = [_ip(address)]
        except ValueError:
            return True
        ips += _inner(ips[0])
        return not any(ip.version == net.version and ip in net for ip in ips for net in self.networks)

    def __repr__(self) -> str:
        return f"Policy({[str(n) for n in self.networks]})"


class Deadline:
    """One deadline for a whole call: :meth:`left` for each step, and a watchdog that shuts the socket at the end."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self._sock = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, seconds), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline")
        return left

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.end

    def watch(self, sock) -> None:
        with self._lock:
            self._sock = sock
        if self.passed:
            self._expire()

    def _expire(self) -> None:
        with self._lock:
            sock = self._sock
        if sock is not None:
            try:  # the plain socket's shutdown, also under TLS: a blocked read in another thread returns at once
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._timer.cancel()

    def __enter__(self) -> "Deadline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def numeric_address(host: str | None) -> str | None:
    """The address ``host`` is written as (``127.1``, ``2130706433``, ``::ffff:127.0.0.1`` included), found without
    asking the network; None for a name."""
    if not host:
        return None
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError, ValueError):
        return None
    return infos[0][4][0] if infos else None


def resolve(host: str, port: int, deadline: Deadline, policy: Policy) -> str:
    """The address to connect to: every address ``host`` has is checked; :class:`FetchError` when one is internal."""
    box: dict = {}

    def lookup():
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError) as exc:
            box["error"] = exc

    t = threading.Thread(target=lookup, name="sdxlcn-serve-resolve", daemon=True)  # getaddrinfo has no timeout
    t.start()
    t.join(deadline.left())
    if t.is_alive() or "error" in box:
        raise FetchError("could not be reached (its host name cannot be resolved); check the URL")
    addresses = [info[4][0] for info in box["infos"]]
    if not addresses:
        raise FetchError("could not be reached (its host name cannot be resolved); check the URL")
    if any(policy.refuses(a) for a in addresses):
        raise Refused(INTERNAL_MSG)
    return addresses[0]


def _connection(parts, address: str, port: int, deadline: Deadline):
    """An HTTP(S) connection to ``parts``' host that connects to ``address``:``port`` only (SNI and certificate: the
    name). The port is always given: with None, http.client reads one off the host's tail (``::1``: host ':',
    port 1)."""
    https = parts.scheme == "https"
    base = http.client.HTTPSConnection if https else http.client.HTTPConnection

    class Pinned(base):
        def connect(self):
            sock = socket.create_connection((address, self.port), timeout=deadline.left())
            deadline.watch(sock)
            if https:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
                deadline.watch(sock)
            sock.settimeout(deadline.left())
            self.sock = sock

    return Pinned(parts.hostname, port, timeout=deadline.left())


def split(url: str):
    """The URL's parts; :class:`FetchError` unless it is an absolute http(s) URL with a host and a valid port."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise Refused("is not a valid URL; give an http(s) URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise Refused("is not an http(s) URL with a host")
    if any(c in url for c in "\r\n\t ") or not url.isascii():
        raise Refused("holds spaces, line breaks or non-ASCII characters; percent-encode them")
    return parts


def request(url: str, *, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
            max_bytes: int, timeout_s: float, policy: Policy | None = None,
            follow_redirects: bool = True) -> tuple[int, bytes]:
    """(HTTP status, body) of ``url``; :class:`FetchError` when refused, unreachable, too large or past the deadline.

    ``timeout_s`` bounds the whole call, redirects included; a body over ``max_bytes`` is refused unread;
    ``policy`` (default: none allowed) says which internal addresses may be reached."""
    policy = policy or Policy()
    deadline = Deadline(timeout_s)
    try:
        for hop in range(MAX_REDIRECTS + 1):
            try:
                parts = split(url)
                port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
                address = resolve(parts.hostname, port, deadline, policy)
            except Refused as exc:
                raise Refused(f"redirects to a URL that {exc}" if hop else str(exc)) from None
            conn = _connection(parts._replace(scheme=parts.scheme.lower()), address, port, deadline)
            try:
                status, data, location = _exchange(conn, parts, method, body, headers or {}, max_bytes, deadline)
            finally:
                conn.close()
            if status in REDIRECTS and follow_redirects and location:
                url = urllib.parse.urljoin(url, location.strip())
                if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
                    raise Refused("redirects to a URL that is not http(s), which this server does not follow")
                if status == 303:
                    method, body = "GET", None
                continue
            return status, data
        raise FetchError(f"redirects more than {MAX_REDIRECTS} times")
    except FetchError:
        raise
    except (OSError, http.client.HTTPException, ssl.SSLError, ValueError):
        if deadline.passed:
            raise FetchError(f"did not answer in full within {timeout_s:g} s") from None
        raise FetchError(CONNECT_MSG) from None
    finally:
        deadline.close()


def _exchange(conn, parts, method, body, headers, max_bytes, deadline) -> tuple[int, bytes, str | None]:
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    conn.request(method, target, body=body, headers={"User-Agent": "sdxlcn-serve", **headers})
    resp = conn.getresponse()
    if resp.status in REDIRECTS:
        return resp.status, b"", resp.getheader("Location")
    length = resp.getheader("Content-Length")
    if length and length.strip().isdigit() and int(length) > max_bytes:
        raise FetchError(f"is {int(length)} bytes, over this server's {max_bytes}-byte limit")
    chunks, size = [], 0
    while True:  # each read waits at most the socket's timeout; the watchdog ends the whole at the deadline
        chunk = resp.read1(64 * 1024)
        if not chunk:
            break
        size += len(chunk)
        if size > max_bytes:
            raise FetchError(f"is over this server's {max_bytes}-byte limit")
        chunks.append(chunk)
    if deadline.passed:
        raise TimeoutError("deadline")
    return resp.status, b"".join(chunks), None


def shown(url: str) -> str:
    """``url`` as messages show it (:func:`~..images.redact_url`: no credentials or query), at most 200 characters."""
    try:
        return redact_url(url)[:200]
    except ValueError:
        return "the URL"


def get_ok(url: str, *, max_bytes: int, timeout_s: float, policy: "Policy") -> bytes:
    """``url``'s body when it answers 200 under these rules; :class:`FetchError` with the whole sentence (naming the
    URL as :func:`shown` does) otherwise."""
    try:
        status, data = request(url, max_bytes=max_bytes, timeout_s=timeout_s, policy=policy)
    except FetchError as exc:
        raise FetchError(f"{shown(url)} {exc}") from None
    if status != 200:
        raise FetchError(f"downloading {shown(url)} failed with HTTP {status}; check the URL")
    return data
