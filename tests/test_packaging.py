"""The Debian package: packaging/build-deb.sh builds it, dpkg installs, configures and purges it.

The package goes into this machine (CI runs the suite as root on a throwaway Debian 12 machine),
and comes out again whatever happens: the module's fixture purges it, and deletes the scanwatch
user and group if it created them. A machine where scanwatch is already installed is left alone.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

CONFIG = "/etc/scanwatch/scanwatch.yaml"
UNIT = "/usr/lib/systemd/system/scanwatch.service"
WANTS = Path("/etc/systemd/system/multi-user.target.wants/scanwatch.service")
INSTALLED_PATHS = [UNIT, "/usr/lib/systemd/system/scanwatch@.service", "/usr/lib/sysusers.d/scanwatch.conf",
                   "/usr/lib/tmpfiles.d/scanwatch.conf", CONFIG, "/usr/bin/scanwatch",
                   "/opt/scanwatch/bin/scanwatch", "/usr/share/doc/scanwatch/copyright",
                   "/usr/share/doc/scanwatch/changelog.gz", "/usr/share/doc/scanwatch/docs/systemd.md"]


def _why_not() -> str | None:
    """Why this machine cannot take the package for a test, or None."""
    if os.geteuid() != 0:
        return "installs a .deb into this machine: needs root"
    for tool in ("dpkg-deb", "dpkg", "dpkg-query"):
        if shutil.which(tool) is None:
            return f"{tool} is absent (not a Debian machine)"
    probe = "import sys, venv, ensurepip; assert sys.version_info >= (3, 11)"
    if subprocess.run(["/usr/bin/python3", "-c", probe], capture_output=True).returncode != 0:
        return "needs /usr/bin/python3 >= 3.11 with venv (scripts/install-test-deps.sh installs python3-venv)"
    ours = ("/opt/scanwatch", "/etc/scanwatch", "/usr/bin/scanwatch")
    if _installed() or any(Path(p).exists() for p in ours):
        return "scanwatch is already on this machine: the test would change it"
    return None


def _installed() -> bool:
    status = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "scanwatch"],
                            capture_output=True, text=True)
    return status.returncode == 0 and status.stdout.strip() not in ("", "un")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"{argv}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _purge(user_existed: bool, srv_existed: bool) -> None:
    """Leave the machine as it was: no package, no user or folders the test made."""
    _run("dpkg", "--purge", "scanwatch", check=False)
    if not user_existed and _user_exists("scanwatch"):
        _run("userdel", "scanwatch", check=False)
        _run("groupdel", "scanwatch", check=False)
    if not srv_existed:
        shutil.rmtree("/srv/scanwatch", ignore_errors=True)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package, built as the README says (gzip: faster to build than xz, same contents)."""
    out = tmp_path_factory.mktemp("deb")
    env = {**os.environ, "SCANWATCH_DEB_COMPRESSION": "gzip"}
    built = subprocess.run([str(ROOT / "packaging" / "build-deb.sh"), str(out)], capture_output=True,
                           text=True, env=env, timeout=900)
    assert built.returncode == 0, built.stderr[-5000:]
    path = Path(built.stdout.strip().splitlines()[-1])
    assert path.parent == out and path.name.startswith("scanwatch_") and path.name.endswith(".deb")
    return path


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[Path]:
    user_existed, srv_existed = _user_exists("scanwatch"), Path("/srv/scanwatch").exists()
    try:
        _run("dpkg", "-i", str(deb))
        yield deb
    finally:
        _purge(user_existed, srv_existed)


def test_the_deb_is_named_for_the_version_and_declares_its_interpreter(deb: Path) -> None:
    fields = _run("dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture", "Depends").stdout
    assert "Package: scanwatch" in fields
    assert f"{deb.name.split('_')[1]}" in fields
    assert "Depends: python3.1" in fields and "libc6 (>= 2." in fields
    listing = _run("dpkg-deb", "-c", str(deb)).stdout
    assert "./usr/bin/scanwatch -> /opt/scanwatch/bin/scanwatch" in listing


def test_installed_program_checks_the_shipped_config(installed: Path) -> None:
    _run("/usr/bin/scanwatch", "check-config", "--config", CONFIG)
    # The daemon's own user reads it too (0640 root:scanwatch, in /etc/scanwatch 0750).
    as_daemon = ["setpriv", "--reuid=scanwatch", "--regid=scanwatch", "--init-groups"]
    _run(*as_daemon, "/usr/bin/scanwatch", "check-config", "--config", CONFIG)
    config = os.stat(CONFIG)
    assert stat.S_IMODE(config.st_mode) == 0o640 and config.st_gid == pwd.getpwnam("scanwatch").pw_gid


def test_installed_venv_lives_at_opt_scanwatch_and_scans_with_yara(installed: Path, tmp_path: Path) -> None:
    prefix = _run("/opt/scanwatch/bin/python", "-c", "import sys, yara; print(sys.prefix)").stdout.strip()
    assert prefix == "/opt/scanwatch"
    sample = tmp_path / "eicar.com"
    shutil.copyfile(ROOT / "samples" / "eicar.com", sample)
    scanned = _run("/usr/bin/scanwatch", "scan", "--config", CONFIG, str(sample), check=False)
    assert scanned.returncode == 1, scanned.stdout + scanned.stderr  # 1: infected


def test_dpkg_lists_the_units_snippets_and_conffile(installed: Path) -> None:
    listed = set(_run("dpkg", "-L", "scanwatch").stdout.splitlines())
    assert set(INSTALLED_PATHS) <= listed
    conffiles = _run("dpkg-query", "-W", "-f=${Conffiles}", "scanwatch").stdout
    assert CONFIG in conffiles


def test_postinst_made_the_user_and_folders(installed: Path) -> None:
    user = pwd.getpwnam("scanwatch")
    assert user.pw_shell == "/usr/sbin/nologin"
    drop = os.stat("/srv/scanwatch/drop")
    assert stat.S_IMODE(drop.st_mode) == 0o2770 and drop.st_uid == user.pw_uid
    for folder in ("clean", "quarantine", "failed"):
        assert os.stat(f"/srv/scanwatch/{folder}").st_uid == user.pw_uid


def test_service_is_enabled_but_not_started(installed: Path) -> None:
    assert WANTS.is_symlink() and WANTS.resolve() == Path(UNIT)
    if shutil.which("systemctl"):
        assert _run("systemctl", "is-enabled", "scanwatch.service", check=False).stdout.strip() == "enabled"
    if Path("/run/systemd/system").is_dir():
        assert _run("systemctl", "is-active", "scanwatch.service", check=False).stdout.strip() != "active"


def test_remove_disables_reinstall_enables_and_purge_cleans_up(installed: Path) -> None:
    _run("dpkg", "-r", "scanwatch")
    assert not Path("/usr/bin/scanwatch").exists() and not Path("/opt/scanwatch/bin").exists()
    assert not WANTS.is_symlink()
    assert Path(CONFIG).exists()  # a conffile outlives `remove`
    _run("dpkg", "-i", str(installed))  # installed again: enabled again, as a first install is
    assert WANTS.is_symlink()
    _run("dpkg", "-r", "scanwatch")
    _run("dpkg", "--purge", "scanwatch")
    assert not _installed()
    assert not Path("/etc/scanwatch").exists() and not Path("/var/lib/scanwatch").exists()
    assert not Path("/srv/scanwatch").exists()  # its folders were empty
