"""Memory a submit may cost, bounded before anything large is made (issue 31 item 6, leftovers of a break-it review):

- an image is one of the formats the server takes (PNG, JPEG, WebP, GIF, BMP), each opened from its header alone:
  Pillow opens an .ico by decoding its largest entry, whatever size the .ico's header claims (a 250 KB .ico holding
  an 8192x8192 PNG took 268 MB before the size check); measured as the process's peak resident memory;
- an image over Pillow's own size warning (89.5 MP) is refused in the server's words only: Pillow's
  DecompressionBombWarning, printed with a site-packages path before the server's message, is not raised;
- a JSON body whose structure cannot be a request's is refused before it is parsed: 16 MiB of ``[{},{},...]``
  took 1 GB to parse.
"""

from __future__ import annotations

import base64
import json
import struct
import warnings
import zlib

from test_serve import APP, call, fal_input
from test_serve_bounds import huge_png, paused_server, peak_rss_mb, reset_peak_rss


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def ico_holding(png: bytes) -> bytes:
    """A Windows icon with one entry, declared 256x256 (a 0 in its header), whose data is ``png``."""
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def test_an_icon_is_refused_from_its_header_without_decoding_its_entry(tmp_path):
    """The .ico's PNG needs 268 MB to decode (8192x8192 RGBA): the refusal names the field and the formats taken,
    and the process grows far less than that."""
    ico = ico_holding(huge_png(8192))
    assert len(ico) < 400_000
    server = paused_server(tmp_path)
    try:
        for field in ("image_url", "control_image_url"):
            before = reset_peak_rss()
            code, body, _ = call("POST", f"{server.url}/{APP}", fal_input(**{field: data_uri(ico, "image/x-icon")}))
            grew = peak_rss_mb() - before
            assert grew < 100, f"refusing the icon in {field} took {grew:.0f} MB: its entry was decoded"
            assert code == 422 and body["detail"][0]["loc"] == ["body", field], body
            msg = body["detail"][0]["msg"]
            assert "PNG, JPEG, WebP, GIF or BMP" in msg, msg
        assert server.store.waiting() == 0
    finally:
        server.stop_all()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (RGB) and whose pixel data is a stub: enough to be opened."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
            png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def test_a_large_image_is_refused_in_the_servers_words_only(tmp_path):
    """100 MP (Pillow warns above 89.5 MP): the 422 says the size, and Pillow warns nothing (the warning is caught
    process-wide here, for the server's threads too)."""
    server = paused_server(tmp_path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, body, _ = call("POST", f"{server.url}/{APP}", fal_input(image_url=data_uri(png_header(10_000,
                                                                                                       10_000))))
        assert code == 422 and body["detail"][0]["loc"] == ["body", "image_url"], body
        assert "is 10000x10000 (100.0 MP), more pixels than this server decodes" in body["detail"][0]["msg"], body
        assert [str(w.category.__name__) for w in caught if "PIL" in w.filename or "ecompression" in
                w.category.__name__] == [], [str(w.message) for w in caught]
    finally:
        server.stop_all()


def test_a_body_that_cannot_be_a_request_is_refused_before_it_is_parsed(tmp_path):
    """16 MiB of empty objects, at the top and inside a field: 422 naming the body, with a bounded peak (parsing
    either took about 1 GB). A request's own JSON, and a long prompt, still pass."""
    server = paused_server(tmp_path, max_body_bytes=64 * 2**20)
    size = 16 * 2**20
    many = b",".join([b"{}"] * (size // 3))
    try:
        plain = json.dumps(fal_input()).encode()
        for body in (b"[" + many + b"]", plain[:-1] + b', "loras": [' + many + b"]}",
                     b'{"prompt": "x", "n": [' + b",".join([b"1.5"] * (size // 4)) + b"]}"):
            before = reset_peak_rss()
            code, answer, _ = call("POST", f"{server.url}/{APP}", body)
            grew = peak_rss_mb() - before
            assert code == 422 and answer["detail"][0]["loc"] == ["body"], (body[:60], answer)
            assert grew < 250, f"refusing a {len(body) / 2**20:.0f} MiB body took {grew:.0f} MB: it was parsed"
        code, answer, _ = call("POST", f"{server.url}/{APP}", fal_input(prompt="a, b: [c] {d} " * 20_000))
        assert code == 200, answer
    finally:
        server.stop_all()
