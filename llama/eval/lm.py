"""lm-evaluation-harness's LM interface on our generator.

Requests are tokenized as lm-eval's `hf` model does with `add_bos_token=True` (Llama 3 is evaluated
after <|begin_of_text|>), cut to the same window, and scored the same way, so that scores are
comparable with `lm_eval --model hf` on the converted checkpoint (tests/test_evaluate.py proves it).

Under torchrun every rank runs every request, in the same batches and order (the model is split
across ranks, not the data); lm-eval builds and returns results on LOCAL_RANK 0 only.
"""
import logging
from typing import Optional, Sequence

from tqdm import tqdm

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as e:  # the optional dependency
    raise ImportError(f"{e}: evaluation needs lm-evaluation-harness: pip install 'llama3-ref[eval]'") from e

from llama import distributed
from llama.generation import Llama
from llama.eval.scoring import score_batch

logger = logging.getLogger(__name__)


class LlamaLM(TemplateLM):
    """lm-eval's LM interface (loglikelihood, loglikelihood_rolling, generate_until) on a `Llama`.

    batch_size: sequences scored or generated per forward pass (requests sorted longest first, so
        each batch pads little); at most the generator's max_batch_size for generation.
    max_length: longest window in tokens (default: the model's max_seq_len); longer requests keep
        their last max_length tokens, as lm-eval's hf model does.
    max_gen_toks: new tokens a generation request gets when its task does not say.
    seed: the sampling seed of generation requests with do_sample (greedy ones need none).
    """

    def __init__(
        self, llama: Llama, batch_size: int = 8, max_length: Optional[int] = None, max_gen_toks: int = 256, seed: int = 1234
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        params = llama.model.params
        if max_length is not None and not 1 < max_length <= params.max_seq_len:
            raise ValueError(f"max_length {max_length} must be in 2..max_seq_len ({params.max_seq_len})")
        self.llama = llama
        self.tok = llama.tokenizer
        self.batch_size = batch_size
        self._max_length = max_length or params.max_seq_len
        self._max_gen_toks = max_gen_toks
        self.seed = seed
        self._device = llama.device
        self._progress = distributed.is_rank0()

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tok.model.name  # the tokenizer file's name

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """Tokens of `string`, after <|begin_of_text|> unless add_special_tokens is False, as lm-eval's
        hf model with add_bos_token=True: special tokens spelled in the text are those tokens, and a
        string that already starts with <|begin_of_text|> is not given another."""
        bos = add_special_tokens if add_special_tokens is not None else True
        if add_special_tokens is None and string.startswith(self.tok.decode([self.tok.bos_id])):
            bos = False
        return self.tok.encode(string, bos=bos, eos=False, allowed_special="all")

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens))

    def _score_all(self, items: list[tuple[list[int], list[int]]], desc: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """_score over `items` in batches of similar lengths (longest first); results in input order."""
        for _, cont in items:
            if not cont:
                raise ValueError("an empty continuation cannot be scored")
            if len(cont) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}: "
                    "build with a larger max_seq_len"
                )
        order = Collator(items, sort_fn=lambda x: (-len(x[0] + x[1]), tuple(x[0] + x[1])))
        results = []
        with tqdm(total=len(items), desc=desc, disable=disable_tqdm or not self._progress) as bar:
            for batch in order.get_batched(n=self.batch_size):
                # the last max_length + 1 tokens, as lm-eval's hf model keeps (the continuation fits)
                kept = [((ctx + cont)[-(self.max_length + 1) : -len(cont)], cont) for ctx, cont in batch]
                results += score_batch(self.llama.model, kept, self.llama.policy)
                bar.update(len(batch))
        return order.get_original(results)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        items = [(ctx, cont) for _, ctx, cont in requests]
        results = self._score_all(items, "loglikelihood", disable_tqdm)
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string, after <|begin_of_text|>, in windows of max_length
        tokens where each window scores only the tokens no earlier window scored (lm-eval's rolling
        windows: every token is predicted once, with as much context as fits)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1
            ):
                windows.append(lm_utils.make_disjoint_window(w))
                owner.append(i)
        scores = self._score_all(windows, "loglikelihood_rolling", disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for each (context, gen_kwargs) until a stop string, a stop token or max_gen_toks;
        greedy unless gen_kwargs ask for sampling (temperature, top_p)."""
        eos = self.tok_decode([self.eot_token_id])
        order = Collator(
            [req.args for req in requests],
            sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
            group_by="gen_kwargs",
            group_fn=lambda x: x[1],
        )
        batch_size = min(self.batch_size, self.llama.model.params.max_batch_size)
        results = []
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or not self._progress) as bar:
            for batch in order.get_batched(n=batch_size):
                contexts, all_kwargs = zip(*batch)
                kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen = kwargs.pop("max_gen_toks")
                do_sample, temperature = kwargs.pop("do_sample", False), float(kwargs.pop("temperature", 0.0))
                temperature = temperature if do_sample else 0.0
                top_p = float(kwargs.pop("top_p", 1.0))
                if kwargs:
                    logger.warning("generation arguments %s are not supported and are ignored", sorted(kwargs))
                max_ctx = self.max_length - max_gen
                if max_ctx < 1:
                    raise ValueError(
                        f"max_gen_toks {max_gen} leaves no room for a prompt in max_length {self.max_length}: "
                        "build with a larger max_seq_len"
                    )
                prompts = [self.tok_encode(c)[-max_ctx:] for c in contexts]
                for context, kw, text in zip(contexts, all_kwargs, self._generate(prompts, max_gen, temperature, top_p, until)):
                    text = postprocess_generated_text(text, until, None)
                    results.append(text)
                    self.cache_hook.add_partial("generate_until", (context, kw), text)
                bar.update(len(batch))
        return order.get_original(results)

    def _generate(self, prompts: list[list[int]], max_gen: int, temperature: float, top_p: float, until: list[str]) -> list[str]:
        """The decoded generations (stop tokens excluded), stopped once every row holds a stop string.

        The stop decision depends only on the tokens, which are the same on every rank, so all
        ranks leave the loop at the same step."""
        tokens: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        stop_tokens = set(self.tok.stop_tokens)
        seed = self.seed if temperature > 0 else None
        for step in self.llama.stream(prompts, max_gen, temperature=temperature, top_p=top_p, seed=seed):
            for t in step:
                if done[t.index]:  # its text is final up to the stop string; other rows go on
                    continue
                if t.token not in stop_tokens:
                    tokens[t.index].append(t.token)
                    text = self.tok_decode(tokens[t.index])
                    done[t.index] = any(u and u in text for u in until)
                done[t.index] = done[t.index] or t.finished
            if all(done):
                break
        return [self.tok_decode(t) for t in tokens]

    def get_model_info(self) -> dict:
        p = self.llama.model.params
        n_params = sum(x.numel() for x in self.llama.model.parameters())
        return {
            "model_num_parameters": n_params,  # this rank's share under tensor parallelism
            "model_dtype": str(self.llama.model.output.weight.dtype),
            "model_dim": p.dim,
            "model_n_layers": p.n_layers,
            "max_length": self.max_length,
        }
