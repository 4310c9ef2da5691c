"""The losses of fine-tuning: next-token cross-entropy on the tokens that train, and DPO's.

DPO (Rafailov et al. 2023), the sigmoid loss: with the summed log-probabilities of a chosen and a
rejected completion under the model being trained (pi_c, pi_r) and under the frozen reference
(ref_c, ref_r), loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))). Rewards are
beta * (pi - ref); a pair is ranked right when the chosen reward is above the rejected one.
"""
import torch
import torch.nn.functional as F

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
