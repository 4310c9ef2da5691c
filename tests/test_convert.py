"""llama/weights/convert.py (scripts/convert.py, llama-convert): Meta <-> Hugging Face round trips, parity with transformers on converted
checkpoints (both directions), and clear refusals."""

import json
import sys

import pytest
import torch

import helpers
from llama import distributed, registry
from llama.weights import checkpoint, hf, loader, save
from llama.model import ModelArgs
from llama.tokenizer import ChatFormat, Tokenizer
from test_parity_hf import (
    ATOL,
    LONG_PARAMS,
    hf_logits,
    long_sequence_logits,
    long_tokens,
    sharpen_attention,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from llama.weights import convert  # noqa: E402

SCALED = {**helpers.TINY_PARAMS, "use_scaled_rope": True}


@pytest.fixture(scope="module", autouse=True)
def process_group():
    distributed.setup(torch.device("cpu"))


def load_ours(ckpt_dir, max_seq_len: int = 64, max_batch_size: int = 2):
    """Our model on a one-shard checkpoint, built in-process as the generator would."""
    params = checkpoint.read_params(ckpt_dir)
    args = ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    return loader.load_model(ckpt_dir, args, 0, 1, torch.device("cpu"), torch.float32)


def load_hf(hf_dir, attn: str = "eager"):
    return transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=attn).eval()


def assert_same_checkpoint(a, b):
    assert checkpoint.read_params(a) == checkpoint.read_params(b)
    pa, pb = checkpoint.shard_paths(a), checkpoint.shard_paths(b)
    assert [p.name for p in pa] == [p.name for p in pb]
    for x, y in zip(pa, pb):
        sa, sb = checkpoint.load_shard(x), checkpoint.load_shard(y)
        assert list(sa) == list(sb)
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "params,shards_in,shards_out,max_shard_size",
    [
        (helpers.TINY_PARAMS, 1, 1, "5GB"),
        (helpers.TINY_PARAMS, 2, 2, "60KB"),  # several safetensors files + index
        (SCALED, 1, 1, "60KB"),
        (SCALED, 2, 2, "5GB"),
        (SCALED, 2, 1, "5GB"),  # resharding through HF: same weights as a 1-shard original
        ({**SCALED, "rope_scale_factor": 32.0}, 1, 2, "5GB"),
    ],
)
def test_round_trip_is_bit_exact(tmp_path, params, shards_in, shards_out, max_shard_size):
    original = helpers.make_checkpoint(tmp_path / "meta", params, n_shards=shards_in, seed=7)
    convert.to_hf(original, tmp_path / "hf", max_shard_size=max_shard_size)
    indexed = (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert indexed == (max_shard_size != "5GB")
    convert.from_hf(tmp_path / "hf", tmp_path / "back", shards=shards_out)
    expected = original
    if shards_out != shards_in:
        expected = helpers.make_checkpoint(tmp_path / "expected", params, n_shards=shards_out, seed=7)
    assert_same_checkpoint(tmp_path / "back", expected)


def test_more_shards_than_kv_heads_repeat_whole_heads(tmp_path):
    original = helpers.make_checkpoint(tmp_path / "meta", SCALED, n_shards=1, seed=4)  # 2 KV heads
    convert.to_hf(original, tmp_path / "hf")
    convert.from_hf(tmp_path / "hf", tmp_path / "mp4", shards=4)
    full = checkpoint.load_shard(original / "consolidated.00.pth")
    head_dim = ModelArgs(**SCALED).head_dim
    for k, path in enumerate(checkpoint.shard_paths(tmp_path / "mp4")):
        shard = checkpoint.load_shard(path)
        for w in ("wk", "wv"):
            key = f"layers.1.attention.{w}.weight"
            assert torch.equal(shard[key], full[key][k // 2 * head_dim : (k // 2 + 1) * head_dim])
    # and back: to_hf keeps one copy of each repeated head
    convert.to_hf(tmp_path / "mp4", tmp_path / "hf2")
    convert.from_hf(tmp_path / "hf2", tmp_path / "back", shards=1)
    assert_same_checkpoint(tmp_path / "back", original)


def test_bfloat16_round_trip_and_dtype_option(tmp_path):
    sd = {k: v.bfloat16() for k, v in helpers.random_state_dict(SCALED, seed=2).items()}
    save.save_checkpoint(sd, SCALED, tmp_path / "meta", n_shards=2)
    convert.to_hf(tmp_path / "meta", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    convert.from_hf(tmp_path / "hf", tmp_path / "back", shards=2)
    assert_same_checkpoint(tmp_path / "back", tmp_path / "meta")
    convert.from_hf(tmp_path / "hf", tmp_path / "f32", shards=1, dtype="float32")
    assert checkpoint.load_shard(tmp_path / "f32" / "consolidated.00.pth")["norm.weight"].dtype == torch.float32


def test_transformers_reads_converted_checkpoint(tmp_path, tiny_ckpt_2shards, tiny_ckpt, byte_tokenizer):
    (tmp_path / "meta").mkdir()
    for p in [*tiny_ckpt_2shards.iterdir(), byte_tokenizer]:
        (tmp_path / "meta" / p.name).write_bytes(p.read_bytes())
    convert.to_hf(tmp_path / "meta", tmp_path / "hf", max_shard_size="100KB")
    out = tmp_path / "hf"
    assert (out / "tokenizer.model").read_bytes() == byte_tokenizer.read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"] is None and config["tie_word_embeddings"] is False
    # byte tokenizer: 256 base ranks, so the specials start at 256; Llama 3 (unscaled) stops
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (256, [257, 265])

    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    theirs = hf_logits(load_hf(out), tokens)
    ours = load_ours(tiny_ckpt).forward_train(tokens)  # same weights, one shard
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    # the tokenizer converted too: AutoTokenizer gives our ids
    auto = transformers.AutoTokenizer.from_pretrained(out)
    ours_ids = Tokenizer(str(byte_tokenizer)).encode("hello, wörld", bos=True, eos=False)
    assert auto("hello, wörld")["input_ids"] == ours_ids


TEXTS = [
    "Hello world",
    "naïve café, 日本語のテキスト and a llama 🦙",
    "  leading spaces\n\n\ttabs and   runs of spaces   ",
    "def f(x):\n    return x ** 2  # 12345678901",
    "I'M can't WE'LL they'd",
    "",
]


def test_converted_tokenizer_matches_ours_on_the_real_llama3_file(tmp_path):
    """hf.write_hf_tokenizer on the real tokenizer.model: AutoTokenizer's ids, specials and chat
    prompt against ours (itself checked against Meta's llama_models in test_tokenizer.py)."""
    import os

    llama_models = pytest.importorskip("llama_models")
    path = os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")
    written = hf.write_hf_tokenizer(path, str(tmp_path))
    assert {"tokenizer.json", "tokenizer_config.json"} <= {os.path.basename(p) for p in written}
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer(path)
    assert len(auto) == ours.n_words == 128256
    for name, i in ours.special_tokens.items():
        assert auto.convert_tokens_to_ids(name) == i, name
    for text in TEXTS:
        ids = ours.encode(text, bos=True, eos=False)
        assert auto(text)["input_ids"] == ids, text
        assert auto.decode(ids, skip_special_tokens=True) == text
    dialog = [
        {"role": "system", "content": "Answer briefly. "},
        {"role": "user", "content": "  What is 2 + 2?\n"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 日本?"},
    ]
    got = auto.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if not isinstance(got, list) else got
    assert got == ChatFormat(ours).encode_dialog_prompt(dialog)


def test_transformers_reads_converted_scaled_checkpoint_past_8192(tmp_path):
    params = {**LONG_PARAMS, "rope_scale_factor": 32.0}
    sd = sharpen_attention(helpers.random_state_dict(params, seed=1))
    save.save_checkpoint(sd, params, tmp_path / "meta")
    convert.to_hf(tmp_path / "meta", tmp_path / "hf")
    rope = json.loads((tmp_path / "hf" / "config.json").read_text())["rope_scaling"]
    assert rope == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}

    tokens = long_tokens(params["vocab_size"])
    ours = long_sequence_logits(load_ours(tmp_path / "meta", tokens.shape[1], 1), tokens)
    theirs = hf_logits(load_hf(tmp_path / "hf", attn="sdpa"), tokens)
    torch.testing.assert_close(ours[:, 8180:], theirs[:, 8180:], atol=ATOL, rtol=0)


def random_hf_model(tie: bool, rope_scaling=None, seed: int = 0):
    """A random LlamaForCausalLM with weights large enough for decisive logits (init std 0.02 is not)."""
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        tie_word_embeddings=tie, rope_scaling=rope_scaling, attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * (4 if "embed" in name else 1))
    return model


@pytest.mark.parametrize(
    "tie,rope_scaling",
    [
        (False, None),
        (True, None),
        (True, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}),
    ],
)
def test_from_transformers_save_pretrained(tmp_path, tie, rope_scaling):
    model = random_hf_model(tie, rope_scaling)
    model.save_pretrained(tmp_path / "hf")
    saved = set(__import__("safetensors").safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt").keys())
    assert ("lm_head.weight" in saved) == (not tie)
    convert.from_hf(tmp_path / "hf", tmp_path / "meta")
    params = checkpoint.read_params(tmp_path / "meta")
    assert params.get("use_scaled_rope", False) == (rope_scaling is not None)
    if rope_scaling:
        assert params["rope_scale_factor"] == 32.0  # not this shape's default (8), so written out

    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    ours = load_ours(tmp_path / "meta").forward_train(tokens)
    torch.testing.assert_close(ours, hf_logits(model, tokens), atol=ATOL, rtol=0)
    if tie:
        shard = checkpoint.load_shard(tmp_path / "meta" / "consolidated.00.pth")
        assert torch.equal(shard["output.weight"], shard["tok_embeddings.weight"])


def test_tied_meta_checkpoint_becomes_tied_hf(tmp_path):
    sd = helpers.random_state_dict(SCALED, seed=3)
    sd["output.weight"] = sd["tok_embeddings.weight"].clone()  # as in the 3.2 1B/3B Meta checkpoints
    save.save_checkpoint(sd, SCALED, tmp_path / "meta", n_shards=2)
    convert.to_hf(tmp_path / "meta", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    convert.from_hf(tmp_path / "hf", tmp_path / "back", shards=2)
    assert_same_checkpoint(tmp_path / "back", tmp_path / "meta")
    # without output.weight (tied, as the loader takes it): the same Hugging Face model
    del sd["output.weight"]
    save.save_checkpoint(sd, SCALED, tmp_path / "no_output", n_shards=2)
    convert.to_hf(tmp_path / "no_output", tmp_path / "hf2")
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["tie_word_embeddings"] is True
    convert.from_hf(tmp_path / "hf2", tmp_path / "back2", shards=2)
    assert_same_checkpoint(tmp_path / "back2", tmp_path / "meta")
    with pytest.raises(hf.ConversionError, match=r"has no output.weight .*default \(tied\)"):
        convert.to_hf(tmp_path / "no_output", tmp_path / "hf3", tie_word_embeddings=False)


@pytest.mark.parametrize("name", list(registry.PUBLISHED))
def test_published_params_survive_the_config(name):
    params = registry.get(name)
    config = hf.config_from_params(params)
    assert hf.params_from_config(config) == params
    scaled = params.get("use_scaled_rope", False)
    assert config["bos_token_id"] == 128000
    assert config["eos_token_id"] == ([128001, 128008, 128009] if scaled else [128001, 128009])
    assert config["max_position_embeddings"] == (131072 if scaled else 8192)
    if scaled:
        assert config["rope_scaling"]["factor"] == (32.0 if name.startswith("llama3.2") else 8.0)
    transformers.LlamaConfig(**config)  # transformers accepts it


def test_params_from_unpublished_config_reproduces_ffn_size():
    for intermediate in (160, 224, 256, 1000, 8192):
        config = {**hf.config_from_params(helpers.TINY_PARAMS), "intermediate_size": intermediate}
        assert ModelArgs(**hf.params_from_config(config)).ffn_hidden_dim == intermediate


def test_refusals(tmp_path, tiny_ckpt):
    with pytest.raises(FileNotFoundError, match="params.json"):
        (tmp_path / "empty").mkdir()
        convert.to_hf(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert.from_hf(tmp_path / "empty", tmp_path / "out")
    config = hf.config_from_params(helpers.TINY_PARAMS)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(hf.ConversionError, match="only safetensors"):
        convert.from_hf(tmp_path / "hf", tmp_path / "out")
    for bad, match in [
        ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "not a Llama"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"attention_bias": True}, "bias"),
    ]:
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(hf.ConversionError, match=match):
            convert.from_hf(tmp_path / "hf", tmp_path / "out")
    convert.to_hf(tiny_ckpt, tmp_path / "out")
    with pytest.raises(ValueError, match="model-parallel size 3"):
        convert.from_hf(tmp_path / "out", tmp_path / "back", shards=3)


def test_cli_help_and_one_line_error(tmp_path):
    script = str(helpers.REPO / "scripts" / "convert.py")
    env = helpers.child_env(PAGER="cat")
    helped, done = helpers.run_at_once(  # side by side
        [[sys.executable, script, "--help"], [sys.executable, script, "from_hf", str(tmp_path / "nope"), str(tmp_path / "out")]],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert helped.returncode == 0 and "to_hf" in helped.stdout + helped.stderr
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error:") and "config.json" in done.stderr
