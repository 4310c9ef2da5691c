"""Compiled graphs of models held in the cache (llama/runtime/graphs.py): the loops it puts in place
of library calls compute the plain-math product and attention; the pass joins products of one input
and rewrites only what it should; compiled steps through it decode eager's greedy tokens."""
import logging

import torch
import torch.nn.functional as F

from llama import Llama
from llama.runtime import graphs

BF16, F32 = torch.bfloat16, torch.float32


def compile_frozen(module: torch.nn.Module, x: torch.Tensor, loops: bool) -> torch.Tensor:
    """`module(x)` compiled as CompiledStep compiles weights held in the cache: frozen, through the pass."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with torch.inference_mode(), inductor_config.patch(freezing=True, pre_grad_custom_pass=graphs.frozen_graph_pass(loops)):
        return torch.compile(module, dynamic=False)(x)


def test_one_row_product_is_the_product_in_plain_math():
    """one_row_product against the float64 product (not another kernel): float32 sums of bfloat16
    inputs, rounded once to bfloat16 (half a bfloat16 step of the largest output, at most)."""
    torch.manual_seed(0)
    w, x, b = torch.randn(96, 64), torch.randn(1, 1, 64), torch.randn(96)
    want = x.double() @ w.double().T + b.double()
    torch.testing.assert_close(graphs.one_row_product(x, w, b).double(), want, rtol=0, atol=1e-5)
    got = graphs.one_row_product(x.to(BF16), w.to(BF16))
    want = x.to(BF16).double() @ w.to(BF16).double().T
    assert got.dtype == BF16 and got.shape == (1, 1, 96)
    assert (got.double() - want).abs().max() <= want.abs().max() * 2**-8


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) where attended) v, in float64, from the definition."""
    scores = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v.double()


def test_decode_attention_is_attention_in_plain_math():
    """Two rows of a batch, 2 KV heads each read by 3 query heads, over 10 cache slots of which
    row 0 attends to 4 and row 1 to 9 (a boolean mask as the model builds it): float32 within
    1e-6 of the float64 definition, bfloat16 within a bfloat16 step; an additive mask the same; and
    the grouped-query form (SDPA's enable_gqa) against KV heads repeated by hand."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    mask = (torch.arange(10) < torch.tensor([4, 9])[:, None])[:, None, None]  # (2, 1, 1, 10)
    want = plain_attention(q, k, v, mask)
    got = graphs.decode_attention(q, k, v, attn_mask=mask)
    assert got.shape == (2, 2, 3, 8) and got.dtype == F32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(graphs.decode_attention(q, k, v, attn_mask=additive), got, rtol=0, atol=1e-6)
    # grouped-query form: 6 query heads, 3 per KV head, 2 tokens each with a (1, 1, 2, 10) causal mask
    q6, causal = torch.randn(1, 6, 2, 8), (torch.arange(10) <= torch.tensor([6, 7])[:, None])[None, None]
    got6 = graphs.decode_attention(q6, k[:1], v[:1], attn_mask=causal, enable_gqa=True)
    want6 = plain_attention(q6, k[:1].repeat_interleave(3, dim=1), v[:1].repeat_interleave(3, dim=1), causal)
    torch.testing.assert_close(got6.double(), want6, rtol=0, atol=1e-6)
    bf = graphs.decode_attention(q.to(BF16), k.to(BF16), v.to(BF16), attn_mask=mask)
    want = plain_attention(q.to(BF16), k.to(BF16), v.to(BF16), mask)
    assert bf.dtype == BF16 and (bf.double() - want).abs().max() <= 2**-8 * want.abs().max()


class Block(torch.nn.Module):
    """An attention block's shape in small: three products of one input (as wq, wk, wv), the
    queries' attention over a cache, and a product of its output."""

    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv = (torch.nn.Linear(32, n, bias=False) for n in (32, 16, 16))
        self.wo = torch.nn.Linear(32, 32, bias=False)
        self.register_buffer("k", torch.randn(1, 2, 12, 8))
        self.register_buffer("v", torch.randn(1, 2, 12, 8))
        self.register_buffer("mask", (torch.arange(12) < 7)[None, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (rows, 32)
        rows = x.shape[0]
        q = self.wq(x).view(1, rows, 2, 2, 8).permute(0, 2, 1, 3, 4).reshape(1, 2, 2 * rows, 8)
        extra = self.wk(x).sum() + self.wv(x).sum()
        out = F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=self.mask)  # (1, 2, 2 * rows, 8)
        return self.wo(out.view(1, 2, rows, 2, 8).permute(0, 2, 1, 3, 4).reshape(rows, 32)) + extra


def test_the_pass_joins_products_of_one_input_and_puts_loops_where_it_should(monkeypatch):
    """Frozen and compiled through the pass: wq, wk and wv become one product (counted in the graph
    the pass leaves), both ways; with loops, a one-row step traces one_row_product for its two
    products and decode_attention for its attention, and an eight-row step neither (its attention
    has 16 query rows per KV head); every result is the module's own within float32 rounding."""
    seen = {"linear": [], "product": set(), "attention": set()}
    step = None  # the (rows, loops) being compiled
    join, product, attention = graphs._join_products, graphs.one_row_product, graphs.decode_attention

    def joined(graph):
        join(graph)
        seen["linear"].append(sum(n.op == "call_function" and n.target in graphs.LINEAR for n in graph.nodes))

    monkeypatch.setattr(graphs, "_join_products", joined)
    monkeypatch.setattr(graphs, "one_row_product", lambda *a: seen["product"].add((step, tuple(a[0].shape))) or product(*a))
    monkeypatch.setattr(graphs, "decode_attention", lambda *a, **k: seen["attention"].add((step, tuple(a[0].shape))) or attention(*a, **k))
    torch.manual_seed(0)
    block = Block().eval()
    for step in ((1, True), (8, True), (1, False)):
        rows, loops = step
        x = torch.randn(rows, 32)
        with torch.no_grad():
            want = block(x)
        torch.testing.assert_close(compile_frozen(block, x, loops), want, rtol=1e-5, atol=1e-5)
    assert seen["linear"] == [2, 2, 2]  # wq, wk and wv joined; wo alone
    assert seen["product"] == {((1, True), (1, 32))}  # traced (at compilation) for the one-row step with loops only
    assert seen["attention"] == {((1, True), (1, 2, 2, 8))}


def test_the_one_row_choice_is_measured_once_and_logged(monkeypatch, caplog):
    graphs._one_row_in_graph.cache_clear()
    with caplog.at_level(logging.INFO, logger="llama.runtime.graphs"):
        first = graphs.compile_one_row_in_graph(32, (2, 2, 8), 16, F32)
        assert graphs.compile_one_row_in_graph(32, (2, 2, 8), 16, F32) is first
    assert isinstance(first, bool)
    assert caplog.text.count("Compiled one-row steps (32x32 float32 products, attention over 16 slots)") == 1
    graphs._one_row_in_graph.cache_clear()
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler")))
    assert graphs.compile_one_row_in_graph(32, (2, 2, 8), 16, F32) is False  # no compiler: the library calls
    graphs._one_row_in_graph.cache_clear()


def test_compiled_one_row_loops_decode_the_eager_tokens(tiny_ckpt, byte_tokenizer, monkeypatch):
    """Batch 1, compiled with one-row steps as loops (forced, whatever this CPU measures) and
    products joined: float32 greedy tokens equal eager's, and the compiled step did not fall back."""
    monkeypatch.setattr(graphs, "compile_one_row_in_graph", lambda *a: True)
    kwargs = dict(max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32")
    compiled = Llama.build(str(tiny_ckpt), str(byte_tokenizer), compile=True, **kwargs)
    assert compiled._compiled.freeze and compiled._compiled.in_graph is None  # decided at the first one-row call
    eager = Llama.build(str(tiny_ckpt), str(byte_tokenizer), **kwargs)
    prompts = [[5, 9, 2, 77, 31], [8, 100, 3]]
    for p in prompts:
        assert compiled.generate([p], max_gen_len=10, temperature=0)[0] == eager.generate([p], max_gen_len=10, temperature=0)[0]
    assert compiled._compiled.in_graph and compiled._compiled.fn is not None
