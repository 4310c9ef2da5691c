"""Evaluate a Llama 3 checkpoint with lm-evaluation-harness (see llama/eval/); python or torchrun.

    python scripts/evaluate.py                                        # the demo model on the bundled suite
    python scripts/evaluate.py --ckpt_dir ~/Meta-Llama-3.1-8B --tasks hellaswag,arc_easy --dtype bfloat16
    torchrun --nproc_per_node 2 scripts/evaluate.py --ckpt_dir ... --output_path results --log_samples
"""
from llama.eval.cli import main

if __name__ == "__main__":
    main()
