"""Speculative decoding's math (llama.engine.speculative): accepting or rejecting a draft's
proposals so that the output follows the model's distribution exactly, and the fused passes that
run a whole step (the draft's proposals, the model's verify pass, the acceptance) as one function
for torch.compile. Functions of tensors and models only; the step around them is `Speculator`'s."""
from typing import Optional, Tuple

import torch

from llama.model import Transformer
from llama.sampling import draw, nonfinite_rows, nucleus_probs, sampling_probs

# sampling steps find each row's nucleus among its most probable tokens (llama.sampling.nucleus_probs)
NUCLEUS_TOP = 256


def accept_reject(
    p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, generator: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling on probability tensors (Leviathan et al.; Chen et al., 2023).

    p: (bsz, k+1, vocab), the model's distributions at each proposal and one past the last;
    q: (bsz, k, vocab), the draft's distributions the proposals were drawn from; draft: (bsz, k).
    Proposal j is accepted with probability min(1, p_j(d_j) / q_j(d_j)); the first rejected one is
    replaced by a draw from max(0, p_j - q_j) renormalised, and when all k are accepted one more
    token is drawn from p_k. Every emitted token then follows p exactly, whatever q is.

    Returns (n_accepted (bsz,), next_token (bsz,)): each row emits draft[:n] and then next_token.
    Its uniforms, k acceptance tests and one draw per row, come from `generator` (`accept_drawn`).
    """
    bsz, k = draft.shape
    u = torch.rand(bsz, k + 1, generator=generator, device=p.device)
    return accept_drawn(p, q, draft, u[:, :k], u[:, k])


def accept_drawn(
    p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u_accept: torch.Tensor, u_next: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`accept_reject` with its uniforms given: u_accept (bsz, k) for the acceptance tests, u_next
    (bsz,) for the draw of the next token. A function of its inputs only (`llama.sampling.draw`), so
    a compiled step (`sampling_pass`) and an eager one accept and draw the same tokens."""
    bsz, k = draft.shape
    rows = torch.arange(bsz, device=p.device)
    p_d = p[:, :k].gather(-1, draft[..., None])[..., 0]  # (bsz, k)
    q_d = q.gather(-1, draft[..., None])[..., 0]
    accepted = u_accept * q_d < p_d  # u < p/q without dividing (q_d > 0: d was drawn from q)
    n = torch.cumprod(accepted.long(), dim=1).sum(dim=1)  # (bsz,) leading acceptances
    # what the next token is drawn from: the residual at the first rejection, else p_k
    residual = torch.cat([(p[:, :k] - q).clamp(min=0), p[:, k:]], dim=1)[rows, n]  # (bsz, vocab)
    mass = residual.sum(dim=-1, keepdim=True)
    # p_j == q_j leaves no residual, but then nothing is rejected: only rounding gets here
    residual = torch.where(mass > 0, residual, p[rows, n])
    return n, draw(residual, u_next)


def sampling_dist(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, in_graph: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The distributions (..., vocab) that rows of logits with per-row temperature and top_p (...)
    sample from, as `sampling_probs` gives them, and (...) True where they are exact. Found among
    each row's NUCLEUS_TOP most probable tokens (`nucleus_probs`: no sort of the vocabulary); a row
    whose nucleus may reach past them gets the whole sort, eagerly, or in a graph (`in_graph`,
    which cannot branch on values) is flagged False for its caller to redo the step eagerly. Rows
    at temperature 0 are flagged True (their callers take the argmax)."""
    probs, exact = nucleus_probs(logits, temperature, top_p, NUCLEUS_TOP)
    exact = exact | (temperature <= 0)
    if not in_graph and not bool(exact.all()):
        probs = torch.where(exact[..., None], probs, sampling_probs(logits, temperature, top_p))
        exact = torch.ones_like(exact)
    return probs, exact


def propose(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor, in_graph: bool = False
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The draft's token per row from its logits (rows, vocab): a draw with uniform u (rows,) from
    its sampling distribution q (rows at temperature > 0), else its argmax. Returns (tokens, q,
    exact (rows,): see `sampling_dist`)."""
    q, exact = sampling_dist(logits, temperature, top_p, in_graph)
    return torch.where(temperature > 0, draw(q, u), logits.argmax(dim=-1)), q, exact


def accept(
    target: torch.Tensor, draft: torch.Tensor, qs: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
    uniforms: torch.Tensor, in_graph: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's number of accepted proposals and next token: `accept_greedy` for rows at
    temperature 0, `accept_drawn` for the others, against the model's sampling distributions of
    `target` (rows, k + 1, vocab) and the draft's, qs (rows, k, vocab), with the uniforms of
    `Speculator._sampling` (rows, 2k + 1). Returns (n, next_token, exact (rows,): `sampling_dist`)."""
    k = draft.shape[1]
    n_greedy, next_greedy = accept_greedy(target, draft)
    p, exact = sampling_dist(target, temperature[:, None].expand(-1, k + 1), top_p[:, None].expand(-1, k + 1), in_graph)
    n, next_token = accept_drawn(p, qs, draft, uniforms[:, k : 2 * k], uniforms[:, 2 * k])
    sampled = temperature > 0
    return torch.where(sampled, n, n_greedy), torch.where(sampled, next_token, next_greedy), exact.all(dim=1)


def accept_greedy(logits: torch.Tensor, draft: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The greedy case of `accept_reject`: logits (bsz, k+1, vocab) of the model, draft (bsz, k).
    A proposal is accepted while it is the model's argmax; the next token is the model's argmax
    after the accepted prefix. Returns (n_accepted (bsz,), next_token (bsz,))."""
    best = logits.argmax(dim=-1)  # (bsz, k+1)
    n = torch.cumprod((draft == best[:, : draft.shape[1]]).long(), dim=1).sum(dim=1)
    return n, best[torch.arange(len(n), device=n.device), n]


def greedy_pass(
    model: Transformer, draft: Transformer, k: int, tokens: torch.Tensor, start_pos: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One greedy step as one function, for torch.compile to make one graph of: the draft's k
    steps, each proposing its argmax, the model's verify pass of the last token and the k
    proposals, and the acceptance (`accept_greedy`). Compiled, a step costs one call instead of
    k + 1, each with its own Python, guard checks and wrapper (on the demo pair, more than the
    draft's own kernels), and one read of its results.

    tokens (rows, t): each row's last token, after the one before it when t = 2 (a draft that
    lags); start_pos (rows,): the position of tokens[:, 0]. Both models' KV caches get the slots
    the separate passes write. Returns (the model's logits (rows, k + 1, vocab), a summary (rows,
    k + 3): each row's k proposals, its number accepted, its next token, and 1 where its logits
    hold a NaN or infinity (`llama.sampling.nonfinite_rows`), else 0).
    """
    pos = start_pos + tokens.shape[1] - 1  # (rows,) the last token's position
    last = torch.full_like(start_pos, tokens.shape[1] - 1)  # the draft's logits at the last token only
    logits = draft._forward(tokens, start_pos, last, use_cache=True)[:, -1]  # (rows, vocab)
    proposals = [logits.argmax(dim=-1)]
    for j in range(1, k):
        logits = draft._forward(proposals[-1][:, None], pos + j, None, use_cache=True)[:, -1]
        proposals.append(logits.argmax(dim=-1))
    draft_tokens = torch.stack(proposals, dim=1)  # (rows, k)
    verify = torch.cat([tokens[:, -1:], draft_tokens], dim=1)  # (rows, k + 1)
    target = model._forward(verify, pos, None, use_cache=True)  # (rows, k + 1, vocab)
    n, next_token = accept_greedy(target, draft_tokens)
    return target, _summary(target, draft_tokens, n, next_token)


def sampling_pass(
    model: Transformer, draft: Transformer, k: int, tokens: torch.Tensor, start_pos: torch.Tensor,
    temperature: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`greedy_pass` for steps with rows that sample: each row's temperature and top_p (rows,)
    and its uniforms (rows, 2k + 1, `Speculator._sampling`) are inputs, so the draws and the
    rejection sampling (`propose`, `accept`) run in the graph, to the tokens an eager step given
    the same uniforms gives. Rows at temperature 0 propose and accept greedily. Same returns."""
    pos = start_pos + tokens.shape[1] - 1
    last = torch.full_like(start_pos, tokens.shape[1] - 1)
    logits = draft._forward(tokens, start_pos, last, use_cache=True)[:, -1]  # (rows, vocab)
    proposals, qs, exact = [], [], []
    for j in range(k):
        if j:
            logits = draft._forward(proposals[-1][:, None], pos + j, None, use_cache=True)[:, -1]
        token, q, exact_q = propose(logits, temperature, top_p, uniforms[:, j], in_graph=True)
        proposals.append(token)
        qs.append(q)
        exact.append(exact_q)
    draft_tokens = torch.stack(proposals, dim=1)  # (rows, k)
    verify = torch.cat([tokens[:, -1:], draft_tokens], dim=1)  # (rows, k + 1)
    target = model._forward(verify, pos, None, use_cache=True)  # (rows, k + 1, vocab)
    n, next_token, exact_p = accept(target, draft_tokens, torch.stack(qs, dim=1), temperature, top_p, uniforms, in_graph=True)
    inexact = ~(torch.stack(exact, dim=1).all(dim=1) & exact_p)
    return target, _summary(target, draft_tokens, n, next_token, inexact)


def _summary(
    target: torch.Tensor, draft_tokens: torch.Tensor, n: torch.Tensor, next_token: torch.Tensor, inexact: Optional[torch.Tensor] = None
) -> torch.Tensor:
    # (rows, k + 3): the proposals, the number accepted, the next token, and 1 where target is not
    # finite, 2 where a row's nucleus reached past the candidates (`sampling_dist`), else 0
    flags = nonfinite_rows(target).any(dim=1).long()
    if inexact is not None:
        flags = flags + 2 * inexact.long()
    return torch.cat([draft_tokens, n[:, None], next_token[:, None], flags[:, None]], dim=1)
