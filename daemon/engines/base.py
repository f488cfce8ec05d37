"""The Engine protocol every scan engine implements; retries, journaling and moves live above it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from daemon.model import Pending, Verdict

__all__ = ["Engine", "ScanRequest"]


@dataclass(frozen=True)
class ScanRequest:
    """One file to scan: an open read-only fd of exactly the hashed bytes, and its names."""

    watch: str
    rel_path: str
    path: str  # absolute local path, for engines that read the file themselves
    fd: int
    size: int
    sha256: str
    ref_id: str  # the external reference ID (contract.md)

    @property
    def name(self) -> str:
        """The file's basename."""
        return self.rel_path.rpartition("/")[2]


class Engine(Protocol):
    """A scan engine: gives a verdict now, or a Pending to poll later.

    `scan` and `poll` raise `EngineRetryableError` (try again later),
    `EngineUnavailableError` (engine down: wait) or `EnginePermanentError` (fail the
    file). They must be thread-safe: the pipeline calls them from `concurrency` threads.
    """

    name: str
    remote: bool  # scans outlive this process: journal the reference ID before submitting

    def scan(self, request: ScanRequest) -> Verdict | Pending:
        """Scan the file, or submit it and return the scan to poll."""
        ...

    def poll(self, request: ScanRequest, engine_scan_id: str) -> Verdict | Pending:
        """The verdict of a submitted scan, or Pending while it runs."""
        ...

    def probe(self) -> str:
        """Check the engine answers; return a one-line description (raises if not)."""
        ...

    def close(self) -> None:
        """Release connections and threads."""
        ...
