"""llama-finetune (llama/train/): one SFT step against a plain PyTorch loop written here, gradient
accumulation against one larger batch, resuming after SIGTERM and after SIGKILL at a random moment
against an uninterrupted run, adapters applied by Llama.build, and the refusals."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import helpers
from llama import distributed
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer
from llama.train import data, loop
from llama.train.finetune import finetune


@pytest.fixture(scope="module", autouse=True)
def process_group():
    distributed.setup(torch.device("cpu"))


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"{a}+{a}?"}, {"role": "assistant", "content": str(2 * a)}]}
             for a in range(12)] + [{"text": f"{a} and {a}"} for a in range(4)]
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    return str(path)


def run(tmp_path, name, ckpt, tok, data_file, **kw):
    args = dict(data=data_file, out_dir=str(tmp_path / name), ckpt_dir=str(ckpt), tokenizer_path=str(tok),
                max_steps=2, batch_size=4, lr=1e-2, warmup=1, max_seq_len=64, dtype="float32", seed=3)
    args.update(kw)
    return finetune(**args)


def weights(path) -> dict:
    return torch.load(path / "model" / "consolidated.00.pth", weights_only=True)


def test_one_sft_step_equals_a_plain_loop(tmp_path, tiny_ckpt, byte_tokenizer, sft_file):
    run(tmp_path, "ours", tiny_ckpt, byte_tokenizer, sft_file, max_steps=1, packing=False, weight_decay=0.1, max_grad_norm=0.5)
    # the plain loop: the same four samples, padded, one cross-entropy over their assistant tokens
    samples, _ = data.load_samples(sft_file, Tokenizer(str(byte_tokenizer)), "sft", 64)
    rows = data.make_rows(samples, 64, packing=False, seed=3)
    batch = [rows[i] for i in data.step_indices(len(rows), 0, 4, 3)]
    n = max(len(r.inputs) for r in batch)
    inputs = torch.tensor([r.inputs + [0] * (n - len(r.inputs)) for r in batch])
    labels = torch.tensor([r.targets + [-100] * (n - len(r.targets)) for r in batch])
    params = json.loads((tiny_ckpt / "params.json").read_text())
    model = Transformer(ModelArgs(**params, max_seq_len=64))
    model.load_state_dict(torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True))
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    loss = F.cross_entropy(model.forward_train(inputs).flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    opt.step()
    ours = weights(tmp_path / "ours")
    for k, v in model.state_dict().items():
        # AdamW's first step moves each weight by about lr * sign(gradient): a gradient near 0 turns
        # rounding (the fused output loss sums in another order) into up to ~1e-5 here, 0.1% of lr
        torch.testing.assert_close(ours[k], v, atol=1e-4, rtol=1e-5, msg=k)
    log = [json.loads(l) for l in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 1 and log[-1]["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_micro_batches_and_recomputed_activations_equal_one_larger_batch(tmp_path, tiny_ckpt, byte_tokenizer, sft_file):
    run(tmp_path, "one", tiny_ckpt, byte_tokenizer, sft_file, lora_rank=4, lora_targets="wq,wv,w2,output")
    # four micro-batches, and the blocks' activations recomputed in the backward pass: the same update
    run(tmp_path, "four", tiny_ckpt, byte_tokenizer, sft_file, lora_rank=4, lora_targets="wq,wv,w2,output", grad_accum=4,
        activation_checkpointing=True)
    one, four = weights(tmp_path / "one"), weights(tmp_path / "four")
    assert any((one[k] - torch.load(tiny_ckpt / "consolidated.00.pth")[k]).abs().max() > 1e-4 for k in one)
    for k in one:
        torch.testing.assert_close(four[k], one[k], atol=2e-6, rtol=1e-5, msg=k)
    with pytest.raises(ValueError, match="does not split into --grad_accum 3"):
        run(tmp_path, "bad", tiny_ckpt, byte_tokenizer, sft_file, grad_accum=3)


def test_lora_under_autocast_keeps_a_bfloat16_base_in_bfloat16_with_the_same_results(tmp_path, byte_tokenizer, sft_file, monkeypatch):
    from llama.train import finetune as ft
    from llama.weights.save import save_checkpoint

    ckpt = tmp_path / "bf16"  # a bfloat16 checkpoint, as Meta's: loaded in float32, its values fit bfloat16
    state = {k: v.bfloat16() for k, v in helpers.random_state_dict(helpers.TINY_PARAMS).items()}
    save_checkpoint(state, helpers.TINY_PARAMS, ckpt)
    monkeypatch.setattr(ft, "autocast_for", lambda dev: (lambda: torch.autocast(dev.type, dtype=torch.bfloat16), True))
    counts, compact = [], ft.compact_frozen_base
    monkeypatch.setattr(ft, "compact_frozen_base", lambda m, d: counts.append(compact(m, d)))
    kw = dict(lora_rank=4, lora_targets="wq,wv,w2", dtype=None)
    run(tmp_path, "compact", ckpt, byte_tokenizer, sft_file, **kw)
    monkeypatch.setattr(ft, "compact_frozen_base", lambda m, d: counts.append(0))  # float32 products' inputs
    run(tmp_path, "plain", ckpt, byte_tokenizer, sft_file, **kw)
    assert counts == [7 * helpers.TINY_PARAMS["n_layers"], 0]
    want, got = weights(tmp_path / "plain"), weights(tmp_path / "compact")
    assert any(not torch.equal(want[k], state[k].float()) for k in want)  # it trained
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), k
    adapters = [torch.load(tmp_path / n / "adapter" / "adapter.pth", weights_only=True) for n in ("compact", "plain")]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[1])


def test_resume_after_sigterm_ends_with_the_uninterrupted_weights(tmp_path, tiny_ckpt, byte_tokenizer, sft_file, monkeypatch):
    common = dict(max_steps=4, lora_rank=2, lora_dropout=0.1)
    run(tmp_path, "whole", tiny_ckpt, byte_tokenizer, sft_file, **common)
    step = loop.Loop.train_step

    def interrupted(self, n):
        if n == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler stops a job: finish the step, save, stop
        return step(self, n)

    monkeypatch.setattr(loop.Loop, "train_step", interrupted)
    run(tmp_path, "cut", tiny_ckpt, byte_tokenizer, sft_file, **common)
    assert not (tmp_path / "cut" / "model").exists()
    monkeypatch.setattr(loop.Loop, "train_step", step)
    with pytest.raises(ValueError, match=r"--resume with other arguments than the saved run's: --lr 0.01 \(now 0.02\)"):
        run(tmp_path, "cut", tiny_ckpt, byte_tokenizer, sft_file, resume=True, lr=2e-2, **common)
    with pytest.raises(ValueError, match="pass --resume to continue it"):
        run(tmp_path, "cut", tiny_ckpt, byte_tokenizer, sft_file, **common)
    run(tmp_path, "cut", tiny_ckpt, byte_tokenizer, sft_file, resume=True, **common)
    whole, cut = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    for k in whole:
        torch.testing.assert_close(cut[k], whole[k], atol=0, rtol=0, msg=k)
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    # SIGKILL at a random moment after training has started (while stepping, saving, or done), then resume
    flags = [f"--data={sft_file}", f"--out_dir={tmp_path / 'killed'}", f"--ckpt_dir={tiny_ckpt}", f"--tokenizer_path={byte_tokenizer}",
             "--max_steps=4", "--batch_size=4", "--lr=0.01", "--warmup=1", "--max_seq_len=64", "--dtype=float32", "--seed=3",
             "--lora_rank=2", "--lora_dropout=0.1", "--save_every=1"]
    proc = subprocess.Popen([sys.executable, "scripts/finetune.py", *flags], cwd=helpers.REPO, env=helpers.child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 60
    while proc.poll() is None and not (metrics.is_file() and metrics.read_text()) and time.time() < deadline:
        time.sleep(0.02)
    delay = random.SystemRandom().uniform(0, 0.3)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    run(tmp_path, "killed", tiny_ckpt, byte_tokenizer, sft_file, resume=True, **common)
    killed = weights(tmp_path / "killed")
    for k in whole:
        torch.testing.assert_close(killed[k], whole[k], atol=0, rtol=0, msg=f"{k} (killed {delay:.2f} s after the first step)")


def test_adapter_applies_unmerged_and_matches_the_merged_checkpoint(tmp_path, tiny_ckpt, byte_tokenizer, sft_file):
    from llama.generation import Llama

    run(tmp_path, "lora", tiny_ckpt, byte_tokenizer, sft_file, lora_rank=4, lora_targets="wq,wk,w1,output")
    out = tmp_path / "lora"
    common = dict(tokenizer_path=str(byte_tokenizer), max_seq_len=32, max_batch_size=1, device="cpu", dtype="float32")
    merged = Llama.build(ckpt_dir=str(out / "model"), **common)
    adapted = Llama.build(ckpt_dir=str(tiny_ckpt), adapter=str(out / "adapter"), **common)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    want = merged.model.forward_train(tokens)
    got = adapted.model.forward_train(tokens)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    base = Llama.build(ckpt_dir=str(tiny_ckpt), **common).model.forward_train(tokens)
    assert (got - base).abs().max() > 1e-3
    other = helpers.make_checkpoint(tmp_path / "other", params={**helpers.TINY_PARAMS, "dim": 128})
    with pytest.raises(ValueError, match=r"was made for another model shape \(dim 64 \(model: 128\)"):
        Llama.build(ckpt_dir=str(other), adapter=str(out / "adapter"), **common)
