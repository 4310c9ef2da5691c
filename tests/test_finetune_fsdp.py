"""llama-finetune on 2 and 4 processes (torchrun, gloo, FSDP2): the same global batch gives the
weights, losses and held-out losses of one process, full and LoRA; the state saved by FSDP2
through torch.distributed.checkpoint's utilities resumes on one process."""
import json

import pytest
import torch

import helpers
from llama import distributed
from llama.train.finetune import finetune

LINES = [{"messages": [{"role": "user", "content": f"{a}+{a}?"}, {"role": "assistant", "content": str(2 * a)}]}
         for a in range(12)]


@pytest.fixture(scope="module", autouse=True)
def process_group():
    distributed.setup(torch.device("cpu"))


def sft_runs(tmp_path) -> dict:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(l) + "\n" for l in LINES))
    common = dict(data=str(path), eval_data=str(path), ckpt_dir=None, tokenizer_path=None,
                  max_steps=3, batch_size=4, grad_accum=2, lr=3e-3, warmup=1, max_seq_len=64, dtype="float32",
                  eval_every=3, seed=5)
    return {"full": dict(common), "lora": dict(common, lora_rank=4, lora_targets="wq,wv,w1,output")}


def check_same_training(tmp_path, names, other: str) -> None:
    """The runs in tmp_path/NAME/one and tmp_path/NAME/OTHER end with the same weights and log the
    same losses and held-out losses."""
    for name in names:
        one = torch.load(tmp_path / name / "one" / "model" / "consolidated.00.pth", weights_only=True)
        two = torch.load(tmp_path / name / other / "model" / "consolidated.00.pth", weights_only=True)
        for k in one:
            torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4, msg=f"{name} {k}")
        logs = [[json.loads(l) for l in (tmp_path / name / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", other)]
        for a, b in zip(*logs):
            assert a.keys() == b.keys()
            for key in ("loss", "eval_loss"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-5)


def test_two_and_four_processes_train_as_one(tmp_path, tiny_ckpt, byte_tokenizer):
    """2 processes, full and LoRA; 4 processes, every weight training (each process holds a quarter
    of each; the global batch of 4 is one row per process), against one process accumulating two
    micro-batches of 2."""
    runs = {name: dict(kw, ckpt_dir=str(tiny_ckpt), tokenizer_path=str(byte_tokenizer)) for name, kw in sft_runs(tmp_path).items()}
    for name, kwargs in runs.items():
        finetune(out_dir=str(tmp_path / name / "one"), **kwargs)
    jobs = [dict(kwargs, out_dir=str(tmp_path / name / "two")) for name, kwargs in runs.items()]
    r = helpers.run_torchrun("tests/workers/finetune_runs.py", [json.dumps(jobs)], nproc=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    check_same_training(tmp_path, runs, "two")
    assert (tmp_path / "lora" / "two" / "adapter" / "adapter.json").is_file()
    job = dict(runs["full"], out_dir=str(tmp_path / "full" / "four"), grad_accum=1)
    r = helpers.run_torchrun("tests/workers/finetune_runs.py", [json.dumps([job])], nproc=4)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    check_same_training(tmp_path, ["full"], "four")
    # the state FSDP2 saved (full tensors through torch.distributed.checkpoint's utilities) loads on one process
    finetune(out_dir=str(tmp_path / "full" / "two"), resume=True, **runs["full"])
