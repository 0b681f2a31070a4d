"""The DiT and DiCo baselines: exact sizes and compute against the facts table, reference
state-dict layout, initialisation, training-step behaviour and the classifier-free-guidance path."""
import pytest
import torch

from fcdm_lab.errors import UserError
from fcdm_lab.models import dico, dit
from fcdm_lab.models.flops import count_gmacs, count_params
from fcdm_lab.models.registry import MODELS

# Facts file, section 5: exact parameter counts and forward GMACs at 32x32x4, 1000 classes.
BASELINES = {
    "DiT-S/2": ("dit", 32_963_360, 6.056),
    "DiT-B/2": ("dit", 130_512_416, 23.005),
    "DiT-L/2": ("dit", 458_102_816, 80.698),
    "DiT-XL/2": ("dit", 675_129_632, 118.621),
    "DiCo-S": ("dico", 33_137_672, 4.236),
    "DiCo-B": ("dico", 129_992_712, 16.856),
    "DiCo-L": ("dico", 463_897_992, 60.169),
    "DiCo-XL": ("dico", 701_151_368, 87.221),
}


def tiny_dit(**kw):
    return dit.DiT(input_size=8, depth=2, hidden_size=64, num_heads=2, num_classes=10, **kw)


def tiny_dico(**kw):
    return MODELS.get("DiCo-S")(input_size=16, num_classes=10, **kw)


TINY = {"dit": (tiny_dit, 8), "dico": (tiny_dico, 16)}


def inputs(size, batch=4, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    return x, t, y


def perturb_(model, seed=0):
    """Give the zero-initialised parameters (adaLN, final layer) small random values so every
    path carries signal; the fixed positional table is left alone."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("name", list(BASELINES))
def test_exact_params_and_gmacs(name):
    family, params, gmacs = BASELINES[name]
    assert MODELS.meta(name)["family"] == family
    with torch.device("meta"):  # shapes only: the XL models build in well under a second
        model = MODELS.get(name)()
    assert count_params(model) == params
    assert count_gmacs(model, (4, 32, 32)) == pytest.approx(gmacs, rel=5e-3)


def test_meta_gmacs_equal_real_gmacs():
    # The table above is counted on meta tensors; the real S models give the same figures.
    for name in ("DiT-S/2", "DiCo-S"):
        with torch.device("meta"):
            meta = MODELS.get(name)()
        real = MODELS.get(name)()
        assert count_gmacs(real, (4, 32, 32)) == count_gmacs(meta, (4, 32, 32))
        assert count_params(real) == BASELINES[name][1]


def test_dit_reference_state_dict_layout():
    with torch.device("meta"):
        sd = MODELS.get("DiT-XL/2")().state_dict()
    assert len(sd) == 292  # 28 blocks x 10 + patch 2 + timestep 4 + label 1 + pos 1 + final 4
    shapes = {
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "pos_embed": (1, 256, 1152),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "blocks.27.attn.qkv.weight": (3456, 1152),
        "blocks.27.attn.proj.weight": (1152, 1152),
        "blocks.27.mlp.fc1.weight": (4608, 1152),
        "blocks.27.mlp.fc2.weight": (1152, 4608),
        "blocks.27.adaLN_modulation.1.weight": (6912, 1152),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
        "final_layer.linear.weight": (32, 1152),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_dico_reference_state_dict_layout():
    with torch.device("meta"):
        sd = MODELS.get("DiCo-S")().state_dict()
    C = 128
    assert len(sd) == 323  # 21 blocks x 14 + stem 2 + 3 timestep x 4 + 3 tables + 4 resamplers + 4 reducers + 4 final
    shapes = {
        "x_embedder.proj.weight": (C, 4, 3, 3),
        "t_embedder_3.mlp.2.weight": (4 * C, 4 * C),
        "y_embedder.embedding_table_0.weight": (1001, C),
        "y_embedder.embedding_table_2.weight": (1001, 4 * C),
        "encoder_level_1.4.conv2.weight": (C, 1, 3, 3),
        "encoder_level_1.4.ca.1.weight": (C, C, 1, 1),
        "encoder_level_1.4.conv4.weight": (2 * C, C, 1, 1),
        "latent.3.adaLN_modulation.1.weight": (24 * C, 4 * C),
        "down1_2.body.0.weight": (C // 2, C, 3, 3),
        "down2_3.body.0.weight": (C, 2 * C, 3, 3),
        "up3_2.body.0.weight": (8 * C, 4 * C, 3, 3),
        "up2_1.body.0.weight": (4 * C, 2 * C, 3, 3),
        "reduce_chan_level2.weight": (2 * C, 4 * C, 1, 1),
        "reduce_chan_level1.weight": (2 * C, 2 * C, 1, 1),  # the last level stays at 2C
        "decoder_level_1.3.conv5.weight": (2 * C, 4 * C, 1, 1),
        "final_layer.adaLN_modulation.1.weight": (4 * C, 2 * C),
        "final_layer.out_proj.weight": (8, 2 * C, 3, 3),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_dit_positional_table_is_fixed_2d_sincos():
    model = tiny_dit()
    pos = model.pos_embed
    assert not pos.requires_grad and pos.shape == (1, 16, 64)
    g, q = 4, 16  # 4x4 tokens; each quarter of the 64 channels is one (sin|cos, column|row) part
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    for i in range(g):
        for j in range(g):
            want = torch.cat([torch.sin(j * omega), torch.cos(j * omega), torch.sin(i * omega), torch.cos(i * omega)])
            torch.testing.assert_close(pos[0, i * g + j].double(), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["dit", "dico"])
def test_output_is_exactly_zero_at_init(family):
    build, size = TINY[family]
    model = build()
    x, t, y = inputs(size)
    out = model(x, t, y)
    assert out.shape == (4, 8, size, size)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("family", ["dit", "dico"])
def test_forward_backward_shapes_and_finite_grads(family):
    build, size = TINY[family]
    model = perturb_(build()).train()
    x, t, y = inputs(size)
    out = model(x, t, y)
    assert out.shape == (4, 8, size, size) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert name == "pos_embed" and p.grad is None
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", ["dit", "dico"])
def test_no_learned_sigma_gives_in_channels(family):
    build, size = TINY[family]
    model = build(learn_sigma=False)
    assert model(*inputs(size)).shape == (4, 4, size, size)


@pytest.mark.parametrize("family", ["dit", "dico"])
def test_grad_checkpointing_matches_plain(family):
    build, size = TINY[family]
    plain = perturb_(build()).train()
    ckpt = build(grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    assert ckpt.config.grad_checkpointing and ckpt.is_gradient_checkpointing
    x, t, y = inputs(size)
    losses = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same label-dropout draw in both
        loss = model(x, t, y).square().mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


@pytest.mark.parametrize("family", ["dit", "dico"])
def test_forward_with_cfg(family):
    build, size = TINY[family]
    model = perturb_(build()).eval()
    x, t, _ = inputs(size, batch=2)
    x = torch.cat([x[:1], x[:1]])
    t = torch.cat([t[:1], t[:1]])
    y = torch.tensor([3, 10])  # conditional half, then the null class
    with torch.no_grad():
        raw = model(x, t, y)
        cond, uncond = raw[:1, :4], raw[1:, :4]
        for scale in (1.0, 4.0):
            out = model.forward_with_cfg(x, t, y, cfg_scale=scale)
            guided = uncond + scale * (cond - uncond)
            torch.testing.assert_close(out[:, :4], torch.cat([guided, guided]))
            torch.testing.assert_close(out[:, 4:], raw[:, 4:])  # variance channels untouched
        legacy = model.forward_with_cfg(x, t, y, cfg_scale=4.0, guidance_channels=3)
        torch.testing.assert_close(legacy[:, 3:], raw[:, 3:])
    assert not torch.allclose(cond, uncond)  # the label really conditions the output


@pytest.mark.parametrize("family", ["dit", "dico"])
def test_state_dict_round_trip_strict(family, tmp_path):
    build, size = TINY[family]
    model = perturb_(build()).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = build().eval()
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    x, t, y = inputs(size)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, y), model(x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["dit", "dico"])
def test_save_pretrained_round_trip(family, tmp_path):
    build, size = TINY[family]
    model = perturb_(build()).eval()
    model.save_pretrained(tmp_path / "m")
    cls = type(model)
    loaded = cls.from_pretrained(tmp_path / "m", local_files_only=True)
    assert loaded.config.num_classes == 10 and loaded.config.input_size == size
    x, t, y = inputs(size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_factory_overrides_are_recorded_in_config():
    model = MODELS.get("DiCo-S")(num_classes=10, learn_sigma=False, class_dropout_prob=0.0, input_size=16)
    cfg = model.config
    assert (cfg.hidden_size, list(cfg.depth), cfg.mlp_ratio) == (128, [5, 4, 4, 4, 4], 2.0)
    assert (cfg.num_classes, cfg.learn_sigma, cfg.input_size) == (10, False, 16)
    assert model.y_embedder.embedding_table_0.num_embeddings == 10  # no null row without dropout
    with torch.device("meta"):
        d = MODELS.get("DiT-L/2")(in_channels=3, grad_checkpointing=True)
    assert (d.config.depth, d.config.hidden_size, d.config.num_heads, d.config.patch_size) == (24, 1024, 16, 2)
    assert d.config.in_channels == 3 and d.out_channels == 6 and d.gradient_checkpointing


def test_bad_input_raises_user_error_with_choices():
    with pytest.raises(UserError, match="valid overrides: input_size, in_channels"):
        MODELS.get("DiT-S/2")(depth=3)
    with pytest.raises(UserError, match="DiCo-XL"):
        MODELS.get("DiCo-XXL")
    with pytest.raises(UserError, match="num_heads"):
        dit.DiT(hidden_size=100, num_heads=3)
    with pytest.raises(UserError, match="patch_size"):
        dit.DiT(input_size=9, depth=1, hidden_size=64, num_heads=2)
    with pytest.raises(UserError, match="5 block counts"):
        dico.DiCo(hidden_size=16, depth=[1, 1, 1])
    with pytest.raises(UserError, match="8x8"):
        tiny_dit()(*inputs(16))
    with pytest.raises(UserError, match="divisible by 4"):
        tiny_dico()(*inputs(10))


def test_label_dropout_is_shared_across_dico_widths():
    emb = dico.MultiWidthLabelEmbedder(10, (4, 8, 16), dropout_prob=0.5)
    labels = torch.arange(10).repeat(20)
    torch.manual_seed(0)
    outs = emb(labels, train=True)
    dropped = []
    for i, out in enumerate(outs):
        null_row = getattr(emb, f"embedding_table_{i}").weight[10]
        dropped.append((out == null_row).all(dim=1))
    assert 0 < int(dropped[0].sum()) < len(labels)
    assert torch.equal(dropped[0], dropped[1]) and torch.equal(dropped[0], dropped[2])
