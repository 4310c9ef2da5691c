"""Chat with a Llama 3 instruct checkpoint (or, with no arguments, the bundled demo model).

    torchrun --nproc_per_node 1 example_chat_completion.py
    torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir Meta-Llama-3-8B-Instruct/ --tokenizer_path Meta-Llama-3-8B-Instruct/tokenizer.model
"""
from typing import List, Optional, Union

from llama import Dialog, distributed
from llama.cli import run
from llama.launch import build_generator

# The original's dialogs, for real instruct checkpoints.
DIALOGS: List[Dialog] = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {
            "role": "assistant",
            "content": """\
Paris, the capital of France, is known for its stunning architecture, art museums, historical landmarks, and romantic atmosphere. Here are some of the top attractions to see in Paris:

1. The Eiffel Tower: The iconic Eiffel Tower is one of the most recognizable landmarks in the world and offers breathtaking views of the city.
2. The Louvre Museum: The Louvre is one of the world's largest and most famous museums, housing an impressive collection of art and artifacts, including the Mona Lisa.
3. Notre-Dame Cathedral: This beautiful cathedral is one of the most famous landmarks in Paris and is known for its Gothic architecture and stunning stained glass windows.

These are just a few of the many attractions that Paris has to offer. With so much to see and do, it's no wonder that Paris is one of the most popular tourist destinations in the world.""",
        },
        {"role": "user", "content": "What is so great about #1?"},
    ],
    [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
    [
        {"role": "system", "content": "Always answer with emojis"},
        {"role": "user", "content": "How to go from Beijing to NY?"},
    ],
]
# The demo model was taught short answers about Python's documentation.
DEMO_DIALOGS: List[Dialog] = [
    [{"role": "user", "content": "What does the str.split method do?"}],
    [{"role": "user", "content": "What is a tuple?"}],
    [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What does the json module do?"},
    ],
    [{"role": "user", "content": "What does the len function return?"}],
]


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
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
    """Answer a few example dialogs in the Llama 3 chat format.

    Args:
        ckpt_dir: Meta checkpoint directory; omit it (and tokenizer_path) for the bundled demo model.
        tokenizer_path: the checkpoint's tokenizer.model (default: ckpt_dir/tokenizer.model).
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling mass.
        max_seq_len: longest dialog + answer.
        max_batch_size: most dialogs per batch.
        max_gen_len: most new tokens per answer (default: max_seq_len - 1).
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
    dialogs = DEMO_DIALOGS if demo else DIALOGS
    results = generator.chat_completion(dialogs, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
    if distributed.is_rank0():
        for dialog, result in zip(dialogs, results):
            for msg in dialog:
                print(f"{msg['role'].capitalize()}: {msg['content']}\n")
            print(f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}")
            print("\n==================================\n")
    distributed.shutdown()


if __name__ == "__main__":
    run(main)
