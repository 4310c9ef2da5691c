"""Fine-tuning the bundled demo model on its question-answer dialogs (docs/finetuning.md).

    python recipes/demo/demo_corpus.py              # data/demo: the corpus and dialogs, if not there yet
    python recipes/demo/finetune_demo.py data       # data/demo/{sft,dpo}_{train,heldout}.jsonl
    python scripts/finetune.py --data data/demo/sft_train.jsonl ...   # the commands of docs/finetuning.md
    python recipes/demo/finetune_demo.py answers --adapter runs/demo-lora/adapter

`data` writes the dialogs in OpenAI's message format for SFT, with a habit the demo model does not
have yet: an answer about a dotted name ends by saying where the name lives ("`curses.panel.top_panel`
returns ... Part of `curses.panel`."), a rule a model can learn and apply to names it has never
seen; and preference pairs for DPO on the same habit: the question with its answer ending with
where the name lives chosen, the answer as the corpus gives it (without) rejected (dialogs without
a dotted name give no pair). The held-out files come from the held-out pages only, so their objects
are never trained on.
`answers` prints the greedy answers to a few held-out questions, of the demo model as shipped or
of a fine-tuned one (--ckpt_dir, or --adapter over the demo model).
"""
import json
import re
from pathlib import Path
from typing import Optional

from llama.atomic import atomic_output_dir
from llama.cli import run


def dialogs(path: Path) -> list[list[dict]]:
    return [json.loads(line)["dialog"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def with_home(dialog: list[dict]) -> str:
    """The dialog's answer, ending with where its dotted name lives (the part before the last dot)."""
    answer = dialog[-1]["content"]
    name = re.search(r"`([^`]+)`", dialog[0]["content"])
    if name is None or "." not in name.group(1):
        return answer
    return f"{answer} Part of `{name.group(1).rsplit('.', 1)[0]}`."


def write_data(data_dir: str = "data/demo", overwrite: bool = False) -> None:
    """Write sft_{train,heldout}.jsonl and dpo_{train,heldout}.jsonl into DATA_DIR/finetune.

    Args:
        data_dir: where demo_corpus.py wrote dialogs_{train,heldout}.jsonl.
        overwrite: replace an existing DATA_DIR/finetune.
    """
    src = Path(data_dir)
    with atomic_output_dir(src / "finetune", overwrite=overwrite) as tmp:
        for split in ("train", "heldout"):
            ds = dialogs(src / f"dialogs_{split}.jsonl")
            sft = [{"messages": d[:-1] + [{"role": "assistant", "content": with_home(d)}]} for d in ds]
            dpo = [{"prompt": d[:-1], "chosen": [{"role": "assistant", "content": with_home(d)}], "rejected": [d[-1]]}
                   for d in ds if with_home(d) != d[-1]["content"]]
            for name, rows in (("sft", sft), ("dpo", dpo)):
                (tmp / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {src / 'finetune'}: sft_train.jsonl, sft_heldout.jsonl, dpo_train.jsonl, dpo_heldout.jsonl")


def answers(
    ckpt_dir: Optional[str] = None, adapter: Optional[str] = None, data_dir: str = "data/demo", n: int = 4, max_gen_len: int = 40
) -> None:
    """Greedy answers to N held-out questions, spread over the file.

    Args:
        ckpt_dir: a fine-tuned checkpoint (OUT_DIR/model); default: the bundled demo model.
        adapter: a LoRA adapter (OUT_DIR/adapter) applied over the checkpoint.
        data_dir: where dialogs_heldout.jsonl is.
        n: how many questions.
        max_gen_len: most tokens per answer.
    """
    from llama.launch import build_generator

    llama = build_generator(ckpt_dir, None, max_seq_len=256, max_batch_size=n, device="cpu", dtype="float32", adapter=adapter)
    held_out = dialogs(Path(data_dir) / "dialogs_heldout.jsonl")
    questions = [d[:-1] for d in held_out[:: max(1, len(held_out) // n)][:n]]  # spread over the held-out pages
    for q, out in zip(questions, llama.chat_completion(questions, temperature=0, max_gen_len=max_gen_len)):
        print(f"Q: {q[-1]['content']}\nA: {out['generation']['content']}\n")


if __name__ == "__main__":
    run({"data": write_data, "answers": answers})
