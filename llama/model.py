# Llama 3 decoder: the architecture of Meta's release, parameter names = checkpoint keys.
import math
from typing import Optional, Union

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import VocabParallelEmbedding
from torch import nn

from llama import kv_cache
from llama.parallel_layers import ColumnParallelLinear, RowParallelLinear, project
from llama.args import MAX_SEQ_LEN_SCALED, MAX_SEQ_LEN_UNSCALED, ModelArgs, _swiglu_hidden_dim, ffn_hidden_dim  # noqa: F401 (re-exported)
from llama.kv_cache import BlockKVCache, Group, KVCache, Slots

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps): one fused kernel on CUDA, the same ops on CPU
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics whatever the activation dtype, as in the original
        return self._norm(x.float()).type_as(x) * self.weight


def apply_scaling(
    freqs: torch.Tensor,
    scale_factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    old_context_len: int = 8192,
) -> torch.Tensor:
    """Llama 3.1 RoPE scaling: slow down low frequencies, keep high ones, blend in between."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * freqs / scale_factor + smooth * freqs
    out = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, out)


def precompute_freqs_cis(
    dim: int, end: int, theta: float = 500000.0, use_scaled: bool = False, **scaling
) -> torch.Tensor:
    """Complex rotations e^{i * pos * f}, shape (end, dim // 2), complex64.

    `scaling` takes apply_scaling's keyword arguments (scale_factor, ...).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    if use_scaled:
        freqs = apply_scaling(freqs, **scaling)
    t = torch.arange(end, device=freqs.device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ADJACENT pairs (2i, 2i+1) of each head in float32.

    xq, xk: (bsz, seqlen, n_heads, head_dim). freqs_cis: complex (seqlen, head_dim/2) or
    (bsz, seqlen, head_dim/2), or the same as real (..., head_dim/2, 2) [cos, sin] pairs.
    """
    if freqs_cis.is_complex():
        freqs_cis = torch.view_as_real(freqs_cis)
    if freqs_cis.dim() == 3:
        freqs_cis = freqs_cis.unsqueeze(0)
    freqs_cis = freqs_cis.unsqueeze(2)  # (bsz|1, seqlen, 1, head_dim/2, 2)
    # the same numbers either way: eager runs one complex product (a third of the kernels of the
    # real form); torch.compile fuses the real form into one kernel, where complex has no kernels
    rotate = _rotate_real if torch.compiler.is_compiling() else _rotate_complex
    return rotate(xq, freqs_cis), rotate(xk, freqs_cis)


def _rotate_complex(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    x_ = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (bsz, seqlen, heads, head_dim/2)
    return torch.view_as_real(x_ * torch.view_as_complex(freqs_cis)).flatten(3).type_as(x)


def _rotate_real(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    cos, sin = freqs_cis.unbind(-1)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (bsz, seqlen, heads, head_dim/2)
    # (x0 + i x1) * (cos + i sin), real and imaginary parts interleaved back
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(3).type_as(x)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """torch.repeat_interleave(x, dim=2, repeats=n_rep) for (bs, seqlen, n_kv_heads, head_dim).

    Kept for users of the original API; attention below reads shared KV heads without copying.
    """
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        model_parallel_size = fs_init.get_model_parallel_world_size()
        self.n_kv_heads = args.n_heads if args.n_kv_heads is None else args.n_kv_heads
        self.n_local_heads = args.n_heads // model_parallel_size
        # with more ranks than KV heads, each rank holds one whole (repeated) KV head
        self.n_local_kv_heads = max(self.n_kv_heads // model_parallel_size, 1)
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.dim // args.n_heads
        kv_out = self.n_local_kv_heads * model_parallel_size * self.head_dim

        self.wq = ColumnParallelLinear(
            args.dim, args.n_heads * self.head_dim, bias=False, gather_output=False, init_method=lambda x: x
        )
        self.wk = ColumnParallelLinear(args.dim, kv_out, bias=False, gather_output=False, init_method=lambda x: x)
        self.wv = ColumnParallelLinear(args.dim, kv_out, bias=False, gather_output=False, init_method=lambda x: x)
        self.wo = RowParallelLinear(
            args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True, init_method=lambda x: x
        )
        # (rows, n_local_kv_heads, seq_len, head_dim) keys and values, or a pool of blocks; None until allocated
        self.kv_cache: Optional[Union[KVCache, BlockKVCache]] = None

    def forward(
        self,
        x: torch.Tensor,
        start_pos: Union[int, torch.Tensor],
        freqs_cis: torch.Tensor,
        mask: Optional[torch.Tensor],
        use_cache: bool = True,
        row0: int = 0,
        kv_len: Optional[int] = None,
        slots: Union[Slots, list, None] = None,
    ) -> torch.Tensor:
        if isinstance(slots, list):  # `Group`s of rows packed along the tokens of x (1, T, dim)
            return self._grouped(x, slots)
        bsz, seqlen, _ = x.shape
        xq, xk, xv = project(x, self.wq, self.wk, self.wv)
        out = self._attend(xq, xk, xv, bsz, seqlen, freqs_cis, mask,
                           lambda xk, xv: self._cached(xk, xv, start_pos, use_cache, row0, kv_len, slots))
        return self.wo(out)

    def _cached(self, xk, xv, start_pos, use_cache, row0, kv_len, slots) -> tuple:
        """The keys and values (bsz, n_local_kv_heads, kv, head_dim) the new tokens attend to."""
        if slots is not None:  # gathered through block tables
            return self.kv_cache.update(slots, xk, xv)
        if use_cache:  # of cache rows row0..row0+bsz
            return self.kv_cache.update(row0, start_pos, xk, xv, kv_len)
        return xk.transpose(1, 2), xv.transpose(1, 2)

    def _grouped(self, x: torch.Tensor, groups: list) -> torch.Tensor:
        """Each projection once over every group's tokens; attention group by group (each its own
        rows, length, positions and block slots)."""
        xq, xk, xv = (t[0] for t in project(x, self.wq, self.wk, self.wv))  # (T, ...)
        outs, off = [], 0
        for g in groups:
            part, off = slice(off, off + g.rows * g.seqlen), off + g.rows * g.seqlen
            out = self._attend(xq[part], xk[part], xv[part], g.rows, g.seqlen, g.freqs_cis, g.mask,
                               lambda k, v, g=g: self.kv_cache.update(g.slots, k, v))
            outs.append(out.reshape(g.rows * g.seqlen, -1))
        return self.wo(torch.cat(outs)[None])

    def _attend(self, xq, xk, xv, bsz: int, seqlen: int, freqs_cis, mask, cached) -> torch.Tensor:
        """Attention of new queries, keys and values (projections of bsz x seqlen tokens) through the
        cache (`cached(xk, xv)` -> keys, values): (bsz, seqlen, n_local_heads * head_dim)."""
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        keys, values = cached(xk, xv)

        if seqlen == 1 and self.n_rep > 1:
            # Decode: the n_rep query heads of each KV head become rows of one matrix product,
            # (bsz, n_kv, n_rep, head_dim), so shared KV heads are read once and never copied.
            q = xq.view(bsz, self.n_local_kv_heads, self.n_rep, self.head_dim)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            causal = mask is None and seqlen > 1
            out = F.scaled_dot_product_attention(
                xq.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal, enable_gqa=self.n_rep > 1
            )
            out = out.transpose(1, 2)
        return out.reshape(bsz, seqlen, -1)  # (bsz, seqlen, n_local_heads * head_dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]):
        super().__init__()
        hidden_dim = _swiglu_hidden_dim(hidden_dim, multiple_of, ffn_dim_multiplier)
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=lambda x: x)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=lambda x: x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1, h3 = project(x, self.w1, self.w3)
        return self.w2(F.silu(h1) * h3)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.dim = args.dim
        self.head_dim = args.dim // args.n_heads
        self.attention = Attention(args)
        self.feed_forward = FeedForward(
            dim=args.dim,
            hidden_dim=4 * args.dim,
            multiple_of=args.multiple_of,
            ffn_dim_multiplier=args.ffn_dim_multiplier,
        )
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        start_pos: Union[int, torch.Tensor],
        freqs_cis: torch.Tensor,
        mask: Optional[torch.Tensor],
        use_cache: bool = True,
        row0: int = 0,
        kv_len: Optional[int] = None,
        slots: Optional[Slots] = None,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, freqs_cis, mask, use_cache, row0, kv_len, slots)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The Llama 3 decoder. Needs fairscale's model parallel initialised (llama.distributed.setup)."""

    def __init__(self, params: ModelArgs):
        super().__init__()
        params.validate(fs_init.get_model_parallel_world_size())
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers

        self.tok_embeddings = VocabParallelEmbedding(params.vocab_size, params.dim, init_method=lambda x: x)
        self.layers = nn.ModuleList(TransformerBlock(layer_id, params) for layer_id in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=lambda x: x)
        # RoPE table as real [cos, sin] pairs, (max_seq_len, head_dim/2, 2); built on first use
        self.freqs_cis: Optional[torch.Tensor] = None
        # with a block KV cache: the block tables (rows, blocks) of the rows the next passes run
        # (llama.engine sets them around each step); a pass of rows row0.. uses rows row0.. of it
        self.kv_tables: Optional[torch.Tensor] = None
        self.kv_first: Optional[int] = None  # one table of consecutive blocks: its first (kv_cache.using_tables)

    def rope_table(self, device: torch.device) -> torch.Tensor:
        p = self.params
        if self.freqs_cis is None or self.freqs_cis.device != device:
            freqs_cis = precompute_freqs_cis(
                p.head_dim,
                p.max_seq_len,
                p.rope_theta,
                p.use_scaled_rope,
                scale_factor=p.rope_scale_factor,
                low_freq_factor=p.rope_low_freq_factor,
                high_freq_factor=p.rope_high_freq_factor,
                old_context_len=p.rope_original_max_seq_len,
            )
            self.freqs_cis = torch.view_as_real(freqs_cis).to(device)
        return self.freqs_cis

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate each layer's KV cache for `max_batch_size` rows of `max_seq_len` tokens."""
        kv_cache.allocate(self, max_batch_size, max_seq_len)

    def free_cache(self) -> None:
        kv_cache.free(self)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: Union[int, torch.Tensor],
        output_index: Optional[torch.Tensor] = None,
        row0: int = 0,
        kv_len: Optional[int] = None,
    ) -> torch.Tensor:
        """Logits (float32) of `tokens` (bsz, seqlen) placed at positions start_pos..., KV cache updated.

        `start_pos` is an int, or a (bsz,) tensor giving each row its own start (rows of different
        lengths decoded together). `output_index` (bsz,) computes logits only at that index of each
        row: (bsz, 1, vocab) instead of (bsz, seqlen, vocab). The batch uses KV cache rows
        row0..row0+bsz; with a tensor `start_pos`, rows attend to the first `kv_len` cache slots
        (default: all; every position written must be below it).
        """
        if kv_cache.shape(self) is None:
            self.setup_cache(self.params.max_batch_size, self.params.max_seq_len)
        return self._forward(tokens, start_pos, output_index, use_cache=True, row0=row0, kv_len=kv_len)

    def forward_train(self, tokens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (float32) of a whole causal sequence from position 0, without the KV cache, with autograd.

        `positions` (bsz, seqlen): several sequences packed in each row, each numbered from 0 where
        it starts; a token then attends only to the earlier tokens of its own sequence.
        """
        if positions is None:
            return self._forward(tokens, 0, None, use_cache=False)
        return self._forward(tokens, positions, None, use_cache=False, packed=True)

    def _forward(
        self,
        tokens: torch.Tensor,
        start_pos: Union[int, torch.Tensor],
        output_index: Optional[torch.Tensor],
        use_cache: bool,
        row0: int = 0,
        kv_len: Optional[int] = None,
        packed: bool = False,
    ) -> torch.Tensor:
        bsz, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        rope = self.rope_table(h.device)

        if packed:  # start_pos holds each token's position: sequence k of a row = tokens after its k-th 0
            freqs_cis = rope[start_pos]
            seq = (start_pos == 0).cumsum(dim=1)  # (bsz, seqlen)
            causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=h.device).tril()
            mask = ((seq[:, :, None] == seq[:, None, :]) & causal)[:, None]  # (bsz, 1, seqlen, seqlen)
        else:
            freqs_cis, mask, kv_len = self._positions(rope, start_pos, seqlen, kv_len, use_cache)
        slots = None
        if use_cache and self.kv_tables is not None:
            block_size = self.layers[0].attention.kv_cache.block_size
            slots = kv_cache.block_slots(self.kv_tables[row0 : row0 + bsz], block_size, start_pos, seqlen, kv_len,
                                         self.kv_first)

        for layer in self.layers:
            h = layer(h, start_pos, freqs_cis, mask, use_cache, row0, kv_len, slots)
        if output_index is not None:  # (bsz, seqlen, dim) -> (bsz, 1, dim)
            h = h[torch.arange(bsz, device=h.device), output_index][:, None]
        h = self.norm(h)
        return self.output(h).float()

    def _positions(self, rope: torch.Tensor, start_pos: Union[int, torch.Tensor], seqlen: int, kv_len: Optional[int],
                   use_cache: bool) -> tuple:
        """(freqs_cis, mask, kv_len) of `seqlen` new tokens per row from `start_pos` (an int, or one per row)."""
        mask = None
        if isinstance(start_pos, int):
            if start_pos + seqlen > rope.shape[0]:
                raise ValueError(f"positions up to {start_pos + seqlen} exceed max_seq_len {rope.shape[0]}")
            if use_cache and start_pos > 0 and seqlen > 1:
                # new tokens see every cached one and causally each other: (1, 1, seqlen, start_pos + seqlen)
                mask = torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=rope.device)
                mask = mask.tril(diagonal=start_pos)[None, None]
            return rope[start_pos : start_pos + seqlen], mask, kv_len
        pos = start_pos[:, None] + torch.arange(seqlen, device=rope.device)  # (bsz, seqlen)
        if kv_len is None:
            kv_len = kv_cache.shape(self)[1]
        mask = torch.arange(kv_len, device=rope.device) <= pos[..., None]  # (bsz, seqlen, kv_len)
        return rope[pos], mask[:, None], kv_len

    @torch.inference_mode()
    def forward_groups(self, groups: list) -> list:
        """With a block KV cache: one pass over several groups of rows, each (tokens (rows, seqlen),
        start_pos, kv_len, output_index (rows,)) as `forward` takes them, the block tables in effect
        covering their rows in order: the projections run once over every group's tokens, attention
        group by group (decode rows beside prefill chunks, none padded to another's length). Returns
        each group's logits at its output_index, (rows, vocab) each."""
        rope = self.rope_table(self.norm.weight.device)
        block_size = self.layers[0].attention.kv_cache.block_size
        packed, index, row0, off = [], [], 0, 0
        for tokens, start_pos, kv_len, output_index in groups:
            rows, seqlen = tokens.shape
            freqs_cis, mask, kv_len = self._positions(rope, start_pos, seqlen, kv_len, True)
            slots = kv_cache.block_slots(self.kv_tables[row0 : row0 + rows], block_size, start_pos, seqlen, kv_len)
            packed.append(Group(rows, seqlen, freqs_cis, mask, slots))
            index.append(off + torch.arange(rows, device=tokens.device) * seqlen + output_index)
            row0, off = row0 + rows, off + rows * seqlen
        h = self.tok_embeddings(torch.cat([g[0].reshape(-1) for g in groups])[None])  # (1, T, dim)
        for layer in self.layers:
            h = layer(h, 0, None, None, True, 0, None, packed)
        h = self.norm(h[0, torch.cat(index)])
        return list(self.output(h).float().split([g[0].shape[0] for g in groups]))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: Optional[torch.Generator] = None) -> None:
        """Random weights for training from scratch: normal(0, std) matrices, output projections of
        each block scaled by 1/sqrt(2 * n_layers), norms at 1. Checkpoint loading does not need this."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            s = std / math.sqrt(2 * self.n_layers) if name.endswith(("wo.weight", "w2.weight")) else std
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).mul_(s).to(p.dtype))
