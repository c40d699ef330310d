"""Webhooks signed as fal signs them (issue 33, item 5): a receiver on 127.0.0.1 verifies a delivery the way fal's
webhook docs say to verify fal's own, with our JWKS URL in place of fal's and a standard ED25519 implementation
(``cryptography``'s), never this pack's code:

1. fetch the JWKS (``/.well-known/jwks.json``, no key) and keep its OKP/Ed25519 keys;
2. read ``X-Fal-Webhook-Request-Id``, ``-User-Id``, ``-Timestamp``, ``-Signature`` from the request;
3. refuse a timestamp more than 5 minutes from now;
4. build the message ``request_id \\n user_id \\n timestamp \\n sha256_hex(raw body)``;
5. verify the hex signature over it with one of the keys.

The key is made once in the data folder (0600) and stays the same across a restart.
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import urllib.request

from loopback import WebhookReceiver
from test_serve import APP, Paused, call, fal_input, start


def fals_verification(jwks: dict, headers: dict, body: bytes, now: float) -> bool:
    """fal's documented webhook verification, step by step."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    keys = [k for k in jwks["keys"] if k.get("kty") == "OKP" and k.get("crv") == "Ed25519"]
    request_id, user_id = headers.get("x-fal-webhook-request-id"), headers.get("x-fal-webhook-user-id")
    timestamp, signature = headers.get("x-fal-webhook-timestamp"), headers.get("x-fal-webhook-signature")
    if not (request_id and user_id and timestamp and signature) or abs(now - int(timestamp)) > 300:
        return False
    message = "\n".join((request_id, user_id, timestamp, hashlib.sha256(body).hexdigest())).encode()
    for key in keys:
        raw = base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))
        try:
            Ed25519PublicKey.from_public_bytes(raw).verify(bytes.fromhex(signature), message)
            return True
        except InvalidSignature:
            continue
    return False


def test_a_webhook_verifies_with_the_servers_jwks_as_fal_documents(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXLCN_SERVE_ALLOW_INTERNAL_URLS", "127.0.0.1")  # the receiver is on this machine
    hook = WebhookReceiver()
    hook_url = f"{hook.url}/fal/webhook"
    server = start(tmp_path, backend=Paused())
    try:
        code, sub, _ = call("POST", f"{server.url}/{APP}?fal_webhook={urllib.request.quote(hook_url, safe='')}",
                            fal_input())
        assert code == 200, sub
        assert call("PUT", sub["cancel_url"])[0] == 202  # it ends (cancelled while waiting): its webhook goes out
        assert hook.got.wait(30), "the webhook never came"
        code, jwks, _ = call("GET", f"{server.url}/.well-known/jwks.json", key=None)  # as a receiver fetches it
        assert code == 200, jwks
    finally:
        server.stop_all()
        hook.close()
    headers, body, when = hook.received[0]
    assert json.loads(body)["request_id"] == sub["request_id"] == headers["x-fal-webhook-request-id"]
    assert fals_verification(jwks, headers, body, when)
    assert not fals_verification(jwks, headers, body.replace(b"ERROR", b"OK"), when)  # a changed body fails
    assert not fals_verification(jwks, headers, body, when + 600)  # so does a replay 10 minutes later
    key_file = tmp_path / "data" / "webhook_signing_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    server = start(tmp_path, backend=Paused())  # the same data folder: the same key
    try:
        assert call("GET", f"{server.url}/.well-known/jwks.json", key=None)[1] == jwks
    finally:
        server.stop_all()
