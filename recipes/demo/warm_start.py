"""Starting the demo's training from a trained Meta checkpoint (train_demo.py): the checkpoint loaded
as a float32 model (the teacher of --distill_from, the source of --init_from), and its tensors copied
into a new model where they fit.

Imported as `warm_start` by the recipes beside it (a script's own directory comes first on sys.path).
"""
import torch

from llama import ModelArgs, Transformer
from llama.weights.checkpoint import read_params
from llama.weights.loader import load_model


def load_trained(ckpt_dir: str, device: torch.device, seq_len: int) -> Transformer:
    """A trained Meta checkpoint (any shard count, tied or not) in float32 on this process, through
    the package's one checkpoint loader: the teacher of --distill_from, the source of --init_from."""
    args = ModelArgs(**{**read_params(ckpt_dir), "max_seq_len": seq_len})
    return load_model(ckpt_dir, args, 0, 1, device, torch.float32)


def warm_start(model: Transformer, source: Transformer) -> None:
    """Copy from `source` every tensor with the same name and shape as the model's. Attention weights
    are copied only when the head split (n_heads, n_kv_heads) is the same too: otherwise their rows
    belong to other heads, with other RoPE frequencies, and are left at their random initialisation."""
    ours, theirs = model.params, source.params
    same_heads = (theirs.n_heads, theirs.n_kv_heads or theirs.n_heads) == (ours.n_heads, ours.n_kv_heads or ours.n_heads)
    src = source.state_dict()
    copied, fresh = 0, []
    with torch.no_grad():
        for name, p in model.state_dict().items():
            t = src.get(name)
            if t is not None and t.shape == p.shape and (same_heads or ".attention." not in name):
                p.copy_(t.to(p.dtype))
                copied += p.numel()
            else:
                fresh.append(name)
    total = sum(p.numel() for p in model.parameters())
    print(f"  {copied / 1e6:.2f}M of {total / 1e6:.2f}M parameters copied, "
          f"{len(fresh)} tensors initialised afresh ({', '.join(sorted({n.split('.')[-2] for n in fresh}))})")
