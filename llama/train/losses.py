"""The losses of fine-tuning: next-token cross-entropy on the tokens that train, and DPO's.

DPO (Rafailov et al. 2023), the sigmoid loss: with the summed log-probabilities of a chosen and a
rejected completion under the model being trained (pi_c, pi_r) and under the frozen reference
(ref_c, ref_r), loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))). Rewards are
beta * (pi - ref); a pair is ranked right when the chosen reward is above the rejected one.
"""
import contextlib
import weakref
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from llama.train.data import IGNORE


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (float32) over the targets that train (not IGNORE)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(rows,) the log-probability of each row's trained targets, summed (float32)."""
    keep = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * keep).sum(dim=-1)


def dpo_terms(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float) -> dict:
    """Per pair: loss, chosen and rejected rewards (no gradient through the rewards)."""
    logits = beta * ((pi_c - pi_r) - (ref_c - ref_r))
    return {
        "loss": -F.logsigmoid(logits),
        "chosen": beta * (pi_c - ref_c).detach(),
        "rejected": beta * (pi_r - ref_r).detach(),
    }


# The output projection and the cross-entropy fused, a chunk of tokens at a time: the (tokens, vocab)
# logits are never held whole (in float32 at Llama 3's 128K vocabulary they outweigh a small model's
# activations many times over). As the loss is the graph's end, each chunk's gradients for the hidden
# states and the output weight are computed in the forward pass, from the chunk's logits while they
# are at hand, and scaled by the incoming gradient in the backward pass: no logits are kept or recomputed.
EXP_FLOOR = -87.0  # exp(-87) = 1.6e-38, just above float32's smallest normal number (1.2e-38)
LOGIT_CHUNK_BYTES = 128 << 20  # float32 logits of one chunk: 256 rows at 128K; fewer rows make slower float32 products


class _FusedOutputLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = max(8, LOGIT_CHUNK_BYTES // (4 * weight.shape[0]))
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        # the products' dtype: autocast's where it is on (it would convert both operands of every
        # chunk's two products); the head converted once, not per product (at 128K rows it is a
        # large conversion, of the order of a product's own time), and a frozen one once for all steps
        dev = h.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        with torch.autocast(dev, enabled=False):
            return _FusedOutputLoss._chunks(ctx, h, weight, targets, rows, dtype, grad_h, grad_w, total)

    @staticmethod
    def _chunks(ctx, h, weight, targets, rows, dtype, grad_h, grad_w, total) -> torch.Tensor:
        want_h, want_w = grad_h is not None, grad_w is not None
        w, hq = (frozen_in(weight, dtype) if not weight.requires_grad else weight.to(dtype)), h.to(dtype)
        for start in range(0, h.shape[0], rows):
            hc, tc = h[start : start + rows], targets[start : start + rows]
            keep = tc != IGNORE
            logits = (hq[start : start + rows] @ w.t()).float()
            picked = logits.gather(-1, tc.clamp(min=0)[:, None])[:, 0]
            top = logits.amax(dim=-1, keepdim=True)
            # in place, one exp: the chunk's largest temporary is its logits. The shifted logits are
            # floored where exp leaves float32's normal range (EXP_FLOOR): below it the CPU's exp
            # takes a slow path, many times slower per value (a model whose logits spread over more
            # than 87 sends most of the vocabulary there), and the floor's exp (under 2e-38 against
            # a sum of at least 1) changes no sum or gradient beyond float rounding
            probs = logits.sub_(top).clamp_(min=EXP_FLOOR).exp_()
            sums = probs.sum(dim=-1)
            total += ((top[:, 0] + sums.log() - picked) * keep).sum()
            if want_h or want_w:  # d loss / d logits = softmax - one-hot, on the tokens that train
                probs /= sums[:, None]
                probs[torch.arange(len(tc), device=tc.device), tc.clamp(min=0)] -= 1.0
                probs *= keep[:, None]
                g = probs.to(hc.dtype)
                if want_h:
                    grad_h[start : start + rows] = g.to(dtype) @ w
                if want_w:  # float32, as autocast leaves an in-place product
                    grad_w.addmm_(g.t().float(), hc.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        out_h = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        out_w = (grad_w * grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        return out_h, out_w, None


_frozen_copies: dict = {}  # id(weight): ((data pointer, version, dtype), the converted copy)


def frozen_in(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` (one that does not train) in `dtype`, converted once and kept while the weight lives
    and stays unchanged (its storage and version), not converted again at every step."""
    if weight.dtype == dtype:
        return weight
    key = (weight.data_ptr(), weight._version, dtype)
    kept = _frozen_copies.get(id(weight))
    if kept is None or kept[0] != key:
        if kept is None:  # dropped with the weight
            weakref.finalize(weight, _frozen_copies.pop, id(weight), None)
        _frozen_copies[id(weight)] = kept = (key, weight.detach().to(dtype))
    return kept[1]


def fused_token_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """token_loss_sum(hidden @ weight^T, targets) without the logits held whole: hidden (..., dim)
    final-norm outputs, weight (vocab, dim) the output projection's."""
    return _FusedOutputLoss.apply(hidden.flatten(0, -2), weight, targets.flatten())


def fusable_head(model: nn.Module) -> Optional[torch.Tensor]:
    """The output projection's weight when the loss may be fused with it (fused_token_loss_sum): a
    plain floating-point matrix held whole here (not sharded by FSDP2, not quantized) with no
    adapter beside it; else None."""
    out = getattr(model, "output", None)
    w = getattr(out, "weight", None)
    if w is None or hasattr(out, "lora") or not w.is_floating_point() or isinstance(w, DTensor):
        return None
    return w if tuple(w.shape) == (model.params.vocab_size, model.params.dim) else None


@contextlib.contextmanager
def final_hidden_states(model: nn.Module) -> Iterator[None]:
    """The model's forward gives its final-norm outputs instead of logits (the output projection
    left to the fused loss)."""
    output = model.output
    model.output = nn.Identity()
    try:
        yield
    finally:
        model.output = output
