"""Text completion with a Llama 3 checkpoint (or, with no arguments, the bundled demo model).

    torchrun --nproc_per_node 1 example_text_completion.py
    torchrun --nproc_per_node 8 example_text_completion.py --ckpt_dir Meta-Llama-3-70B/ --tokenizer_path Meta-Llama-3-70B/tokenizer.model
"""
from typing import List, Optional, Union

from llama import distributed
from llama.cli import run
from llama.launch import build_generator

# The original's prompts, for real checkpoints.
PROMPTS: List[str] = [
    # For these prompts, the expected answer is the natural continuation of the prompt
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
    # Few shot prompt (providing a few examples before asking model to complete more);
    """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
]
# The demo model knows Python's documentation and little else.
DEMO_PROMPTS: List[str] = [
    "The list data type has some more methods. Here are all of the methods of list objects:",
    "A dictionary is",
    "The for statement in Python",
    "To open a file for reading,",
]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    seed: int = 1,
    compile: bool = False,
    verify: bool = False,
    quantize: Optional[str] = None,
    group_size: int = 32,
    draft_ckpt_dir: Optional[str] = None,
    speculate: bool = False,
    speculate_k: Union[int, str] = 4,
    adapter: Optional[str] = None,
):
    """Complete a few example prompts.

    Args:
        ckpt_dir: Meta checkpoint directory; omit it (and tokenizer_path) for the bundled demo model.
        tokenizer_path: the checkpoint's tokenizer.model (default: ckpt_dir/tokenizer.model).
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling mass.
        max_seq_len: longest prompt + generation.
        max_gen_len: most new tokens per prompt.
        max_batch_size: most prompts per batch.
        device: cuda or cpu (default: cuda when available).
        dtype: bfloat16, float16 or float32 (default: the device's best).
        seed: random seed, the same on every process.
        compile: torch.compile the decode step, and with a draft its steps and the verify passes
            (CUDA graphs on GPU); eager if compilation fails.
        verify: check the checkpoint's files against its checklist.chk (md5) before loading.
        quantize: int8, int4 (or fp8 on CUDA sm89+) weight-only quantization on load, or w8a8 (int8
            weights and activations, x86 CPUs); none by default;
            a checkpoint from scripts/quantize.py loads quantized as stored.
        group_size: int4 group size (32, 64, 128, 256).
        draft_ckpt_dir: a draft model (same tokenizer) for speculative decoding: it proposes
            speculate_k tokens per step, the model verifies them in one pass (greedy output unchanged).
        speculate: decode speculatively; with the demo model and no draft_ckpt_dir, its bundled draft.
        speculate_k: draft tokens proposed per step, 1 to 16, or auto (adapted after each step).
        adapter: a LoRA adapter directory (llama-finetune's OUT_DIR/adapter), applied unmerged.
    """
    demo = ckpt_dir is None and tokenizer_path is None
    generator = build_generator(
        ckpt_dir,
        tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        seed=seed,
        device=device,
        dtype=dtype,
        compile=compile,
        verify=verify,
        quantize=quantize,
        group_size=group_size,
        speculate=speculate,
        draft_ckpt_dir=draft_ckpt_dir,
        speculate_k=speculate_k,
        adapter=adapter,
    )
    prompts = DEMO_PROMPTS if demo else PROMPTS
    results = generator.text_completion(prompts, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    if distributed.is_rank0():
        for prompt, result in zip(prompts, results):
            print(prompt)
            print(f"> {result['generation']}")
            print("\n==================================\n")
    distributed.shutdown()


if __name__ == "__main__":
    run(main)
