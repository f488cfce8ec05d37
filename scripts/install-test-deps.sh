#!/usr/bin/env bash
# Install the system packages the test suite uses, if they are missing (Debian/Ubuntu).
# Idempotent; runs apt-get only when something is missing; as root, or through sudo.
set -euo pipefail

declare -A package_of=(
  [setpriv]=util-linux          # run a test as the user nobody
  [mount]=mount                 # a small tmpfs for the disk-full test
  [mkfs.xfs]=xfsprogs           # an XFS image with reflinks for the snapshot tests
  [clamd]=clamav-daemon         # a real clamd for the ClamAV engine (started by the tests)
  [sigtool]=clamav              # builds the tests' one-signature database
  [clamdscan]=clamdscan         # the peer in bench/clamav_throughput.py
  [systemd-analyze]=systemd     # verifies the units and their exposure score
  [promtool]=prometheus         # checks the alert rules and the dashboard's PromQL
  [deb-systemd-helper]=init-system-helpers   # the .deb's postinst enables the unit with it
)
missing=()
for binary in "${!package_of[@]}"; do
  command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ] || missing+=("${package_of[$binary]}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
# packaging/build-deb.sh builds the package's venv with the system's interpreter.
[ ! -x /usr/bin/python3 ] || /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-test-deps: need root or sudo for: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "install-test-deps: installing ${missing[*]}"
$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
# Start no service while installing (clamd and freshclam would; the tests start their
# own clamd with a one-signature database and never download signatures).
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod +x "$policy"
  trap '$sudo rm -f "$policy"' EXIT
fi
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
