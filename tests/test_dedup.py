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
