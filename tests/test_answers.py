"""The one mapping of an engine's answer or error to what happens next (daemon/pipeline/answers.py),
used by the single- and the multi-engine scanner alike (docs/integrity.md, "Engine errors")."""

from __future__ import annotations

import pytest

from daemon.errors import (
    EngineBrokenError,
    EnginePermanentError,
    EngineResubmitError,
    EngineRetryableError,
    EngineThrottledError,
    EngineUnavailableError,
)
from daemon.model import Pending, Reason, Verdict, VerdictKind
from daemon.pipeline.answers import Answered, Failed, Limits, Retry, Wait, ask, health_of, step_of
from daemon.retry import RetryPolicy

LIMITS = Limits(max_attempts=3, max_pending_age_s=100.0, policy=RetryPolicy(base_s=1.0, max_s=8.0))


def _step(result, *, attempts: int = 1, spent: bool = True, age_s: float = 10.0):
    return step_of(result, attempts=attempts, spent=spent, discovered_at=1000.0, now=1000.0 + age_s,
                   limits=LIMITS)


def test_an_answer_is_taken_and_says_the_engine_answers() -> None:
    clean, pending = Verdict(VerdictKind.CLEAN), Pending("scan-1", 5.0)
    assert _step(clean) == Answered(clean)
    assert _step(pending) == Answered(pending)
    assert health_of(clean) == (True, "answering")


@pytest.mark.parametrize("spent", [True, False])
def test_an_engine_not_reached_is_waited_for_without_spending_an_attempt(spent: bool) -> None:
    down = EngineUnavailableError("refused", retry_after_s=7.0)
    step = _step(down, attempts=2, spent=spent)
    assert step == Wait(down, 7.0, 1 if spent else 2)
    assert health_of(down) == (False, "refused")


def test_a_throttled_engine_is_waited_for_and_stays_healthy() -> None:
    slow = EngineThrottledError("429", retry_after_s=3.0)
    assert _step(slow) == Wait(slow, 3.0, 0)
    assert health_of(slow) is None


def test_waiting_ends_at_max_pending_age_with_a_failed_verdict() -> None:
    down = EngineUnavailableError("refused")
    assert isinstance(_step(down, age_s=100.0), Wait)
    step = _step(down, attempts=2, age_s=100.5)
    assert isinstance(step, Failed) and step.attempts == 2
    assert (step.verdict.kind, step.verdict.reason) == (VerdictKind.FAILED, Reason.ENGINE_UNAVAILABLE)
    assert step.verdict.raw == {"error": "refused"}


def test_a_timeout_is_retried_while_attempts_remain_with_the_policys_delay() -> None:
    timeout = EngineRetryableError("timed out")
    step = _step(timeout, attempts=2)
    assert isinstance(step, Retry) and step.attempts == 2 and 0.0 <= step.delay_s <= 2.0
    busy = EngineRetryableError("503", retry_after_s=4.0)
    assert _step(busy, attempts=1, spent=False) == Retry(busy, 4.0, 2)
    unspent = _step(timeout, attempts=1, spent=False)
    assert isinstance(unspent, Retry) and unspent.attempts == 2
    assert health_of(timeout) is None


@pytest.mark.parametrize(("attempts", "spent"), [(3, True), (2, False)])
def test_the_last_attempt_fails_the_file(attempts: int, spent: bool) -> None:
    step = _step(EngineRetryableError("timed out", reason=Reason.TIMEOUT), attempts=attempts, spent=spent)
    assert isinstance(step, Failed) and step.attempts == 3
    assert step.verdict.reason == Reason.TIMEOUT and step.verdict.raw == {"error": "timed out"}


def test_a_refusal_fails_at_once_and_a_refused_credential_takes_the_engine_down() -> None:
    rejected = EnginePermanentError("too large", reason=Reason.TOO_LARGE)
    step = _step(rejected, attempts=1)
    assert isinstance(step, Failed) and step.verdict.reason == Reason.TOO_LARGE
    assert health_of(rejected) is None
    assert health_of(EnginePermanentError("401", reason=Reason.AUTH)) == (False, "401")
    assert health_of(EngineBrokenError("licence", reason=Reason.ENGINE_ERROR)) == (False, "licence")


def test_ask_turns_engine_errors_into_results_and_lets_a_resubmission_through() -> None:
    down = EngineUnavailableError("refused")

    def fails() -> Verdict:
        raise down

    def lost() -> Verdict:
        raise EngineResubmitError("404")

    assert ask(fails) is down
    assert ask(lambda: Verdict(VerdictKind.CLEAN)) == Verdict(VerdictKind.CLEAN)
    with pytest.raises(EngineResubmitError):
        ask(lost)
