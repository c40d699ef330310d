"""Webhooks signed the way fal signs them, with the server's own ED25519 key.

fal's webhook receivers verify four headers against fal's public keys (a JWKS): ``X-Fal-Webhook-Request-Id``,
``X-Fal-Webhook-User-Id``, ``X-Fal-Webhook-Timestamp`` (Unix seconds) and ``X-Fal-Webhook-Signature``, the hex of an
ED25519 signature over ``request_id \\n user_id \\n timestamp \\n sha256_hex(raw body)``; they refuse a timestamp more
than 5 minutes away from their clock. This server signs its webhooks the same way with a key of its own, generated
once into its data folder (``webhook_signing_key.pem``, mode 0600, PKCS#8), and publishes the public half at
``/.well-known/jwks.json``: a receiver that verifies fal's webhooks verifies ours by fetching our JWKS URL instead of
fal's. The user id it sends is the key's id (the ``kid`` of the JWKS, RFC 7638's thumbprint): one per server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("sdxl_controlnet_img2img.serve")
KEY_FILE = "webhook_signing_key.pem"
HEADER_REQUEST_ID = "X-Fal-Webhook-Request-Id"
HEADER_USER_ID = "X-Fal-Webhook-User-Id"
HEADER_TIMESTAMP = "X-Fal-Webhook-Timestamp"
HEADER_SIGNATURE = "X-Fal-Webhook-Signature"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    """What is signed, as fal's webhook verification builds it."""
    return "\n".join((request_id, user_id, timestamp, hashlib.sha256(body).hexdigest())).encode("utf-8")


class Signer:
    """The server's webhook key: made once in ``folder`` (the data folder), read at every start."""

    def __init__(self, private_key):
        from cryptography.hazmat.primitives import serialization

        self._key = private_key
        self.public = private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                             serialization.PublicFormat.Raw)
        self.jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(self.public)}
        # RFC 7638: the SHA-256 of the required members, sorted, without spaces
        thumb = json.dumps(self.jwk, sort_keys=True, separators=(",", ":")).encode()
        self.kid = b64url(hashlib.sha256(thumb).digest())
        self.user_id = self.kid

    @classmethod
    def for_folder(cls, folder) -> "Signer":
        """The key in ``folder``, made (0600) when there is none; a file that is not such a key is an error naming
        it. Two processes making it at once end with the same key: the first one linked into place wins."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from ..errors import SDXLCNError

        path = Path(folder) / KEY_FILE
        if not path.exists():
            pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM,
                                                             serialization.PrivateFormat.PKCS8,
                                                             serialization.NoEncryption())
            tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, pem)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # fails when another process made it first: its key is used
                log.info("serve: made the webhook signing key %s (its public key: /.well-known/jwks.json)", path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
            log.warning("serve: %s could be read by other users; it is 0600 now", path)
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise SDXLCNError(f"{path}: not an unencrypted PEM private key ({exc}); move it away and a new webhook "
                              "signing key is made at the next start") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SDXLCNError(f"{path}: not an ED25519 key; move it away and a new one is made at the next start")
        return cls(key)

    def jwks(self) -> dict:
        """The public key as a JSON Web Key Set, as fal publishes its own."""
        return {"keys": [{**self.jwk, "kid": self.kid, "use": "sig", "alg": "EdDSA"}]}

    def headers(self, request_id: str, body: bytes, now: float | None = None) -> dict:
        """fal's four webhook headers for one delivery of ``body`` (the exact bytes sent)."""
        timestamp = str(int(time.time() if now is None else now))
        signature = self._key.sign(message(request_id, self.user_id, timestamp, body)).hex()
        return {HEADER_REQUEST_ID: request_id, HEADER_USER_ID: self.user_id, HEADER_TIMESTAMP: timestamp,
                HEADER_SIGNATURE: signature}
