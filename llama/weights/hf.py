"""Weight-layout and config conversion between Meta's Llama 3 checkpoints and Hugging Face's.

Everything works one tensor (or one dict) at a time, so a converter can stream a model of any
size. Facts used (SPEC.md, "Hugging Face layout"): the key renaming below; Meta's RoPE rotates
ADJACENT pairs of each head while HF rotates halves, so the rows of wq and wk are permuted within
each head; Llama 3.1 scaling is the config's `rope_scaling` block of rope_type "llama3".
"""
import re
from typing import Optional

import torch

from llama import registry
from llama.args import ModelArgs, ffn_hidden_dim
from llama.runtime.policy import dtype_name  # noqa: F401 (re-exported: the name a config.json gives a dtype)


# Meta module path inside a layer -> HF module path inside `model.layers.{i}`.
_LAYER_KEYS = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_KEYS = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_LAYER_KEYS_INV = {v: k for k, v in _LAYER_KEYS.items()}
_TOP_KEYS_INV = {v: k for k, v in _TOP_KEYS.items()}
_META_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")

# Keys that carry no weights: Meta's precomputed RoPE table, HF's rotary buffers of old exports.
META_IGNORED = ("rope.freqs",)
HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# Defaults of the published 3.1 recipe; written to params.json only when a model differs.
ROPE_DEFAULTS = {"rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_seq_len": 8192}
META_VOCAB_SIZE = 128256
N_SPECIAL_TOKENS = 256  # special tokens follow the base BPE ranks


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message says why in one line."""


def _head_dim(w: torch.Tensor, n_heads: int) -> int:
    if w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise ConversionError(f"{w.shape[0]} rows do not split into {n_heads} heads of even size")
    return w.shape[0] // n_heads


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta wq/wk rows -> HF rows: row 2i+j of each head goes to row j*head_dim/2 + i."""
    head_dim = _head_dim(w, n_heads)
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF wq/wk rows -> Meta rows: the inverse of permute_to_hf."""
    head_dim = _head_dim(w, n_heads)
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_to_hf_key(key: str) -> str:
    """`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight` (and the top-level keys)."""
    m = _META_LAYER.fullmatch(key)
    if m and m.group(2) in _LAYER_KEYS:
        return f"model.layers.{m.group(1)}.{_LAYER_KEYS[m.group(2)]}.weight"
    top = key.removesuffix(".weight")
    if key.endswith(".weight") and top in _TOP_KEYS:
        return f"{_TOP_KEYS[top]}.weight"
    raise ConversionError(f"{key!r} is not a Llama 3 checkpoint key")


def hf_to_meta_key(key: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `layers.3.attention.wq.weight` (and the top-level keys)."""
    m = _HF_LAYER.fullmatch(key)
    if m and m.group(2) in _LAYER_KEYS_INV:
        return f"layers.{m.group(1)}.{_LAYER_KEYS_INV[m.group(2)]}.weight"
    top = key.removesuffix(".weight")
    if key.endswith(".weight") and top in _TOP_KEYS_INV:
        return f"{_TOP_KEYS_INV[top]}.weight"
    raise ConversionError(f"{key!r} is not a Hugging Face Llama weight (bias or unknown module?)")


def _heads_for(meta_key: str, n_heads: int, n_kv_heads: int) -> Optional[int]:
    """How many heads a wq/wk weight holds (its rows are permuted per head), or None for other keys."""
    if meta_key.endswith("attention.wq.weight"):
        return n_heads
    if meta_key.endswith("attention.wk.weight"):
        return n_kv_heads
    return None


def tensor_to_hf(key: str, w: torch.Tensor, params: dict) -> tuple[str, torch.Tensor]:
    """One full (unsharded) Meta tensor -> (HF key, HF tensor)."""
    heads = _heads_for(key, params["n_heads"], params.get("n_kv_heads") or params["n_heads"])
    return meta_to_hf_key(key), (w if heads is None else permute_to_hf(w, heads))


def tensor_from_hf(key: str, w: torch.Tensor, config: dict) -> tuple[str, torch.Tensor]:
    """One HF tensor -> (Meta key, full Meta tensor)."""
    meta_key = hf_to_meta_key(key)
    n_heads = config["num_attention_heads"]
    heads = _heads_for(meta_key, n_heads, config.get("num_key_value_heads") or n_heads)
    return meta_key, (w if heads is None else permute_from_hf(w, heads))


def special_token_ids(vocab_size: int, n_base: Optional[int] = None, scaled_rope: bool = True) -> dict:
    """bos and stop-token ids: the 256 special tokens follow the `n_base` BPE ranks.

    Meta's vocab (128256) has n_base 128000: bos 128000, eos [128001, 128008, 128009] for 3.1+
    (eom 128008 only exists as a stop token from 3.1) and [128001, 128009] before.
    """
    if n_base is None:
        n_base = vocab_size - N_SPECIAL_TOKENS
    if n_base < 0 or n_base + 10 > vocab_size:
        raise ConversionError(f"vocab_size {vocab_size} has no room for the Llama 3 special tokens")
    eos = [n_base + 1, n_base + 8, n_base + 9] if scaled_rope else [n_base + 1, n_base + 9]
    return {"bos_token_id": n_base, "eos_token_id": eos}


def config_from_params(
    params: dict,
    tie_word_embeddings: bool = False,
    rope_scale_factor: Optional[float] = None,
    max_position_embeddings: Optional[int] = None,
    n_base_tokens: Optional[int] = None,
    torch_dtype: Optional[str] = "bfloat16",
) -> dict:
    """A transformers LlamaConfig dict (config.json contents) for a Meta params.json dict.

    RoPE is written the way published Llama 3.1 configs write it (top-level `rope_theta`, a
    `rope_scaling` block), which transformers 4.4x reads directly and 5.x converts into
    `rope_parameters`. `rope_scale_factor` overrides params/registry (3.2 1B/3B: 32, others 8).
    """
    args = ModelArgs(**params)
    scaled = bool(params.get("use_scaled_rope", False))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": max_position_embeddings or (131072 if scaled else 8192),
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True,
        "rope_scaling": None,
        **special_token_ids(args.vocab_size, n_base_tokens, scaled),
    }
    if torch_dtype:
        config["torch_dtype"] = torch_dtype
    if scaled:
        if rope_scale_factor is None:
            rope_scale_factor = params.get("rope_scale_factor") or registry.default_rope_scale_factor(params)
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": float(rope_scale_factor),
            "low_freq_factor": float(args.rope_low_freq_factor),
            "high_freq_factor": float(args.rope_high_freq_factor),
            "original_max_position_embeddings": int(args.rope_original_max_seq_len),
        }
    return config


def generation_config_from(config: dict) -> dict:
    """generation_config.json: bos, the stop tokens, and the reference sampling defaults (T 0.6, top-p 0.9)."""
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.9,
    }


def rope_block(config: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, llama3 scaling dict or None) from a config in 4.x (`rope_scaling`) or 5.x
    (`rope_parameters`) form."""
    block = config.get("rope_scaling") or config.get("rope_parameters") or {}
    theta = config.get("rope_theta", block.get("rope_theta", 10000.0))
    rope_type = block.get("rope_type", block.get("type", "default"))
    if rope_type in ("default", None):
        return float(theta), None
    if rope_type != "llama3":
        raise ConversionError(f"RoPE type {rope_type!r} is not Llama 3's (only default and 'llama3' convert)")
    return float(theta), block


def check_llama_config(config: dict) -> None:
    """Raise ConversionError naming what makes `config` something our Llama 3 model cannot run."""
    arch = config.get("architectures") or ["LlamaForCausalLM"]
    if config.get("model_type") != "llama" or "LlamaForCausalLM" not in arch:
        raise ConversionError(
            f"not a Llama model (model_type {config.get('model_type')!r}, architectures {arch}): only LlamaForCausalLM converts"
        )
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, hidden // heads):
        raise ConversionError(f"head_dim {config['head_dim']} != hidden_size / num_attention_heads {hidden // heads}")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConversionError(f"{flag} is set: Llama 3 has no biases")
    if config.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"hidden_act {config['hidden_act']!r} is not Llama 3's silu")
    rope_block(config)


def _ffn_params(dim: int, hidden: int) -> tuple[int, Optional[float]]:
    """A (multiple_of, ffn_dim_multiplier) that reproduces FFN size `hidden` under the published rule.

    The rule is not invertible; prefer round multipliers and large powers of two, as releases use.
    """
    base = int(2 * 4 * dim / 3)
    multipliers = [None] + [round(hidden / base, d) for d in range(1, 7)]
    for f in multipliers:
        m = 1 << max(hidden.bit_length() - 1, 0)
        while m >= 1:
            if ffn_hidden_dim(dim, m, f) == hidden:
                return m, f
            m //= 2
    return (hidden, None) if base <= hidden else (1, hidden / base)  # exact fallbacks


def params_from_config(config: dict) -> dict:
    """The Meta params.json dict for a transformers LlamaConfig dict (inverse of config_from_params).

    A published shape (llama.registry) is returned exactly as Meta wrote it; RoPE-scaling values
    are only written when they differ from what the registry would assume.
    """
    check_llama_config(config)
    theta, scaling = rope_block(config)
    shape = {
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "vocab_size": config["vocab_size"],
    }
    hidden = config["intermediate_size"]
    published = registry.match(shape, hidden)
    if published is not None:
        params = {k: v for k, v in published.items() if k != "use_scaled_rope"}
        params.update(norm_eps=config.get("rms_norm_eps", 1e-5), rope_theta=theta)
    else:
        multiple_of, mult = _ffn_params(shape["dim"], hidden)
        params = {**shape, "multiple_of": multiple_of}
        if mult is not None:
            params["ffn_dim_multiplier"] = mult
        params.update(norm_eps=config.get("rms_norm_eps", 1e-5), rope_theta=theta)
    if scaling is not None:
        params["use_scaled_rope"] = True
        if float(scaling["factor"]) != registry.default_rope_scale_factor(params):
            params["rope_scale_factor"] = float(scaling["factor"])
        for meta_key, hf_key in (
            ("rope_low_freq_factor", "low_freq_factor"),
            ("rope_high_freq_factor", "high_freq_factor"),
            ("rope_original_max_seq_len", "original_max_position_embeddings"),
        ):
            value = scaling.get(hf_key, ROPE_DEFAULTS[meta_key])
            if value != ROPE_DEFAULTS[meta_key]:
                params[meta_key] = value
    return params


# The chat layout of llama.tokenizer.ChatFormat for plain role/content messages: bos, then per
# message a header, the stripped content and <|eot_id|>; an open assistant header to generate.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def write_hf_tokenizer(tokenizer_model: str, out_dir: str) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for `tokenizer_model`
    (a Llama 3 tiktoken file), so that transformers.AutoTokenizer loads the converted directory.

    The BPE ranks become merges via transformers' tiktoken converter (transformers is needed here
    only). Ids equal llama.Tokenizer's: encoding adds <|begin_of_text|> as ours does with bos=True,
    and `apply_chat_template` gives ChatFormat's prompt for plain messages. Returns the files written.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from llama.tokenizer import Tokenizer

    ours = Tokenizer(tokenizer_model)
    names = sorted(ours.special_tokens, key=ours.special_tokens.get)
    converter = TikTokenConverter(vocab_file=tokenizer_model, pattern=Tokenizer.pat_str, extra_special_tokens=names)
    backend = converter.converted()
    bos = "<|begin_of_text|>"
    add_bos = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ours.bos_id)]
    )
    backend.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), add_bos])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|end_of_text|>",
        chat_template=CHAT_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )
    return [str(p) for p in fast.save_pretrained(out_dir, legacy_format=False)]
