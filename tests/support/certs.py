"""A throwaway CA and a server certificate it signs, as PEM files, for tests of
``imc serve --tls-cert --tls-key`` (the harness's TLS registry makes its own the same way)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    cert_dir: Path
    """The CA as skopeo's ``--src-cert-dir`` wants it: a directory with ``ca.crt``."""


def issue(workdir: Path, *names: str) -> Certs:
    """A new CA, and a certificate for ``names`` (default: 127.0.0.1 and localhost)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert(*(names or ("127.0.0.1", "localhost")))
    certs = Certs(workdir / "ca.pem", workdir / "server.pem", workdir / "server-key.pem", workdir / "certs.d")
    ca.cert_pem.write_to_path(str(certs.ca))
    leaf.private_key_pem.write_to_path(str(certs.key))
    for i, pem in enumerate(leaf.cert_chain_pems):
        pem.write_to_path(str(certs.cert), append=i > 0)
    certs.cert_dir.mkdir()
    ca.cert_pem.write_to_path(str(certs.cert_dir / "ca.crt"))
    return certs
