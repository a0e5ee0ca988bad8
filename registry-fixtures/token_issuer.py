#!/usr/bin/env python3
"""A token server that signs JWTs the way registry:2 (distribution 2.8) verifies them.

It lets the tests exercise real bearer-token auth against a real registry, and
counts what it issued (``GET /stats``) so tests can assert a client's token
caching and refresh behaviour.

    python registry-fixtures/token_issuer.py --listen 127.0.0.1:PORT --key KEY.pem \\
        --cert CERT.pem --users htpasswd-or-json --issuer imc-test-issuer \\
        --service imc-test-registry --expires-in 300

Endpoints:
  GET /token?service=S&scope=repository:NAME:pull,push[&scope=...]
      HTTP Basic credentials required (401 otherwise); grants exactly the
      requested scopes.  Answers {"token","access_token","expires_in","issued_at"}.
  GET /stats          {"issued": N, "denied": N, "by_scope": {scope: N}}
                      (a token without scope counts under "" in by_scope)
  POST /stats/reset   zeroes the counters.

Distribution 2.8 finds the verification key from the JWT header ``kid``: the
libtrust key ID of a public key in ``auth.token.rootcertbundle``; ``aud`` must
be a single string there, and it allows 60 s of leeway on ``exp`` and ``nbf``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import secrets
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def libtrust_key_id(public_key: Any) -> str:
    """The libtrust key ID distribution uses to look up trusted keys.

    SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits, base32 without
    padding, in 4-character groups joined by ':'.
    """
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i:i + 4] for i in range(0, len(encoded), 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def sign_jwt(private_key: Any, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """Compact JWS over ``claims``; RS256 for RSA keys, ES256 (raw r||s) for P-256 keys."""
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + _b64url(json.dumps(claims, separators=(",", ":")).encode())).encode()
    if isinstance(private_key, rsa.RSAPrivateKey):
        signature = private_key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(private_key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing_input.decode() + "." + _b64url(signature)


def parse_scope(scope: str) -> dict[str, Any]:
    """``type:name:actions`` into a claim entry; the name may itself contain ':'."""
    rtype, _, rest = scope.partition(":")
    name, _, actions = rest.rpartition(":")
    if not rtype or not name:
        raise ValueError(f"malformed scope {scope!r}")
    return {"type": rtype, "name": name, "actions": [a for a in actions.split(",") if a]}


class UserDB:
    """Credentials from an htpasswd file (bcrypt) or a JSON ``{"user": "password"}`` map."""

    def __init__(self, path: Path) -> None:
        text = path.read_text()
        self.plain: dict[str, str] = {}
        self.hashed: dict[str, bytes] = {}
        if text.lstrip().startswith("{"):
            self.plain = json.loads(text)
        else:
            for line in text.splitlines():
                user, sep, pw_hash = line.strip().partition(":")
                if sep:
                    self.hashed[user] = pw_hash.encode()

    def check(self, user: str, password: str) -> bool:
        """True when the pair is valid."""
        if user in self.plain:
            return secrets.compare_digest(self.plain[user], password)
        if user in self.hashed:
            return bcrypt.checkpw(password.encode(), self.hashed[user])
        return False


class TokenIssuer:
    """Issues tokens and keeps counters; shared by the handler threads."""

    def __init__(self, key_path: Path, cert_path: Path, users: UserDB, issuer: str, service: str, expires_in: int) -> None:
        self.key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if libtrust_key_id(cert.public_key()) != libtrust_key_id(self.key.public_key()):
            raise SystemExit(f"{cert_path} does not hold the public half of {key_path}")
        self.kid = libtrust_key_id(self.key.public_key())
        self.alg = "RS256" if isinstance(self.key, rsa.RSAPrivateKey) else "ES256"
        self.users = users
        self.issuer = issuer
        self.service = service
        self.expires_in = expires_in
        self.lock = threading.Lock()
        self.issued = 0
        self.denied = 0
        self.by_scope: dict[str, int] = {}

    def issue(self, subject: str, scopes: list[str]) -> dict[str, Any]:
        """Sign a token granting exactly ``scopes`` and count it."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": [parse_scope(s) for s in scopes],
        }
        token = sign_jwt(self.key, {"typ": "JWT", "alg": self.alg, "kid": self.kid}, claims)
        with self.lock:
            self.issued += 1
            for scope in scopes or [""]:
                self.by_scope[scope] = self.by_scope.get(scope, 0) + 1
        issued_at = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"token": token, "access_token": token, "expires_in": self.expires_in, "issued_at": issued_at}

    def stats(self) -> dict[str, Any]:
        """Snapshot of the counters."""
        with self.lock:
            return {"issued": self.issued, "denied": self.denied, "by_scope": dict(self.by_scope)}

    def reset(self) -> None:
        """Zero the counters."""
        with self.lock:
            self.issued = self.denied = 0
            self.by_scope.clear()


class Handler(BaseHTTPRequestHandler):
    """HTTP front of :class:`TokenIssuer`."""

    server: IssuerServer
    protocol_version = "HTTP/1.1"

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _credentials(self) -> tuple[str, str] | None:
        header = self.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None
        try:
            user, sep, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return (user, password) if sep else None

    def do_GET(self) -> None:
        """/token and /stats."""
        url = urlsplit(self.path)
        issuer = self.server.issuer
        if url.path == "/stats":
            self._send_json(200, issuer.stats())
            return
        if url.path != "/token":
            self._send_json(404, {"error": "not found"})
            return
        query = parse_qs(url.query)
        service = query.get("service", [issuer.service])[0]
        if service != issuer.service:
            self._send_json(400, {"error": f"unknown service {service!r}"})
            return
        creds = self._credentials()
        if creds is None or not issuer.users.check(*creds):
            with issuer.lock:
                issuer.denied += 1
            self._send_json(401, {"error": "invalid credentials"}, {"WWW-Authenticate": f'Basic realm="{issuer.issuer}"'})
            return
        # Several scopes may come as repeated parameters or space-separated in one.
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        try:
            answer = issuer.issue(creds[0], scopes)
        except ValueError as exc:
            self._send_json(400, {"error": str(exc)})
            return
        self._send_json(200, answer)

    def do_POST(self) -> None:
        """/stats/reset."""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if urlsplit(self.path).path == "/stats/reset":
            self.server.issuer.reset()
            self._send_json(200, self.server.issuer.stats())
        else:
            self._send_json(404, {"error": "not found"})


class IssuerServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying the issuer for its handlers."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], issuer: TokenIssuer) -> None:
        super().__init__(address, Handler)
        self.issuer = issuer


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="127.0.0.1:PORT")
    parser.add_argument("--key", required=True, type=Path, help="PEM private key (RSA or P-256)")
    parser.add_argument("--cert", required=True, type=Path, help="PEM certificate of that key (the registry's rootcertbundle)")
    parser.add_argument("--users", required=True, type=Path, help="htpasswd (bcrypt) or JSON {user: password}")
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--service", required=True)
    parser.add_argument("--expires-in", type=int, default=300)
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    issuer = TokenIssuer(args.key, args.cert, UserDB(args.users), args.issuer, args.service, args.expires_in)
    server = IssuerServer((host, int(port)), issuer)
    print(f"token issuer on http://{args.listen}/token (kid {issuer.kid})", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
