#!/usr/bin/env bash
# Build scanwatch_<version>_<arch>.deb with dpkg-deb; print its path.
#   packaging/build-deb.sh [OUTDIR]       # OUTDIR defaults to ./dist
# Needs: dpkg-deb, fakeroot (or root), python3 (>= 3.11) with venv (python3-venv), and
# PyPI or a wheel cache: the program and its runtime dependencies are installed into a
# virtualenv built for /opt/scanwatch inside a staging root, then every path that names
# the staging root is rewritten to /opt/scanwatch (the build fails if one is left).
# Environment: PYTHON (default /usr/bin/python3: the interpreter the package will run
# on), SCANWATCH_DEB_COMPRESSION (dpkg-deb -Z: xz by default; gzip builds faster).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
outdir=$(mkdir -p "${1:-$root/dist}" && cd "${1:-$root/dist}" && pwd)
python=$(readlink -f "${PYTHON:-/usr/bin/python3}")
compression=${SCANWATCH_DEB_COMPRESSION:-xz}
prefix=/opt/scanwatch

"$python" -c 'import sys; assert sys.version_info >= (3, 11), "scanwatch needs Python >= 3.11"'
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
version=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
          "$root/pyproject.toml")
arch=$(dpkg --print-architecture)

work=$(mktemp -d "${TMPDIR:-/tmp}/scanwatch-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
stage=$work/root
venv=$stage$prefix

# 1. The program and its dependencies in a venv. A clean copy of the sources, so the
#    build leaves no build/ or *.egg-info in the checkout.
mkdir -p "$work/src"
tar -C "$root" --exclude=__pycache__ -cf - pyproject.toml README.md daemon | tar -C "$work/src" -xf -
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile "$work/src" >&2
# pip and setuptools built the venv; the package ships neither (dpkg owns /opt/scanwatch).
"$venv/bin/python" -m pip uninstall --quiet --yes pip setuptools >/dev/null 2>&1
find "$venv" -name __pycache__ -type d -prune -exec rm -rf {} +

# 2. The venv moved to its real place: scripts' shebangs, activate scripts, pyvenv.cfg.
grep -rlF --null "$venv" "$venv/bin" "$venv/pyvenv.cfg" | xargs -0 -r sed -i "s|$venv|$prefix|g"
if grep -rlF "$venv" "$venv" >&2; then
    echo "build-deb: the files above still name the staging root $venv" >&2
    exit 1
fi
# Bytecode now, as files of the package: the daemon cannot write it at run time
# (ProtectSystem=strict); -s/-p record /opt/scanwatch paths in tracebacks.
"$venv/bin/python" -m compileall -q -f -j 0 -s "$stage" -p / "$venv/lib" >/dev/null

# 3. The rest of the system layout.
install -D -m 0755 -d "$stage/usr/bin"
ln -s "$prefix/bin/scanwatch" "$stage/usr/bin/scanwatch"
install -D -m 0644 "$root/systemd/scanwatch.service" "$stage/usr/lib/systemd/system/scanwatch.service"
install -D -m 0644 "$root/systemd/scanwatch@.service" "$stage/usr/lib/systemd/system/scanwatch@.service"
install -D -m 0644 "$root/systemd/scanwatch.sysusers" "$stage/usr/lib/sysusers.d/scanwatch.conf"
install -D -m 0644 "$root/systemd/scanwatch.tmpfiles" "$stage/usr/lib/tmpfiles.d/scanwatch.conf"
install -D -m 0644 "$here/scanwatch.yaml" "$stage/etc/scanwatch/scanwatch.yaml"
doc=$stage/usr/share/doc/scanwatch
install -D -m 0644 "$root/README.md" "$doc/README.md"
install -D -m 0644 -t "$doc/docs" "$root"/docs/*.md
install -D -m 0644 -t "$doc/examples" "$root/config/example.yaml" "$root/config/dropfolder.yaml"
install -D -m 0644 "$here/copyright" "$doc/copyright"
gzip -9nc "$root/CHANGELOG.md" > "$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"

# 4. Control files. The venv runs on exactly this interpreter (its site-packages and
#    the compiled wheels are for one Python ABI), and the wheels' manylinux tags give
#    the oldest glibc they run on; they link nothing else from the system (checked).
check_no_system_libs() {
    local so line
    while IFS= read -r -d '' so; do
        ldd "$so" > "$work/ldd" 2>&1 || { cat "$work/ldd" >&2; exit 1; }
        while IFS= read -r line; do
            case "$line" in
                *"not found"*) echo "build-deb: $so: $line" >&2; exit 1 ;;
                *"=> $venv/"*|*linux-vdso*|*ld-linux*) ;;
                *"=> "*/libc.so.*|*"=> "*/libm.so.*|*"=> "*/libpthread.so.*|*"=> "*/libdl.so.*) ;;
                *"=> "*/librt.so.*|*"=> "*/libgcc_s.so.*) ;;
                *"=> "*) echo "build-deb: $so needs a system library: $line" >&2; exit 1 ;;
            esac
        done < "$work/ldd"
    done < <(find "$venv" -name '*.so*' -type f -print0)
}
check_no_system_libs
glibc=$(cat "$venv"/lib/python*/site-packages/*.dist-info/WHEEL | "$python" -c '
import re, sys
legacy = {"1": (2, 5), "2010": (2, 12), "2014": (2, 17)}
need = (2, 5)
for wheel in sys.stdin.read().split("Wheel-Version:")[1:]:
    found = [(int(m[1]), int(m[2])) if m[1] else legacy[m[3]]
             for m in re.finditer(r"^Tag: .*-manylinux(?:_(\d+)_(\d+)|(1|2010|2014))_", wheel, re.M)]
    if found:  # a wheel runs where any of its tags does
        need = max(need, min(found))
print(f"{need[0]}.{need[1]}")')
depends="python$pyver, libc6 (>= $glibc)"
mkdir -p "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@SIZE@|$size|" -e "s|@DEPENDS@|$depends|" \
    "$here/debian/control.in" > "$stage/DEBIAN/control"
install -m 0644 "$here/debian/conffiles" "$stage/DEBIAN/conffiles"
install -m 0755 "$here/debian/postinst" "$here/debian/prerm" "$here/debian/postrm" "$stage/DEBIAN/"
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 md5sum) > "$stage/DEBIAN/md5sums"
chmod -R u+rwX,go+rX,go-w "$stage"

deb=$outdir/scanwatch_${version}_${arch}.deb
fakeroot=""
[ "$(id -u)" -eq 0 ] || fakeroot=fakeroot
$fakeroot dpkg-deb --root-owner-group -Z"$compression" --build "$stage" "$deb" >&2
echo "$deb"
