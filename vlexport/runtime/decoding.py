"""Greedy and beam-search decoding in numpy, for any decoder that runs one step at a time.

The model is a *step function* (the caption task wraps its ``decoder`` graph in one)::

    step(prefix_embeds, input_ids, attention_mask, past) -> (logits, present)

* ``prefix_embeds`` ``[B, P', D]`` float32: the image prefix on the first call (``P' = P``), an
  empty ``[B, 0, D]`` on later cached calls; None when decoding has no prefix at all;
* ``input_ids`` ``[B, T]`` int64: the new tokens (the prompt on the first call, which may be empty);
* ``attention_mask`` ``[B, S + P' + T]`` int64, all ones (no padding: beams share one length);
* ``past`` ``[L, 2, B, H, S, hd]``: the cache returned by the previous call, or None when there is
  none yet (the step makes its own empty ``S = 0`` cache: only it knows L, H and hd);
* returns the ``[B, V]`` logits of the last position and the cache ``present``
  ``[L, 2, B, H, S + P' + T, hd]``.

Beams are the batch axis; after each beam-search step the cache rows follow their beams with
``np.take(present, beam_idx, axis=2)``. ``use_cache=False`` recomputes the whole sequence (prefix
and every token) from an empty cache at every step: slower, the same tokens, and what a benchmark
compares the cached loop against.

Scores are log-probabilities of the *processed* logits (after the repetition penalty), as in
Hugging Face ``generate``. A sequence's length counts its generated tokens, the end-of-sequence
token included (the prompt is not counted); ``max_length`` is the most tokens generated, the
end-of-sequence token included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vlexport.errors import UsageError

__all__ = [
    "StepFn",
    "DecodeResult",
    "greedy_decode",
    "beam_search",
    "apply_repetition_penalty",
    "log_softmax",
    "check_decode_options",
]

StepFn = Callable[
    [np.ndarray | None, np.ndarray, np.ndarray, np.ndarray | None], tuple[np.ndarray, np.ndarray]
]


@dataclass(frozen=True)
class DecodeResult:
    """The decoded tokens (without the end-of-sequence token) and how they were found.

    ``score`` is the sum of the tokens' log-probabilities (end-of-sequence token included); beam
    search divides it by ``length ** length_penalty``. ``steps`` counts decoder runs.
    ``ended`` is True when the end-of-sequence token was generated (False: cut at ``max_length``).
    """

    token_ids: list[int]
    score: float
    steps: int
    ended: bool = False


def decoder_feeds(settings: dict[str, Any], prefix_embeds: np.ndarray | None, input_ids: np.ndarray,
                  attention_mask: np.ndarray, past: np.ndarray | None, *, prefix_dtype: Any = np.float32,
                  kv_dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """The decoder graph's four inputs for one step, an absent prefix or cache made empty.

    ``settings`` is the bundle's ``caption`` section (``num_layers``, ``num_heads``, ``head_dim``,
    ``embed_size``): only the graph's owner knows the shape of an empty cache.
    """
    b = input_ids.shape[0]
    if past is None:
        past = np.zeros((settings["num_layers"], 2, b, settings["num_heads"], 0, settings["head_dim"]), kv_dtype)
    if prefix_embeds is None:
        prefix_embeds = np.zeros((b, 0, settings["embed_size"]), prefix_dtype)
    return {"prefix_embeds": np.ascontiguousarray(prefix_embeds, dtype=prefix_dtype), "input_ids": input_ids,
            "attention_mask": attention_mask, "past_key_values": np.ascontiguousarray(past, dtype=kv_dtype)}


# -- pieces --------------------------------------------------------------------------------
def check_decode_options(
    max_length: int, num_beams: int = 1, length_penalty: float = 1.0, repetition_penalty: float = 1.0
) -> None:
    """Raise a UsageError for a decoding option that cannot work (each check one line)."""
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
        raise UsageError(f"max length must be at least 1, got {max_length!r}")
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise UsageError(f"num_beams must be a positive integer, got {num_beams!r}")
    for name, v in (("length_penalty", length_penalty), ("repetition_penalty", repetition_penalty)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise UsageError(f"{name} must be a finite number, got {v!r}")
    if repetition_penalty <= 0:
        raise UsageError(f"repetition_penalty must be positive (1.0 = none), got {repetition_penalty!r}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (stable; ``-inf`` logits get ``-inf``)."""
    x = np.asarray(logits, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def apply_repetition_penalty(logits: np.ndarray, seen: Sequence[Sequence[int]], penalty: float) -> np.ndarray:
    """CTRL's repetition penalty, as Hugging Face applies it: a copy of ``logits`` ``[B, V]`` in which
    each row's already-seen token ids have positive logits divided by ``penalty`` and negative ones
    multiplied by it (so ``penalty > 1`` always makes a repeat less likely)."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if penalty == 1.0:
        return out
    for row, ids in zip(out, seen):
        if len(ids):
            idx = np.unique(np.asarray(ids, np.int64))
            vals = row[idx]
            row[idx] = np.where(vals < 0, vals * penalty, vals / penalty)
    return out


class _Runner:
    """Feeds a step function and keeps its cache: cached steps or full recomputation."""

    def __init__(self, step: StepFn, prefix: np.ndarray | None, prompt: list[int], use_cache: bool):
        if prefix is not None:
            prefix = np.asarray(prefix)
            if prefix.ndim != 3 or prefix.shape[0] != 1:
                raise ValueError(f"prefix: got shape {tuple(prefix.shape)}, expected (1, P, D)")
            prefix = np.ascontiguousarray(prefix, dtype=np.float32)
        self.step, self.prefix, self.prompt, self.use_cache = step, prefix, prompt, use_cache
        self.past: np.ndarray | None = None
        self.past_len = 0
        self.calls = 0
        self.vocab: int | None = None

    def _prefix(self, batch: int, empty: bool) -> np.ndarray | None:
        if self.prefix is None:
            return None
        if empty:
            return np.zeros((batch, 0, self.prefix.shape[2]), np.float32)
        return np.repeat(self.prefix, batch, axis=0) if batch > 1 else self.prefix

    def _call(self, prefix: np.ndarray | None, ids: np.ndarray, past: np.ndarray | None, past_len: int):
        b, t = ids.shape
        p = 0 if prefix is None else prefix.shape[1]
        mask = np.ones((b, past_len + p + t), np.int64)
        logits, present = self.step(prefix, ids, mask, past)
        self.calls += 1
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.shape[0] != b or (self.vocab is not None and logits.shape[1] != self.vocab):
            want = f"({b}, {self.vocab if self.vocab is not None else 'V'})"
            raise ValueError(f"decoder step: logits have shape {tuple(logits.shape)}, expected {want}")
        self.vocab = logits.shape[1]
        present = np.asarray(present)
        total = past_len + p + t
        if present.ndim != 6 or present.shape[1] != 2 or present.shape[2] != b or present.shape[4] != total:
            raise ValueError(
                f"decoder step: present has shape {tuple(present.shape)}, expected (L, 2, {b}, H, {total}, hd)"
            )
        return logits, present

    def start(self) -> np.ndarray:
        """Logits after the prefix and the prompt, for one sequence."""
        ids = np.asarray([self.prompt], np.int64).reshape(1, len(self.prompt))
        logits, present = self._call(self._prefix(1, empty=False), ids, None, 0)
        if self.use_cache:
            self.past, self.past_len = present, present.shape[4]
        return logits

    def advance(self, tokens: list[list[int]], beam_idx: np.ndarray | None = None) -> np.ndarray:
        """Logits after appending each row's last token; ``tokens[b]`` is row b's whole generated
        sequence; ``beam_idx[b]`` the row of the previous step it continues (None: the same row)."""
        b = len(tokens)
        if not self.use_cache:
            ids = np.asarray([self.prompt + seq for seq in tokens], np.int64).reshape(b, -1)
            logits, _ = self._call(self._prefix(b, empty=False), ids, None, 0)
            return logits
        past = self.past if beam_idx is None else np.take(self.past, beam_idx, axis=2)
        ids = np.asarray([[seq[-1]] for seq in tokens], np.int64)
        logits, present = self._call(self._prefix(b, empty=True), ids, past, self.past_len)
        self.past, self.past_len = present, present.shape[4]
        return logits


# -- greedy --------------------------------------------------------------------------------
def greedy_decode(
    step: StepFn,
    prefix: np.ndarray | None,
    *,
    max_length: int,
    eos_token_id: int,
    prompt_ids: Sequence[int] = (),
    repetition_penalty: float = 1.0,
    use_cache: bool = True,
) -> DecodeResult:
    """Pick the most likely next token until ``eos_token_id`` or ``max_length`` tokens.

    ``prefix`` is ``[1, P, D]`` (or None); ``prompt_ids`` are fed after it and never returned.
    Ties go to the lowest token id (``argmax``).
    """
    check_decode_options(max_length, repetition_penalty=repetition_penalty)
    prompt = [int(i) for i in prompt_ids]
    runner = _Runner(step, prefix, prompt, use_cache)
    logits = runner.start()
    tokens: list[int] = []
    score = 0.0
    ended = False
    for i in range(max_length):
        logp = log_softmax(apply_repetition_penalty(logits, [prompt + tokens], repetition_penalty))[0]
        tok = int(np.argmax(logp))
        score += float(logp[tok])
        if tok == eos_token_id:
            ended = True
            break
        tokens.append(tok)
        if i + 1 < max_length:
            logits = runner.advance([tokens])
    return DecodeResult(tokens, score, runner.calls, ended)


# -- beam search ---------------------------------------------------------------------------
def _best_possible(sum_logprobs: float, cur_len: int, max_length: int, length_penalty: float) -> float:
    """The highest final score a live beam of ``cur_len`` tokens and ``sum_logprobs`` can still reach.

    More tokens only lower the sum (log-probabilities are <= 0). With a positive length penalty the
    longest completion divides by the most; otherwise the shortest completion (one more token) wins.
    """
    if length_penalty > 0:
        return sum_logprobs / (max_length**length_penalty)
    return sum_logprobs / ((cur_len + 1) ** length_penalty)


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values, best first; equal values in index order.

    A partial partition first: sorting all ``beams x vocabulary`` candidates (150k for 3 beams of
    GPT-2) at every step would cost more than the selection itself.
    """
    idx = np.argpartition(-values, k - 1)[:k] if k < values.size else np.arange(values.size)
    return idx[np.lexsort((idx, -values[idx]))]


def beam_search(
    step: StepFn,
    prefix: np.ndarray | None,
    *,
    num_beams: int,
    max_length: int,
    eos_token_id: int,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    prompt_ids: Sequence[int] = (),
    use_cache: bool = True,
) -> DecodeResult:
    """Keep the ``num_beams`` most likely sequences at each step; return the best finished one.

    As in Hugging Face ``generate``: each step ranks ``beam score + log p(token)`` over all beams
    and tokens; an end-of-sequence candidate among the top ``num_beams`` becomes a finished
    hypothesis scored ``sum_logprobs / length ** length_penalty``; the best non-ending candidates
    (up to ``num_beams``) go on. Beams still running at ``max_length`` are scored the same way.

    Stopping is exact rather than Hugging Face's default heuristic: the search ends once
    ``num_beams`` hypotheses are finished and no running beam can reach a better score than the
    worst of them under any completion (see :func:`_best_possible`), so with enough beams the
    result is the exhaustive optimum. Among equal scores the lower beam, then the lower token id,
    comes first.
    """
    check_decode_options(max_length, num_beams, length_penalty, repetition_penalty)
    prompt = [int(i) for i in prompt_ids]
    runner = _Runner(step, prefix, prompt, use_cache)
    logits = runner.start()
    beams: list[list[int]] = [[]]
    sums = np.zeros(1, np.float64)
    finished: list[tuple[float, list[int], bool]] = []  # (score, tokens, ended)
    for t in range(max_length):
        logp = log_softmax(apply_repetition_penalty(logits, [prompt + seq for seq in beams], repetition_penalty))
        vocab = logp.shape[1]
        cand = (sums[:, None] + logp).ravel()
        order = _top_k(cand, min(2 * num_beams, cand.size))
        live: list[tuple[int, int, float]] = []  # (beam, token, sum)
        for rank, flat in enumerate(order.tolist()):
            b, tok = divmod(flat, vocab)
            s = float(cand[flat])
            if s == -math.inf:
                break
            if tok == eos_token_id:
                if rank < num_beams:  # lower-ranked endings are not better than the running beams
                    finished.append((s / (t + 1) ** length_penalty, list(beams[b]), True))
                continue
            live.append((b, tok, s))
            if len(live) == num_beams:
                break
        if t + 1 == max_length:
            finished += [(s / (t + 1) ** length_penalty, beams[b] + [tok], False) for b, tok, s in live]
            break
        if not live:
            break
        if len(finished) >= num_beams:
            worst_kept = sorted((f[0] for f in finished), reverse=True)[num_beams - 1]
            if worst_kept >= max(_best_possible(s, t + 1, max_length, length_penalty) for _, _, s in live):
                break
        beam_idx = np.asarray([b for b, _, _ in live], np.int64)
        beams = [beams[b] + [tok] for b, tok, _ in live]
        sums = np.asarray([s for _, _, s in live], np.float64)
        logits = runner.advance(beams, beam_idx)
    if not finished:
        # Every candidate had probability zero (all logits -inf): nothing can be decoded.
        raise ValueError("beam search: the decoder gave every token zero probability")
    best = max(range(len(finished)), key=lambda i: (finished[i][0], -i))
    score, tokens, ended = finished[best]
    return DecodeResult(tokens, float(score), runner.calls, ended)
