"""Who may call the endpoint and how its answers name it: the Host, Origin and proxy rules, CORS, and the base URL
that status, result and image URLs are built on.

- **No key** (only this machine's programs may call): no CORS headers at all; a request is refused (403) when its
  ``Host`` is not a loopback name (DNS rebinding: a web page whose name resolves to 127.0.0.1), when it carries an
  ``Origin`` other than the server's own or ``Sec-Fetch-Site`` other than ``same-origin``/``none`` (a web page, even
  one on another loopback port), or any header a proxy adds (:data:`PROXY_HEADERS`: ``Forwarded``, ``Via``,
  ``X-Forwarded-*``, ``X-Real-IP``, ...; a proxy in front: others reach it through it). A proxy that adds none
  (nginx's plain ``proxy_pass``) cannot be seen: only a key makes a server safe behind a proxy.
- **A key**: CORS headers only for the origins the operator lists (``--cors-origin``); other pages get none, so a
  browser keeps them from reading any answer.
- **Base URL**: ``--public-url`` when given, else the scheme the client used (the connection's; a listed proxy's
  ``X-Forwarded-Proto`` and ``X-Forwarded-Host``, ``--trusted-proxy``) and its ``Host``: a client that came over TLS
  is never sent to an ``http://`` URL.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

from ..key_policy import is_loopback  # noqa: F401 - the server's loopback rule, used here and by its callers
from .protocol import CORS_HEADERS, HttpError

# headers that proxies, load balancers and CDNs add (RFC 7239 Forwarded, RFC 9110 Via, the de-facto client-address
# headers of nginx, Apache, Akamai, Cloudflare, Fastly); any X-Forwarded-* too
PROXY_HEADERS = ("forwarded", "via", "x-real-ip", "x-client-ip", "true-client-ip", "cf-connecting-ip",
                 "fastly-client-ip", "x-cluster-client-ip", "x-original-forwarded-for")
PROXY_PREFIX = "x-forwarded-"
HOST_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9.])?|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$")
ORIGIN_RE = re.compile(r"^https?://(?:[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?|\[[0-9a-f:.]{2,45}\])(?::\d{1,5})?$")


def host_name(host_header: str) -> str:
    """The host of a ``Host`` header value (``[::1]:8443`` -> ``::1``)."""
    return urllib.parse.urlsplit("//" + host_header).hostname or ""


def parse_origins(values, what: str) -> frozenset:
    """Origins as a browser sends them (``https://app.example:8080``), lower-case; ``SDXLCNError`` naming ``what``
    for anything else (a path, a ``*``)."""
    from ..errors import SDXLCNError

    out = set()
    for raw in values or ():
        for value in re.split(r"[,\s]+", str(raw).strip()):
            if not value:
                continue
            origin = value.lower().rstrip("/")
            if not ORIGIN_RE.match(origin):
                raise SDXLCNError(f"{what}: {value[:80]!r} is not an origin; give scheme://host[:port] as the browser "
                                  "shows it, e.g. https://app.example.com (no path, no '*'), once per origin")
            out.add(origin)
    return frozenset(out)


def parse_proxies(values, what: str) -> frozenset:
    """Addresses of reverse proxies whose ``X-Forwarded-Proto`` is believed."""
    from ..errors import SDXLCNError

    out = set()
    for raw in values or ():
        for value in re.split(r"[,\s]+", str(raw).strip()):
            if not value:
                continue
            try:
                out.add(str(ipaddress.ip_address(value.strip("[]"))))
            except ValueError:
                raise SDXLCNError(f"{what}: {value[:80]!r} is not an IP address; give the proxy's address as this "
                                  "server sees it (e.g. 127.0.0.1)") from None
    return frozenset(out)


@dataclass(frozen=True)
class Access:
    keyed: bool  # a key is set: the key guards every call
    cors_origins: frozenset = frozenset()
    trusted_proxies: frozenset = frozenset()
    public_url: str | None = None

    def refusal(self, headers: dict, scheme: str) -> HttpError | None:
        """Why this request may not be answered at all (from its headers alone), or None."""
        host = headers.get("host", "")
        if host and not HOST_RE.match(host):
            return HttpError(400, "the Host header is not a host[:port]")
        if self.keyed:
            return None
        fwd = sorted(h for h in headers if h in PROXY_HEADERS or h.startswith(PROXY_PREFIX))
        if fwd:
            return HttpError(403, f"this server has no key and answers only programs on this machine; the request "
                                  f"came through a proxy ({fwd[0]}): set a key (SDXLCN_SERVE_KEY) to serve through one")
        if host and not is_loopback(host_name(host)):
            return HttpError(403, f"this server has no key and answers only to this machine's own names (localhost, "
                                  f"127.0.0.1, [::1]), not Host {host[:80]!r}; set a key (SDXLCN_SERVE_KEY) to serve "
                                  "other names")
        origin = headers.get("origin")
        if origin is not None and (not host or origin.lower().rstrip("/") != f"{scheme}://{host}".lower()):
            return HttpError(403, "this server has no key: web pages may not call it (the request came from "
                                  f"{origin[:80]!r}); set a key and list the page's origin with --cors-origin")
        site = headers.get("sec-fetch-site")
        if site is not None and site.lower() not in ("same-origin", "none"):
            return HttpError(403, "this server has no key: web pages may not call it (Sec-Fetch-Site: "
                                  f"{site[:20]}); set a key and list the page's origin with --cors-origin")
        return None

    def allowed_origin(self, headers: dict) -> str | None:
        origin = (headers.get("origin") or "").lower().rstrip("/")
        return origin if self.keyed and origin in self.cors_origins else None

    def cors(self, headers: dict) -> dict:
        """CORS headers for this request's answer: only for a listed origin (and only with a key)."""
        origin = self.allowed_origin(headers)
        if origin is None:
            return {"Vary": "Origin"} if self.cors_origins else {}
        return {**CORS_HEADERS, "Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    def base(self, scheme: str, host: str, peer: str, headers: dict, prefix: str = "") -> str:
        """How the client reached the server's base: ``scheme://host[:port][prefix]``, no trailing slash."""
        if self.public_url:
            return self.public_url
        if normal_ip(peer) in self.trusted_proxies:
            proto = (headers.get("x-forwarded-proto") or "").split(",")[0].strip().lower()
            if proto in ("http", "https"):
                scheme = proto
            fwd_host = (headers.get("x-forwarded-host") or "").split(",")[0].strip()
            if HOST_RE.match(fwd_host):
                host = fwd_host
        return f"{scheme}://{host}{prefix}"


def normal_ip(peer: str) -> str:
    try:
        return str(ipaddress.ip_address((peer or "").strip("[]")))
    except ValueError:
        return peer or ""
