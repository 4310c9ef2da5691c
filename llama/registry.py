"""Published Llama 3 shapes by name, as their params.json files write them, plus tiny test shapes.

The values are SPEC.md's table. The one fact params.json does not carry is the RoPE scale factor:
the 3.2 1B and 3B were trained with 32, every other scaled release with 8
(`default_rope_scale_factor`).
"""
import copy
from typing import Optional

from llama.args import ffn_hidden_dim

_COMMON = {"vocab_size": 128256, "norm_eps": 1e-05, "rope_theta": 500000.0}


def _shape(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, mult: float, multiple_of: int, scaled: bool) -> dict:
    # key order of Meta's own params.json files
    params = {
        "dim": dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "vocab_size": _COMMON["vocab_size"],
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": mult,
        "norm_eps": _COMMON["norm_eps"],
        "rope_theta": _COMMON["rope_theta"],
    }
    if scaled:
        params["use_scaled_rope"] = True
    return params


PUBLISHED: dict[str, dict] = {
    "llama3-8b": _shape(4096, 32, 32, 8, 1.3, 1024, False),
    "llama3-70b": _shape(8192, 80, 64, 8, 1.3, 4096, False),
    "llama3.1-8b": _shape(4096, 32, 32, 8, 1.3, 1024, True),
    "llama3.1-70b": _shape(8192, 80, 64, 8, 1.3, 4096, True),
    "llama3.3-70b": _shape(8192, 80, 64, 8, 1.3, 4096, True),
    "llama3.1-405b": _shape(16384, 126, 128, 8, 1.2, 4096, True),
    # the 16-shard 405B release stores each KV head twice and says so in params.json
    "llama3.1-405b-mp16": _shape(16384, 126, 128, 16, 1.2, 4096, True),
    "llama3.2-1b": _shape(2048, 16, 32, 8, 1.5, 256, True),
    "llama3.2-3b": _shape(3072, 28, 24, 8, 1.0, 256, True),
}

_TINY = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 512,  # 256 byte tokens + 256 Llama 3 special tokens
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
}

# Small shapes for tests and benchmarks; not released models.
TINY: dict[str, dict] = {
    "tiny": _TINY,
    "tiny-scaled": {**_TINY, "use_scaled_rope": True},
    # the 3.2 1B's proportions at 1/8 width and depth, with Meta's vocabulary (real tokenizer)
    "small": {**_shape(256, 2, 4, 1, 1.5, 256, True)},
}

_SMALL_SCALE_32 = ("llama3.2-1b", "llama3.2-3b")  # trained with RoPE scale 32
_SHAPE_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim_multiplier", "vocab_size")


def names() -> list[str]:
    """Every name `get` accepts."""
    return [*PUBLISHED, *TINY]


class UnknownModel(KeyError, ValueError):
    """A name `get` does not know: a failed lookup, and bad input that scripts report in one line."""

    def __str__(self) -> str:
        return str(self.args[0])  # the message, not KeyError's quoted repr of it


def get(name: str) -> dict:
    """params.json dict of a published or tiny shape (a fresh copy, safe to modify)."""
    table = {**PUBLISHED, **TINY}
    if name not in table:
        raise UnknownModel(f"unknown model {name!r}: known are {', '.join(table)}")
    return copy.deepcopy(table[name])


def default_rope_scale_factor(params: dict) -> float:
    """The RoPE scale factor a scaled model was trained with when params.json does not say:
    32 for the Llama 3.2 1B and 3B shapes, 8 for every other model."""
    n_kv = params.get("n_kv_heads") or params.get("n_heads")
    for name in _SMALL_SCALE_32:
        ref = PUBLISHED[name]
        have = {**params, "n_kv_heads": n_kv}
        if all(have.get(k) == ref[k] for k in _SHAPE_KEYS):
            return 32.0
    return 8.0


def match(shape: dict, hidden_dim: int) -> Optional[dict]:
    """The first published params whose dim/n_layers/n_heads/n_kv_heads/vocab_size equal `shape`'s
    and whose FFN size is `hidden_dim`, or None. Used to recover multiple_of/ffn_dim_multiplier,
    which the Hugging Face config (intermediate_size only) does not keep."""
    for params in PUBLISHED.values():
        if all(params[k] == v for k, v in shape.items()) and hidden_dim == ffn_hidden_dim(
            params["dim"], params["multiple_of"], params["ffn_dim_multiplier"]
        ):
            return copy.deepcopy(params)
    return None
