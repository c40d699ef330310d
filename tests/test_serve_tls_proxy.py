"""The key never in clear text (issue 31, item 5).

- ``serve`` behind a local TLS-terminating reverse proxy (aiohttp here, doing what nginx does: HTTPS in, plain HTTP to
  the server, X-Forwarded-Proto/-Host added): listed with ``--trusted-proxy``, the status, result and image URLs are
  https on the proxy's address (they were http, and the pack's client sent the key there), and the pack's fal
  client runs a request through it end to end; a client's own X-Forwarded-* is ignored when it is not a listed proxy.
- The pack's fal client follows no URL a server answers that is plain http to another machine (the rule covered
  only SDXLCN_FAL_URL): nothing reaches a listener on this machine's network address.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import urllib.request
import uuid

import pytest

from loopback import Loopback, Quiet
from test_serve import APP, KEY, Paused, call, fal_input
from test_serve_cli import make_cert

HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class TlsProxy:
    """HTTPS on 127.0.0.1 in front of ``backend`` (plain HTTP), adding X-Forwarded-Proto/-Host/-For."""

    def __init__(self, backend: str, cert, key):
        self.backend, self.cert, self.key = backend, cert, key
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, daemon=True).start()
        assert self.ready.wait(30), "the proxy did not start"

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self):
        from aiohttp import ClientSession, web

        self.session = ClientSession(auto_decompress=False)

        async def forward(request):
            headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
            headers.update({"X-Forwarded-Proto": "https", "X-Forwarded-Host": request.host,
                            "X-Forwarded-For": request.remote})
            async with self.session.request(request.method, self.backend + request.raw_path, headers=headers,
                                            data=await request.read(), allow_redirects=False) as r:
                body = await r.read()
                return web.Response(status=r.status, body=body,
                                    headers={k: v for k, v in r.headers.items() if k.lower() not in HOP})

        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", forward)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert), str(self.key))
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = self.runner.addresses[0][1]
        self.url = f"https://127.0.0.1:{self.port}"

    def stop(self):
        async def down():
            await self.runner.cleanup()
            await self.session.close()

        asyncio.run_coroutine_threadsafe(down(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def https_call(method, url, ctx, body=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, method=method,
                                 headers={"Authorization": f"Key {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
        return r.status, json.loads(r.read())


def test_behind_a_tls_proxy_the_urls_are_https_and_the_packs_client_follows_them(tmp_path, tiny_pipe, monkeypatch):
    from sdxl_controlnet_img2img.pipeline.fal.client import run_remote
    from sdxl_controlnet_img2img.pipeline.fal.settings import FalSettings
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest
    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.server import StandaloneServer
    from sdxl_controlnet_img2img.pipeline.serve.store import Store
    from sdxl_controlnet_img2img.pipeline.serve.worker import LocalWorkers

    cert, key = make_cert(tmp_path)
    store = Store(tmp_path / "data")
    workers = LocalWorkers(store, {"cpu": tiny_pipe})
    server = StandaloneServer(ServeApp(store, workers, key=KEY, trusted_proxies={"127.0.0.1"})).start()
    workers.start()
    proxy = TlsProxy(server.url, cert, key)
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        code, sub = https_call("POST", f"{proxy.url}/{APP}", ctx, fal_input())
        assert code == 200, sub
        root = f"{proxy.url}/fal-ai/fast-sdxl-controlnet-canny/requests/{sub['request_id']}"
        assert (sub["status_url"], sub["response_url"], sub["cancel_url"]) == (root + "/status", root, root + "/cancel")
        monkeypatch.setenv("SDXLCN_FAL_URL", proxy.url)
        monkeypatch.setenv("FAL_KEY", KEY)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        settings = FalSettings(http_timeout_s=10.0, max_retries=1, poll_interval_s=0.05)
        result = run_remote(GenerationRequest.from_dict(fal_input(seed=3)), settings=settings,
                            request_log_dir=tmp_path / "log", timeout_s=120)
        assert result.images[0].size == (64, 64) and result.seed == 3
        code, done = https_call("GET", f"{root}", ctx)
        assert code == 200 and done["images"][0]["url"].startswith(f"{proxy.url}/files/"), done
    finally:
        proxy.stop()
        server.stop()
        workers.stop()
        store.close()


def test_forwarded_headers_from_a_client_that_is_not_a_listed_proxy_are_ignored(tmp_path):
    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.server import StandaloneServer
    from sdxl_controlnet_img2img.pipeline.serve.store import Store

    store = Store(tmp_path / "data")
    server = StandaloneServer(ServeApp(store, Paused(), key=KEY)).start()
    try:
        code, sub, _ = call("POST", f"{server.url}/{APP}", fal_input(),
                            headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"})
        assert code == 200 and sub["status_url"].startswith(f"{server.url}/"), sub
    finally:
        server.stop()
        store.close()


def network_address() -> str | None:
    """An address of this machine that is not loopback (where a LAN server would be), or None."""
    candidates = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("198.51.100.1", 9))  # no packet is sent: only the route's source address is chosen
            candidates.append(s.getsockname()[0])
    except OSError:
        pass
    try:
        candidates.append(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    for address in candidates:
        if not address.startswith("127."):
            try:
                with socket.socket() as s:
                    s.bind((address, 0))
                return address
            except OSError:
                continue
    return None


@pytest.mark.skipif(network_address() is None, reason="this machine has no network address besides loopback")
def test_the_packs_client_sends_no_key_to_a_plain_http_url_a_server_answers(tmp_path, monkeypatch):
    """A self-hosted endpoint on 127.0.0.1 (plain http is fine there) answers a submit with a status URL that is
    plain http to this machine's network address: the client refuses to follow it, and nothing arrives there."""
    from sdxl_controlnet_img2img.pipeline.fal.client import run_remote
    from sdxl_controlnet_img2img.pipeline.fal.errors import FalError
    from sdxl_controlnet_img2img.pipeline.fal.settings import FalSettings
    from sdxl_controlnet_img2img.pipeline.request import GenerationRequest

    address = network_address()
    listener = socket.create_server((address, 0))
    received = []

    def listen():
        listener.settimeout(30)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                received.append(conn.recv(65536))
            except OSError:
                pass

    threading.Thread(target=listen, daemon=True).start()
    elsewhere = f"http://{address}:{listener.getsockname()[1]}"
    rid = str(uuid.uuid4())

    class Endpoint(Quiet):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            root = f"{elsewhere}/fal-ai/fast-sdxl-controlnet-canny/requests/{rid}"
            data = json.dumps({"request_id": rid, "status_url": root + "/status", "response_url": root,
                               "cancel_url": root + "/cancel", "queue_position": 0}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-fal-request-id", rid)
            self.end_headers()
            self.wfile.write(data)

    endpoint = Loopback(Endpoint)
    try:
        monkeypatch.setenv("SDXLCN_FAL_URL", endpoint.url)
        monkeypatch.setenv("FAL_KEY", KEY)
        settings = FalSettings(http_timeout_s=3.0, max_retries=0, poll_interval_s=0.05)
        with pytest.raises(FalError) as caught:
            run_remote(GenerationRequest.from_dict(fal_input()), settings=settings, request_log_dir=tmp_path / "log",
                       timeout_s=20)
        assert "clear text" in str(caught.value) and elsewhere in str(caught.value), caught.value
        assert KEY not in str(caught.value)
    finally:
        endpoint.close()
        listener.close()
    assert received == [], f"the client sent {received[0][:300]!r} in clear text"
