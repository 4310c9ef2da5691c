"""ModelArgs, RoPE and RMSNorm against plain reference math, and build-time options."""
import json
import logging
import math
import shutil
import subprocess
import sys

import pytest
import torch

import helpers
from llama import Llama, ModelArgs
from llama.model import RMSNorm, apply_rotary_emb, apply_scaling, precompute_freqs_cis


def test_model_args_accept_every_params_json_key_and_ignore_unknown(caplog):
    params = {**helpers.TINY_PARAMS, "use_scaled_rope": True, "quantization_args": {"scheme": "fp8"}, "moe": None}
    with caplog.at_level(logging.DEBUG, logger="llama.args"):
        args = ModelArgs(**params)
    assert args.use_scaled_rope and args.dim == 64 and not hasattr(args, "quantization_args")
    assert "ignoring unknown keys ['moe', 'quantization_args']" in caplog.text


@pytest.mark.parametrize(
    "changes, mp, message",
    [
        ({"dim": 65}, 1, "dim 65 is not divisible by n_heads 4"),
        ({"n_kv_heads": 3}, 1, "n_heads 4 is not divisible by n_kv_heads 3"),
        ({}, 8, "n_heads 4 is not divisible by the model-parallel size 8"),
        ({"n_heads": 8, "n_kv_heads": 4}, 8, None),
        ({"n_heads": 12, "n_kv_heads": 6, "dim": 96}, 4, "n_kv_heads 6 and the model-parallel size 4"),
        ({"vocab_size": 510}, 4, "vocab_size 510 is not divisible by the model-parallel size 4"),
        ({"max_seq_len": 8193}, 1, "max_seq_len 8193 exceeds the 8192 tokens"),
        ({"max_seq_len": 131072, "use_scaled_rope": True}, 1, None),
        ({"max_seq_len": 131073, "use_scaled_rope": True}, 1, "exceeds the 131072 tokens"),
    ],
)
def test_impossible_shapes_are_value_errors_that_say_why(changes, mp, message):
    args = ModelArgs(**{**helpers.TINY_PARAMS, **changes})
    if message is None:
        args.validate(mp)
    else:
        with pytest.raises(ValueError, match=message):
            args.validate(mp)


def test_rope_rotates_adjacent_pairs_as_complex_numbers():
    head_dim, seqlen = 8, 5
    freqs_cis = precompute_freqs_cis(head_dim, seqlen, theta=10000.0)
    x = torch.randn(2, seqlen, 3, head_dim)
    out, _ = apply_rotary_emb(x, x, freqs_cis)
    for pos in range(seqlen):
        for i in range(head_dim // 2):
            angle = pos * 10000.0 ** (-2 * i / head_dim)
            z = complex(x[0, pos, 1, 2 * i], x[0, pos, 1, 2 * i + 1]) * complex(math.cos(angle), math.sin(angle))
            assert out[0, pos, 1, 2 * i].item() == pytest.approx(z.real, abs=1e-5)
            assert out[0, pos, 1, 2 * i + 1].item() == pytest.approx(z.imag, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_of_compiled_and_eager_steps_agree(dtype):
    """Eager rotates with one complex product, torch.compile with the real form it can fuse:
    both against the reference rotation above, on per-row positions and on a slice of the table."""
    from llama.model import _rotate_complex, _rotate_real

    torch.manual_seed(0)
    tol = dict(atol=1e-6, rtol=0) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)  # bf16: 1 ulp
    table = torch.view_as_real(precompute_freqs_cis(16, 64))  # (64, 8, 2)
    x = torch.randn(3, 4, 5, 16).to(dtype)
    pos = torch.tensor([[0, 1, 2, 3], [7, 8, 9, 10], [60, 61, 62, 63]])
    for freqs in (table[pos], table[10:14][None].expand(3, -1, -1, -1)):
        freqs = freqs.unsqueeze(2)  # (bsz, seqlen, 1, head_dim/2, 2)
        a, b = _rotate_complex(x, freqs), _rotate_real(x, freqs)
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), **tol)

    compiled = torch.compile(apply_rotary_emb, backend="eager", fullgraph=True)
    q, k = compiled(x, x[:, :, :2], table[pos])
    eager_q, eager_k = apply_rotary_emb(x, x[:, :, :2], table[pos])
    torch.testing.assert_close(q, eager_q, **tol)
    torch.testing.assert_close(k, eager_k, **tol)


def test_rope_scaling_follows_the_published_rule():
    freqs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).double() / 128))
    scaled = apply_scaling(freqs.float(), scale_factor=8.0)
    for f, s in zip(freqs.tolist(), scaled.tolist()):
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            expected = f
        elif wavelen > 8192:
            expected = f / 8
        else:
            a = (8192 / wavelen - 1) / (4 - 1)
            expected = (1 - a) * f / 8 + a * f
        assert s == pytest.approx(expected, rel=1e-5)


def test_rmsnorm_statistics_are_float32_then_cast_back():
    norm = RMSNorm(16, eps=1e-5).to(torch.bfloat16)
    x = (torch.randn(4, 16) * 100).to(torch.bfloat16)
    ref = x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.to(torch.bfloat16) * norm.weight)


def test_scaled_checkpoint_from_a_later_release_loads_and_the_rope_factor_can_be_overridden(
    tmp_path, tiny_ckpt, byte_tokenizer, caplog
):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    params = {**json.loads((ckpt / "params.json").read_text()), "use_scaled_rope": True, "quantization_args": {}}
    (ckpt / "params.json").write_text(json.dumps(params))
    with caplog.at_level(logging.INFO, logger="llama"):
        default = Llama.build(str(ckpt), str(byte_tokenizer), 64, 1, device="cpu", dtype="float32")
        forced = Llama.build(str(ckpt), str(byte_tokenizer), 64, 1, device="cpu", dtype="float32", rope_scale_factor=32)
    assert default.model.params.rope_scale_factor == 8.0
    assert forced.model.params.rope_scale_factor == 32.0
    assert "RoPE scaling factor 32 (as asked)" in caplog.text
    prompt = default.tokenizer.encode("scaled", bos=True, eos=False)
    assert default.generate([prompt], 4, temperature=0)[0]


def test_two_plain_python_runs_at_once_do_not_collide(tiny_ckpt, byte_tokenizer):
    """Without torchrun each run is a process group of one held in memory: no port to fight over."""
    cmd = [sys.executable, "example_text_completion.py", "--ckpt_dir", str(tiny_ckpt), "--tokenizer_path",
           str(byte_tokenizer), "--max_seq_len", "2048", "--max_gen_len", "4", "--device", "cpu"]
    procs = [subprocess.Popen(cmd, cwd=helpers.REPO, env=helpers.child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        assert out.count("==================================") == 4
