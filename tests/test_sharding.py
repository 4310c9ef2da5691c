"""The tensor-parallel rules of llama.weights.sharding: slices of every key on every count cover the full
tensor exactly once (KV heads repeated past n_kv_heads), merge inverts the split, and quantized
keys split with their weights."""
import pytest
import torch

import helpers
from llama.args import check_model_parallel
from llama.weights import checkpoint, quant_formats, sharding
from llama.model import ModelArgs

PARAMS = {**helpers.TINY_PARAMS, "dim": 128, "multiple_of": 128, "ffn_dim_multiplier": None}
ARGS = ModelArgs(**PARAMS)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_shard_then_merge_is_the_identity_for_every_key(count):
    for key, full in helpers.random_state_dict(PARAMS).items():
        pieces = [sharding.shard_tensor(key, full, ARGS, r, count) for r in range(count)]
        assert all(p.shape == sharding.piece_shape(key, ARGS, r, count) for r, p in enumerate(pieces))
        assert torch.equal(sharding.merge_pieces(key, pieces, ARGS), full)
        assert sharding.merged_shape(key, pieces, ARGS) == full.shape


def test_kv_heads_repeat_past_n_kv_heads_and_a_wrong_repeat_is_refused():
    wk = helpers.random_state_dict(PARAMS)["layers.0.attention.wk.weight"]  # 2 heads of 32 rows
    pieces = [sharding.shard_tensor("layers.0.attention.wk.weight", wk, ARGS, r, 4) for r in range(4)]
    assert torch.equal(pieces[0], pieces[1]) and torch.equal(pieces[2], wk[32:])
    pieces[1] = pieces[1] + 1
    with pytest.raises(ValueError, match="shard 1 should repeat shard 0's KV head"):
        sharding.merge_pieces("layers.0.attention.wk.weight", pieces, ARGS)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_keys_split_with_their_weights(mode):
    """Quantizing each rank's slice gives the slices of the quantized full weight."""
    config = quant_formats.resolve(mode)
    for key, full in helpers.random_state_dict(PARAMS).items():
        if not config.applies(key):
            continue
        whole = quant_formats.quantize_weight(key, full, config)
        for r in range(4):
            piece = sharding.shard_tensor(key, full, ARGS, r, 4)
            amax = full.abs().amax(1)  # what the all-reduce over the ranks gives
            mine = quant_formats.quantize_weight(key, piece, config, lambda _: amax)
            for k, t in mine.items():
                assert t.shape == sharding.piece_shape(k, ARGS, r, 4, config), k
                assert torch.equal(t, sharding.shard_tensor(k, whole[k], ARGS, r, 4, config)), k


def test_int8_scales_of_row_parallel_layers_are_replicated():
    config = quant_formats.resolve("int8")
    assert sharding.shard_dim("layers.0.attention.wo.scales", config) is None
    assert sharding.shard_dim("layers.0.attention.wq.scales", config) == 0
    assert sharding.shard_dim("layers.0.feed_forward.w2.zeros", quant_formats.resolve("int4")) == 1


def test_expected_keys_of_a_quantized_checkpoint():
    keys = checkpoint.expected_keys(1, quant_formats.resolve("int4", quantize_output=False))
    assert {"layers.0.attention.wq.weight", "layers.0.attention.wq.scales", "layers.0.attention.wq.zeros"} <= keys
    assert "output.weight" in keys and "output.scales" not in keys and "tok_embeddings.scales" not in keys


def test_process_counts():
    sharding.check_process_count(ARGS, 1, 4)
    with pytest.raises(ValueError, match="neither count divides the other: use one of"):
        sharding.check_process_count(ARGS, 2, 3)
    with pytest.raises(ValueError, match="n_heads 4 is not divisible by the model-parallel size 3"):
        check_model_parallel(ARGS, 3)
    assert sharding.source_ranks(4, 1, 2) == [2, 3] and sharding.source_ranks(1, 3, 4) == [0]
