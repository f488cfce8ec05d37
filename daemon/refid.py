"""External reference IDs: `<watch>:<relative path>#<12 hex of sha256>`.

docs/contract.md#external-reference-ids is the rule.
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["MAX_LENGTH", "build_ref_id"]

MAX_LENGTH = 255
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/#@-]")


def build_ref_id(watch: str, rel_path: str, sha256: str, generation: int = 1) -> str:
    """The engine's external reference ID for these bytes at this path.

    Generation 2, 3... are re-submissions after a failed or too old scan. An ID that
    needed sanitizing or shortening keeps its tail and ends in `@` + 12 hex of the
    unsanitized ID's sha256, so two distinct inputs never share an ID. (An unaltered
    ID always ends in `#<hex>` or `.<n>`, so it can never look like an altered one.)
    """
    raw = f"{watch}:{rel_path}#{sha256[:12]}"
    if generation > 1:
        raw += f".{generation}"
    safe = _UNSAFE.sub("_", raw)
    if safe == raw and len(raw) <= MAX_LENGTH:
        return raw
    digest = hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{safe[-(MAX_LENGTH - 13):]}@{digest}"
