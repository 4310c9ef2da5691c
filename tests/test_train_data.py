"""Fine-tuning data (llama/train/data.py): what trains in a dialog, refusals naming the line,
packing that keeps samples apart, and the SFT loss against transformers' with labels at -100."""
import json

import pytest
import torch

import helpers
from llama import distributed
from llama.model import ModelArgs, Transformer
from llama.tokenizer import ChatFormat, Tokenizer
from llama.train import data, losses
from llama.weights import hf

DIALOG = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "and?"},
    {"role": "assistant", "content": "bye"},
]}


@pytest.fixture(scope="module", autouse=True)
def process_group():
    distributed.setup(torch.device("cpu"))


@pytest.fixture(scope="module")
def tok(byte_tokenizer):
    return Tokenizer(str(byte_tokenizer))


def write_jsonl(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return str(path)


def test_only_assistant_content_and_eot_train(tok):
    fmt = ChatFormat(tok)
    s = data.encode_sft(fmt, DIALOG, "x:1")
    trained = tok.decode([t for t, k in zip(s.tokens, s.trained) if k])
    assert trained == "hello<|eot_id|>bye<|eot_id|>"
    # the same tokens as the chat prompt the model sees at inference
    dialog = [{"role": m["role"], "content": m["content"]} for m in DIALOG["messages"]]
    prompt = fmt.encode_dialog_prompt(dialog[:-1])
    assert s.tokens[: len(prompt)] == prompt
    text = data.encode_sft(fmt, {"text": "abc"}, "x:2")
    assert text.trained == [False, True, True, True, True] and text.tokens[-1] == tok.eos_id


def test_bad_lines_are_named(tok, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [DIALOG, "{not json"])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        data.load_samples(bad, tok, "sft", 64)
    none = write_jsonl(tmp_path / "none.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"none.jsonl:1: the dialog has no assistant turn"):
        data.load_samples(none, tok, "sft", 64)
    long = write_jsonl(tmp_path / "long.jsonl", [DIALOG, {"text": "x" * 200}])
    samples, dropped = data.load_samples(long, tok, "sft", 128)
    assert len(samples) == 1 and dropped == 1
    with pytest.raises(ValueError, match=r"long.jsonl:2: 202 tokens, more than --max_seq_len 128"):
        data.load_samples(long, tok, "sft", 128, drop_long=False)
    pref = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": [{"role": "user", "content": "q"}],
                                                 "chosen": [{"role": "assistant", "content": "good"}],
                                                 "rejected": [{"role": "assistant", "content": "no"}]}])
    (c, r), = data.load_samples(pref, tok, "dpo", 64)[0]
    assert tok.decode([t for t, k in zip(c.tokens, c.trained) if k]) == "good<|eot_id|>"
    assert c.tokens[: c.trained.index(True)] == r.tokens[: r.trained.index(True)]


def tiny_model() -> Transformer:
    model = Transformer(ModelArgs(**helpers.TINY_PARAMS, max_seq_len=128, max_batch_size=2))
    model.load_state_dict(helpers.random_state_dict(helpers.TINY_PARAMS))
    return model


def test_packed_samples_attend_only_to_themselves(tok):
    fmt = ChatFormat(tok)
    a, b = data.encode_sft(fmt, DIALOG, "a"), data.encode_sft(fmt, {"text": "packed text"}, "b")
    rows = data.pack([a, b], 128)
    assert len(rows) == 1
    batch = data.collate(rows)
    model = tiny_model()
    packed = model.forward_train(batch["inputs"], batch["positions"])[0]
    alone = torch.cat([model.forward_train(torch.tensor([s.tokens[:-1]]))[0] for s in (a, b)])
    torch.testing.assert_close(packed[: alone.shape[0]], alone, atol=1e-5, rtol=1e-5)


def test_sft_loss_equals_transformers(tok):
    transformers = pytest.importorskip("transformers")
    fmt = ChatFormat(tok)
    s = data.encode_sft(fmt, DIALOG, "x")
    model = tiny_model()
    batch = data.collate([data.to_row([s])])
    ours = losses.token_loss_sum(model.forward_train(batch["inputs"]), batch["targets"])
    ours = ours / (batch["targets"] != data.IGNORE).sum()
    params = helpers.TINY_PARAMS
    config = transformers.LlamaConfig(**hf.config_from_params(params, torch_dtype="float32"), attn_implementation="eager")
    theirs = transformers.LlamaForCausalLM(config).float().eval()
    sd = helpers.random_state_dict(params)
    theirs.load_state_dict(dict(hf.tensor_to_hf(k, v, params) for k, v in sd.items()))
    labels = torch.tensor([[t if k else -100 for t, k in zip(s.tokens, s.trained)]])
    with torch.no_grad():
        want = theirs(torch.tensor([s.tokens]), labels=labels).loss
    torch.testing.assert_close(ours.detach(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight_trains", [True, False])
def test_fused_output_loss_equals_the_loss_on_whole_logits(monkeypatch, weight_trains):
    monkeypatch.setattr(losses, "LOGIT_CHUNK_BYTES", 4 * 512 * 5)  # chunks of 5 rows of a 512-token vocabulary
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 64, generator=g)
    w = torch.randn(512, 64, generator=g) / 8
    targets = torch.randint(0, 512, (3, 7), generator=g)
    targets[0, :3] = data.IGNORE
    grads = []
    for fused in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_(weight_trains)
        loss = losses.fused_token_loss_sum(hh, ww, targets) if fused else losses.token_loss_sum(hh @ ww.t(), targets)
        (loss * 0.37).backward()
        grads.append((loss.detach(), hh.grad, ww.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-5)
    if weight_trains:
        torch.testing.assert_close(grads[0][2], grads[1][2], atol=1e-6, rtol=1e-5)
    else:
        assert grads[0][2] is None
    # under bfloat16 autocast: the products in bfloat16 as autocast makes them (the head converted once)
    hh = h.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = losses.fused_token_loss_sum(hh, w, targets)
    (loss * 0.37).backward()
    logits = (h.bfloat16() @ w.bfloat16().t()).float()
    torch.testing.assert_close(loss.detach(), losses.token_loss_sum(logits, targets))
    assert hh.grad.dtype == torch.float32
    torch.testing.assert_close(hh.grad, grads[1][1], atol=2e-2, rtol=2e-2)
    kept = losses.frozen_in(w, torch.bfloat16)  # the frozen head's conversion, kept from step to step
    assert losses.frozen_in(w, torch.bfloat16) is kept and torch.equal(kept, w.bfloat16())
    w.mul_(2.0)  # changed in place: converted again
    assert torch.equal(losses.frozen_in(w, torch.bfloat16), w.bfloat16())
    model = tiny_model()  # the loop's check: a plain output projection fuses, one with an adapter does not
    assert losses.fusable_head(model) is model.output.weight
    model.output.lora = torch.nn.Identity()
    assert losses.fusable_head(model) is None


def test_fused_output_loss_on_logits_spread_past_exps_range():
    # logits spread over hundreds (random unscaled weights): most shifted logits sit below float32
    # exp's normal range, where the fused loss floors them; loss and gradients stay those of the
    # cross-entropy over whole logits
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 64, generator=g)
    w = torch.randn(512, 64, generator=g) * 25
    targets = torch.randint(0, 512, (2, 5), generator=g)
    out = []
    for fused in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = losses.fused_token_loss_sum(hh, ww, targets) if fused else losses.token_loss_sum(hh @ ww.t(), targets)
        loss.backward()
        out.append((loss.detach(), hh.grad, ww.grad))
    shifted = h @ w.t() - (h @ w.t()).amax(-1, keepdim=True)
    assert (shifted < losses.EXP_FLOOR).float().mean() > 0.5
    torch.testing.assert_close(out[0][0], out[1][0], atol=0, rtol=1e-6)
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-30, rtol=1e-5)
    torch.testing.assert_close(out[0][2], out[1][2], atol=1e-30, rtol=1e-5)
