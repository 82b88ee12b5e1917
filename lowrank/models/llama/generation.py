"""Text generation as Hugging Face's ``generate``: prefill the prompt once, then one token per step.

Letters: B prompts, T prompt length (left-padded to the longest), V vocabulary, n new tokens.

    cache  = KVCache(L, B, H_kv, T + n, h), T positions allocated, grown (doubling) as steps need them
    logits = forward(ids (B, T), attention_mask (B, T), cache)[:, -1]          prefill     (B, V)
    repeat n times:
        token  = pick(logits)                                                               (B,)
        logits = forward(token (B, 1), None, cache)[:, -1]                     decode      (B, V)

pick: greedy argmax, or (do_sample) a draw from softmax(logits / temperature) restricted to the
top_k largest logits, then to the smallest set of tokens whose probability reaches top_p
(transformers' order: temperature, top-k, top-p). The scores are (logits − max) / temperature,
the same softmax, which cannot overflow: as temperature -> 0 they tend to 0 for the largest
logits and −inf for the rest, the argmax (logits / 1e-308 would be inf, and the draw NaN).
A row that produced one of the ``eos_token_id`` ids is finished and gets ``pad_token_id`` from
then on; when every row is finished, generation stops early (so the cache holds only what was used).

``streamer`` follows transformers' protocol: ``put(input_ids (B, T))`` once with the prompt, then
``put(token (B,))`` after every step (finished rows' pad included), then ``end()``.

Prompts of different lengths are left-padded (attention_mask 0 on the left); positions are
absolute (0 .. T + n − 1) as in the model's forward, and RoPE sees only position differences,
so a padded row generates what it generates alone (up to rounding).
"""
from __future__ import annotations

import numbers

import numpy as np

from ...kernels.common import host as _host
from ...nn.device import get_array_module
from ...nn.kv_cache import KVCache


def generate(model, input_ids, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed=None, eos_token_id=None,
             pad_token_id: int | None = None, attention_mask=None, streamer=None, *, forward=None):
    """Continue each prompt of ``input_ids`` (B, T) by up to ``max_new_tokens`` tokens -> ids (B, T + n).

    ``model``: a LlamaForCausalLM (its config, dtype and device); ``forward(ids, attention_mask,
    kv_cache, logits_to_keep) -> logits`` defaults to ``model.forward`` (benchmarks/serving.py passes its own; LoRA
    generation sets the adapters on the layers instead, ``LoraModel.generate``).
    ``seed``: the numpy Generator's seed for sampling. ``eos_token_id``: an int or a list of ints;
    ``pad_token_id`` defaults to the (first) eos id. ``attention_mask`` (B, T): 1 for tokens, 0 for
    left padding; None: every position is a token. ``streamer``: an object with ``put(ids)`` and
    ``end()`` (transformers' TextStreamer protocol, see the module docstring), or None.
    """
    config = model.config
    forward = model.forward if forward is None else forward
    xp = get_array_module(next(p for _, p in model.named_parameters()).data)
    ids, mask = _check_prompt(input_ids, attention_mask, config, max_new_tokens)
    _check_sampling(do_sample, temperature, top_k, top_p)
    eos, pad = _check_token_ids(eos_token_id, pad_token_id, config.vocab_size)
    B, T = ids.shape
    rng = np.random.default_rng(seed)
    cache = KVCache.for_model(config, B, T + max_new_tokens, model.dtype, xp, capacity=T)
    if streamer is not None:
        streamer.put(ids)
    logits = forward(xp.asarray(ids), attention_mask=xp.asarray(mask), kv_cache=cache,
                     logits_to_keep=1)[:, -1]                                 # (B, V) prefill: the last position's
    finished = np.zeros(B, bool)
    new = []
    for step in range(max_new_tokens):
        token = pick(_host(logits), do_sample, temperature, top_k, top_p, rng)                # (B,)
        if eos:
            token = np.where(finished, pad, token)
            finished |= np.isin(token, eos)
        new.append(token)
        if streamer is not None:
            streamer.put(token)
        if finished.all() or step == max_new_tokens - 1:
            break
        logits = forward(xp.asarray(token[:, None]), attention_mask=None, kv_cache=cache)[:, -1]  # (B, V) decode
    if streamer is not None:
        streamer.end()
    return xp.asarray(np.concatenate([ids] + [t[:, None] for t in new], axis=1))              # (B, T + n)


def pick(logits, do_sample: bool, temperature: float = 1.0, top_k=None, top_p=None, rng=None):
    """Next token per row of ``logits`` (B, V) (host floats): argmax, or a draw by ``rng``."""
    if not do_sample:
        return logits.argmax(axis=-1)
    scores = logits.astype(np.float64)
    with np.errstate(over="ignore"):                                              # -> -inf for a tiny temperature
        scores = (scores - scores.max(axis=-1, keepdims=True)) / temperature      # (B, V), max 0
    V = scores.shape[-1]
    if top_k is not None and top_k < V:
        kth = np.partition(scores, V - top_k, axis=-1)[:, V - top_k][:, None]      # (B, 1) the k-th largest
        scores = np.where(scores >= kth, scores, -np.inf)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)                                    # (B, V)
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")                          # (B, V) most likely first
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < top_p              # mass before it < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
    cdf = np.cumsum(probs, axis=-1)
    cdf /= cdf[:, -1:]                                                            # (B, V), ends at exactly 1
    u = 1.0 - rng.random(len(cdf))                                                # (B,) in (0, 1]
    return (cdf < u[:, None]).sum(axis=-1)                                        # first token with cdf >= u


def _check_prompt(input_ids, attention_mask, config, max_new_tokens):
    """(ids, mask) as host int64 arrays (B, T), after every check ``generate`` makes on its inputs."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    ids = _host(input_ids)
    if ids.ndim != 2 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"generate: input_ids must be integer token ids of shape (B, T), got shape "
                         f"{ids.shape} and dtype {ids.dtype}")
    B, T = ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"generate: empty prompt (input_ids of shape {ids.shape}); give at least one token")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ValueError(f"generate: token ids must lie in [0, {config.vocab_size}), got {ids.min()}..{ids.max()}")
    mask = np.ones((B, T), np.int64) if attention_mask is None else _host(attention_mask).astype(np.int64)
    if mask.shape != (B, T) or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"generate: attention_mask must be 0/1 of shape (B, T) = ({B}, {T}) like input_ids, "
                         f"got shape {mask.shape}")
    if not mask.any(axis=1).all():
        raise ValueError(f"generate: empty prompt in rows {np.flatnonzero(~mask.any(axis=1)).tolist()} "
                         f"(attention_mask all 0); give at least one token")
    if (np.diff(mask, axis=1) < 0).any():
        raise ValueError("generate: attention_mask has padding after a token; pad prompts on the left")
    context = config.max_position_embeddings
    if T > context:
        raise ValueError(f"generate: the prompt has {T} tokens, longer than the model's context of {context} "
                         f"positions (max_position_embeddings)")
    if T + max_new_tokens > context:
        raise ValueError(f"generate: a prompt of {T} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"context of {context} positions; shorten the prompt or ask for at most "
                         f"{context - T} new tokens")
    return ids.astype(np.int64), mask


def _check_sampling(do_sample, temperature, top_k, top_p):
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must lie in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"generate: top_k must be an integer >= 1, got {top_k!r}")
    if do_sample and not (isinstance(temperature, numbers.Real) and np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"generate: temperature must be a finite number > 0 when sampling, got {temperature!r}")


def _check_token_ids(eos_token_id, pad_token_id, vocab_size):
    """(eos ids [int], pad id or None) after checking they are token ids in [0, vocab_size)."""
    eos = ([] if eos_token_id is None else list(eos_token_id) if isinstance(eos_token_id, (list, tuple))
           else np.reshape(eos_token_id, -1).tolist() if isinstance(eos_token_id, np.ndarray) else [eos_token_id])
    if not all(_is_token_id(e, vocab_size) for e in eos):
        raise ValueError(f"generate: eos_token_id must be token ids in [0, {vocab_size}) (the model's vocab_size), "
                         f"got {eos_token_id!r}")
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
    if pad is not None and not _is_token_id(pad, vocab_size):
        raise ValueError(f"generate: pad_token_id must be a token id in [0, {vocab_size}) (the model's vocab_size), "
                         f"got {pad_token_id!r}")
    return [int(e) for e in eos], (None if pad is None else int(pad))


def _is_token_id(value, vocab_size) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < vocab_size
