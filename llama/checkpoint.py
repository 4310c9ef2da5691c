# The one place that reads and writes Meta-format checkpoints (params.json + consolidated.NN.pth).
import json
import logging
import time
from pathlib import Path
from typing import Optional, Union

import torch

from llama.model import ModelArgs, Transformer

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
IGNORED_KEYS = ("rope.freqs",)  # older checkpoints carry the RoPE table; it is recomputed

# How fairscale's tensor parallelism splits each weight across model-parallel ranks.
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")  # split dim 0
ROW_PARALLEL = ("wo", "w2")  # split dim 1


def shard_dim(key: str) -> Optional[int]:
    """The dimension along which `key` is split across ranks, or None if replicated (the norms)."""
    module = key.split(".")[-2]
    if module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL:
        return 1
    return None


def read_params(ckpt_dir: PathLike) -> dict:
    """params.json of a checkpoint directory, with clear errors for a missing dir or file."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist: pass --ckpt_dir DIR")
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a Meta checkpoint directory holds params.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def shard_paths(ckpt_dir: PathLike) -> list[Path]:
    """The consolidated.NN.pth shards, sorted: shard k belongs to model-parallel rank k."""
    paths = sorted(Path(ckpt_dir).glob("*.pth"))
    if not paths:
        raise FileNotFoundError(f"no checkpoint files (*.pth) in {ckpt_dir}")
    return paths


def expected_keys(n_layers: int) -> set[str]:
    keys = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(n_layers):
        keys |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        keys |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        keys |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    return keys


def check_keys(state_dict: dict, n_layers: int, source: str) -> None:
    """Strict key check: only IGNORED_KEYS may be extra. Names the missing and unexpected keys."""
    want = expected_keys(n_layers)
    have = set(state_dict) - set(IGNORED_KEYS)
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match a {n_layers}-layer Llama 3 model: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


def load_shard(path: PathLike) -> dict:
    """One .pth shard, memory-mapped and with weights_only (no code runs on load)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def load_model(
    ckpt_dir: PathLike, args: ModelArgs, mp_rank: int, mp_size: int, device: torch.device, dtype: torch.dtype
) -> Transformer:
    """Build the Transformer for this model-parallel rank and fill it from its own shard."""
    paths = shard_paths(ckpt_dir)
    if len(paths) != mp_size:
        raise ValueError(
            f"{ckpt_dir} has {len(paths)} shard(s) but {mp_size} model-parallel process(es) were started: "
            f"run this checkpoint with {len(paths)} process(es) (torchrun --nproc_per_node {len(paths)})"
        )
    start = time.perf_counter()
    state = load_shard(paths[mp_rank])
    check_keys(state, args.n_layers, str(paths[mp_rank]))
    for k in IGNORED_KEYS:
        state.pop(k, None)
    model = Transformer(args)
    _check_shapes(model, state, paths[mp_rank])
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    model.to(device=device, dtype=dtype)
    logger.debug("loaded %s in %.1fs", paths[mp_rank], time.perf_counter() - start)
    return model.eval()


def _check_shapes(model: Transformer, state: dict, source: PathLike) -> None:
    for key, param in model.state_dict().items():
        if state[key].shape != param.shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(state[key].shape)} but params.json implies "
                f"{tuple(param.shape)} on this rank: the params do not match the weights"
            )


def save_checkpoint(
    state_dict: dict, params: dict, out_dir: PathLike, n_shards: int = 1, dtype: Optional[torch.dtype] = None
) -> None:
    """Write a full (unsharded) state dict as a Meta checkpoint of `n_shards` consolidated.NN.pth."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    for k in range(n_shards):
        shard = {}
        for key, t in state_dict.items():
            dim = shard_dim(key)
            if dim is not None:
                t = t.chunk(n_shards, dim=dim)[k]
            shard[key] = (t if dtype is None else t.to(dtype)).detach().clone().contiguous()
        torch.save(shard, out_dir / f"consolidated.{k:02d}.pth")
