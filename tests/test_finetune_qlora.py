"""llama-finetune --base_quantize (llama/train/qlora.py): LoRA over a quantized frozen base. The
adapters' gradients equal those over a plain float model holding the dequantized weights, for every
kernel path a quantized projection can take; a short run learns and writes the adapter merged onto
the full-precision base; the refusals."""
import json

import pytest
import torch

from llama import distributed
from llama.train import qlora
from llama.train.finetune import finetune
from llama.weights import lora
from llama.weights.checkpoint import read_params
from llama.weights.loader import load_model, model_args
from llama.weights.quant_formats import quantize_weight, resolve
from llama.weights.quant_modules import QuantizedEmbedding, QuantizedLinear


@pytest.fixture(scope="module", autouse=True)
def process_group():
    distributed.setup(torch.device("cpu"))


@pytest.mark.parametrize("mode,path", [("int8", "pack"), ("int8", "dequant"), ("int4", "pack"), ("int4", "dequant"),
                                       ("int4", "pack-read-through-kernel")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_input_gradient_equals_the_dequantized_product(mode, path, dtype, monkeypatch):
    if path == "pack-read-through-kernel":  # a kernel layout whose rows cannot be read (CUDA's int4)
        monkeypatch.setattr(qlora.qk, "int4_kernel_block", lambda: None)
        path = "pack"
    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(0))
    q, scales, *zeros = quantize_weight("layers.0.attention.wq.weight", w, resolve(mode)).values()
    module = QuantizedLinear(mode, q, scales, zeros[0] if zeros else None, 32, dtype, path=path, compute_dtype=dtype)
    qlora.make_trainable(module)
    x = torch.randn(3, 5, 96, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(3, 5, 128, dtype=dtype)
    module(x).backward(grad_y)
    want = grad_y.float() @ module.dequantize().to(dtype).float()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(x.grad.float(), want, **tol)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_lora_gradients_equal_those_over_the_dequantized_float_base(mode, tiny_ckpt):
    args = model_args(read_params(tiny_ckpt), 32, 1)
    quantized = load_model(tiny_ckpt, args, 0, 1, torch.device("cpu"), torch.float32, resolve(mode), torch.float32)
    qlora.make_trainable(quantized)
    plain = load_model(tiny_ckpt, args, 0, 1, torch.device("cpu"), torch.float32)
    for name, m in quantized.named_modules():  # the plain model holds exactly the weights the kernels use
        if isinstance(m, QuantizedLinear):
            plain.get_submodule(name).weight.data = m.dequantize()
        elif isinstance(m, QuantizedEmbedding):
            plain.get_submodule(name).weight.data = m(torch.arange(args.vocab_size)).float()
    config = lora.LoRAConfig(4, 8.0, ("wq", "wv", "wo", "w1", "w2", "output"))
    grads = []
    for model in (quantized, plain):
        model.requires_grad_(False)
        torch.manual_seed(0)
        for a in lora.attach(model, config).values():
            torch.nn.init.normal_(a.B, std=0.1)  # B = 0 would leave A without a gradient
        tokens = torch.randint(0, args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
        logits = model.forward_train(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append({k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 2 * (5 * args.n_layers + 1)
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-4, msg=k)


def test_a_short_run_learns_and_merges_onto_the_full_precision_base(tmp_path, tiny_ckpt, byte_tokenizer):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a}+{a}?"},
                                                    {"role": "assistant", "content": str(2 * a)}]}) + "\n" for a in range(8)))
    finetune(data=str(path), out_dir=str(tmp_path / "run"), ckpt_dir=str(tiny_ckpt), tokenizer_path=str(byte_tokenizer),
             lora_rank=4, lora_targets="wq,wv,w2", base_quantize="int4", max_steps=8, batch_size=4, lr=3e-2,
             warmup=1, max_seq_len=64, seed=2)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-2:]) < 0.5 * sum(losses[:2])
    base = torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True)
    merged = torch.load(tmp_path / "run" / "model" / "consolidated.00.pth", weights_only=True)
    adapter = torch.load(tmp_path / "run" / "adapter" / "adapter.pth", weights_only=True)
    key = "layers.1.feed_forward.w2"
    scale = 16.0 / 4  # the default alpha over the rank
    want = base[key + ".weight"].float() + scale * adapter[key + ".lora.B"] @ adapter[key + ".lora.A"]
    torch.testing.assert_close(merged[key + ".weight"].float(), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(merged["layers.0.attention.wk.weight"], base["layers.0.attention.wk.weight"])


def test_refusals(tmp_path, tiny_ckpt, monkeypatch):
    with pytest.raises(ValueError, match="--base_quantize .*--lora_rank R > 0"):
        finetune(data="x.jsonl", out_dir=str(tmp_path / "a"), ckpt_dir=str(tiny_ckpt), base_quantize="int8")
    with pytest.raises(ValueError, match="--base_quantize 'fp8': pass int4 or int8"):
        finetune(data="x.jsonl", out_dir=str(tmp_path / "a"), ckpt_dir=str(tiny_ckpt), base_quantize="fp8", lora_rank=4)
    monkeypatch.delattr(torch, "_weight_int4pack_mm_for_cpu")
    with pytest.raises(ValueError, match="--base_quantize int4: .*no kernel on cpu"):
        finetune(data="x.jsonl", out_dir=str(tmp_path / "a"), ckpt_dir=str(tiny_ckpt), base_quantize="int4", lora_rank=4)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_an_adapter_applied_over_a_quantized_model_computes_as_over_its_dequantized_weights(mode, tiny_ckpt, tmp_path):
    """Llama.build(quantize=..., adapter=...) at inference: the adapter beside the quantized products."""
    args = model_args(read_params(tiny_ckpt), 32, 1)
    quantized = load_model(tiny_ckpt, args, 0, 1, torch.device("cpu"), torch.float32, resolve(mode), torch.float32)
    plain = load_model(tiny_ckpt, args, 0, 1, torch.device("cpu"), torch.float32)
    for name, m in quantized.named_modules():
        if isinstance(m, QuantizedLinear):
            plain.get_submodule(name).weight.data = m.dequantize()
        elif isinstance(m, QuantizedEmbedding):
            plain.get_submodule(name).weight.data = m(torch.arange(args.vocab_size)).float()
    config = lora.LoRAConfig(4, 8.0, ("wq", "wv", "w2", "output"))
    torch.manual_seed(0)
    state = {f"{name}.lora.{k}": t for name, a in lora.attach(load_model(tiny_ckpt, args, 0, 1, torch.device("cpu"), torch.float32), config).items()
             for k, t in (("A", a.A.detach()), ("B", torch.randn_like(a.B) * 0.05))}
    lora.save_adapter(state, config, args, tmp_path / "adapter")
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = quantized.forward_train(tokens)
        for model in (quantized, plain):
            lora.apply_adapter(model, tmp_path / "adapter")
        got, want = quantized.forward_train(tokens), plain.forward_train(tokens)
    assert (got - before).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
