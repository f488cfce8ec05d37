"""An uploader of a shared drop folder racing the daemon: its own descriptors and inotify only.

Run by tests/test_attacks.py as a second, unprivileged uid (`setpriv --reuid=65534`);
prints one JSON line of what it did. Each mode is an attack of docs/integrity.md:

- `flip PATH MIB EICAR`: writes a file ending in EICAR and keeps its write descriptor; when
  the daemon's reads of it stop (IN_ACCESS, then silence) it overwrites the tail with
  harmless bytes (size and mtime kept) for the engine to read, and writes EICAR back when
  the daemon closes it (IN_CLOSE_NOWRITE). Again for every open, until the deadline.
- `opath PATH WAIT_FOR EICAR`: writes a harmless file and keeps only an O_PATH descriptor;
  once WAIT_FOR exists (the file promoted), reopens /proc/self/fd/N to append EICAR and
  linkat()s it back into the drop folder.
- `mapped PATH SECONDS EICAR`: writes a harmless file the size of EICAR, maps it shared and
  writable, and closes its descriptor: the mapping is all it keeps. For SECONDS it flips the
  bytes between harmless and EICAR through memory (no system call, no inotify event),
  whatever name the inode has by then; then leaves EICAR in it.
- `race PATH ATTACK SPARE EICAR`: writes a harmless 4 MiB file at PATH (its folder made
  first) and, the instant the daemon opens it (IN_OPEN), plays ATTACK: `replace` renames
  SPARE (EICAR, written beforehand) over PATH; `symlink` moves PATH's folder aside and puts
  a symlink to the folder SPARE in its place; `hardlink` links the file to SPARE, waits (up
  to 5 s) for the daemon to take PATH away, then writes EICAR through SPARE; `truncate`
  truncates it to 9 bytes through a write descriptor kept from the start (SPARE unused),
  `grow` extends it to a sparse terabyte through that descriptor.
- `strand DIR EICAR`: writes DIR/sub/a.txt and keeps its write descriptor; when the daemon
  renames it away (IN_MOVED_FROM), writes EICAR through it and removes sub/.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import select
import struct
import sys
import time

IN_ACCESS = 0x001
IN_CLOSE_NOWRITE = 0x010
IN_OPEN = 0x020
IN_MOVED_FROM = 0x040
IN_DELETE_SELF = 0x400
_HEADER = struct.Struct("iIII")
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    def __init__(self, path: str, mask: int) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if _libc.inotify_add_watch(self.fd, path.encode(), mask) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

    def events(self, timeout_s: float) -> list[tuple[int, str]]:
        """The events that arrive within `timeout_s` (empty: silence)."""
        if not select.select([self.fd], [], [], timeout_s)[0]:
            return []
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        out, offset = [], 0
        while offset < len(data):
            _, mask, _, length = _HEADER.unpack_from(data, offset)
            name = data[offset + _HEADER.size: offset + _HEADER.size + length].rstrip(b"\0").decode()
            out.append((mask, name))
            offset += _HEADER.size + length
        return out


def flip(path: str, mib: str, eicar_path: str) -> dict[str, object]:
    with open(eicar_path, "rb") as f:
        eicar = f.read()
    size = int(mib) << 20
    fd = os.open(path + ".part", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    block = b"A" * (1 << 20)
    for offset in range(0, size - len(eicar), len(block)):
        os.pwrite(fd, block[: size - len(eicar) - offset], offset)
    os.pwrite(fd, eicar, size - len(eicar))
    os.rename(path + ".part", path)
    st = os.fstat(fd)
    times = (st.st_atime_ns, st.st_mtime_ns)
    watch = Inotify(path, IN_ACCESS | IN_CLOSE_NOWRITE | IN_DELETE_SELF)
    flips = 0
    deadline = time.monotonic() + 60
    reading = False
    while time.monotonic() < deadline and os.fstat(fd).st_nlink:
        events = watch.events(0.03)
        masks = [m for m, _ in events]
        if any(m & IN_DELETE_SELF for m in masks):
            break
        if any(m & IN_ACCESS for m in masks):
            reading = True
        elif reading and not events:  # the daemon's read pass is over: flip for the engine
            os.pwrite(fd, b"h" * len(eicar), size - len(eicar))
            os.utime(fd, ns=times)
            flips += 1
            reading = False
        if any(m & IN_CLOSE_NOWRITE for m in masks):
            os.pwrite(fd, eicar, size - len(eicar))
            os.utime(fd, ns=times)
            reading = False
    return {"flips": flips}


def opath(path: str, wait_for: str, eicar_path: str) -> dict[str, object]:
    with open(eicar_path, "rb") as f:
        eicar = f.read()
    with open(path + ".part", "wb") as f:
        f.write(b"harmless bytes")
    os.rename(path + ".part", path)
    fd = os.open(path, os.O_PATH)
    inode = os.fstat(fd).st_ino
    deadline = time.monotonic() + 60
    while not os.path.exists(wait_for) and time.monotonic() < deadline:
        time.sleep(0.01)
    result: dict[str, object] = {"inode": inode}
    try:
        writer = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_APPEND)
        os.write(writer, eicar)
        os.close(writer)
        result["appended"] = True
    except OSError as exc:
        result["appended"] = exc.errno
    relinked = os.path.join(os.path.dirname(path), ".relinked")
    if _libc.linkat(_AT_FDCWD, f"/proc/self/fd/{fd}".encode(), _AT_FDCWD, relinked.encode(),
                    _AT_SYMLINK_FOLLOW) == 0:
        result["linked"] = True
    else:
        result["linked"] = ctypes.get_errno()
    return result


def mapped(path: str, seconds: str, eicar_path: str) -> dict[str, object]:
    with open(eicar_path, "rb") as f:
        eicar = f.read()
    harmless = b"h" * len(eicar)
    fd = os.open(path + ".part", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, harmless)
    inode = os.fstat(fd).st_ino
    with mmap.mmap(fd, len(eicar), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as shared:
        os.close(fd)
        os.rename(path + ".part", path)
        flips = 0
        deadline = time.monotonic() + float(seconds)
        while time.monotonic() < deadline:
            for _ in range(1000):
                shared[:] = eicar
                shared[:] = harmless
            flips += 1000
        shared[:] = eicar
        shared.flush()
    return {"inode": inode, "flips": flips}


def _names(path: str, inode: int) -> bool:
    try:
        return os.lstat(path).st_ino == inode
    except FileNotFoundError:
        return False


def race(path: str, attack: str, spare: str, eicar_path: str) -> dict[str, object]:
    with open(eicar_path, "rb") as f:
        eicar = f.read()
    folder = os.path.dirname(path)
    os.mkdir(folder, 0o777)
    os.chmod(folder, 0o777)
    if attack == "replace":
        with open(spare, "wb") as f:
            f.write(eicar)
    with open(path + ".part", "wb") as f:
        f.write(b"harmless " * (1 << 19))
    inode = os.stat(path + ".part").st_ino
    writer = os.open(path + ".part", os.O_WRONLY) if attack in ("truncate", "grow") else -1
    watch = Inotify(path + ".part", IN_OPEN)
    os.rename(path + ".part", path)
    deadline = time.monotonic() + 60
    while not watch.events(0.5):
        if time.monotonic() > deadline:
            return {"opened": False}
    if attack == "replace":
        os.rename(spare, path)
    elif attack == "symlink":
        os.rename(folder, folder + ".old")
        os.symlink(spare, folder)
    elif attack in ("truncate", "grow"):
        os.ftruncate(writer, 9 if attack == "truncate" else 1 << 40)
    else:
        os.link(path, spare)
        deadline = time.monotonic() + 5  # a link seen before the snapshot: left in place
        while _names(path, inode) and time.monotonic() < deadline:
            time.sleep(0.01)
        with open(spare, "r+b") as f:
            f.write(eicar)
    return {"opened": True, "inode": inode}


def strand(folder: str, eicar_path: str) -> dict[str, object]:
    with open(eicar_path, "rb") as f:
        eicar = f.read()
    sub = os.path.join(folder, "sub")
    os.mkdir(sub, 0o777)
    os.chmod(sub, 0o777)
    watch = Inotify(sub, IN_MOVED_FROM)
    fd = os.open(os.path.join(sub, "a.txt"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, b"harmless")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(name == "a.txt" for _, name in watch.events(0.5)):
            break
    else:
        return {"captured": False}
    os.pwrite(fd, eicar, 0)
    nlink = os.fstat(fd).st_nlink
    try:
        os.rmdir(sub)
        removed: object = True
    except OSError as exc:
        removed = exc.errno
    return {"captured": True, "nlink_after_write": nlink, "rmdir": removed}


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    modes = {"flip": flip, "mapped": mapped, "opath": opath, "race": race, "strand": strand}
    print(json.dumps(modes[mode](*args)), flush=True)
