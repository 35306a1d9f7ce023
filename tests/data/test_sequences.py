"""Token sequences (cvfp_lightning.data.sequences)."""

from __future__ import annotations

from cvfp_lightning.data.sequences import TokenSequences


def test_token_sequences_concat_keeps_every_sequence():
    a = TokenSequences.from_lists([[1, 2], [3]], num_bytes=5)
    b = TokenSequences.from_lists([[4, 5, 6], [], [7]], num_bytes=4)
    both = TokenSequences.concat([a, b])
    assert both.ids.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert [both.sequence(s).tolist() for s in range(both.num_sequences)] == [[1, 2], [3], [4, 5, 6], [], [7]]
    assert both.num_bytes == 9
