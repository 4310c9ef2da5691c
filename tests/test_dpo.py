"""DPO (llama/train/losses.py, the loop's DPO step) against TRL's DPOTrainer loss, an implementation
we did not write: the same pairs and reference log-probs on the same weights (ours in our
Transformer, TRL's on transformers' Llama converted with llama/weights/hf.py) give the same loss,
rewards and gradients; and a short DPO run raises the reward accuracy of its pairs."""
import collections
import json
import types

import pytest
import torch

import helpers
from llama import distributed
from llama.model import ModelArgs, Transformer
from llama.tokenizer import ChatFormat, Tokenizer
from llama.train import data, losses
from llama.weights import hf

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

PAIRS = [({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
           "rejected": [{"role": "assistant", "content": r}]}) for q, c, r in
         [("2+2?", "4", "five"), ("Capital of France?", "Paris", "Rome, I think"), ("hi", "hello there", "go away")]]
BETA = 0.3


@pytest.fixture(scope="module", autouse=True)
def process_group():
    distributed.setup(torch.device("cpu"))


def trl_loss(model, batch: dict, ref: torch.Tensor):
    """TRL's DPOTrainer._compute_loss on one batch, with precomputed reference log-probs; the parts
    of the trainer it reads (accelerator, metrics) stood in for by plain objects."""
    trl.trainer.utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = types.SimpleNamespace(
        model=model, accelerator=acc, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0], beta=BETA, use_weighting=False,
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    loss = trl.DPOTrainer._compute_loss(fake, model, batch, return_outputs=False)
    return loss, fake._metrics["train"]


def test_dpo_loss_rewards_and_gradients_equal_trl(byte_tokenizer):
    fmt = ChatFormat(Tokenizer(str(byte_tokenizer)))
    pairs = [data.encode_preference(fmt, p, f"pairs:{i}") for i, p in enumerate(PAIRS)]
    rows = data.collate(data.preference_rows(pairs))
    n = len(pairs)
    ref = torch.tensor([[-60.0, -75.0], [-90.0, -130.0], [-100.0, -90.0]])
    params = helpers.TINY_PARAMS
    sd = helpers.random_state_dict(params)

    ours = Transformer(ModelArgs(**params, max_seq_len=64))
    ours.load_state_dict(sd)
    logps = losses.sequence_logprobs(ours.forward_train(rows["inputs"]), rows["targets"])
    terms = losses.dpo_terms(logps[:n], logps[n:], ref[:, 0], ref[:, 1], BETA)
    terms["loss"].mean().backward()

    config = transformers.LlamaConfig(**hf.config_from_params(params, torch_dtype="float32"), attn_implementation="eager")
    theirs = transformers.LlamaForCausalLM(config).float().train()
    theirs.load_state_dict(dict(hf.tensor_to_hf(k, v, params) for k, v in sd.items()))
    samples = [c for c, _ in pairs] + [r for _, r in pairs]
    width = max(len(s.tokens) for s in samples)
    batch = {
        "input_ids": torch.tensor([s.tokens + [0] * (width - len(s.tokens)) for s in samples]),
        "attention_mask": torch.tensor([[1] * len(s.tokens) + [0] * (width - len(s.tokens)) for s in samples]),
        "completion_mask": torch.tensor([[int(t) for t in s.trained] + [0] * (width - len(s.tokens)) for s in samples]),
        "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1],
    }
    loss, metrics = trl_loss(theirs, batch, ref)
    loss.backward()

    torch.testing.assert_close(terms["loss"].mean(), loss, atol=1e-5, rtol=1e-5)
    margin = terms["chosen"] - terms["rejected"]
    assert metrics["rewards/chosen"][0] == pytest.approx(terms["chosen"].mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"][0] == pytest.approx(terms["rejected"].mean().item(), abs=1e-5)
    assert metrics["rewards/margins"][0] == pytest.approx(margin.mean().item(), abs=1e-5)
    assert metrics["rewards/accuracies"][0] == pytest.approx((margin > 0).float().mean().item())
    grads = {"layers.1.feed_forward.w2.weight": theirs.model.layers[1].mlp.down_proj.weight.grad,
             "layers.0.attention.wo.weight": theirs.model.layers[0].self_attn.o_proj.weight.grad,
             "output.weight": theirs.lm_head.weight.grad}
    named = dict(ours.named_parameters())
    for key, want in grads.items():
        torch.testing.assert_close(named[key].grad, want, atol=1e-5, rtol=1e-4, msg=key)


def test_a_short_dpo_run_ranks_its_pairs(tmp_path, tiny_ckpt, byte_tokenizer):
    from llama.train.finetune import finetune

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS * 2))
    last = finetune(data=str(path), eval_data=str(path), out_dir=str(tmp_path / "run"), ckpt_dir=str(tiny_ckpt),
                    tokenizer_path=str(byte_tokenizer), method="dpo", lora_rank=4, max_steps=6, batch_size=3, lr=3e-2,
                    warmup=1, max_seq_len=64, eval_every=6, dtype="float32", beta=BETA)
    log = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)  # the reference itself
    assert last["eval_reward_accuracy"] == 1.0 and last["eval_loss"] < 0.5
