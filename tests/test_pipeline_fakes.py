"""The pipeline's steps through the in-tree fakes: no filesystem, no server, no engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import EICAR, FakeEngine, FakeLocation, FakeWatcher, answers

from daemon.config import Config
from daemon.journal import Journal, owner_token
from daemon.locations import MoveRequest, Source
from daemon.model import FileState, Pending, Verdict, VerdictKind
from daemon.pipeline import Pipeline
from daemon.retry import RetryPolicy

_ROOTS = {name: f"s3://fake/{name}/" for name in ("in", "clean", "quarantine", "failed")}


class World:
    """A watch on fake locations, its journal, a fake watcher and engine, and the pipeline."""

    def __init__(self, tmp_path: Path, engine: FakeEngine) -> None:
        config = Config.model_validate({
            "state_dir": str(tmp_path / "state"),
            "engines": {"default": {"type": "yara"}},
            "watches": [{"name": "w", "engine": "default", "source": _ROOTS["in"],
                         "clean": _ROOTS["clean"], "quarantine": _ROOTS["quarantine"],
                         "failed": _ROOTS["failed"]}]})
        self.places = {name: FakeLocation(url) for name, url in _ROOTS.items()}
        self.journal = Journal(tmp_path / "journal.sqlite3")
        self.engine = engine
        self.watcher = FakeWatcher("w", self.journal, self.places["in"])
        self.pipeline = Pipeline(config, self.journal, {"default": engine}, owner=owner_token(),
                                 policy=RetryPolicy(base_s=0, max_s=0),
                                 places={url: self.places[name] for name, url in _ROOTS.items()})

    def run(self) -> None:
        for _ in range(10):
            if not self.pipeline.run_once(["w"]):
                return

    def row(self, rel_path: str) -> object:
        row = self.journal.latest("w", rel_path)
        assert row is not None
        return row


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path, FakeEngine())


def test_each_verdict_reaches_its_destination_with_its_facts(world: World) -> None:
    world.engine.script.extend([answers(Verdict(VerdictKind.CLEAN)), answers(Verdict.failed("encrypted"))])
    world.watcher.arrive("a.txt", b"hello")
    world.watcher.arrive("locked.zip", b"PK...")
    world.watcher.arrive("deep/e.com", EICAR)
    world.run()
    clean, quarantine, failed = (world.places[n] for n in ("clean", "quarantine", "failed"))
    assert clean.objects == {"a.txt": b"hello"} and clean.tags["a.txt"]["scanwatch-verdict"] == "clean"
    assert quarantine.objects == {"deep/e.com": EICAR}
    assert quarantine.sidecars["deep/e.com"]["threats"] == ["Eicar-Test-Signature"]
    assert failed.sidecars["locked.zip"]["reason"] == "encrypted"
    assert world.places["in"].objects == {}
    assert all(r.state is FileState.DONE for r in world.journal.rows())


def test_replaced_after_its_scan_is_scanned_again_never_promoted(world: World) -> None:
    def swap(_: object) -> Verdict:
        world.places["in"].put("a.txt", EICAR)  # new bytes land while the old ones are judged
        return Verdict(VerdictKind.CLEAN)

    world.engine.script.append(swap)
    world.watcher.arrive("a.txt", b"harmless")
    world.run()
    assert world.places["clean"].objects == {}
    assert world.places["quarantine"].objects == {"a.txt": EICAR}
    assert len(world.engine.calls) == 2


def test_a_name_taken_at_the_destination_gets_the_next_free_name(world: World) -> None:
    world.places["clean"].put("a.txt", b"already there")
    world.watcher.arrive("a.txt", b"new")
    world.run()
    assert world.places["clean"].objects == {"a.txt": b"already there", "a.1.txt": b"new"}
    assert world.row("a.txt").destination == "s3://fake/clean/a.1.txt"  # type: ignore[attr-defined]


def test_a_name_taken_meanwhile_is_journaled_before_the_move_to_it(world: World,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    clean = world.places["clean"]
    receive = clean.receive
    tried: list[tuple[str, str | None]] = []  # (the name tried, the name journaled then)

    def taken_first(req: MoveRequest, source: Source) -> bool:
        tried.append((req.dest_rel, world.row("a.txt").dest_rel))  # type: ignore[attr-defined]
        if len(tried) == 1:
            clean.put(req.dest_rel, b"another writer's")  # taken between the plan and the move
        return receive(req, source)

    monkeypatch.setattr(clean, "receive", taken_first)
    world.watcher.arrive("a.txt", b"new")
    world.run()
    assert tried == [("a.txt", "a.txt"), ("a.1.txt", "a.1.txt")]
    assert clean.objects == {"a.txt": b"another writer's", "a.1.txt": b"new"}
    assert world.row("a.txt").state is FileState.DONE  # type: ignore[attr-defined]


def test_a_pending_remote_scan_is_polled_without_its_bytes(world: World) -> None:
    world.engine.remote = True
    world.engine.script.append(answers(Pending("scan-1", poll_after_s=0)))
    world.engine.polls["scan-1"] = [Pending("scan-1", poll_after_s=0), Verdict(VerdictKind.CLEAN)]
    world.watcher.arrive("a.txt", b"hello")
    world.run()
    assert [method for method, _ in world.engine.calls] == ["scan", "poll", "poll"]
    assert world.engine.seen == [b"hello"]  # read once, for the submission
    assert world.places["clean"].objects == {"a.txt": b"hello"}
