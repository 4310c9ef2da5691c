"""llama/validation.py: every request argument and params.json value that is wrong gets a
TypeError/ValueError naming it; non-finite logits stop generation with the likely cause."""
import json
import math

import pytest
import torch

import helpers
from llama import Llama
from llama.weights import checkpoint
from llama.generation import NonFiniteLogitsError
from llama.model import ModelArgs


@pytest.fixture(scope="module")
def llama(tiny_ckpt, byte_tokenizer) -> Llama:
    return Llama.build(str(tiny_ckpt), str(byte_tokenizer), max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32")


def toks(llama):
    return [llama.tokenizer.encode("Hi", bos=True, eos=False)]


BAD_SAMPLING = [  # (kwargs, error type, words the message must hold)
    (dict(temperature=-1), ValueError, "temperature must be >= 0"),
    (dict(temperature=math.nan), ValueError, "temperature must be finite"),
    (dict(temperature=math.inf), ValueError, "temperature must be finite"),
    (dict(temperature="0.5"), TypeError, "temperature must be a number"),
    (dict(temperature=None), TypeError, "temperature must be a number"),
    (dict(top_p=1.5), ValueError, "top_p must be <= 1"),
    (dict(top_p=-1), ValueError, "top_p must be >= 0"),
    (dict(top_p=math.nan), ValueError, "top_p must be finite"),
    (dict(top_p=[0.9]), TypeError, "top_p must be a number"),
    (dict(max_gen_len=-5), ValueError, "max_gen_len must be >= 0"),
    (dict(max_gen_len=2.5), TypeError, "max_gen_len must be an int"),
    (dict(max_gen_len=True), TypeError, "max_gen_len must be an int"),
    (dict(seed=1.5), TypeError, "seed must be an int or None"),
    (dict(seed="1"), TypeError, "seed must be an int or None"),
    (dict(logprobs="yes"), TypeError, "logprobs must be True or False"),
]


@pytest.mark.parametrize("kwargs,error,words", BAD_SAMPLING)
def test_bad_sampling_arguments_are_named_by_every_method(llama, kwargs, error, words):
    calls = {
        "generate": lambda **kw: llama.generate(toks(llama), **{"max_gen_len": 4, **kw}),
        "stream": lambda **kw: list(llama.stream(toks(llama), **{"max_gen_len": 4, **kw})),
        "text_completion": lambda **kw: llama.text_completion(["Hi"], **kw),
        "chat_completion": lambda **kw: llama.chat_completion([[{"role": "user", "content": "Hi"}]], **kw),
    }
    for name, call in calls.items():
        with pytest.raises(error, match=words):
            call(**kwargs)


def test_generate_and_stream_need_a_max_gen_len(llama):
    with pytest.raises(TypeError, match="max_gen_len must be an int"):
        llama.generate(toks(llama), None)
    with pytest.raises(TypeError, match="max_gen_len must be an int"):
        list(llama.stream(toks(llama), None))


def test_valid_edges_still_generate(llama):
    assert llama.generate(toks(llama), 0)[0] == [[]]
    assert len(llama.generate(toks(llama), 3, temperature=0.7, top_p=0.0, seed=3)[0][0]) == 3
    assert len(llama.generate(toks(llama), 3, temperature=2, top_p=1, seed=3)[0][0]) == 3
    assert llama.text_completion(["Hi"], max_gen_len=2, temperature=0)[0]["generation"]


@pytest.mark.parametrize(
    "prompt_tokens,error,words",
    [
        ([1, 2, 3], TypeError, r"prompt_tokens\[0\] must be a list of ints"),
        ("abc", TypeError, "prompt_tokens must be a list of token lists"),
        ([[1, "2"]], TypeError, r"prompt_tokens\[0\] holds '2'"),
        ([[1, 2.0]], TypeError, r"prompt_tokens\[0\] holds 2.0"),
        ([[1, 512]], ValueError, r"token id 512, outside the vocabulary \[0, 512\)"),
        ([[5], [-1]], ValueError, r"prompt_tokens\[1\] holds token id -1"),
    ],
)
def test_bad_prompt_tokens_are_named(llama, prompt_tokens, error, words):
    with pytest.raises(error, match=words):
        llama.generate(prompt_tokens, 2)
    with pytest.raises(error, match=words):
        list(llama.stream(prompt_tokens, 2))


def test_a_bare_string_prompt_is_refused_naming_prompts(llama):
    with pytest.raises(TypeError, match=r"prompts must be a list of strings, got one string 'abc': pass \[prompt\]"):
        llama.text_completion("abc")
    with pytest.raises(TypeError, match=r"prompts\[1\] must be a string"):
        llama.text_completion(["a", 3])


@pytest.mark.parametrize(
    "dialogs,error,words",
    [
        ([{"role": "user", "content": "Hi"}], TypeError, r"dialogs\[0\] is one message, not a dialog"),
        ({"role": "user", "content": "Hi"}, TypeError, "dialogs must be a list of dialogs, got one message"),
        ("Hi", TypeError, "dialogs must be a list of dialogs"),
        ([["Hi"]], TypeError, r"dialogs\[0\]\[0\] must be a message dict"),
        ([[]], ValueError, r"dialogs\[0\] is empty"),
        ([[{"role": "user"}]], ValueError, r"dialogs\[0\]\[0\] has no 'content'"),
        ([[{"content": "Hi"}]], ValueError, r"dialogs\[0\]\[0\] has no 'role'"),
        ([[{"role": "robot", "content": "Hi"}]], ValueError, r"has role 'robot': use one of"),
        ([[{"role": "user", "content": 7}]], TypeError, r"dialogs\[0\]\[0\]\['content'\] must be a string"),
    ],
)
def test_bad_dialogs_are_named(llama, dialogs, error, words):
    with pytest.raises(error, match=words):
        llama.chat_completion(dialogs, max_gen_len=2)


def test_non_finite_logits_name_the_likely_cause(llama, monkeypatch):
    real_forward = llama.model.forward

    def nan_forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out[..., 7] = float("nan")
        return out

    monkeypatch.setattr(llama.model, "forward", nan_forward)
    for temperature in (0, 0.8):  # greedy would pick garbage, sampling would crash in multinomial
        with pytest.raises(NonFiniteLogitsError, match="NaN or infinite logits.*corrupt.*float16"):
            llama.generate(toks(llama), 3, temperature=temperature)
    assert issubclass(NonFiniteLogitsError, ValueError)  # scripts report it as one error: line


# ---------------------------------------------------------------------------------------------
# params.json


@pytest.mark.parametrize(
    "change,error,words",
    [
        ({"dim": "320"}, TypeError, r"'dim' must be an int, got '320' \(str\)"),
        ({"dim": []}, TypeError, r"'dim' must be an int, got \[\] \(list\)"),
        ({"dim": 64.0}, TypeError, r"'dim' must be an int"),
        ({"dim": -64}, ValueError, r"'dim' must be >= 1, got -64"),
        ({"n_layers": True}, TypeError, r"'n_layers' must be an int, got True \(bool\)"),
        ({"n_heads": 0}, ValueError, r"'n_heads' must be >= 1"),
        ({"n_kv_heads": "2"}, TypeError, r"'n_kv_heads' must be an int or None"),
        ({"multiple_of": 0}, ValueError, r"'multiple_of' must be >= 1, got 0"),
        ({"norm_eps": "x"}, TypeError, r"'norm_eps' must be a number, got 'x'"),
        ({"norm_eps": 0}, ValueError, r"'norm_eps' must be > 0"),
        ({"rope_theta": -1.0}, ValueError, r"'rope_theta' must be > 0"),
        ({"ffn_dim_multiplier": "1.3"}, TypeError, r"'ffn_dim_multiplier' must be a number or None"),
        ({"use_scaled_rope": 1}, TypeError, r"'use_scaled_rope' must be True or False"),
        ({"vocab_size": None}, TypeError, r"'vocab_size' must be an int"),
    ],
)
def test_bad_params_json_values_name_the_key(tmp_path, change, error, words):
    path = tmp_path / "params.json"
    path.write_text(json.dumps({**helpers.TINY_PARAMS, **change}))
    with pytest.raises(error, match=words) as info:
        checkpoint.read_params(tmp_path)
    assert "params.json" in str(info.value)
    with pytest.raises(error, match=words):  # and the same at ModelArgs
        ModelArgs(**{**helpers.TINY_PARAMS, **change})


@pytest.mark.parametrize("key", ["dim", "n_layers", "n_heads", "vocab_size"])
def test_missing_required_params_are_named(tmp_path, key):
    params = {k: v for k, v in helpers.TINY_PARAMS.items() if k != key}
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(ValueError, match=f"lacks required key.*'{key}'"):
        checkpoint.read_params(tmp_path)


def test_params_json_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "params.json").write_text("[1, 2]")
    with pytest.raises(TypeError, match="params.json must be a JSON object"):
        checkpoint.read_params(tmp_path)


def test_unknown_params_keys_are_still_accepted(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({**helpers.TINY_PARAMS, "some_future_key": [1, "x"]}))
    params = checkpoint.read_params(tmp_path)
    assert ModelArgs(**params).dim == helpers.TINY_PARAMS["dim"]


def test_non_finite_logits_check_does_not_fire_on_finite_input():
    from llama.sampling import sample as _sample

    logits = torch.randn(2, 16)
    assert _sample(logits, 0, 0.9, None).tolist() == logits.argmax(-1).tolist()


def test_under_torchrun_the_last_lines_name_the_problem(tmp_path, tiny_ckpt_2shards, byte_tokenizer):
    args = ["--ckpt_dir", tiny_ckpt_2shards, "--tokenizer_path", byte_tokenizer, "--temperature", -1,
            "--device", "cpu", "--max_seq_len", 64]
    r = helpers.run_torchrun("example_text_completion.py", args, 2)
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "error: temperature must be >= 0, got -1" in "\n".join(lines[-3:])  # the launcher's summary ends with it
    assert sum(x.startswith("error: ") for x in lines) == 1  # rank 0's own line, once
    assert "Traceback" not in "\n".join(lines[lines.index("Root Cause (first observed failure):"):])
    # rank 0 reads one of the two shards: its log says so, rather than "1/1"
    assert "loading consolidated.00.pth (shard 1 of 2 in the checkpoint" in r.stderr
    assert "1 of 1 this process reads" in r.stderr


def test_logits_masked_with_minus_inf_still_sample_but_a_row_all_minus_inf_does_not():
    from llama.sampling import sample as _sample

    logits = torch.randn(2, 16)
    logits[:, :8] = -math.inf  # a legitimate mask
    assert (_sample(logits, 0.7, 0.9, None) >= 8).all() and (_sample(logits, 0, 0.9, None) >= 8).all()
    logits[1] = -math.inf
    with pytest.raises(NonFiniteLogitsError, match=r"batch rows \[1\]"):
        _sample(logits, 0.7, 0.9, None)
