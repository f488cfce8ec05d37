"""The container image and the compose trial, checked as far as they can be without docker.

The Dockerfile, compose.yaml and config/docker.yaml must agree on every path and port; the
trial config must pass `check-config` and scan through a real clamd once the container
paths are mapped to temporary directories (as the mounts would); the image's HEALTHCHECK
must follow /healthz. Where a docker daemon answers, the image is also built and run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from clamd_server import Clamd, free_port
from conftest import EICAR, ROOT

from daemon.config import load_config
from daemon.healthcheck import healthz_url

DOCKER_CONFIG = ROOT / "config" / "docker.yaml"
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), f"{self.keyword} should use the exec (JSON) form"
        return value


def _dockerfile_stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), split at FROM."""
    stages: list[list[Instruction]] = []
    logical = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        keyword, _, args = (logical + line).strip().partition(" ")
        logical = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append(Instruction(keyword.upper(), args.strip()))
    return stages


def _final_stage() -> list[Instruction]:
    return _dockerfile_stages()[-1]


def _one(stage: list[Instruction], keyword: str) -> Instruction:
    [found] = [i for i in stage if i.keyword == keyword]
    return found


def _env(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for pair in instruction.args.split():
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _mounts(service: str) -> dict[str, str]:
    """`container path → host path or volume name` of one compose service."""
    mounts = {}
    for spec in _compose()["services"][service]["volumes"]:
        source, target = spec.split(":")[:2]
        mounts[target] = source
    return mounts


# -- the image ----------------------------------------------------------------------------------

def test_both_stages_start_from_python_3_12_slim() -> None:
    stages = _dockerfile_stages()
    assert len(stages) == 2
    assert [s[0].args for s in stages] == ["python:3.12-slim AS builder", "python:3.12-slim"]


def test_final_stage_runs_as_a_fixed_non_root_user() -> None:
    stage = _final_stage()
    user = _one(stage, "USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and gid.isdigit() and int(gid) >= 1000, user
    runs = " ".join(i.args for i in stage if i.keyword == "RUN")
    assert f"--uid {uid}" in runs and f"--gid {gid}" in runs and "useradd --system" in runs
    assert f"-o scanwatch -g scanwatch -m 0750 {_one(stage, 'VOLUME').exec_form()[0]}" in runs
    # Nothing runs after USER: every later instruction is metadata.
    after = [i.keyword for i in stage[stage.index(_one(stage, "USER")):]]
    assert not {"RUN", "COPY", "ADD"} & set(after), after


def test_entrypoint_cmd_volume_and_healthcheck() -> None:
    stage = _final_stage()
    assert _one(stage, "ENTRYPOINT").exec_form() == ["scanwatch"]
    cmd = _one(stage, "CMD").exec_form()
    assert cmd == ["run", "--config", "/etc/scanwatch/scanwatch.yaml"]
    env = _env(stage)
    assert env["SCANWATCH_CONFIG"] == cmd[2]  # the healthcheck and `docker exec ... status` read it
    assert env["PATH"].startswith("/opt/scanwatch/bin:")
    assert _one(stage, "VOLUME").exec_form() == ["/var/lib/scanwatch"]
    health = _one(stage, "HEALTHCHECK").args
    assert health.endswith('CMD ["python", "-m", "daemon.healthcheck"]'), health


def test_the_image_copies_no_secrets() -> None:
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*"  # an allowlist: a stray .env or key file never reaches the builder
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "daemon"}
    builder, final = _dockerfile_stages()
    for stage in (builder, final):
        assert not [i for i in stage if i.keyword == "ADD"]  # ADD may fetch URLs and unpack archives
        for instruction in stage:
            if instruction.keyword in ("ENV", "ARG", "LABEL"):
                assert not any(word in instruction.args.upper() for word in SECRET_WORDS), instruction
    copied = [i.args.split() for i in builder if i.keyword == "COPY"]
    assert {src for *sources, _ in copied for src in sources} == allowed
    assert [i.args for i in final if i.keyword == "COPY"] == ["--from=builder /opt/scanwatch /opt/scanwatch"]


def test_the_build_context_holds_only_the_package() -> None:
    context = [p for p in (ROOT / "daemon").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"]
    suffixes = {p.suffix for p in context}
    assert suffixes <= {".py", ".yar", ".typed"}, suffixes


# -- compose.yaml and config/docker.yaml ----------------------------------------------------------

def test_compose_mounts_what_the_image_and_config_expect() -> None:
    compose = _compose()
    scanwatch, clamd = compose["services"]["scanwatch"], compose["services"]["clamd"]
    assert clamd["image"].startswith("clamav/clamav:")
    assert scanwatch["depends_on"] == {"clamd": {"condition": "service_healthy"}}
    mounts = _mounts("scanwatch")
    config_path = _one(_final_stage(), "CMD").exec_form()[2]
    assert f"./config/docker.yaml:{config_path}:ro" in scanwatch["volumes"]
    raw = yaml.safe_load(DOCKER_CONFIG.read_text())
    assert mounts[raw["state_dir"]] == "./var/docker/state"
    assert raw["state_dir"] == _one(_final_stage(), "VOLUME").exec_form()[0]
    for watch in raw["watches"]:
        for key in ("source", "clean", "quarantine", "failed"):
            host = mounts.get(watch[key], "")
            assert host.startswith("./var/docker/"), f"{key} {watch[key]}: no bind mount under ./var/docker"
    # clamd's socket: the image listens on /tmp/clamd.sock; its /tmp is the shared volume.
    socket = PurePosixPath(raw["engines"]["clam"]["socket"])
    assert raw["engines"]["clam"]["type"] == "clamav" and socket.name == "clamd.sock"
    volume = mounts[str(socket.parent)]
    assert volume in compose["volumes"] and _mounts("clamd")["/tmp"] == volume
    assert raw["engines"]["clam"]["mode"] == "stream"  # clamd cannot see our files by path


def test_docker_stops_scanwatch_only_after_it_could_drain(tmp_path: Path) -> None:
    grace = _compose()["services"]["scanwatch"]["stop_grace_period"]
    assert grace.endswith("s")
    assert int(grace[:-1]) >= load_config(_mapped_config(tmp_path)).shutdown_timeout + 10


def test_metrics_port_is_exposed_and_published_on_loopback_only() -> None:
    raw = yaml.safe_load(DOCKER_CONFIG.read_text())
    port = raw["metrics"]["listen"].rpartition(":")[2]
    assert _one(_final_stage(), "EXPOSE").args == port
    assert _compose()["services"]["scanwatch"]["ports"] == [f"127.0.0.1:{port}:{port}"]


def _mapped_config(tmp_path: Path, *, make_sources: bool = True, listen: str | None = None) -> Path:
    """config/docker.yaml with each compose mount replaced by a directory under tmp_path."""
    text = DOCKER_CONFIG.read_text()
    for target in sorted(_mounts("scanwatch"), key=len, reverse=True):
        if target.startswith("/etc/scanwatch"):
            continue
        host = tmp_path / "mounts" / target.strip("/").replace("/", "_")
        if make_sources:
            host.mkdir(parents=True, exist_ok=True)
        text = text.replace(target, str(host))
    if listen:
        text = text.replace("0.0.0.0:9477", listen)
    path = tmp_path / "scanwatch.yaml"
    path.write_text(text)
    return path


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "check-config", "--config", str(path)],
                          capture_output=True, text=True, cwd=ROOT)


def test_docker_config_passes_check_config_where_its_mounts_exist(tmp_path: Path) -> None:
    path = _mapped_config(tmp_path)
    config = load_config(path)
    paths = [str(config.state_dir), str(config.engines["clam"].socket)]  # type: ignore[union-attr]
    paths += [p for w in config.watches for p in (w.source, *w.destinations.values())]
    assert all(p.startswith(str(tmp_path)) for p in paths), paths  # every path was a mount
    result = _check_config(path)
    assert result.returncode == 0, result.stderr
    assert "engine clam: clamav" in result.stdout


def test_docker_config_fails_check_config_without_the_drop_folder(tmp_path: Path) -> None:
    result = _check_config(_mapped_config(tmp_path, make_sources=False))
    assert result.returncode == 2
    assert "watches[0].source: directory" in result.stderr and "does not exist" in result.stderr


# -- the trial, run without docker ------------------------------------------------------------------

def _healthcheck(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.healthcheck"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "SCANWATCH_CONFIG": str(config)}, timeout=30)


def test_docker_config_scans_through_clamd_and_healthcheck_follows_healthz(
        tmp_path: Path, clamd: Clamd, daemon_factory) -> None:
    port = free_port()
    config = _mapped_config(tmp_path, listen=f"127.0.0.1:{port}")
    loaded = load_config(config)
    watch = loaded.watches[0]
    socket = loaded.engines["clam"].socket  # type: ignore[union-attr]
    socket.symlink_to(clamd.socket)  # the shared volume: compose starts us once clamd is healthy
    daemon = daemon_factory(config)
    daemon.wait_started()
    (Path(watch.source) / "hello.txt").write_bytes(b"hello")
    (Path(watch.source) / "eicar.com").write_bytes(EICAR)
    daemon.wait_for(lambda: len(daemon.named("file.moved")) >= 2, what="two files moved")
    assert (Path(watch.clean) / "hello.txt").read_bytes() == b"hello"
    sidecar = json.loads((Path(watch.quarantine) / "eicar.com.scanwatch.json").read_text())
    assert sidecar["threats"] == [clamd.signature] and sidecar["engine"] == "clam"
    ready = _healthcheck(config)
    assert ready.returncode == 0 and json.loads(ready.stdout) == {"ready": True, "reasons": []}
    assert daemon.stop() == 0
    gone = _healthcheck(config)
    assert gone.returncode == 1 and "did not answer" in gone.stdout


def test_healthcheck_fails_while_clamd_is_down(tmp_path: Path, daemon_factory) -> None:
    config = _mapped_config(tmp_path, listen=f"127.0.0.1:{free_port()}")  # nothing on the socket
    daemon = daemon_factory(config)
    daemon.wait_started()
    down = _healthcheck(config)
    assert daemon.stop() == 0
    assert down.returncode == 1 and "unready: engine clam down" in down.stdout, down.stdout
    assert "cannot reach clamd" in down.stdout


def test_an_engine_down_at_startup_is_ready_once_it_scans(tmp_path: Path, clamd: Clamd,
                                                          daemon_factory) -> None:
    config = _mapped_config(tmp_path, listen=f"127.0.0.1:{free_port()}")
    loaded = load_config(config)
    socket = loaded.engines["clam"].socket  # type: ignore[union-attr]
    daemon = daemon_factory(config)
    daemon.wait_started()  # the startup probe finds no clamd
    socket.symlink_to(clamd.socket)
    (Path(loaded.watches[0].source) / "hello.txt").write_bytes(b"hello")
    daemon.wait_for(lambda: daemon.named("file.moved"), what="the file moved")
    ready = _healthcheck(config)
    assert daemon.stop() == 0
    assert ready.returncode == 0, ready.stdout


def test_healthcheck_passes_without_metrics_and_fails_on_a_bad_config(tmp_path: Path) -> None:
    config = _mapped_config(tmp_path)
    raw = yaml.safe_load(config.read_text())
    del raw["metrics"]
    config.write_text(yaml.safe_dump(raw))
    quiet = _healthcheck(config)
    assert quiet.returncode == 0 and "no metrics.listen" in quiet.stdout
    config.write_text("engines: {}\n")
    bad = _healthcheck(config)
    assert bad.returncode == 1 and "is not valid" in bad.stdout


@pytest.mark.parametrize(("listen", "url"), [
    ("0.0.0.0:9477", "http://127.0.0.1:9477/healthz"),
    ("[::]:9477", "http://[::1]:9477/healthz"),
    ("127.0.0.1:9000", "http://127.0.0.1:9000/healthz"),
    ("[::1]:9477", "http://[::1]:9477/healthz"),
    ("scanwatch.internal:9477", "http://scanwatch.internal:9477/healthz"),
])
def test_healthcheck_asks_a_wildcard_listener_on_loopback(listen: str, url: str) -> None:
    assert healthz_url(listen) == url


# -- the image itself, where docker runs ------------------------------------------------------------

def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _docker_answers(), reason="no docker daemon answers here: the image build "
                                                  "is checked only where one does")
def test_image_builds_and_runs_as_scanwatch(tmp_path: Path) -> None:
    tag = f"scanwatch:test-{os.getpid()}"
    build = subprocess.run(["docker", "build", "-t", tag, str(ROOT)], capture_output=True, text=True,
                           timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    try:
        def run(*args: str) -> str:
            result = subprocess.run(["docker", "run", "--rm", *args], capture_output=True, text=True,
                                    timeout=120)
            assert result.returncode == 0, result.stderr
            return result.stdout.strip()

        assert run("--entrypoint", "id", tag, "-u") == "10001"
        assert run(tag, "--version").startswith("scanwatch ")
        inspect = json.loads(subprocess.run(["docker", "image", "inspect", tag], capture_output=True,
                                            text=True, check=True).stdout)[0]["Config"]
        assert inspect["User"] == "10001:10001" and inspect["Healthcheck"]["Test"][0] == "CMD"
        mapped = _mapped_config(tmp_path)
        check = run("-v", f"{tmp_path}:{tmp_path}", tag, "check-config", "--config", str(mapped))
        assert "valid" in check
    finally:
        subprocess.run(["docker", "image", "rm", "-f", tag], capture_output=True)
