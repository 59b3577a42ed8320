"""TLS and bearer tokens for the clients: the other side of ``chunkd --tls_cert`` and
``chunkd --auth_tokens``.

- TLS (``tls_ca=`` the CA file that signs the server's certificate, or ``tls=True`` for the
  system's roots) applies to TCP addresses; ``unix:`` sockets stay plaintext, as chunkd serves
  them. ``tls_cert=``/``tls_key=`` are the client's certificate for servers that require one
  (``--tls_client_ca``); ``tls_server_name=`` overrides the name the certificate must hold.
- ``token=`` (default: the ``CHUNKD_TOKEN`` environment variable) goes with every call as
  ``authorization: Bearer TOKEN`` metadata, added by the C++ client's channel
  (client/credentials.h), so the lease keeper's background calls carry it too.

The files are read here, once, so that a wrong path fails at construction and a pickled client
carries the certificates themselves; the native client takes the PEM text.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["Security"]

TOKEN_ENV = "CHUNKD_TOKEN"


PemSource = str | os.PathLike[str] | bytes


def _read(source: PemSource, what: str) -> bytes:
    """PEM bytes, or the contents of the PEM file at a path."""
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), "bytes"
    else:
        name = repr(os.fspath(source))
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"chunkd: cannot read {what} {name}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"chunkd: {what} {name} is not PEM")
    return data


@dataclass(frozen=True)
class Security:
    """What a client presents and checks; made by :meth:`create` from the clients' arguments."""

    tls: bool = False
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None
    token: str | None = None

    @classmethod
    def create(
        cls,
        *,
        tls_ca: PemSource | None = None,
        tls: bool = False,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
    ) -> Security:
        """Reads the files now, so a wrong path fails at construction (``ValueError``). The
        PEM arguments take a path or the PEM bytes themselves."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError(
                "chunkd: a client certificate needs its key: give tls_cert and tls_key"
            )
        use_tls = bool(tls or tls_ca is not None)
        if not use_tls and (tls_cert is not None or tls_server_name):
            raise ValueError(
                "chunkd: tls_cert, tls_key and tls_server_name need tls_ca= (or tls=True)"
            )
        if token is None:  # "" sends no token, whatever the environment says
            token = os.environ.get(TOKEN_ENV, "").strip()
        token = token or None
        if token is not None and any(not 0x21 <= ord(ch) <= 0x7E for ch in token):
            raise ValueError("chunkd: the token must be printable ASCII without blanks")
        return cls(
            tls=use_tls,
            root_certificates=_read(tls_ca, "CA file") if tls_ca is not None else None,
            certificate_chain=_read(tls_cert, "client certificate") if tls_cert else None,
            private_key=_read(tls_key, "client key") if tls_key else None,
            server_name=tls_server_name or None,
            token=token,
        )

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of the clients that make this again (PEM bytes, not paths: what a
        pickled client carries to another process)."""
        return {
            "tls_ca": self.root_certificates,
            "tls": self.tls,
            "tls_cert": self.certificate_chain,
            "tls_key": self.private_key,
            "tls_server_name": self.server_name,
            "token": self.token or "",  # "": no token, not $CHUNKD_TOKEN of that process
        }

    def __repr__(self) -> str:  # never show the token
        return f"Security(tls={self.tls}, token={'set' if self.token else None})"

    def native(self) -> dict[str, Any]:
        """The native client's arguments (chunkd._native.Client): PEM text, "" where unset."""
        return {
            "tls_ca": (self.root_certificates or b"").decode("ascii", "replace"),
            "tls": self.tls,
            "tls_cert": (self.certificate_chain or b"").decode("ascii", "replace"),
            "tls_key": (self.private_key or b"").decode("ascii", "replace"),
            "tls_server_name": self.server_name or "",
            "token": self.token or "",
        }
