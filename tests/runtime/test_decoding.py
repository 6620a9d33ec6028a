"""Greedy and beam-search decoding against toy numpy language models and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from vlexport.errors import UsageError
from vlexport.runtime.decoding import (
    DecodeResult,
    apply_repetition_penalty,
    beam_search,
    greedy_decode,
    log_softmax,
)

EOS = 3  # the toy vocabulary is {0, 1, 2, 3 = end of sequence}
V = 4


class ToyLM:
    """A language model whose only memory is a real, growing KV cache.

    The cache is ``[L=1, 2, B, H=1, S, hd=1]``: per position, k holds the token id (or the prefix
    embedding's sum) and v marks what it is (1 = token, -1 = prefix). The next-token logits are
    read back from the cache alone, ``logits_fn(prefix_sum, tokens_so_far)``, so a cache row that
    does not follow its beam gives the wrong history and the wrong logits.
    """

    def __init__(self, logits_fn):
        self.logits_fn = logits_fn
        self.calls: list[tuple[int, int, int, bool]] = []  # (batch, P', T, had a past)

    def __call__(self, prefix_embeds, input_ids, attention_mask, past):
        b, t = input_ids.shape
        assert input_ids.dtype == np.int64 and attention_mask.dtype == np.int64
        p = 0 if prefix_embeds is None else prefix_embeds.shape[1]
        s = 0 if past is None else past.shape[4]
        assert attention_mask.shape == (b, s + p + t) and np.all(attention_mask == 1)
        if past is None:
            past = np.zeros((1, 2, b, 1, 0, 1), np.float32)
        assert past.shape[2] == b
        new = np.zeros((1, 2, b, 1, p + t, 1), np.float32)
        if p:
            new[0, 0, :, 0, :p, 0] = prefix_embeds.sum(axis=2)
            new[0, 1, :, 0, :p, 0] = -1
        new[0, 0, :, 0, p:, 0] = input_ids
        new[0, 1, :, 0, p:, 0] = 1
        present = np.concatenate([past, new], axis=4)
        self.calls.append((b, p, t, s > 0))
        logits = np.stack([self._row(present[0, :, i, 0, :, 0]) for i in range(b)])
        return logits.astype(np.float32), present

    def _row(self, kv: np.ndarray) -> np.ndarray:
        k, v = kv
        tokens = [int(x) for x in k[v == 1]]
        prefix_sum = float(k[v == -1].sum())
        return np.asarray(self.logits_fn(prefix_sum, tokens), np.float32)


def table_lm(table: dict) -> ToyLM:
    """Logits from a table keyed by the last token (None = start)."""
    return ToyLM(lambda _p, toks: table[toks[-1] if toks else None])


def logits_of_probs(p) -> np.ndarray:
    with np.errstate(divide="ignore"):  # probability 0 -> logit -inf, on purpose
        return np.log(np.asarray(p, np.float64))


def brute_force(logits_fn, prefix_sum, prompt, max_length, length_penalty=1.0, repetition_penalty=1.0):
    """The best sequence over every sequence the decoder could produce, scored directly."""
    best = (-math.inf, None)
    for n in range(1, max_length + 1):
        for seq in itertools.product(range(V), repeat=n):
            if EOS in seq[:-1]:
                continue
            total = 0.0
            for i, tok in enumerate(seq):
                history = list(prompt) + list(seq[:i])
                logits = np.asarray(logits_fn(prefix_sum, history), np.float64)
                for j in set(history):  # CTRL penalty, written out
                    logits[j] = logits[j] * repetition_penalty if logits[j] < 0 else logits[j] / repetition_penalty
                total += logits[tok] - math.log(np.exp(logits).sum())
            if seq[-1] != EOS and n < max_length:
                continue  # unfinished sequences only count at the length limit
            score = total / n**length_penalty
            if score > best[0]:
                best = (score, [t for t in seq if t != EOS])
    return best


def random_history_lm(seed: int) -> ToyLM:
    """Logits depend on the prefix, the last token and the sum of all earlier ones (the whole history)."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 1.5, size=(V + 1, V + 1, V))
    pvec = rng.normal(0, 1, size=V)

    def fn(prefix_sum, toks):
        history = sum(toks[:-1]) % (V + 1)
        last = toks[-1] if toks else V
        return table[history, last] + 0.3 * prefix_sum * pvec

    return ToyLM(fn)


PREFIX = np.arange(6, dtype=np.float32).reshape(1, 2, 3) / 10  # sum 1.5


# -- greedy ----------------------------------------------------------------------------------
def test_greedy_picks_the_argmax_and_scores_log_probs() -> None:
    probs = {None: [0.1, 0.6, 0.2, 0.1], 1: [0.1, 0.1, 0.7, 0.1], 2: [0.2, 0.1, 0.1, 0.6]}
    lm = table_lm({k: logits_of_probs(v) for k, v in probs.items()})
    res = greedy_decode(lm, PREFIX, max_length=10, eos_token_id=EOS)
    assert res.token_ids == [1, 2] and res.ended
    assert res.score == pytest.approx(math.log(0.6) + math.log(0.7) + math.log(0.6), rel=1e-6)
    assert res.steps == 3
    # First call: the whole prefix and an empty prompt; then one token on an empty prefix with the cache.
    assert lm.calls == [(1, 2, 0, False), (1, 0, 1, True), (1, 0, 1, True)]


def test_greedy_stops_at_max_length_and_never_returns_eos() -> None:
    lm = table_lm({None: logits_of_probs([0.1, 0.7, 0.1, 0.1]), 1: logits_of_probs([0.1, 0.7, 0.1, 0.1])})
    res = greedy_decode(lm, PREFIX, max_length=3, eos_token_id=EOS)
    assert res.token_ids == [1, 1, 1] and not res.ended
    assert res.steps == 3  # no decoder run after the last token
    eos_first = table_lm({None: logits_of_probs([0.1, 0.1, 0.1, 0.7])})
    res = greedy_decode(eos_first, PREFIX, max_length=1, eos_token_id=EOS)
    assert res.token_ids == [] and res.ended and res.score == pytest.approx(math.log(0.7))


def test_greedy_with_and_without_cache_agree() -> None:
    for seed in range(4):
        lm_c, lm_n = random_history_lm(seed), random_history_lm(seed)
        a = greedy_decode(lm_c, PREFIX, max_length=6, eos_token_id=EOS, prompt_ids=[2, 0])
        b = greedy_decode(lm_n, PREFIX, max_length=6, eos_token_id=EOS, prompt_ids=[2, 0], use_cache=False)
        assert a.token_ids == b.token_ids and a.score == pytest.approx(b.score)
        assert a.steps == b.steps
        # Without the cache every call starts from nothing and feeds the prefix, prompt and all tokens.
        assert all(not had_past and p == 2 for _, p, _, had_past in lm_n.calls)
        assert [t for _, _, t, _ in lm_n.calls] == list(range(2, 2 + len(lm_n.calls)))


def test_prompt_is_fed_but_not_returned() -> None:
    lm = ToyLM(lambda _p, toks: logits_of_probs([0.7, 0.1, 0.1, 0.1]) if toks == [2, 1] else
               logits_of_probs([0.1, 0.1, 0.1, 0.7]))
    res = greedy_decode(lm, None, max_length=5, eos_token_id=EOS, prompt_ids=[2, 1])
    assert res.token_ids == [0] and res.ended
    assert lm.calls[0] == (1, 0, 2, False)


# -- repetition penalty ------------------------------------------------------------------------
def test_repetition_penalty_matches_ctrl_rule() -> None:
    logits = np.array([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, -2.0, 0.0]], np.float32)
    out = apply_repetition_penalty(logits, [[0, 1, 1], [2, 3]], 2.0)
    np.testing.assert_allclose(out, [[1.0, -2.0, 0.5, 3.0], [1.0, 1.0, -4.0, 0.0]])
    assert logits[0, 0] == 2.0  # the input is not modified


def test_repetition_penalty_blocks_a_repeat() -> None:
    table = {None: np.array([0.0, 2.0, 0.0, -5.0]), 1: np.array([0.0, 2.0, 1.5, -5.0]), 2: np.array([0, 0, 0, 5.0])}
    lm = table_lm(table)
    assert greedy_decode(lm, None, max_length=3, eos_token_id=EOS).token_ids == [1, 1, 1]
    res = greedy_decode(lm, None, max_length=3, eos_token_id=EOS, repetition_penalty=2.0)
    assert res.token_ids == [1, 2]  # 2.0 / 2 = 1.0 < 1.5
    # The score is taken from the penalised distributions (zero logits stay zero).
    want = (log_softmax(table[None])[1] + log_softmax(np.array([0.0, 1.0, 1.5, -5.0]))[2]
            + log_softmax(np.array([0.0, 0.0, 0.0, 5.0]))[3])
    assert res.score == pytest.approx(want)


# -- beam search ---------------------------------------------------------------------------------
def test_beam_finds_a_likelier_sequence_than_greedy() -> None:
    # Greedy takes A (0.5) then anything (at best 0.35); B (0.4) then the end (0.9) is likelier.
    probs = {None: [0.5, 0.4, 0.0001, 0.0999], 0: [0.35, 0.33, 0.02, 0.30], 1: [0.05, 0.03, 0.02, 0.9]}
    lm = table_lm({k: logits_of_probs(v) for k, v in probs.items()})
    g = greedy_decode(lm, None, max_length=2, eos_token_id=EOS)
    b = beam_search(lm, None, num_beams=2, max_length=2, eos_token_id=EOS, length_penalty=0.0)
    assert g.token_ids == [0, 0]
    assert b.token_ids == [1] and b.ended
    assert b.score == pytest.approx(math.log(0.4 * 0.9), rel=1e-5)
    assert b.score > g.score


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("length_penalty,repetition_penalty", [(1.0, 1.0), (0.0, 1.0), (2.0, 1.3), (-0.5, 1.0)])
def test_wide_beam_equals_exhaustive_search(seed: int, length_penalty: float, repetition_penalty: float) -> None:
    lm = random_history_lm(seed)
    prompt = [seed % 3]
    score, tokens = brute_force(lm.logits_fn, float(PREFIX.sum()), prompt, 4, length_penalty, repetition_penalty)
    # 3^4 = 81 unfinished sequences at the limit: 81 beams never drop a candidate.
    res = beam_search(lm, PREFIX, num_beams=81, max_length=4, eos_token_id=EOS, prompt_ids=prompt,
                      length_penalty=length_penalty, repetition_penalty=repetition_penalty)
    assert res.token_ids == tokens
    assert res.score == pytest.approx(score, rel=1e-5)


def test_beam_with_and_without_cache_agree_and_the_cache_follows_the_beams() -> None:
    for seed in range(6):
        lm = random_history_lm(seed)
        kwargs = dict(num_beams=3, max_length=5, eos_token_id=EOS, prompt_ids=[1], length_penalty=1.0)
        cached = beam_search(lm, PREFIX, **kwargs)
        fresh = beam_search(random_history_lm(seed), PREFIX, use_cache=False, **kwargs)
        assert cached.token_ids == fresh.token_ids and cached.score == pytest.approx(fresh.score)
        assert cached.steps == fresh.steps
        # The cache had one row per beam after the first step.
        assert lm.calls[0][0] == 1 and all(c[0] <= 3 for c in lm.calls[1:])


def test_a_wrong_cache_reorder_changes_the_result() -> None:
    """The toy model is sensitive to the reorder: rows that do not follow their beams give other tokens."""
    differ = 0
    for seed in range(6):
        lm = random_history_lm(seed)

        def shuffled(prefix, ids, mask, past, lm=lm):
            return lm(prefix, ids, mask, None if past is None else past[:, :, ::-1])

        kwargs = dict(num_beams=3, max_length=5, eos_token_id=EOS, prompt_ids=[1])
        good = beam_search(lm, PREFIX, **kwargs)
        bad = beam_search(shuffled, PREFIX, **kwargs)
        differ += good.token_ids != bad.token_ids or not math.isclose(good.score, bad.score, rel_tol=1e-9)
    assert differ >= 3


def test_length_penalty_changes_the_winner() -> None:
    # [end] has p = 0.4 (length 1); [A, end] has p = 0.6 * 0.6 = 0.36 (length 2).
    table = {None: logits_of_probs([0.6, 1e-6, 1e-6, 0.4]), 0: logits_of_probs([0.2, 0.1, 0.1, 0.6])}
    table[1] = table[2] = np.zeros(V)
    lm = table_lm(table)
    short = beam_search(lm, None, num_beams=2, max_length=3, eos_token_id=EOS, length_penalty=0.0)
    long = beam_search(lm, None, num_beams=2, max_length=3, eos_token_id=EOS, length_penalty=1.0)
    assert short.token_ids == [] and short.score == pytest.approx(math.log(0.4), rel=1e-4)
    assert long.token_ids == [0] and long.score == pytest.approx(math.log(0.36) / 2, rel=1e-4)


def test_beam_stops_early_when_nothing_can_beat_the_finished() -> None:
    # Both beams end at once with high probability; with length_penalty 0 nothing longer can win.
    table = {None: logits_of_probs([0.05, 0.05, 0.0, 0.9])}
    for k in range(3):
        table[k] = logits_of_probs([0.01, 0.01, 0.01, 0.97])
    lm = table_lm(table)
    res = beam_search(lm, None, num_beams=2, max_length=20, eos_token_id=EOS, length_penalty=0.0)
    assert res.token_ids == [] and res.ended
    assert res.steps == 2  # the first run, one more step to finish the second hypothesis, then stop


def test_beam_without_eos_returns_max_length_tokens() -> None:
    lm = table_lm({k: logits_of_probs([0.5, 0.3, 0.2, 1e-9]) for k in (None, 0, 1, 2)})
    res = beam_search(lm, None, num_beams=2, max_length=4, eos_token_id=EOS)
    assert res.token_ids == [0, 0, 0, 0] and not res.ended
    assert res.score == pytest.approx(4 * math.log(0.5) / 4, rel=1e-6)


def test_option_errors() -> None:
    lm = table_lm({None: np.zeros(V)})
    with pytest.raises(UsageError, match="max length must be at least 1"):
        greedy_decode(lm, None, max_length=0, eos_token_id=EOS)
    with pytest.raises(UsageError, match="max length must be at least 1"):
        beam_search(lm, None, num_beams=2, max_length=0, eos_token_id=EOS)
    with pytest.raises(UsageError, match="num_beams"):
        beam_search(lm, None, num_beams=0, max_length=3, eos_token_id=EOS)
    with pytest.raises(UsageError, match="repetition_penalty"):
        greedy_decode(lm, None, max_length=3, eos_token_id=EOS, repetition_penalty=0.0)


def test_a_step_with_a_wrong_cache_length_is_reported() -> None:
    lm = random_history_lm(0)

    def stale(prefix, ids, mask, past):
        logits, present = lm(prefix, ids, mask, past)
        return logits, present[:, :, :, :, :1]

    with pytest.raises(ValueError, match="present has shape"):
        greedy_decode(stale, PREFIX, max_length=3, eos_token_id=EOS, prompt_ids=[0])


def test_decode_result_is_plain_data() -> None:
    r = DecodeResult([1, 2], -1.5, 3, True)
    assert r.token_ids == [1, 2] and r.score == -1.5 and r.steps == 3 and r.ended
