"""LoRA (llama/weights/lora.py) against PEFT's, an implementation we did not write; adapters on the
Transformer: merging, switching off, refusals."""
import pytest
import torch
from torch import nn

import helpers
from llama import distributed
from llama.model import ModelArgs, Transformer
from llama.weights import lora

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module", autouse=True)
def process_group():
    distributed.setup(torch.device("cpu"))


class Proj(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 16, bias=False)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_linear_equals_peft(rslora):
    torch.manual_seed(0)
    ours = Proj()
    theirs = Proj()
    theirs.load_state_dict(ours.state_dict())
    config = lora.LoRAConfig(rank=4, alpha=8.0, rslora=rslora)
    adapter = lora.add_adapter(ours.proj, config)
    with torch.no_grad():
        adapter.B.normal_()  # a trained B: the new one is zero
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0, use_rslora=rslora)
    model = peft.get_peft_model(theirs, peft_config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(adapter.A)
        layer.lora_B["default"].weight.copy_(adapter.B)
    assert layer.scaling["default"] == pytest.approx(config.scale)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(ours(x), model(x), atol=1e-6, rtol=1e-6)
    merged = model.merge_and_unload().proj.weight
    w = lora.merged_state_dict(ours)["proj.weight"]
    torch.testing.assert_close(w, merged, atol=1e-6, rtol=1e-6)


def tiny_model() -> Transformer:
    model = Transformer(ModelArgs(**helpers.TINY_PARAMS, max_seq_len=32, max_batch_size=2))
    model.load_state_dict(helpers.random_state_dict(helpers.TINY_PARAMS))
    return model


def test_merge_disable_and_refusals():
    model = tiny_model()
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    base = model.forward_train(tokens)
    config = lora.LoRAConfig(rank=4, alpha=16.0, targets=lora.TARGETS)
    adapters = lora.attach(model, config)
    assert len(adapters) == 7 * 2 + 1
    torch.testing.assert_close(model.forward_train(tokens), base)  # B starts at zero
    with torch.no_grad():
        for a in adapters.values():
            a.B.normal_(std=0.05)
    adapted = model.forward_train(tokens)
    assert (adapted - base).abs().max() > 1e-3
    with lora.disabled(model):
        torch.testing.assert_close(model.forward_train(tokens), base)
    merged = tiny_model()
    merged.load_state_dict(lora.merged_state_dict(model))
    torch.testing.assert_close(merged.forward_train(tokens), adapted, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="exceeds"):
        lora.attach(tiny_model(), lora.LoRAConfig(rank=65, alpha=1.0))
    with pytest.raises(ValueError, match="unknown LoRA target"):
        lora.parse_targets(["wq", "w4"])


def test_exported_adapter_gives_our_loglikelihoods_in_peft(tmp_path, tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from llama.weights import adapter_hf, convert, hf

    model = tiny_model()
    config = lora.LoRAConfig(rank=4, alpha=8.0, targets=lora.TARGETS, rslora=True)
    with torch.no_grad():
        for a in lora.attach(model, config).values():
            a.B.normal_(std=0.05)
    state = {k: v for k, v in model.state_dict().items() if ".lora." in k}
    lora.save_adapter(state, config, model.params, tmp_path / "adapter")
    convert.to_hf(str(tiny_ckpt), str(tmp_path / "hf"))
    adapter_hf.adapter_to_peft(str(tmp_path / "adapter"), str(tmp_path / "peft"))
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()

    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(2))

    def loglik(logits):
        return torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]

    with torch.no_grad():
        ours = loglik(model.forward_train(tokens))
        with lora.disabled(model):
            assert (loglik(model.forward_train(tokens)) - ours).abs().max() > 1e-2  # the adapter matters
        torch.testing.assert_close(loglik(theirs(tokens).logits), ours, atol=1e-4, rtol=0)
        merged = theirs.merge_and_unload().state_dict()
    params = helpers.TINY_PARAMS
    for k, v in lora.merged_state_dict(model).items():
        hf_key, want = hf.tensor_to_hf(k, v, params)
        torch.testing.assert_close(merged[hf_key], want, atol=1e-6, rtol=1e-5, msg=k)
