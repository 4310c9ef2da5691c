"""The sampling math: from logits to tokens (greedy, temperature, nucleus), the distributions
speculative decoding compares, and the check that logits can be sampled at all. Pure functions of
tensors; nothing here knows about sequences or the model. Also the one check of the sampling options
beyond temperature and top_p that the library takes (`sampling_options`)."""
import math
from typing import List, Optional, Tuple, Union

import torch

from llama import structured, validation


class NonFiniteLogitsError(ValueError):
    """The model produced NaN or infinite logits: nothing can be sampled from them."""


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """(..., vocab) logits -> (...) bool: the rows nothing can be sampled from (a NaN or +inf
    logit, or every logit -inf; a -inf mask on some tokens still samples)."""
    return (torch.isnan(logits) | torch.isposinf(logits)).any(-1) | torch.isneginf(logits).all(-1)


def check_finite(logits: torch.Tensor) -> None:
    """Raise NonFiniteLogitsError, naming the likely causes, for NaN or +inf logits or a row that is
    all -inf (`nonfinite_rows`); argmax would pick garbage, multinomial crash."""
    bad = nonfinite_rows(logits)
    if bool(bad.any()):
        rows = bad.nonzero()[:, 0].tolist()
        raise NonFiniteLogitsError(
            f"the model produced NaN or infinite logits (batch rows {rows[:8]}): the weights are likely corrupt "
            "(check them with scripts/verify.py), or the activations overflowed in float16 (run in bfloat16 or "
            "float32: --dtype bfloat16)"
        )


def _top_p_sorted(probs: torch.Tensor, p: Union[float, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of each row of `probs` (..., vocab): the smallest prefix of the sorted
    distribution whose mass reaches `p` (the top token always), renormalised; (probs, ids) sorted.
    `p`: one for all rows, or a tensor (..., 1) of one per row."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort.masked_fill_(mask, 0.0)
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return probs_sort, probs_idx


def top_p_probs(probs: torch.Tensor, p: Union[float, torch.Tensor]) -> torch.Tensor:
    """The distribution nucleus sampling draws from, in vocabulary order (..., vocab)."""
    probs_sort, probs_idx = _top_p_sorted(probs, p)
    return torch.zeros_like(probs_sort).scatter_(-1, probs_idx, probs_sort)


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Nucleus sampling: keep the smallest prefix of the sorted distribution whose mass reaches `p`
    (the top token always), renormalise, draw one token per row. Returns (bsz, 1) token ids."""
    probs_sort, probs_idx = _top_p_sorted(probs, p)
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # (bsz, 1)
    return torch.gather(probs_idx, -1, next_token)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, min_p: float = 0.0) -> torch.Tensor:
    """(..., vocab) logits with -inf for the tokens that top-k (only the k most likely; 0: all) and
    min-p (only those whose probability at `temperature` is at least min_p times the most likely
    one's) leave out; the most likely token always stays. The logits themselves when both are off."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + temperature * log(min_p)
        floor = logits.amax(dim=-1, keepdim=True) + temperature * math.log(min_p)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def draw_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator], top_k: int = 0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """(bsz, vocab) logits -> (bsz,) tokens: greedy at temperature 0, else nucleus sampling after
    top-k and min-p (`filter_logits`)."""
    if temperature > 0:
        probs = torch.softmax(filter_logits(logits, temperature, top_k, min_p) / temperature, dim=-1)
        return sample_top_p(probs, top_p, generator)[:, 0]
    return torch.argmax(logits, dim=-1)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """`draw_token` after `check_finite`: (bsz, vocab) logits -> (bsz,) tokens."""
    check_finite(logits)
    return draw_token(logits, temperature, top_p, generator)


def sampling_probs(
    logits: torch.Tensor, temperature: Union[float, torch.Tensor], top_p: Union[float, torch.Tensor]
) -> torch.Tensor:
    """The distribution (..., vocab) that sampling at `temperature` > 0 with nucleus `top_p` draws
    from. Both are floats, or tensors (...) of one per row (speculative steps over rows of mixed
    requests; a row at temperature 0 gets its distribution at temperature 1, for callers that take
    its argmax instead)."""
    if isinstance(temperature, torch.Tensor):
        temperature = torch.where(temperature > 0, temperature, 1.0)[..., None]
        top_p = top_p[..., None]
    return top_p_probs(torch.softmax(logits / temperature, dim=-1), top_p)


def nucleus_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`sampling_probs` with per-row tensors, from the `top` most probable tokens of each row
    instead of a sort of the whole vocabulary (which costs several times the rest on CPU): the
    same distribution wherever the nucleus lies within them. Returns (probs (..., vocab),
    covered (...)): covered is False for a row whose nucleus may reach past them (its first
    top - 1 tokens do not hold more than top_p), where the caller needs `sampling_probs`."""
    if top >= logits.shape[-1]:  # the candidates are the whole vocabulary
        return sampling_probs(logits, temperature, top_p), torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    temperature = torch.where(temperature > 0, temperature, 1.0)[..., None]
    probs = torch.softmax(logits / temperature, dim=-1)
    values, ids = torch.topk(probs, top, dim=-1)  # (..., top), descending
    mass = torch.cumsum(values, dim=-1)
    values = values.masked_fill(mass - values > top_p[..., None], 0.0)
    values = values / values.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, ids, values), mass[..., -2] > top_p


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (..., vocab; not necessarily normalised) by inverse transform
    sampling with uniforms `u` (...) in [0, 1): the first token whose cumulative mass exceeds u
    times the row's mass. Never a token of zero mass. A function of its inputs only, so a compiled
    graph draws the tokens that an eager pass given the same uniforms draws."""
    cdf = probs.cumsum(dim=-1)
    token = (cdf <= (u * cdf[..., -1])[..., None]).sum(dim=-1)  # rounding may reach the end
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)  # the last token with mass
    return torch.minimum(token, last)


def top_logprobs(lsm: torch.Tensor, k: int) -> List[List[Tuple[int, float]]]:
    """The k most likely tokens of each row of log-probs (rows, vocab): [(token, logprob), ...]."""
    values, indices = torch.topk(lsm, min(k, lsm.shape[-1]), dim=-1)  # (rows, k) each
    return [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]


def sampling_options(top_k: int = 0, min_p: float = 0.0, response_format: Optional[dict] = None) -> dict:
    """Checked Request fields beyond temperature and top_p: top_k (sample among the k most likely
    tokens; 0: all), min_p (among those at least min_p times as likely as the most likely one) and
    response_format (OpenAI's {"type": "json_object"} or {"type": "json_schema", "json_schema":
    {"name", "schema"}}: every answer parses as JSON and follows the schema; llama.structured)."""
    validation.check_int("top_k", top_k, minimum=0)
    validation.check_real("min_p", min_p, minimum=0, maximum=1)
    structured.check_response_format(response_format)
    return {"top_k": top_k, "min_p": float(min_p), "response_format": response_format}
