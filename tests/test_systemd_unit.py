"""The systemd units: valid, hardened (exposure <= 2.0), and wired for notify and reload."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

UNITS = ["scanwatch.service", "scanwatch@.service"]
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze is absent (scripts/install-test-deps.sh installs it)")


def _installable_copy(unit: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's interpreter, which exists here."""
    text = (ROOT / "systemd" / unit).read_text()
    text = text.replace("ExecStart=/usr/bin/scanwatch", f"ExecStart={sys.executable} -m daemon.cli")
    copy = tmp_path / unit
    copy.write_text(text)
    return copy


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies(unit: str, tmp_path: Path) -> None:
    name = unit.replace("@.", "@instance.")
    copy = _installable_copy(unit, tmp_path)
    if name != unit:
        copy = copy.rename(tmp_path / name)
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_is_at_most_2(unit: str) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", unit],
                            capture_output=True, text=True, cwd=ROOT / "systemd")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= 2.0


@pytest.mark.parametrize("unit", UNITS)
def test_unit_wires_notify_reload_state_and_watchdog(unit: str) -> None:
    text = (ROOT / "systemd" / unit).read_text()
    for directive in ("Type=notify", "NotifyAccess=main", "ExecReload=/bin/kill -HUP $MAINPID",
                      "WatchdogSec=", "StateDirectory=scanwatch", "User=scanwatch",
                      "ReadWritePaths=/srv/scanwatch", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert directive in text, directive
    assert "PrivateNetwork=yes" not in text  # S3 and engine APIs need the network
