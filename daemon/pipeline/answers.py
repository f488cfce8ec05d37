"""What an engine's answer, or its error, comes to: the one mapping both scanners use.

A pure function of the answer (or error), the attempts, the limits and the clock
(docs/integrity.md, "Engine errors"): an answer is taken; an engine not reached, or
refusing for now, is waited for without spending an attempt, until `max_pending_age`; an
error that may hide a submission is retried while attempts remain; anything else, or
limits reached, is a failed verdict. The single-engine scanner turns the result into the
row's change, the multi-engine scanner into its scan record's; both build on `ScanStep`,
which holds what they share (the engines' health, how the engines read the bytes) and their
one way of writing the journal themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from daemon.config import Config, EngineConfig, WatchConfig
from daemon.errors import (
    EngineBrokenError,
    EnginePermanentError,
    EngineRetryableError,
    EngineThrottledError,
    EngineUnavailableError,
)
from daemon.journal import Journal, RowChanges
from daemon.locations import ReadBy
from daemon.model import Pending, Reason, ScanChanges, Verdict
from daemon.pipeline.caching import VerdictCache
from daemon.pipeline.health import EngineHealth
from daemon.pipeline.outcome import Outcomes
from daemon.retry import RetryPolicy

__all__ = ["Answered", "EngineResult", "Failed", "Limits", "Retry", "ScanStep", "Step", "Wait", "ask",
           "health_of", "step_of"]

EngineResult = Verdict | Pending | EngineUnavailableError | EngineRetryableError | EnginePermanentError


@dataclass(frozen=True)
class Limits:
    """One engine's limits on a file, and the retry policy's delays."""

    max_attempts: int
    max_pending_age_s: float
    policy: RetryPolicy

    @classmethod
    def of(cls, engine: EngineConfig, policy: RetryPolicy) -> Limits:
        return cls(engine.max_attempts, engine.max_pending_age, policy)


@dataclass(frozen=True)
class Answered:
    answer: Verdict | Pending


@dataclass(frozen=True)
class Wait:
    """Not reached, or refused for now: nothing was submitted, the attempt is given back."""

    error: EngineUnavailableError
    delay_s: float
    attempts: int


@dataclass(frozen=True)
class Retry:
    """A timeout or a 5xx may hide a submission: it stays in doubt, an attempt is spent."""

    error: EngineRetryableError
    delay_s: float
    attempts: int


@dataclass(frozen=True)
class Failed:
    verdict: Verdict
    attempts: int


Step = Answered | Wait | Retry | Failed


def ask(call: Callable[[], Verdict | Pending]) -> EngineResult:
    """The engine's answer, or the engine error that stands for it (others propagate)."""
    try:
        return call()
    except (EngineRetryableError, EnginePermanentError) as exc:
        return exc


def step_of(result: EngineResult, *, attempts: int, spent: bool, discovered_at: float, now: float,
            limits: Limits) -> Step:
    """What `result` comes to. `attempts`: the file's attempts at this engine so far, this
    call's included when `spent` (a claim counts it before the call)."""
    if isinstance(result, Verdict | Pending):
        return Answered(result)
    failed = Failed(Verdict.failed(result.reason, raw={"error": str(result)}), attempts)
    if isinstance(result, EngineUnavailableError):
        if now - discovered_at > limits.max_pending_age_s:
            return failed
        return Wait(result, limits.policy.delay(attempts, result.retry_after_s), attempts - spent)
    if isinstance(result, EngineRetryableError):
        attempts += not spent
        if attempts >= limits.max_attempts:
            return Failed(failed.verdict, attempts)
        return Retry(result, limits.policy.delay(attempts, result.retry_after_s), attempts)
    return failed


class ScanStep:
    """What both scanners (one engine, several) work with: the config, the journal, the
    outcomes on the pipeline's clock, the engines' health, the verdict cache. A verdict is
    returned unplanned (`Outcome.needs_plan`): the pipeline's loop plans its move."""

    def __init__(self, config: Config, journal: Journal, outcomes: Outcomes, health: EngineHealth) -> None:
        self.config = config
        self.journal = journal
        self.outcomes = outcomes
        self.health = health
        self.clock = outcomes.clock
        self.cache = VerdictCache(config, journal, self.clock)

    def asked(self, engine: str, call: Callable[[], Verdict | Pending]) -> EngineResult:
        """The engine's answer, or the error that stands for it (`ask`); its health journaled
        if that changed."""
        result = ask(call)
        if (health := health_of(result)) is not None:
            self.health.set(engine, None if health[0] else health[1])
        return result

    def read_by(self, watch: WatchConfig, reads_s3: bool) -> ReadBy:
        """How the engines asked read the bytes (`reads_s3`: each reads an S3 source itself):
        from a descriptor, else the pinned version, or by key where one of the watch's engines
        reads by `path`, which names no version: a private snapshot (docs/integrity.md,
        "Remote engines")."""
        if not reads_s3:
            return ReadBy.DESCRIPTOR
        if any(self.config.engines[e].reads_s3_by_path for e in watch.engines if e in self.config.engines):
            return ReadBy.KEY
        return ReadBy.VERSION

    def journal_at_once(self, file_id: int, changes: RowChanges,
                        scans: Mapping[str, ScanChanges] | None = None) -> None:
        """The only journal writes a scanning step makes itself, each in its own transaction
        before the step returns its `Outcome` (which the pipeline's loop writes), on purpose
        (docs/integrity.md, "Remote engines"): a submission marked in doubt before an engine
        sees the bytes; a scan's ID, or (several engines) each engine's answer, right after it."""
        if scans is None:
            self.journal.apply([(file_id, changes)])
        else:
            self.journal.apply_scans(file_id, changes, scans)


def health_of(result: EngineResult) -> tuple[bool, str] | None:
    """What `result` says of the engine's health: (healthy, why) to journal, None: nothing.

    Throttling is pacing, not down; a refused credential, or an engine broken for every file
    (`EngineBrokenError`), fails every file alike: down."""
    if isinstance(result, Verdict | Pending):
        return True, "answering"
    if isinstance(result, EngineThrottledError):
        return None
    if isinstance(result, EngineUnavailableError | EngineBrokenError) or (
            isinstance(result, EnginePermanentError) and result.reason == Reason.AUTH):
        return False, str(result)
    return None
