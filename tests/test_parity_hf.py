"""Our Transformer against transformers.LlamaForCausalLM, an independent implementation, on the
same random weights (converted with llama/weights/hf.py); plus the registry's published shapes."""
import json
from typing import Optional

import pytest
import torch

import helpers
from llama import distributed, registry
from llama.weights import hf
from llama.model import ModelArgs, Transformer

transformers = pytest.importorskip("transformers")

ATOL = 1e-4  # float32 logits
# Tiny model for sequences past 8192 tokens: one GQA layer, head_dim 16 (8 RoPE frequencies, some
# below, some inside and some above the scaled band), so ~8200-token forwards take well under a second.
LONG_PARAMS = {
    "dim": 32,
    "n_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 1,
    "vocab_size": 512,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
}
PREFILL, DECODE = 8200, 8  # prefill ends past 8192; decode steps at 8200..8207


@pytest.fixture(scope="module", autouse=True)
def process_group():
    distributed.setup(torch.device("cpu"))  # idempotent for a group of one


def our_model(params: dict, state_dict: dict, max_seq_len: int = 64, max_batch_size: int = 2) -> Transformer:
    model = Transformer(ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_batch_size))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def hf_model(params: dict, state_dict: dict, attn: str = "eager", rope_scale_factor: Optional[float] = None):
    """LlamaForCausalLM (float32) from config_from_params, loaded with the converted weights."""
    config = transformers.LlamaConfig(
        **hf.config_from_params(params, rope_scale_factor=rope_scale_factor, torch_dtype="float32"),
        attn_implementation=attn,
    )
    model = transformers.LlamaForCausalLM(config).float().eval()
    model.load_state_dict(dict(hf.tensor_to_hf(k, v, params) for k, v in state_dict.items()), strict=True)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def sharpen_attention(state_dict: dict, scale: float = 4.0) -> dict:
    """Larger wq/wk so attention is peaked and positions matter visibly in the logits."""
    return {k: v * scale if k.endswith(("wq.weight", "wk.weight")) else v for k, v in state_dict.items()}


def long_sequence_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill to PREFILL through the KV cache, then one token per step: logits of every position."""
    prefill = model.forward(tokens[:, :PREFILL], 0)
    steps = [model.forward(tokens[:, p : p + 1], p) for p in range(PREFILL, tokens.shape[1])]
    return torch.cat([prefill, *steps], dim=1)


def long_tokens(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, PREFILL + DECODE), generator=torch.Generator().manual_seed(3))


def test_permutation_is_an_inverse_pair():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)
    hf_w = hf.permute_to_hf(w, n_heads=4)
    # row 2i+j of a head goes to row j*head_dim/2 + i: head 1, i=1, j=1 is Meta row 8+3 -> HF row 8+4+1
    assert torch.equal(hf_w[13], w[11])
    assert torch.equal(hf.permute_from_hf(hf_w, n_heads=4), w)


def test_key_renaming_round_trips():
    for key in helpers.random_state_dict(helpers.TINY_PARAMS):
        assert hf.hf_to_meta_key(hf.meta_to_hf_key(key)) == key
    assert hf.meta_to_hf_key("layers.1.feed_forward.w3.weight") == "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(hf.ConversionError):
        hf.hf_to_meta_key("model.layers.0.self_attn.q_proj.bias")


def test_logits_match_transformers_gqa_batch_and_decode():
    params = helpers.TINY_PARAMS  # grouped-query: 4 heads, 2 KV heads
    sd = helpers.random_state_dict(params, seed=5)
    tokens = torch.randint(0, params["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))
    theirs = hf_logits(hf_model(params, sd), tokens)

    ours = our_model(params, sd)
    torch.testing.assert_close(ours.forward_train(tokens), theirs, atol=ATOL, rtol=0)
    # KV cache: a prefill then one-token decode steps give the full forward's logits
    prefill = ours.forward(tokens[:, :10], 0)
    steps = [ours.forward(tokens[:, p : p + 1], p) for p in range(10, tokens.shape[1])]
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_scaled_rope_matches_transformers_past_8192(factor):
    params = {**LONG_PARAMS, "rope_scale_factor": factor}
    sd = sharpen_attention(helpers.random_state_dict(LONG_PARAMS, seed=1))
    tokens = long_tokens(params["vocab_size"])
    ours = long_sequence_logits(our_model(params, sd, max_seq_len=tokens.shape[1], max_batch_size=1), tokens)
    # sdpa: eager materialises 8208^2 scores and is 20x slower; the RoPE under test is the same
    theirs = hf_logits(hf_model(params, sd, attn="sdpa", rope_scale_factor=factor), tokens)
    late = slice(8180, None)  # positions 8180..8207, both sides of 8192
    torch.testing.assert_close(ours[:, late], theirs[:, late], atol=ATOL, rtol=0)

    unscaled = {**LONG_PARAMS, "use_scaled_rope": False}
    plain = hf_logits(hf_model(unscaled, sd, attn="sdpa"), tokens)
    assert (ours[:, late] - plain[:, late]).abs().max() > 0.5, "scaled RoPE should change these logits"


def test_scale_factors_8_and_32_differ():
    """Our model with factor 32 is not factor 8: a model ignoring the factor fails the test above."""
    sd = sharpen_attention(helpers.random_state_dict(LONG_PARAMS, seed=1))
    tokens = long_tokens(LONG_PARAMS["vocab_size"])[:, :PREFILL]
    logits = [
        our_model({**LONG_PARAMS, "rope_scale_factor": f}, sd, PREFILL, 1).forward_train(tokens)[:, -16:]
        for f in (8.0, 32.0)
    ]
    assert (logits[0] - logits[1]).abs().max() > 0.5


@pytest.mark.parametrize(
    "name,hidden",
    [
        ("llama3-8b", 14336),
        ("llama3.1-8b", 14336),
        ("llama3-70b", 28672),
        ("llama3.1-70b", 28672),
        ("llama3.3-70b", 28672),
        ("llama3.1-405b", 53248),
        ("llama3.1-405b-mp16", 53248),
        ("llama3.2-1b", 8192),
        ("llama3.2-3b", 8192),
    ],
)
def test_registry_ffn_hidden_dim(name, hidden):
    args = ModelArgs(**registry.get(name))
    assert args.ffn_hidden_dim == hidden
    args.validate(1)


@pytest.mark.parametrize(
    "name,factor",
    [("llama3.2-1b", 32.0), ("llama3.2-3b", 32.0), ("llama3.1-8b", 8.0), ("llama3.1-70b", 8.0),
     ("llama3.3-70b", 8.0), ("llama3.1-405b", 8.0), ("llama3.1-405b-mp16", 8.0), ("tiny-scaled", 8.0)],
)
def test_default_rope_scale_factor(name, factor):
    assert registry.default_rope_scale_factor(registry.get(name)) == factor


def test_registry_get_is_a_copy_and_rejects_unknown_names():
    registry.get("llama3-8b")["dim"] = 1
    assert registry.get("llama3-8b")["dim"] == 4096
    assert "use_scaled_rope" not in registry.get("llama3-70b")
    assert registry.get("llama3.3-70b")["use_scaled_rope"] is True
    with pytest.raises(KeyError, match="llama3.2-1b"):
        registry.get("llama-9b")
    for name in ("tiny", "tiny-scaled", "small"):
        Transformer(ModelArgs(**registry.get(name), max_seq_len=16, max_batch_size=1))


def test_params_json_from_later_releases_builds(tmp_path):
    params = {
        **registry.get("llama3.2-1b"),
        "quantization_args": {"group_size": 256, "scheme": "int4_weight_int8_dynamic_activation"},
        "lora_args": {"rank": 16, "scale": 2.0},
        "rope_scale_factor": 32,
        "some_future_key": [1, 2],
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    args = ModelArgs(**json.loads((tmp_path / "params.json").read_text()), max_seq_len=131072)
    args.validate(1)
    assert args.use_scaled_rope and args.rope_scale_factor == 32
    assert args.ffn_hidden_dim == 8192
    tiny = {**registry.get("tiny"), "quantization_args": {"scheme": "fp8"}, "use_scaled_rope": True}
    Transformer(ModelArgs(**tiny, max_seq_len=16, max_batch_size=1))


def test_greedy_generate_matches_transformers(tiny_ckpt, byte_tokenizer):
    """Llama.generate at temperature 0 gives, token for token, transformers' greedy generate."""
    from llama import Llama

    llama = Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=64, max_batch_size=3, device="cpu", dtype="float32")
    ref = hf_model(helpers.TINY_PARAMS, helpers.random_state_dict(helpers.TINY_PARAMS))
    prompts = [llama.tokenizer.encode(t, bos=True, eos=False) for t in ("Greedy", "parity with transformers", "x")]
    ours, _ = llama.generate(prompts, max_gen_len=16, temperature=0)
    stop = list(llama.tokenizer.stop_tokens)
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            out = ref.generate(
                torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=stop, pad_token_id=stop[0]
            )
        theirs = out[0, len(prompt):].tolist()
        if theirs and theirs[-1] in stop:
            theirs = theirs[:-1]
        assert tokens == theirs
