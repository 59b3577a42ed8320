"""TLS and bearer tokens for the clients: the other side of ``chunkd --tls_cert`` and
``chunkd --auth_tokens``.

- TLS (``tls_ca=`` the CA file that signs the server's certificate, or ``tls=True`` for the
  system's roots) applies to TCP addresses; ``unix:`` sockets stay plaintext, as chunkd serves
  them. ``tls_cert=``/``tls_key=`` are the client's certificate for servers that require one
  (``--tls_client_ca``); ``tls_server_name=`` overrides the name the certificate must hold.
- ``token=`` (default: the ``CHUNKD_TOKEN`` environment variable) goes with every call as
  ``authorization: Bearer TOKEN`` metadata, added by a channel interceptor, so the lease
  keeper's background calls carry it too.
"""

from __future__ import annotations

import functools
import os
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

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

    # -- channels ---------------------------------------------------------------------------------

    def _credentials(self, target: str) -> grpc.ChannelCredentials | None:
        if not self.tls or target.startswith(("unix:", "unix-abstract:")):
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )

    def _options(self, target: str, options: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        options = list(options)
        if self.server_name and self._credentials(target) is not None:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def channel(self, target: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        """A blocking channel to ``target``."""
        credentials = self._credentials(target)
        options = self._options(target, options)
        if credentials is None:
            channel = grpc.insecure_channel(target, options=options)
        else:
            channel = grpc.secure_channel(target, credentials, options=options)
        if self.token:
            channel = grpc.intercept_channel(channel, _TokenInterceptor(self.token))
        return channel

    def aio_channel(self, target: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        """An asyncio channel to ``target`` (belongs to the running event loop)."""
        credentials = self._credentials(target)
        options = self._options(target, options)
        interceptors = _aio_interceptors(self.token) if self.token else None
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
        return grpc.aio.secure_channel(
            target, credentials, options=options, interceptors=interceptors
        )

    def channel_factory(
        self, target: str, options: list[tuple[str, Any]]
    ) -> Callable[[], grpc.Channel]:
        """Makes blocking channels like :meth:`channel` (for the lease keepers)."""
        return functools.partial(self.channel, target, list(options))


# ------------------------------------------------------------------------------------------------
# The token, on every call


class _CallDetails(
    namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            d.method,
            d.timeout,
            [*(d.metadata or ()), self._entry],
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def _aio_details(
    d: grpc.aio.ClientCallDetails, entry: tuple[str, str]
) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(tuple(d.metadata) if d.metadata else ()), entry)
    return grpc.aio.ClientCallDetails(
        d.method, d.timeout, metadata, d.credentials, d.wait_for_ready
    )


def _aio_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    entry = ("authorization", f"Bearer {token}")

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, client_call_details, request):
            return await continuation(_aio_details(client_call_details, entry), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, client_call_details, request):
            return await continuation(_aio_details(client_call_details, entry), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
            return await continuation(_aio_details(client_call_details, entry), request_iterator)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(
            self, continuation, client_call_details, request_iterator
        ):
            return await continuation(_aio_details(client_call_details, entry), request_iterator)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
