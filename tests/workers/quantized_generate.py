"""Worker for the quantization tests: build each (checkpoint, quantize mode) with Llama.build on this
process group, run greedy generation and one forward pass, and save the results from rank 0
(torch.save of {"<ckpt>|<mode>": {"tokens", "logits", "decode": the decode path of layer 0's wq}})."""
import fire
import torch

from llama import Llama, distributed
from llama.runtime import quant_choice

PROMPTS = [[1, 72, 101, 108, 108, 111], [1, 97, 98]]


def run(ckpt_dir: str, tokenizer_path: str, quantize, group_size: int = 32) -> dict:
    """Greedy tokens of PROMPTS and the logits of the first prompt, `quantize` (None: as stored)."""
    llama = Llama.build(
        ckpt_dir, tokenizer_path, max_seq_len=32, max_batch_size=2, dtype="float32",
        quantize=quantize, group_size=group_size,
    )
    tokens, _ = llama.generate(PROMPTS, 8, temperature=0)
    llama.model.free_cache()
    logits = llama.model(torch.tensor([PROMPTS[0]]), 0)
    decode = getattr(llama.model.layers[0].attention.wq, "kernels", {}).get("decode", ("",))[0]
    return {"tokens": tokens, "logits": logits, "decode": decode}


def main(runs: str, tokenizer_path: str, out: str) -> None:
    """runs: comma-separated CKPT_DIR|MODE[|PATH] (MODE "none": as stored; PATH: every quantized
    product on that path, e.g. native_a8, instead of the measured choice)."""
    results = {}
    measured = quant_choice.quantized_kernel
    for item in str(runs).split(","):
        ckpt_dir, mode, *path = item.split("|")
        quant_choice.quantized_kernel = (lambda m, step, dt=None: (path[0], torch.float32)) if path else measured
        results[item] = run(ckpt_dir, tokenizer_path, None if mode == "none" else mode)
    if distributed.is_rank0():
        torch.save(results, out)
    distributed.shutdown()


if __name__ == "__main__":
    fire.Fire(main)
