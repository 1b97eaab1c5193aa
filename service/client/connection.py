"""How a client reaches a server: address, deadline, TLS, client certificate and bearer token.

One :class:`Connection` describes it for every caller (``Client``, ``AsyncClient``, the
health check, annotation and evaluation), and :func:`channel_credentials` is the one
place TLS credentials are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

__all__ = ["Connection", "channel_credentials"]


def channel_credentials(
    *,
    tls: bool = False,
    root_certificates: bytes | None = None,
    client_certificate: tuple[bytes, bytes] | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials for a channel, or None for plaintext.

    TLS is on when ``tls`` is true or certificates are given. Without
    ``root_certificates`` the server is verified against gRPC's default roots (those of
    ``GRPC_DEFAULT_SSL_ROOTS_FILE_PATH`` when set, else the public roots gRPC ships).

    Args:
        tls: use TLS even without certificates of our own.
        root_certificates: PEM roots that signed the server's certificate.
        client_certificate: ``(certificate_chain, private_key)`` PEM bytes presented to a
            server that requires mutual TLS.
    """
    if not (tls or root_certificates is not None or client_certificate is not None):
        return None
    chain, key = client_certificate if client_certificate is not None else (None, None)
    return grpc.ssl_channel_credentials(root_certificates, private_key=key, certificate_chain=chain)


@dataclass(frozen=True)
class Connection:
    """Everything needed to call one server.

    Attributes:
        address: ``host:port``.
        timeout: deadline of each call in seconds; None for none.
        tls: use TLS (implied by certificates).
        root_certificates: PEM roots to verify the server; None for gRPC's default roots.
        client_certificate: ``(certificate_chain, private_key)`` PEM bytes for mutual TLS.
        token: bearer token sent as ``authorization`` metadata on every call.
    """

    address: str
    timeout: float | None = 60.0
    tls: bool = False
    root_certificates: bytes | None = None
    client_certificate: tuple[bytes, bytes] | None = None
    token: str | None = None

    def __repr__(self) -> str:  # keys and tokens stay out of logs and tracebacks
        return (
            f"Connection(address={self.address!r}, timeout={self.timeout}, tls={self.uses_tls}, "
            f"client_certificate={self.client_certificate is not None}, token={self.token is not None})"
        )

    @property
    def uses_tls(self) -> bool:
        """True when calls go over TLS."""
        return self.credentials() is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        """The channel's TLS credentials, None for plaintext."""
        return channel_credentials(
            tls=self.tls,
            root_certificates=self.root_certificates,
            client_certificate=self.client_certificate,
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: the bearer token, when there is one."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        """A new synchronous channel to the server."""
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(self.address, options=options)
        return grpc.secure_channel(self.address, creds, options=options)
