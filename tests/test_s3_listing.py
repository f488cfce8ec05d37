"""The S3 watcher's listing: the next page is on the wire while this one is journaled."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from daemon.watchers.s3 import one_ahead


def test_the_next_page_is_fetched_while_the_caller_handles_this_one() -> None:
    second_fetched = threading.Event()

    def pages() -> Iterator[int]:
        yield 1
        second_fetched.set()
        yield 2

    seen = []
    for page in one_ahead(pages()):
        if page == 1:  # still handling page 1: page 2 is being (or was) fetched meanwhile
            assert second_fetched.wait(10)
        seen.append(page)
    assert seen == [1, 2]


def test_a_failed_fetch_surfaces_after_the_pages_before_it() -> None:
    def pages() -> Iterator[int]:
        yield 1
        raise OSError("LIST failed")

    seen = []
    with pytest.raises(OSError, match="LIST failed"):
        for page in one_ahead(pages()):
            seen.append(page)
    assert seen == [1]


def test_stopping_early_fetches_at_most_one_page_more() -> None:
    fetched = []

    def pages() -> Iterator[int]:
        for i in range(100):
            fetched.append(i)
            yield i

    for page in one_ahead(pages()):
        if page == 3:
            break
    assert fetched in ([0, 1, 2, 3], [0, 1, 2, 3, 4])
