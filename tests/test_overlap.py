import time

import pytest

from vsearch.overlap import read_ahead


def test_read_ahead_produces_the_next_item_while_the_caller_works_on_this_one():
    produced = []

    def items():
        for number in range(3):
            produced.append(number)
            yield number

    seen = []
    for item in read_ahead(items()):
        time.sleep(0.05)  # the caller's work
        seen.append((item, list(produced)))
    assert seen == [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2])]


def test_read_ahead_raises_what_the_items_raise_in_their_place():
    def items():
        yield 1
        raise ValueError("shard damaged")

    reader = read_ahead(items())
    assert next(reader) == 1
    with pytest.raises(ValueError, match="shard damaged"):
        next(reader)
