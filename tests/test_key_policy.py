"""The key-file and loopback rules the fal client and the server share (pipeline/key_policy.py), as each side's user
meets them: a key file the client reads is read the same by `serve --key-file`; plain http:// carries a key only to
this machine, and a `*.localhost` name (which browsers resolve, but this machine's resolver may not) counts as this
machine for a browser's Host header only, never for where the client sends a key."""

import pytest

from sdxl_controlnet_img2img.pipeline.errors import SDXLCNError
from sdxl_controlnet_img2img.pipeline.fal.key import resolve_key
from sdxl_controlnet_img2img.pipeline.fal.settings import check_endpoint_url, check_followed_url
from sdxl_controlnet_img2img.pipeline.serve.access import is_loopback
from sdxl_controlnet_img2img.pipeline.serve.cli import read_key

NOTEPAD = "\ufeff# my key\n\n  sekrit-123  \nsecond\n"


def test_a_key_file_reads_the_same_for_client_and_server(tmp_path, monkeypatch):
    for name in ("FAL_KEY", "FAL_KEY_ID", "FAL_KEY_SECRET", "SDXLCN_SERVE_KEY"):
        monkeypatch.delenv(name, raising=False)
    f = tmp_path / "key.txt"
    f.write_text(NOTEPAD, encoding="utf-8")
    assert resolve_key(key_file=f) == read_key(f) == "sekrit-123"
    f.write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(SDXLCNError, match="holds no key"):
        read_key(f)


@pytest.mark.parametrize("url, allowed", [("http://127.0.0.1:8443", True), ("http://localhost:8443", True),
                                          ("http://[::1]:8443", True), ("http://gpu-box:8443", False),
                                          ("http://app.localhost:8443", False), ("https://gpu-box:8443", True)])
def test_plain_http_carries_the_key_only_to_this_machine(url, allowed):
    """SDXLCN_FAL_URL and every URL a server sends the client on to (status, result, cancel, redirects)."""
    for check in (check_endpoint_url, check_followed_url):
        if allowed:
            check(url)
        else:
            with pytest.raises(Exception, match="clear text"):
                check(url)


@pytest.mark.parametrize("host, local", [("127.0.0.1", True), ("[::1]", True), ("localhost", True),
                                         ("app.localhost", True), ("gpu-box", False), ("127.0.0.1.nip.io", False)])
def test_a_browsers_host_header_on_this_machine(host, local):
    assert is_loopback(host) is local
