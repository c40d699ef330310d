"""Clients without the key cannot hold the stand-alone server's connections (issue 31, item 2; the break-it review:
4 addresses x 256 connections with no key held all 1024 slots for 74 s and keyed clients got resets).

- At the bound (8 here) a new connection takes the place of the oldest idle one that never sent the key: a keyed
  client is answered while 4 other addresses hold every slot, and its own keep-alive connection, once it sent the
  key, is never the one closed.
- A connection that has sent no request with the key is closed at the header deadline from its start, however many
  key-less calls (``GET /ready``) it makes; one with the key stays while it keeps calling.
- IPv6 clients are counted by their /64 (one host may use any address in it), IPv4-mapped ones by their IPv4.
- A keyed body must keep a minimum rate: a trickle gets 408 long before the total body deadline.
All counts are bounded and every wait is a generous deadline, never a speed.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time

from test_serve import APP, KEY, fal_input
from test_serve_http import Running, closed_by_server, post_head, read_response, trickling

STATUS = f"/fal-ai/fast-sdxl-controlnet-canny/requests/{'0' * 8}-0000-0000-0000-{'0' * 12}/status"
SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


def keyless_trickler(port: int, source: str) -> socket.socket:
    """A connection from ``source`` that sends the start of a key-less request's headers and never ends them."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.sendall(b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    return s


def keyed_status(sock: socket.socket, port: int) -> int:
    sock.sendall(f"GET {STATUS} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Key {KEY}\r\n\r\n".encode())
    return read_response(sock)[0]


def open_count(srv) -> int:
    return sum(srv.server._open.values())


def wait_for(what, deadline_s: float = 20.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if what():
            return True
        time.sleep(0.05)
    return False


def test_a_keyed_client_gets_through_while_keyless_connections_hold_every_slot(tmp_path):
    with Running(tmp_path, max_connections=8, header_s=120.0) as srv:
        flood = [keyless_trickler(srv.port, SOURCES[i % 4]) for i in range(8)]
        try:
            assert wait_for(lambda: open_count(srv) == 8), "the flood's 8 connections were not all taken"
            with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as keyed:
                assert keyed_status(keyed, srv.port) == 404  # answered: the oldest key-less connection made room
                assert closed_by_server(flood[0], 10.0), "the oldest idle key-less connection was not the one closed"
                for round_ in range(3):  # the flood keeps refilling every slot; the keyed connection stays
                    flood += [keyless_trickler(srv.port, SOURCES[(round_ + i) % 4]) for i in range(8)]
                    assert wait_for(lambda: open_count(srv) == 8)
                    assert keyed_status(keyed, srv.port) == 404, f"round {round_}: the keyed connection was closed"
            for _ in range(3):  # and new keyed connections still get in, each taking a flood connection's place
                with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as keyed:
                    assert keyed_status(keyed, srv.port) == 404
        finally:
            for s in flood:
                s.close()


def test_a_connection_without_the_key_is_closed_at_the_header_deadline_however_busy(tmp_path):
    """With a 2 s header deadline: a connection calling GET /ready (no key needed) every 0.3 s is closed soon after
    the deadline from its start (it was kept alive for as long as it called); a keyed one calling as often stays."""
    with Running(tmp_path, header_s=2.0) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as keyless, \
                socket.create_connection(("127.0.0.1", srv.port), timeout=10) as keyed:
            start, keyless_open = time.monotonic(), True
            while time.monotonic() - start < 8.0:
                if keyless_open:
                    try:
                        keyless.sendall(f"GET /ready HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n\r\n".encode())
                        read_response(keyless)
                    except OSError:  # closed (or reset) by the server
                        keyless_open = False
                assert keyed_status(keyed, srv.port) == 404, "the keyed connection was closed"
                time.sleep(0.3)
            assert not keyless_open, "a connection without the key stayed open for 8 s by calling /ready"


def test_ipv6_clients_are_counted_by_their_64():
    from sdxl_controlnet_img2img.pipeline.serve.server import client_group

    net = ipaddress.ip_network("2001:db8:1:2::/64")
    inside = ["2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:fffe", "2001:db8:1:2:a:b:c:d%eth0"]
    assert all(ipaddress.ip_address(a.split("%")[0]) in net for a in inside)
    assert len({client_group(a) for a in inside}) == 1
    assert client_group("2001:db8:1:3::1") != client_group(inside[0])  # the next /64: another client
    assert client_group("::ffff:127.0.0.2") == client_group("127.0.0.2") != client_group("::ffff:127.0.0.3")
    assert client_group("127.0.0.2") != client_group("127.0.0.3")


def test_a_keyed_body_must_keep_a_minimum_rate(tmp_path):
    """1000 bytes/s after a 2 s grace, 600 s in all: a body trickling 5 bytes/s gets 408 naming the rate (it held
    its connection for the whole body deadline before); one sent at a few KB/s is taken."""
    with Running(tmp_path, body_s=600.0, body_rate=1000, body_grace_s=2.0) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(post_head(f"/{APP}", {"Authorization": f"Key {KEY}", "Content-Length": "100000"}))
            with trickling(s):
                status, _h, answer = read_response(s)  # within the socket's 30 s
        assert status == 408 and "KiB/s" in json.loads(answer)["detail"], answer
        body = json.dumps(fal_input()).encode() + b" " * 17000  # ~20 KB: past the grace at ~8 KB/s
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(post_head(f"/{APP}", {"Authorization": f"Key {KEY}", "Content-Type": "application/json",
                                            "Content-Length": str(len(body))}))
            for i in range(0, len(body), 4000):  # ~8 KB/s
                s.sendall(body[i:i + 4000])
                time.sleep(0.5)
            status, _h, answer = read_response(s)
        assert status == 200, answer
