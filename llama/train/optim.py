"""The optimizer, its schedule and the mixed-precision context, shared by fine-tuning and the demo's
pretraining (recipes/demo/train_demo.py)."""
import math
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from llama.runtime import probes


def lr_at(step: int, max_steps: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to `min_lr` at `max_steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.95) over the parameters that train, with weight decay on the weight
    matrices only, not the norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    # the fused kernel: one pass over each tensor's memory instead of one per operation (several times
    # faster on a CPU, where every weight's step is bound by memory); FSDP2's sharded parameters keep
    # the default implementation
    fused = bool(params) and all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None,
    )


def autocast_for(dev: torch.device) -> tuple[Callable[[], torch.autocast], bool]:
    """The forward passes' autocast context and whether it casts: to bfloat16 where the device's policy
    computes large products (as training's are) in bfloat16; master weights stay float32."""
    use_bf16 = probes.policy_for(dev).prefill.dtype == torch.bfloat16

    def autocast() -> torch.autocast:
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16)

    return autocast, use_bf16
