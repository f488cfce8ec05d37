"""Keep-alive HTTP(S) connections for the lean S3 requests (daemon/s3requests.py).

stdlib `http.client`, one idle pool per scheme and host. What the wire raises leaves as the
botocore exception botocore's own transport raises for it (`EndpointConnectionError`,
`ConnectionClosedError`, `ReadTimeoutError`, ...), so the retry policy and the error boundary
(daemon/s3client.py) treat both paths alike. TLS verification uses the CA bundle botocore
would: the `ca_bundle` setting of the AWS config, else `REQUESTS_CA_BUNDLE`, else botocore's.
"""

from __future__ import annotations

import functools
import http.client
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from botocore.exceptions import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    SSLError,
)
from botocore.httpsession import create_urllib3_context, get_cert_path

__all__ = ["Body", "Pools", "ssl_context"]

# As the boto3 client's config (daemon/s3client.py, `make_client`).
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
_IDLE_KEPT = 64  # per host, as the boto3 client's pool


def ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """The TLS context botocore would verify with for `ca_bundle` (the AWS config's setting)."""
    verify = ca_bundle or os.environ.get("REQUESTS_CA_BUNDLE") or True
    where = get_cert_path(verify)
    context: ssl.SSLContext = create_urllib3_context()
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if os.path.isdir(where):
        context.load_verify_locations(capath=where)
    else:
        context.load_verify_locations(cafile=where)
    return context


class _ReadTimeout:
    """Connect within CONNECT_TIMEOUT_S, then wait up to READ_TIMEOUT_S for each read."""

    sock: socket.socket | None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        assert self.sock is not None
        self.sock.settimeout(READ_TIMEOUT_S)


class _HTTP(_ReadTimeout, http.client.HTTPConnection):
    pass


class _HTTPS(_ReadTimeout, http.client.HTTPSConnection):
    pass


class Pools:
    """Idle keep-alive connections, per scheme and host; thread-safe."""

    def __init__(self, ca_bundle: str | None) -> None:
        self._ca_bundle = ca_bundle
        self._context: ssl.SSLContext | None = None  # made for the first TLS connection
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def send(self, method: str, url: str, headers: dict[str, str],
             body: bytes | None) -> tuple[http.client.HTTPResponse, Callable[[], None]]:
        """Send one request; its response (headers read, body not) and the call that ends the
        exchange: the connection goes back to the pool if the body was read to its end."""
        scheme, _, rest = url.partition("://")
        host, _, path = rest.partition("/")
        conn = self._take(scheme, host)
        try:
            if conn.sock is None:
                _connect(conn, url)
            with wire_errors(url):
                conn.request(method, "/" + path, body=body, headers=headers)
                response = conn.getresponse()
        except BaseException:
            conn.close()
            self._drop(scheme, host)  # a peer that dropped one dropped the idle ones too
            raise
        return response, functools.partial(self._release, scheme, host, conn, response)

    def _release(self, scheme: str, host: str, conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse) -> None:
        if response.isclosed():
            self._give(scheme, host, conn)
        else:
            conn.close()

    def _take(self, scheme: str, host: str) -> http.client.HTTPConnection:
        with self._lock:
            idle = self._idle.get((scheme, host))
            if idle:
                return idle.pop()
        if scheme == "https":
            with self._lock:
                self._context = self._context or ssl_context(self._ca_bundle)
            return _HTTPS(host, timeout=CONNECT_TIMEOUT_S, context=self._context)
        return _HTTP(host, timeout=CONNECT_TIMEOUT_S)

    def _give(self, scheme: str, host: str, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault((scheme, host), [])
            if len(idle) < _IDLE_KEPT:
                idle.append(conn)
                return
        conn.close()

    def _drop(self, scheme: str, host: str) -> None:
        with self._lock:
            idle = self._idle.pop((scheme, host), [])
        for conn in idle:
            conn.close()


def _connect(conn: http.client.HTTPConnection, url: str) -> None:
    """Open the connection; what fails leaves as botocore's connection errors (safe to retry)."""
    try:
        conn.connect()
    except ssl.SSLError as exc:
        raise SSLError(endpoint_url=url, error=exc) from exc
    except TimeoutError as exc:
        raise ConnectTimeoutError(endpoint_url=url) from exc
    except OSError as exc:
        raise EndpointConnectionError(endpoint_url=url) from exc


@contextmanager
def wire_errors(url: str) -> Iterator[None]:
    """A failure once the request may have been sent: botocore's ReadTimeoutError or
    ConnectionClosedError, as its own transport raises them."""
    try:
        yield
    except TimeoutError as exc:
        raise ReadTimeoutError(endpoint_url=url) from exc
    except ssl.SSLError as exc:
        raise SSLError(endpoint_url=url, error=exc) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise ConnectionClosedError(endpoint_url=url) from exc


class Body:
    """A GET's streaming body: `read`, `close`; an early end of the stream is an error.

    http.client returns b"" when the peer closes before Content-Length bytes: every byte
    read is hashed and may be promoted (docs/integrity.md), so a short body must fail.
    """

    def __init__(self, response: http.client.HTTPResponse, done: Callable[[], None], url: str) -> None:
        self._response = response
        self._done: Callable[[], None] | None = done  # pools or closes the connection
        self._url = url
        self._expected = response.length
        self._read = 0

    def read(self, size: int | None = -1) -> bytes:
        whole = size is None or size < 0
        try:
            with wire_errors(self._url):
                chunk = self._response.read(None if whole else size)
        except BaseException:
            self.close()
            raise
        self._read += len(chunk)
        if self._expected is not None and self._read < self._expected and (whole or not chunk):
            self.close()
            raise IncompleteReadError(actual_bytes=self._read, expected_bytes=self._expected)
        if self._response.isclosed():
            self.close()
        return chunk

    def close(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done()

    def __enter__(self) -> Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
