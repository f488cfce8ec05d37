"""Idempotent placement across daemons: a copy another daemon placed counts as placed (SeaweedFS)."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from typing import Any

import pytest
from realservers import S3Server

from daemon.config import S3Config
from daemon.locations.base import MoveRequest, transfer
from daemon.locations.s3 import S3Location

DATA = b"the scanned bytes\n"
SHA = hashlib.sha256(DATA).hexdigest()


def _setup(s3_server: S3Server, bucket: str, key: str = "in/a b+c%.txt") -> tuple[Any, S3Location, S3Location,
                                                                                   MoveRequest]:
    client = s3_server.client()
    etag = client.put_object(Bucket=bucket, Key=key, Body=DATA)["ETag"]
    source = S3Location(f"s3://{bucket}/in/", client, S3Config())
    dest = S3Location(f"s3://{bucket}/clean/", client, S3Config())
    rel = key.removeprefix("in/")
    req = MoveRequest(file_id=1, rel_path=rel, dest_rel=rel, size=len(DATA), sha256=SHA, verify=True,
                      private=False, etag=etag, tags={"scanwatch-verdict": "clean", "scanwatch-reason": ""})
    return client, source, dest, req


def _keys(client: Any, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def test_a_second_node_finds_its_object_placed_by_another(s3_server: S3Server, s3_bucket: str) -> None:
    client, source, dest, req = _setup(s3_server, s3_bucket)
    node_a = req
    node_b = MoveRequest(**{**req.__dict__, "file_id": 77})  # another journal, another row id
    transfer(node_a, source, dest)
    transfer(node_b, source, dest)  # redelivered to node B after A placed it and deleted the source
    assert _keys(client, s3_bucket) == ["clean/a b+c%.txt"]
    tags = {t["Key"]: t["Value"] for t in
            client.get_object_tagging(Bucket=s3_bucket, Key="clean/a b+c%.txt")["TagSet"]}
    assert tags["scanwatch-sha256"] == SHA
    assert tags["scanwatch-source-version"] == req.etag.strip('"')  # type: ignore[union-attr]


def test_a_placed_copy_before_the_source_delete_still_ends_in_one_placement(s3_server: S3Server,
                                                                           s3_bucket: str) -> None:
    client, source, dest, req = _setup(s3_server, s3_bucket)
    dest.receive(req, source)  # node A copied, then died before deleting the source
    transfer(MoveRequest(**{**req.__dict__, "file_id": 9}), source, dest)  # node B
    assert _keys(client, s3_bucket) == ["clean/a b+c%.txt"]


def test_another_object_at_the_name_is_still_a_collision(s3_server: S3Server, s3_bucket: str) -> None:
    client, source, dest, req = _setup(s3_server, s3_bucket)
    client.put_object(Bucket=s3_bucket, Key="clean/a b+c%.txt", Body=b"someone else's file")
    with pytest.raises(FileExistsError):
        dest.receive(req, source)
    client.put_object(Bucket=s3_bucket, Key="clean/a b+c%.txt", Body=b"x", Tagging=(
        f"scanwatch-source-version={req.etag.strip(chr(34))}&scanwatch-sha256={'0' * 64}"))  # type: ignore[union-attr]
    with pytest.raises(FileExistsError):  # same source version claimed, other bytes: not ours
        dest.receive(req, source)


def _race(req: MoveRequest, source: S3Location, dest: S3Location) -> list[BaseException]:
    """Two nodes (two row ids) move the same object at the same moment; their errors."""
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def node(file_id: int) -> None:
        start.wait()
        try:
            transfer(MoveRequest(**{**req.__dict__, "file_id": file_id}), source, dest)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return errors


def test_two_nodes_racing_on_one_object_place_it_once(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    for round_ in range(5):
        _, source, dest, req = _setup(s3_server, s3_bucket, key=f"in/race-{round_}.txt")
        assert _race(req, source, dest) == []
    assert _keys(client, s3_bucket) == [f"clean/race-{n}.txt" for n in range(5)]


def test_a_version_another_node_placed_under_a_collision_name_is_found_there(s3_server: S3Server,
                                                                            s3_bucket: str) -> None:
    """The same bytes uploaded again are another version: node A placed it as `f.1.txt` beside
    the first upload's copy. Node B, with the same version scanned, finds `f.txt` taken and
    looks again: A's `f.1.txt` is where it goes (already placed), not a third copy `f.2.txt`."""
    client, source, dest, req = _setup(s3_server, s3_bucket, key="in/f.txt")
    transfer(dataclasses.replace(req, last_modified=1000.0), source, dest)  # the first upload
    client.put_object(Bucket=s3_bucket, Key="in/f.txt", Body=DATA)  # the same bytes again
    again = dataclasses.replace(req, last_modified=2000.0)
    for node in (again, dataclasses.replace(again, file_id=9)):  # A, then B (A not yet deleted the source)
        with pytest.raises(FileExistsError):
            dest.receive(node, source)
        assert dest.plan("f.txt", taken=True, placing=node) == "f.1.txt"
    assert dest.receive(dataclasses.replace(again, dest_rel="f.1.txt"), source) is False  # A places it
    assert transfer(dataclasses.replace(again, file_id=9, dest_rel="f.1.txt"), source, dest) is True  # B
    assert _keys(client, s3_bucket) == ["clean/f.1.txt", "clean/f.txt"]
    assert dest.plan("f.txt", taken=True, placing=dataclasses.replace(req, last_modified=3000.0)) == "f.2.txt"
