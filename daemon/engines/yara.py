"""The embedded YARA engine: no server, rules compiled once, the bundled EICAR rule always on."""

from __future__ import annotations

import hashlib
import io
import mmap
import os
from importlib import resources

import yara

from daemon.config import YaraEngineConfig
from daemon.engines.base import ScanHandle, ScanRequest, Signatures, refuse_too_large
from daemon.errors import ConfigError, EnginePermanentError, EngineRetryableError
from daemon.model import Pending, Reason, Verdict, VerdictKind

__all__ = ["YaraEngine"]

# Up to this size a file is read rather than mapped: mapping and unmapping 4 KB costs more
# than the match (bench/RESULTS.md, "Issue 21").
_READ_MAX = 1 << 20


def _compile(name: str, config: YaraEngineConfig) -> yara.Rules:
    bundled = resources.files("daemon").joinpath("rules/eicar.yar").read_text()
    sources = {"bundled_eicar": bundled}
    for i, path in enumerate(config.rules):
        try:
            sources[f"rules_{i}"] = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("config", [f"engines.{name}.rules[{i}]: cannot read {path}: {exc}"]) from None
    try:
        return yara.compile(sources=sources)
    except yara.SyntaxError as exc:
        raise ConfigError("config", [f"engines.{name}.rules: {exc}"]) from None


class YaraEngine:
    """Scans the file's bytes in process; a match is a threat named after its rule."""

    remote = False
    reads_s3 = False

    def __init__(self, name: str, config: YaraEngineConfig) -> None:
        self.name = name
        self._timeout_s = max(1, round(config.timeout))
        self._max_size = config.max_size
        self._rules = _compile(name, config)
        self._rule_count = sum(1 for _ in self._rules)
        compiled = io.BytesIO()
        self._rules.save(file=compiled)
        # The compiled rules, not their files: a reload (SIGHUP) with other rules changes it.
        self._signatures = Signatures(f"yara:{hashlib.sha256(compiled.getvalue()).hexdigest()}",
                                      is_versioned=True)

    def scan(self, request: ScanRequest) -> Verdict:
        """Match the rules against the file's bytes (mapped, not read into memory, above
        `_READ_MAX`).

        The mapped pages count as the daemon's resident memory while they are matched,
        so a file over `max_size` fails as `too_large` without being mapped.
        """
        refuse_too_large(self.name, self._max_size, request)
        try:
            size = os.fstat(request.bytes_fd).st_size
            if size <= _READ_MAX:
                read = os.pread(request.bytes_fd, size, 0)
                if len(read) != size:
                    raise ValueError(f"{size - len(read)} bytes fewer than its size: truncated")
                matches = self._rules.match(data=read, timeout=self._timeout_s)
            else:
                with mmap.mmap(request.bytes_fd, size, access=mmap.ACCESS_READ) as data:
                    matches = self._rules.match(data=data, timeout=self._timeout_s)
        except yara.TimeoutError as exc:
            raise EngineRetryableError(f"YARA scan timed out after {self._timeout_s}s",
                                       reason=Reason.TIMEOUT) from exc
        except (yara.Error, OSError, ValueError) as exc:
            # libyara traps SIGBUS: the file was truncated while mapped (or read). Try again later.
            raise EngineRetryableError(f"YARA could not read the file: {exc}",
                                       reason=Reason.UNREADABLE) from exc
        if matches:
            return Verdict(VerdictKind.INFECTED, threats=tuple(m.rule for m in matches))
        return Verdict(VerdictKind.CLEAN)

    def poll(self, scan: ScanHandle) -> Verdict | Pending:
        """YARA answers at once, so there is never a scan to poll."""
        raise EnginePermanentError("YARA has no submitted scans to poll")

    def signatures(self) -> Signatures:
        """The hash of the compiled rules (docs/engines.md, "Verdict cache")."""
        return self._signatures

    def probe(self) -> str:
        """YARA is always available."""
        return f"yara {yara.__version__}, {self._rule_count} rules"

    def close(self) -> None:
        """Nothing to release."""
