"""AppliedSeqs: which delta ids a shard applied, when a client's batches arrive in any order."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from mmsb_dist.dedup import AppliedSeqs


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 300)), max_size=200),
       st.integers(1, 64))
def test_answers_like_a_set_of_every_delta_id_within_the_window(ops, window):
    seqs, oracle = AppliedSeqs(window), set()
    for client, seq in ops:
        top = max([s for c, s in oracle if c == client], default=0)
        expected = (client, seq) in oracle or (seq <= top and top - seq >= window)
        assert seqs.applied(client, seq) == expected
        seqs.add(client, seq)
        oracle.add((client, seq))
        assert seqs.applied(client, seq)
    # the manifest form round-trips exactly, through JSON
    again = AppliedSeqs.from_json(json.loads(json.dumps(seqs.to_json())), window=window)
    for client in (1, 2, 3, 4):
        for seq in range(0, 310):
            assert again.applied(client, seq) == seqs.applied(client, seq)


def test_a_batch_behind_a_newer_one_is_not_a_duplicate():
    seqs = AppliedSeqs(1 << 16)
    seqs.add(7, 5)                  # seq 5 applied before seq 3 and 4 arrived
    assert not seqs.applied(7, 3) and not seqs.applied(7, 4)
    seqs.add(7, 3)
    assert seqs.applied(7, 3) and not seqs.applied(7, 4) and seqs.highest(7) == 5


def test_manifests_with_high_water_marks_count_everything_up_to_the_mark_as_applied():
    seqs = AppliedSeqs.from_json(None, {"9": 40})
    assert seqs.applied(9, 1) and seqs.applied(9, 40) and not seqs.applied(9, 41)
    assert not seqs.applied(8, 1)


def _stored(seqs, client):
    return seqs._by_client[client]


def test_a_client_whose_batches_all_arrived_costs_no_bitmap():
    seqs = AppliedSeqs(1 << 16)
    for seq in range(1, 100_001):
        seqs.add(3, seq)
    assert _stored(seqs, 3) == (100_000, 0, 0)
    assert seqs.to_json() == {"3": [100_000, "0", 0]}
    assert seqs.applied(3, 1) and seqs.applied(3, 100_000) and not seqs.applied(3, 100_001)


def test_the_bitmap_reaches_back_only_to_the_oldest_missing_seq():
    seqs = AppliedSeqs(1 << 16)
    for seq in range(1, 1001):
        if seq != 200:
            seqs.add(3, seq)
    top, _, span = _stored(seqs, 3)
    assert (top, span) == (1000, 801)          # seq 200 is bit 800: 801 bits kept, not 65,536
    assert not seqs.applied(3, 200) and seqs.applied(3, 199) and seqs.applied(3, 201)
    seqs.add(3, 200)
    assert _stored(seqs, 3) == (1000, 0, 0)


def test_manifests_of_the_fourth_session_read_as_written():
    # [highest, bitmap over the whole window]: bit k is seq highest - k
    seqs = AppliedSeqs.from_json({"5": [10, "3f7"]}, window=64)   # every seq 1..10 but 7
    assert [s for s in range(0, 12) if seqs.applied(5, s)] == [1, 2, 3, 4, 5, 6, 8, 9, 10]
    assert _stored(seqs, 5)[2] == 4


def test_seq_zero_is_no_delta_id():
    seqs = AppliedSeqs(64)
    seqs.add(5, 0)
    assert not seqs.applied(5, 0) and len(seqs) == 0
