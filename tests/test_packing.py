"""Document-aware packing (--reset-attention-mask): a document's outputs do not depend on what
was packed before it, in both branches and in the block selection."""
import pytest
import torch

from model_utils import build_tiny_model, tiny_args
from ssa_megatron.model import SSACoreAttention
from ssa_megatron.model.runtime import document_cu_seqlens, document_packed_seq_params

EOD = 119


def _packed(prefix_len: int, doc: torch.Tensor, seq: int = 64):
    g = torch.Generator().manual_seed(prefix_len)
    prefix = torch.randint(0, EOD, (prefix_len - 1,), generator=g)
    tokens = torch.cat([prefix, torch.tensor([EOD]), doc])[:seq]
    positions = torch.cat([torch.arange(prefix_len), torch.arange(seq - prefix_len)])
    return tokens.unsqueeze(0), positions.unsqueeze(0)


@pytest.mark.parametrize("mode", ["full", "sparse"])
def test_document_outputs_ignore_what_is_packed_before(single_process_parallel_state, mode):
    model = build_tiny_model(tiny_args())
    model.eval()
    doc = torch.randint(0, EOD, (64,), generator=torch.Generator().manual_seed(5))
    outs, attn = [], []
    hooks = [m.register_forward_hook(lambda mod, i, o: attn.append(o.detach()))
             for m in model.modules() if isinstance(m, SSACoreAttention)]
    try:
        for prefix_len in (21, 40):  # the document starts mid-block at different offsets
            tokens, positions = _packed(prefix_len, doc)
            labels = torch.roll(tokens, -1, dims=1)
            from ssa_megatron.model import set_inference_mode
            set_inference_mode(model, mode)
            with torch.no_grad():
                loss = model(tokens, positions, None, labels=labels,
                             packed_seq_params=document_packed_seq_params(positions))
            n = 64 - prefix_len
            outs.append((loss[0, prefix_len:prefix_len + n - 1], prefix_len, n))
    finally:
        for h in hooks:
            h.remove()
    (a, pa, na), (b, pb, nb) = outs
    n = min(na, nb) - 1
    torch.testing.assert_close(a[:n], b[:n], atol=1e-5, rtol=1e-5)
    layers = len(attn) // 2
    for layer in range(layers):
        first, second = attn[layer], attn[layers + layer]
        torch.testing.assert_close(first[pa:pa + n], second[pb:pb + n], atol=1e-5, rtol=1e-5)


def test_without_reset_the_prefix_does_matter(single_process_parallel_state):
    model = build_tiny_model(tiny_args())
    model.eval()
    doc = torch.randint(0, EOD, (64,), generator=torch.Generator().manual_seed(5))
    losses = []
    for prefix_len in (21, 40):
        tokens, positions = _packed(prefix_len, doc)
        with torch.no_grad():
            loss = model(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1))
        losses.append(loss[0, prefix_len:prefix_len + 20])
    assert not torch.allclose(losses[0], losses[1], atol=1e-5)


def test_cu_seqlens_from_reset_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])
    assert document_cu_seqlens(positions).tolist() == [0, 3, 5, 7, 10]


def test_reset_flags_are_coupled():
    from model_utils import tiny_args as make
    from ssa_megatron.model.config import ConfigError
    assert make("--reset-attention-mask").reset_position_ids
    with pytest.raises(ConfigError, match="add --reset-attention-mask"):
        make("--reset-position-ids")
