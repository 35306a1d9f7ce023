"""The continuous cache: its formula, its memory window, and one scoring path for batches and reading."""

import math

import pytest
import torch

from cvfp_lightning.errors import CVFPUserError
from cvfp_lightning.models.context import build_context_updater, unroll
from cvfp_lightning.models.continuous_cache import ContinuousCache
from cvfp_lightning.models.embedding import build_embedding
from cvfp_lightning.models.lm import CVFPLanguageModel


def brute_force(cache, logits, keys, nexts):
    """p_i(w) of the mixture for a text read in order: position i remembers j in [i - size, i)."""
    out = []
    for i in range(len(keys)):
        p = torch.softmax(logits[i].double(), -1)
        memory = [j for j in range(max(0, i - cache.size), i) if nexts[j] >= 0]
        if memory:
            cos = torch.stack([torch.nn.functional.cosine_similarity(keys[i].double(), keys[j].double(), dim=0)
                               for j in memory])
            a = torch.softmax(cache.theta * cos, 0)
            p_cache = torch.zeros_like(p)
            for weight, j in zip(a, memory):
                p_cache[nexts[j]] += weight
            p = (1 - cache.weight) * p + cache.weight * p_cache
        out.append(p.log())
    return torch.stack(out)


def test_the_mixture_is_the_formula_over_the_last_size_positions():
    torch.manual_seed(0)
    n, E, V = 9, 5, 7
    logits, keys = torch.randn(n, V), torch.randn(n, E)
    nexts = torch.randint(0, V, (n,))
    nexts[4] = -100  # a sequence's last position: no next id, never in the memory
    positions = torch.arange(n)
    for cache in (ContinuousCache(size=3, theta=2.0, weight=0.3), ContinuousCache(size=100, theta=0.5, weight=0.6)):
        got = cache.log_probs(logits, keys, positions, keys, nexts, positions)
        torch.testing.assert_close(got.double(), brute_force(cache, logits, keys, nexts), atol=1e-5, rtol=1e-5)
        assert torch.allclose(got.exp().sum(-1), torch.ones(n))  # a distribution at every position
    cache = ContinuousCache(size=3, theta=2.0, weight=0.3)
    got = cache.log_probs(logits, keys, positions, keys, nexts, positions)
    torch.testing.assert_close(got[0], torch.log_softmax(logits[0], -1))  # nothing before the first position
    assert got[1, nexts[0]] > torch.log_softmax(logits[1], -1)[nexts[0]]  # the id after position 0 gains
    # a memory of other positions: only the rows before, at distance 1..size, count
    far = cache.log_probs(logits[8:], keys[8:], positions[8:], keys[:4], nexts[:4], positions[:4])  # all > 3 back
    torch.testing.assert_close(far, torch.log_softmax(logits[8:], -1))
    assert torch.equal(ContinuousCache(weight=0.0).log_probs(logits, keys, positions, keys, nexts, positions),
                       torch.log_softmax(logits, -1))


@pytest.mark.parametrize("bad, message", [
    ({"size": 0}, "continuous_cache.size=0"), ({"size": 2.5}, "continuous_cache.size=2.5"),
    ({"theta": -1.0}, "continuous_cache.theta=-1.0"), ({"theta": math.inf}, "continuous_cache.theta=inf"),
    ({"weight": 1.0}, r"continuous_cache.weight=1.0 is invalid: expected a value in \[0, 1\)"),
    ({"weight": -0.1}, "continuous_cache.weight=-0.1"), ({"sizes": 3}, "unknown keys"),
    ({"size": 10 ** 24}, r"size=1000000000000000000000000 is invalid: expected a whole number of positions in \[1, 2\*\*62\]"),
    ({"theta": 1e39}, r"theta=1e\+39 is invalid: expected a number in \[0, 1e\+06\]"),
])
def test_bad_settings_are_one_line_errors(bad, message):
    with pytest.raises(CVFPUserError, match=message):
        ContinuousCache.coerce(bad)
    assert ContinuousCache.from_option(None) is None
    assert str(ContinuousCache(weight=-0.0).weight) == "0.0"  # no negative zero in configs and model cards


def test_reading_token_by_token_scores_as_the_position_batches():
    """Generation's read and the scoring of position batches (validation, cvfp evaluate) give the same
    distribution at every position of a text, in any batch cut; the memory crosses sequences."""
    from cvfp_lightning.data import TokenSequences

    torch.manual_seed(0)
    emb = build_embedding(30, {"embed_dim": 8}, default_dim=8)
    upd = build_context_updater({"context_dim": 8, "num_layers": 2}, 8)
    cache = ContinuousCache(size=4, theta=3.0, weight=0.5)
    lm = CVFPLanguageModel(emb, upd, weight_tying=True, train_embedding=True, token_history=1,
                           continuous_cache=cache).eval()
    first, second = torch.tensor([3, 14, 15, 9, 2, 6, 5]), torch.tensor([3, 14, 8])
    seqs = TokenSequences.from_lists([first, second])
    previous = torch.cat([torch.cat([torch.zeros(1, 8), unroll(upd, lm.context_embed(s[None]))[0][:-1]])
                          for s in (first, second)])  # (10, D): c before each position, 0 at a start

    def rows(positions):
        return seqs.position_batch(positions, 1), previous[positions]

    with torch.no_grad():
        whole = lm.score_positions(seqs.position_batch(torch.arange(10), 1), previous, rows)
        for cut in ([0, 3, 10], [0, 1, 2, 5, 6, 9, 10]):  # batches of the chunked loaders, in order
            parts = [lm.score_positions(seqs.position_batch(torch.arange(a, b), 1), previous[a:b], rows)
                     for a, b in zip(cut[:-1], cut[1:])]
            torch.testing.assert_close(torch.cat(parts), whole)
        state, read = lm.start_state(1), []
        for t in range(len(first)):  # the first sequence read as one text
            state, scores = lm.read(state, first[t:t + 1].reshape(1, 1))
            read.append(scores[0])
        state = lm.next_sequence(state)  # the second sequence of the same text: the memory stays
        for t in range(len(second)):
            state, scores = lm.read(state, second[t:t + 1].reshape(1, 1))
            read.append(scores[0])
        torch.testing.assert_close(torch.stack(read), whole)
        assert state.memory_next[0].tolist() == [5, -1, 14, 8]  # the first sequence's end: in the window, no match
        state, at_once = lm.read(lm.start_state(1), first.reshape(1, -1))  # a prompt read in one call
        torch.testing.assert_close(at_once[0], whole[6])
        assert state.memory_keys.shape == (1, 4, 8) and state.memory_next[0].tolist() == first[3:].tolist()
        plain = lm.step(previous, seqs.position_batch(torch.arange(10), 1)["ids"],
                        seqs.position_batch(torch.arange(10), 1)["history"])[1]
    torch.testing.assert_close(whole[0], torch.log_softmax(plain[0], -1))  # no memory yet: the model alone
    # position 8's memory is positions 4..7 (size 4); the ids after them: 6, 5, none (the first sequence's end), 14
    gain = whole[8] - torch.log_softmax(plain[8], -1)
    assert gain[[6, 5, 14]].min() > 0 and gain[15] < 0  # only ids that followed a remembered position gain
    with pytest.raises(CVFPUserError, match="needs the text's earlier positions"):
        lm.score_positions(seqs.position_batch(torch.arange(3), 1), previous[:3])


def test_bf16_autocast_reads_the_cache_in_float32():
    """Under ``bf16-mixed`` the model runs in bfloat16 but the mixture is formed in float32: the same
    scores as the float32 model up to bfloat16's rounding of the model's own outputs."""
    torch.manual_seed(0)
    emb = build_embedding(30, {"embed_dim": 8}, default_dim=8)
    upd = build_context_updater({"context_dim": 8, "num_layers": 2}, 8)
    lm = CVFPLanguageModel(emb, upd, weight_tying=True, train_embedding=True, token_history=1,
                           continuous_cache={"size": 4, "theta": 3.0, "weight": 0.5}).eval()
    ids = torch.tensor([[1, 2, 3, 1, 2], [4, 5, 6, 4, 5]])
    with torch.no_grad():
        _, full = lm.read(lm.start_state(2), ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            state, mixed = lm.read(lm.start_state(2), ids)
            generated = lm.generate(ids[0], 4, greedy=True)
    assert mixed.dtype == torch.float32 and state.memory_keys.shape == (2, 4, 8)
    torch.testing.assert_close(mixed, full, atol=0.1, rtol=0.05)
    assert generated.shape == (4,)
