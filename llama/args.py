# The model's hyper-parameters (the keys of a Meta params.json plus run-time limits) and the checks
# of a shape, apart from the model: the sharding rules, the loader and the HF conversion read them
# without building or importing the architecture.
import logging
from dataclasses import dataclass, fields
from typing import Optional

from llama import validation

logger = logging.getLogger(__name__)

# Longest context each RoPE variant was trained for.
MAX_SEQ_LEN_UNSCALED = 8192
MAX_SEQ_LEN_SCALED = 131072


@dataclass(init=False)
class ModelArgs:
    """Model hyper-parameters: the keys of a Meta `params.json`, plus run-time limits.

    Unknown keys (from later releases) are accepted and ignored, so
    `ModelArgs(**json.load(open("params.json")))` works for every release.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1
    multiple_of: int = 256  # make SwiGLU hidden layer size multiple of large power of 2
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1 RoPE scaling; the four constants of the published recipe.
    use_scaled_rope: bool = False
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192

    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __init__(self, **kwargs):
        validation.check_params(kwargs, "model settings")  # types and ranges, naming the key
        for f in fields(self):
            setattr(self, f.name, kwargs.pop(f.name, f.default))
        if kwargs:
            logger.debug("ModelArgs: ignoring unknown keys %s", sorted(kwargs))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def decode_weights(self) -> int:
        """Weights one decode step reads: every matrix and norm of the blocks, the final norm and
        the output projection; not the embedding table, of which it looks up one row per token."""
        kv_dim = (self.n_kv_heads or self.n_heads) * self.head_dim
        per_layer = 2 * self.dim * self.dim + 2 * kv_dim * self.dim + 3 * self.dim * self.ffn_hidden_dim + 2 * self.dim
        return self.n_layers * per_layer + self.vocab_size * self.dim + self.dim

    def validate(self, model_parallel_size: int = 1) -> None:
        """Raise ValueError, saying why, if this shape cannot be built on `model_parallel_size` ranks."""
        mp = model_parallel_size
        n_kv = self.n_kv_heads or self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} (dim / n_heads) must be even for rotary embeddings")
        if self.n_heads % n_kv:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {n_kv}")
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {self.vocab_size}")
        check_model_parallel(self, mp)
        limit = MAX_SEQ_LEN_SCALED if self.use_scaled_rope else MAX_SEQ_LEN_UNSCALED
        if self.max_seq_len > limit:
            raise ValueError(
                f"max_seq_len {self.max_seq_len} exceeds the {limit} tokens this model was trained for"
                + ("" if self.use_scaled_rope else " (only Llama 3.1+ models with use_scaled_rope go longer)")
            )


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """SwiGLU hidden size of a model of width `dim` (14336 for the 8B)."""
    return _swiglu_hidden_dim(4 * dim, multiple_of, ffn_dim_multiplier)


def _swiglu_hidden_dim(hidden_dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    # the original's rule, from hidden_dim = 4 * dim: two thirds, times the multiplier, rounded up
    hidden_dim = int(2 * hidden_dim / 3)
    if ffn_dim_multiplier is not None:
        hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


def check_model_parallel(args: ModelArgs, mp: int) -> None:
    """ValueError, saying why, unless `args`' shape splits evenly over `mp` model-parallel ranks
    (fairscale's parallel layers split heads, the vocabulary and the feed-forward width evenly)."""
    n_kv = args.n_kv_heads or args.n_heads
    if args.n_heads % mp:
        raise ValueError(
            f"n_heads {args.n_heads} is not divisible by the model-parallel size {mp}: "
            f"use a process count that divides {args.n_heads}"
        )
    if n_kv % mp and mp % n_kv:
        raise ValueError(f"n_kv_heads {n_kv} and the model-parallel size {mp} do not divide one another")
    for name, size in (("vocab_size", args.vocab_size), ("ffn hidden size", args.ffn_hidden_dim)):
        if size % mp:
            raise ValueError(f"{name} {size} is not divisible by the model-parallel size {mp}")
