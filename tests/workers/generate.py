"""Worker for multi-process tests: build a Llama, run greedy generation and one forward pass, and
write the results from rank 0 to a file (torch.save); with --compile, which compiled passes ran. With a draft (speculative decoding) it also
writes the acceptance rate, the draft's KV projection rows, and each other rank's sampled tokens
to OUT.rankN.sampled. --variants (a list of {"out", "compile" (0 or 1), "draft_parallel"} overrides, as
JSON) builds and runs each in turn in the same processes, so that one start-up of torchrun serves several."""
import gc
import json
from typing import Optional

import fire
import torch

from llama import Llama, distributed

PROMPTS = ["Hello, world", "The quick brown fox jumps over", "a"]


def results_of(llama: Llama, max_gen_len: int = 12) -> dict:
    """Greedy tokens and log-probs of PROMPTS, seeded samples of them, and the logits of one forward
    pass of the second prompt (what the tests compare across process counts)."""
    prompt_tokens = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    tokens, logprobs = llama.generate(prompt_tokens, max_gen_len, temperature=0, logprobs=True)
    sampled, _ = llama.generate(prompt_tokens, max_gen_len, temperature=0.8, top_p=0.9, seed=7)
    llama.model.free_cache()
    logits = llama.model(torch.tensor([prompt_tokens[1]], device=llama.device), 0).cpu()
    return {"tokens": tokens, "logprobs": logprobs, "sampled": sampled, "logits": logits}


def run(ckpt_dir: str, tokenizer_path: str, out: str, max_gen_len: int, device: str, draft_ckpt_dir: Optional[str],
        draft_parallel: str, compile: bool) -> None:
    draft = {} if draft_ckpt_dir is None else {"draft_ckpt_dir": draft_ckpt_dir, "draft_parallel": draft_parallel}
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, device=device, dtype="float32", compile=compile,
                        **draft)
    results = results_of(llama, max_gen_len)
    if compile:  # which compiled passes fell back to eager (None: compilation failed)
        passes = [llama._compiled] + ([llama.speculator.compiled.model, llama.speculator.compiled.draft] if draft else [])
        results["compiled"] = [p.fn is not None for p in passes]
    if llama.speculator is not None:
        results["acceptance"] = llama.speculator.acceptance_rate
        results["draft_wk_rows"] = llama.speculator.draft.layers[0].attention.wk.weight.shape[0]
        if not distributed.is_rank0():
            torch.save(results["sampled"], f"{out}.rank{distributed.rank()}.sampled")
    if distributed.is_rank0():
        torch.save(results, out)


def main(ckpt_dir: str, tokenizer_path: str, out: Optional[str] = None, max_gen_len: int = 12, device: str = "cpu",
         draft_ckpt_dir: Optional[str] = None, draft_parallel: str = "replicated", compile: bool = False, variants=None):
    base = {"out": out, "draft_parallel": draft_parallel, "compile": compile}
    if isinstance(variants, str):
        variants = json.loads(variants)
    for variant in variants or [{}]:
        kw = {**base, **variant}
        run(ckpt_dir, tokenizer_path, kw["out"], max_gen_len, device, draft_ckpt_dir, kw["draft_parallel"], bool(kw["compile"]))
        gc.collect()  # the last variant's model and caches go before the next is built
    distributed.shutdown()


if __name__ == "__main__":
    fire.Fire(main)
