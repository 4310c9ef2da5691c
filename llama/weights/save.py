# Writing a Meta-format checkpoint: a full state dict split into consolidated.NN.pth shards as
# fairscale splits it, beside its params.json.
import json
from pathlib import Path
from typing import Optional

import torch

from llama.args import ModelArgs
from llama.weights import sharding
from llama.weights.checkpoint import IGNORED_KEYS, PathLike
from llama.weights.quant_formats import QuantConfig


def save_checkpoint(
    state_dict: dict, params: dict, out_dir: PathLike, n_shards: int = 1, dtype: Optional[torch.dtype] = None
) -> None:
    """Write a full (unsharded) state dict as a Meta checkpoint of `n_shards` consolidated.NN.pth,
    split as fairscale splits it (KV heads repeated when n_shards exceeds n_kv_heads). A state dict
    without output.weight gives a tied checkpoint.

    A quantized state dict (llama.weights.quant_formats' stored tensors) goes with params holding its
    `quantization` block; its scales split with their weights, and `dtype` leaves them as they are."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    args = ModelArgs(**params)
    quant = QuantConfig.from_params(params)
    for k in range(n_shards):
        shard = {}
        for key, t in state_dict.items():
            if key not in IGNORED_KEYS:
                t = sharding.shard_tensor(key, t, args, k, n_shards, quant)
            keep = dtype is None or (quant is not None and quant.applies(key))
            shard[key] = (t if keep else t.to(dtype)).detach().clone().contiguous()
        torch.save(shard, out_dir / f"consolidated.{k:02d}.pth")
