"""CUDA checks: run where a GPU exists (marked `gpu`, skipped without one)."""
import pytest
import torch

import helpers
from llama import Llama

pytestmark = pytest.mark.gpu


def logits_of(llama: Llama, tokens: list) -> torch.Tensor:
    llama.model.free_cache()
    return llama.model(torch.tensor([tokens], device=llama.device), 0)[0].float().cpu()


def test_cuda_float32_matches_cpu(tiny_ckpt, byte_tokenizer):
    kwargs = dict(max_seq_len=64, max_batch_size=2, dtype="float32")
    cpu = Llama.build(str(tiny_ckpt), str(byte_tokenizer), device="cpu", **kwargs)
    gpu = Llama.build(str(tiny_ckpt), str(byte_tokenizer), device="cuda", **kwargs)
    assert gpu.device.type == "cuda" and gpu.model.layers[0].attention.wq.weight.is_cuda
    prompt = cpu.tokenizer.encode("CUDA parity", bos=True, eos=False)
    torch.testing.assert_close(logits_of(gpu, prompt), logits_of(cpu, prompt), atol=1e-4, rtol=0)
    assert gpu.generate([prompt], 10, temperature=0)[0] == cpu.generate([prompt], 10, temperature=0)[0]
    assert gpu.model.layers[0].attention.kv_cache.k.is_cuda


def test_cuda_default_dtype_is_bfloat16_and_close_to_float32(tiny_ckpt, byte_tokenizer):
    ref = Llama.build(str(tiny_ckpt), str(byte_tokenizer), 64, 2, device="cuda", dtype="float32")
    bf16 = Llama.build(str(tiny_ckpt), str(byte_tokenizer), 64, 2, device="cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert bf16.model.output.weight.dtype == expected
    prompt = ref.tokenizer.encode("bfloat16 on the GPU", bos=True, eos=False)
    a, b = logits_of(ref, prompt), logits_of(bf16, prompt)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99
    out, _ = bf16.generate([prompt, prompt[:5]], 8, temperature=0.7, top_p=0.9, seed=1)
    assert all(len(t) == 8 for t in out)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_two_processes_match_one(tmp_path, tiny_ckpt, tiny_ckpt_2shards, byte_tokenizer):
    outs = {}
    for name, ckpt, n in (("one", tiny_ckpt, 1), ("two", tiny_ckpt_2shards, 2)):
        out = tmp_path / f"{name}.pt"
        args = ["--ckpt_dir", ckpt, "--tokenizer_path", byte_tokenizer, "--out", out, "--device", "cuda"]
        r = helpers.run_torchrun("tests/workers/generate.py", args, n)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[name] = torch.load(out)
    assert outs["one"]["tokens"] == outs["two"]["tokens"]
    torch.testing.assert_close(outs["two"]["logits"], outs["one"]["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat_completion.py"])
def test_examples_on_cuda(script, tiny_ckpt, byte_tokenizer):
    args = ["--ckpt_dir", tiny_ckpt, "--tokenizer_path", byte_tokenizer, "--max_gen_len", 8, "--max_seq_len", 2048, "--device", "cuda"]
    r = helpers.run_torchrun(script, args, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cuda" in r.stderr
