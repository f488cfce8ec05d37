"""The facts of a file's outcome, as sidecars, `quarantine show` and notifications give them.

docs/contract.md#sidecars lists them; every place that reports an outcome builds them here.
"""

from __future__ import annotations

from daemon.config import WatchConfig
from daemon.journal import FileRow
from daemon.timefmt import iso

__all__ = ["iso", "outcome_facts"]


def outcome_facts(watch: WatchConfig, row: FileRow, destination: str | None) -> dict[str, object]:
    """Where the file came from and went, and what the engine said about its bytes."""
    facts: dict[str, object] = {
        "source": watch.source.rstrip("/") + "/" + row.rel_path,
        "destination": destination,
        "verdict": row.verdict,
        "reason": row.reason,
        "threats": row.threats or [],
        "engine": watch.engine_label,
        "engine_scan_id": row.engine_scan_id,
        "external_reference_id": row.ref_id,
        "sha256": row.sha256,
        "size": row.size,
        "detected_at": iso(row.discovered_at),
        "scanned_at": iso(row.scanned_at),
    }
    raw = row.raw_result or {}
    if "cached_from" in raw:  # the verdict cache's: the scan whose verdict this reuses
        facts["cached"] = True
        facts["cached_from"] = raw["cached_from"]
    if len(watch.engines) > 1:  # one object per engine that answered (docs/contract.md)
        facts["scans"] = raw.get("scans", [])
    return facts
