import pytest
import torch
from transformers import Idefics3Config
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

from config import QFormerOptions
from connectors import (
    CONNECTORS,
    Attention,
    ClsGate,
    LlamaQFormer,
    MLPProjector,
    PixelShuffle,
    TokenLearner,
    TokenLearnerQFormer,
    pixel_shuffle,
)
from connectors import tokenlearner_qformer as tlqf_module
from tests.tiny_towers import DIM, IMAGE, PATCH, pixels, tiny_tower


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
    qf = LlamaQFormer(
        num_queries=3, dim=24, context_dim=10, out_dim=12, num_heads=6, num_kv_heads=3, intermediate_size=32
    )
    assert qf(torch.randn(2, 7, 10)).shape == (2, 3, 12)


@pytest.mark.parametrize("version", ["1", "1.1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_connector_shape_and_dtype(version, dtype):
    cfg = QFormerOptions(
        num_queries=6,
        num_tokens=8,
        version=version,
        bottleneck=8,
        hidden_size=16,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=32,
    )
    connector = TokenLearnerQFormer(cfg, 20, 12).to(dtype)
    out = connector(torch.randn(3, 64, 20, dtype=dtype))
    assert out.shape == (3, 6, 12) and out.dtype == dtype
    # a float32 connector inside a bf16 model still hands back bf16
    assert TokenLearnerQFormer(cfg, 20, 12)(torch.randn(1, 64, 20, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- the tower connectors ------------------------------------------------------------------------

LLM = 12


def _qformer_config(**overrides) -> QFormerOptions:
    sizes = dict(
        num_queries=6,
        num_tokens=8,
        bottleneck=8,
        hidden_size=16,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=32,
    )
    return QFormerOptions(**{**sizes, **overrides})


def _build(name: str) -> torch.nn.Module:
    """Each registered connector from plain sizes, as a model builder makes it."""
    torch.manual_seed(0)
    if name == "pixel_shuffle":
        return CONNECTORS[name](DIM, LLM, 2)
    if name == "tokenlearner_qformer":
        return CONNECTORS[name](_qformer_config(), DIM, LLM)
    return CONNECTORS[name](DIM, LLM)


def test_registry_names_each_connector_and_the_config_moves_with_its_module():
    assert CONNECTORS == {
        "pixel_shuffle": PixelShuffle,
        "mlp": MLPProjector,
        "cls_gate": ClsGate,
        "tokenlearner_qformer": TokenLearnerQFormer,
    }
    assert tlqf_module.TokenLearnerQFormer is TokenLearnerQFormer


@pytest.mark.parametrize(("scale", "grid"), [(2, 4), (2, 6), (3, 6), (3, 9), (4, 8), (4, 32)])
def test_pixel_shuffle_equals_idefics3_connector(scale, grid):
    dv, d = 8, 12
    config = Idefics3Config(
        vision_config={"hidden_size": dv, "num_attention_heads": 2},
        text_config={"model_type": "llama", "hidden_size": d, "num_attention_heads": 2},
        scale_factor=scale,
    )
    theirs = Idefics3Connector(config)
    ours = PixelShuffle(dv, d, scale)
    ours.proj.weight.data.copy_(theirs.modality_projection.proj.weight)  # (d, dv·r²): same feature layout
    x = torch.randn(3, grid * grid, dv)
    expected = theirs(x)
    out = ours(x, x[:, 0])
    assert out.shape == (3, (grid // scale) ** 2, d) == expected.shape
    assert (out - expected).abs().max() <= 1e-6
    assert ours.tokens_per_frame(grid) == (grid // scale) ** 2
    assert ours.proj.bias is None


def test_pixel_shuffle_groups_each_block_of_patches_in_grid_order():
    grid, scale = 4, 2
    ids = torch.arange(grid * grid, dtype=torch.float32).view(1, -1, 1)  # patch index as its only feature
    blocks = pixel_shuffle(ids, scale)[0]  # (4 tokens, 4 features)
    assert blocks.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_pixel_shuffle_refuses_a_grid_it_cannot_shuffle():
    ps = PixelShuffle(8, 12, 4)
    with pytest.raises(ValueError, match="square"):
        ps(torch.randn(1, 12, 8))  # 12 patches: no square grid
    with pytest.raises(ValueError, match="divisible"):
        ps(torch.randn(1, 36, 8))  # 6x6 grid, scale 4
    with pytest.raises(ValueError, match="divisible"):
        ps.tokens_per_frame(6)


def test_mlp_is_linear_gelu_linear_over_every_patch():
    torch.manual_seed(0)
    mlp = MLPProjector(DIM, LLM)
    assert [type(m) for m in mlp.children()] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    assert (mlp.linear_1.in_features, mlp.linear_1.out_features, mlp.linear_2.out_features) == (DIM, LLM, LLM)
    assert mlp.act.approximate == "none"
    x = torch.randn(2, 16, DIM)
    out = mlp(x, x[:, 0])
    assert out.shape == (2, 16, LLM) and mlp.tokens_per_frame(4) == 16
    h = torch.nn.functional.gelu(x @ mlp.linear_1.weight.T + mlp.linear_1.bias)
    torch.testing.assert_close(out, h @ mlp.linear_2.weight.T + mlp.linear_2.bias)
    torch.testing.assert_close(out[:, 5], mlp(x[:, 5:6])[:, 0])  # token-wise: each patch on its own


def test_cls_gate_makes_one_token_per_frame_from_the_pooled_embedding():
    torch.manual_seed(0)
    gate = ClsGate(DIM, LLM, hidden=7)
    assert [type(m) for m in gate.children()] == [torch.nn.Linear, torch.nn.Linear]  # no nonlinearity, as seeded
    assert ClsGate(DIM, LLM).projector.out_features == 512
    patches, pooled = torch.randn(3, 16, DIM), torch.randn(3, DIM)
    out = gate(patches, pooled)
    assert out.shape == (3, 1, LLM) and gate.tokens_per_frame(4) == 1 == gate.tokens_per_frame(37)
    expected = (pooled @ gate.projector.weight.T + gate.projector.bias) @ gate.gate.weight.T + gate.gate.bias
    torch.testing.assert_close(out[:, 0], expected)
    torch.testing.assert_close(gate(torch.zeros_like(patches), pooled), out)  # the patches are not read


@pytest.mark.parametrize("num_tokens", [8, 0])
def test_tokenlearner_qformer_reads_a_tiny_dinov2_towers_patches(num_tokens):
    tower = tiny_tower("dinov2")
    with torch.no_grad():
        patches, pooled = tower(pixels(2))  # (2, 16, 32), (2, 32)
    torch.manual_seed(0)
    connector = TokenLearnerQFormer(_qformer_config(num_tokens=num_tokens, num_layers=1), DIM, LLM)
    out, maps = connector(patches, pooled, return_maps=True)
    assert out.shape == (2, 6, LLM) and connector.tokens_per_frame(tower.grid(IMAGE)) == 6
    torch.testing.assert_close(connector(patches), out)  # Idefics3's one-argument call, same tokens
    if num_tokens:
        assert maps.shape == (2, num_tokens, 16)
        torch.testing.assert_close(maps.sum(-1), torch.ones(2, num_tokens))
    else:  # no TokenLearner: the queries cross-attend to the 16 patches themselves
        assert maps is None and connector.token_learner is None
        assert not any(k.startswith("token_learner") for k in connector.state_dict())
        torch.testing.assert_close(out, connector.qformer(patches))
    with pytest.raises(ValueError, match="num_tokens"):
        TokenLearnerQFormer(_qformer_config(num_tokens=-1), DIM, LLM)


@pytest.mark.parametrize("name", sorted(CONNECTORS))
@pytest.mark.parametrize("family", ["dinov2", "siglip"])
def test_tokens_per_frame_is_the_output_length_in_the_patches_dtype(name, family):
    tower = tiny_tower(family)
    connector = _build(name)  # float32 parameters
    for size in (IMAGE, 24 if name != "pixel_shuffle" else 2 * IMAGE):
        with torch.no_grad():
            patches, pooled = tower(pixels(2, size))
        grid = tower.grid(size)
        assert patches.shape[1] == grid * grid and grid == size // PATCH
        for dtype in (torch.float32, torch.bfloat16):
            out = connector(patches.to(dtype), pooled.to(dtype))
            assert out.shape == (2, connector.tokens_per_frame(grid), LLM) and out.dtype == dtype
