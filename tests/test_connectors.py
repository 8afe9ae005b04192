import pytest
import torch

from connectors import Attention, LlamaQFormer, TokenLearner, TokenLearnerQFormer, TokenLearnerQFormerConfig


def test_token_learner_v11_maps_are_softmax_and_tokens_are_weighted_sums():
    torch.manual_seed(0)
    tl = TokenLearner(dim=16, num_tokens=5, bottleneck=8)
    x = torch.randn(2, 36, 16)  # (N, P, dim)
    tokens, maps = tl(x, return_maps=True)
    assert tokens.shape == (2, 5, 16) and maps.shape == (2, 5, 36)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 5))
    # reference by hand: scores from the normalised inputs, softmax over positions, pool the raw inputs
    lin1, lin2 = tl.score[0], tl.score[2]
    h = torch.nn.functional.layer_norm(x, (16,), tl.norm.weight, tl.norm.bias)
    logits = torch.nn.functional.gelu(h @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias  # (N, P, T)
    weights = logits.softmax(dim=1)  # (N, P, T)
    expected = torch.stack([(weights[n, :, t, None] * x[n]).sum(0) for n in range(2) for t in range(5)])
    torch.testing.assert_close(maps, weights.transpose(1, 2))
    torch.testing.assert_close(tokens, expected.view(2, 5, 16))


def test_token_learner_v1_shape_and_gates():
    tl = TokenLearner(dim=16, num_tokens=4, version="1")
    tokens, maps = tl(torch.randn(3, 49, 16), return_maps=True)
    assert tokens.shape == (3, 4, 16) and maps.shape == (3, 4, 49)
    assert ((maps > 0) & (maps < 1)).all()
    with pytest.raises(ValueError):
        tl(torch.randn(1, 50, 16))


def test_grouped_kv_attention_matches_repeated_heads():
    torch.manual_seed(0)
    attn = Attention(dim=24, context_dim=10, num_heads=6, num_kv_heads=2)
    x, ctx = torch.randn(2, 5, 24), torch.randn(2, 7, 10)
    q = attn.q_proj(x).view(2, 5, 6, 4).transpose(1, 2)
    k = attn.k_proj(ctx).view(2, 7, 2, 4).transpose(1, 2).repeat_interleave(3, dim=1)  # KV head j serves 3 heads
    v = attn.v_proj(ctx).view(2, 7, 2, 4).transpose(1, 2).repeat_interleave(3, dim=1)
    probs = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)  # scale 1/sqrt(head_dim=4)
    expected = attn.o_proj((probs @ v).transpose(1, 2).reshape(2, 5, 24))
    torch.testing.assert_close(attn(x, ctx), expected)


def test_qformer_grouped_kv_runs():
    qf = LlamaQFormer(num_queries=3, dim=24, context_dim=10, out_dim=12, num_heads=6, num_kv_heads=3,
                      intermediate_size=32)
    assert qf(torch.randn(2, 7, 10)).shape == (2, 3, 12)


@pytest.mark.parametrize("version", ["1", "1.1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_connector_shape_and_dtype(version, dtype):
    cfg = TokenLearnerQFormerConfig(vision_hidden=20, text_hidden=12, num_queries=6, num_tokens=8, version=version,
                                    bottleneck=8, hidden_size=16, num_heads=4, num_kv_heads=2, intermediate_size=32)
    connector = TokenLearnerQFormer(cfg).to(dtype)
    out = connector(torch.randn(3, 64, 20, dtype=dtype))
    assert out.shape == (3, 6, 12) and out.dtype == dtype
    # a float32 connector inside a bf16 model still hands back bf16
    assert TokenLearnerQFormer(cfg)(torch.randn(1, 64, 20, dtype=torch.bfloat16)).dtype == torch.bfloat16
