"""Evaluation: lm-evaluation-harness on our generator (`lm.LlamaLM`, `harness.evaluate`, the
`llama-eval` command in `cli`), batched log-likelihood scoring (`scoring`, also what
scripts/perplexity.py is built on) and the bundled offline task suite (`tasks`).

Nothing is imported here, so that scoring works without lm-eval installed."""
