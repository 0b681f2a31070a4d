"""FCDM backbone, block registry, compute matching and the profiler (facts sections 2-6, 10)."""
import itertools
import json
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w
import torch

from fcdm_lab.errors import UserError
from fcdm_lab.models import FCDM, create_model
from fcdm_lab.models.blocks import MixerSpec, build_block, resolve_block_spec, resolve_mixer_spec
from fcdm_lab.models.flops import count_gmacs, count_params
from fcdm_lab.models.matching import KNOBS, fcdm_gmacs, match_flops
from fcdm_lab.models.profile import profile_model
from fcdm_lab.models.registry import BLOCKS, MIXERS, Registry

sys.path.insert(0, str(Path(__file__).parent))
from reference_fcdm import ReferenceFCDM  # noqa: E402

FACTS = {  # facts section 4: exact params, measured GMACs at 32x32x4, 1000 classes
    "FCDM-S": (32_699_912, 3.073),
    "FCDM-B": (127_675_400, 12.136),
    "FCDM-L": (504_453_128, 48.231),
    "FCDM-XL": (698_754_056, 64.530),
}


@pytest.mark.parametrize("name", FACTS)
def test_preset_params_and_gmacs(name):
    params, gmacs = FACTS[name]
    with torch.device("meta"):
        m = create_model(name)
    assert count_params(m) == params
    assert count_gmacs(m, (4, 32, 32)) == pytest.approx(gmacs, rel=0.005)


def test_fcdm_xl_512_gmacs():
    with torch.device("meta"):
        m = create_model("FCDM-XL", input_size=64)
    assert count_gmacs(m, (4, 64, 64)) == pytest.approx(257.5, rel=0.005)


def test_state_dict_layout_fcdm_s():
    with torch.device("meta"):
        sd = create_model("FCDM-S").state_dict()
    assert len(sd) == 231
    C = 128
    expect = {
        "t_embedder_3.mlp.0.weight": (4 * C, 256),
        "y_embedder_2.embedding_table.weight": (1001, 2 * C),
        "x_embedder.weight": (C, 4, 3, 3),
        "encoder_level_1.0.dwconv.weight": (C, 1, 7, 7),
        "encoder_level_1.1.pwconv1.weight": (3 * C, C, 1, 1),
        "encoder_level_2.3.grn.gamma": (1, 6 * C, 1, 1),
        "latent.7.pwconv2.weight": (4 * C, 12 * C, 1, 1),
        "decoder_level_1.1.adaLN_modulation.1.weight": (3 * C, C),
        "down1_2.conv.0.weight": (C // 2, C, 3, 3),
        "down2_3.conv.0.weight": (C, 2 * C, 3, 3),
        "up3_2.conv.0.weight": (8 * C, 4 * C, 3, 3),
        "up2_1.conv.0.weight": (4 * C, 2 * C, 3, 3),
        "reduce_chans_2.weight": (2 * C, 4 * C, 1, 1),
        "reduce_chans_1.weight": (C, 2 * C, 1, 1),
        "output_layer.weight": (C, C, 3, 3),
        "final_layer.adaLN_modulation.1.weight": (2 * C, C),
        "final_layer.conv.weight": (8, C, 3, 3),
    }
    for key, shape in expect.items():
        assert tuple(sd[key].shape) == shape, key
    assert sum(k.startswith("latent.") for k in sd) == 8 * 10


def _randomised_reference(**kw):
    torch.manual_seed(0)
    ref = ReferenceFCDM(**kw)
    with torch.no_grad():  # non-zero everywhere, so zero-initialised parts cannot hide differences
        for p in ref.parameters():
            p.normal_(0, 0.05)
    return ref.eval()


def test_reference_checkpoint_loads_strict_and_matches_numerics(tmp_path):
    ref = _randomised_reference(in_channels=4, num_classes=10, L=1, C=16)
    ckpt = {"model": ref.state_dict(), "ema": ref.state_dict(), "opt": {}, "args": {"model": "FCDM"}}
    torch.save(ckpt, tmp_path / "ref.pt")
    loaded = torch.load(tmp_path / "ref.pt", weights_only=False)
    m = FCDM(input_size=16, in_channels=4, num_classes=10, L=1, C=16)
    m.load_state_dict(loaded["ema"], strict=True)
    m.eval()
    x, t, y = torch.randn(4, 4, 16, 16), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        a, b = ref(x, t, y), m(x, t, y)
    assert a.shape == b.shape == (4, 8, 16, 16)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def option_values(name, typ, default):
    """Values worth testing for one declared block or mixer option, derived from its declaration
    only: both booleans, every mixer spec for an option of type MixerSpec (`mixer_specs`), and the
    default plus one other value for numbers (odd stays odd for kernels)."""
    if typ is bool:
        return [False, True]
    if typ == MixerSpec:
        return list(mixer_specs())
    if typ is int:
        return [default, max(1, default - 2)]
    if typ is float:
        return [default, default / 2]
    return [default]


def mixer_specs():
    """Every registered mixer by name, then each option it declares moved on its own (a table):
    a new mixer or mixer option adds cases without a test edit."""
    for name, cls in MIXERS.items():
        yield name
        for k, (typ, default, _) in getattr(cls, "OPTIONS", {}).items():
            yield from ({"name": name, k: v} for v in option_values(k, typ, default)[1:])


def _spec_id(spec):
    return "-".join("+".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else f"{v}"
                    for v in spec.values())


def _block_specs():
    """Every registered family, from its declared OPTIONS: the full product of its switches (bools
    and mixers), then each numeric option moved on its own. Adding a family, an option or a mixer
    adds cases here without a test edit."""
    for family, cls in BLOCKS.items():
        values = {k: option_values(k, typ, default) for k, (typ, default, _) in cls.OPTIONS.items()}
        switches = {k: v for k, v in values.items() if cls.OPTIONS[k][0] in (bool, MixerSpec)}
        for combo in itertools.product(*switches.values()):
            yield {"family": family, **dict(zip(switches, combo))}
        for k, vals in values.items():
            if k not in switches:
                yield from ({"family": family, k: v} for v in vals[1:])


@pytest.mark.parametrize("spec", list(_block_specs()), ids=_spec_id)
def test_every_block_combination(spec):
    torch.manual_seed(0)
    blk = build_block(16, spec)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    c = torch.randn(2, 16)
    # adaLN-zero: the block is the identity at initialisation
    assert torch.equal(blk(x, c), x)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.1)
    out = blk(x, c)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in blk.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", BLOCKS.names())
def test_tiny_model_forward_backward_per_family(family):
    m = FCDM(input_size=8, in_channels=1, num_classes=10, L=1, C=8, block={"family": family})
    x = torch.randn(3, 1, 8, 8)
    out = m(x, torch.randint(0, 1000, (3,)), torch.randint(0, 10, (3,)))
    assert out.shape == (3, 2, 8, 8)
    assert torch.count_nonzero(out) == 0  # zero-initialised final layer
    out.sum().backward()


@pytest.mark.parametrize("L,C,size", [(1, 8, 4), (3, 10, 12), (2, 16, 20)])
def test_any_L_even_C_and_size_divisible_by_4(L, C, size):
    m = FCDM(input_size=size, in_channels=3, num_classes=7, L=L, C=C, learn_sigma=False)
    assert m(torch.randn(2, 3, size, size), torch.tensor([1, 2]), torch.tensor([0, 6])).shape == (2, 3, size, size)


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = FCDM(input_size=8, in_channels=1, num_classes=10, L=1, C=8)
    b = FCDM(input_size=8, in_channels=1, num_classes=10, L=1, C=8, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters()):
            p.normal_(0, 0.1)
            q.copy_(p)
    a.train(), b.train()
    for m in (a, b):  # no label dropout (random), whether it is drawn once or per level
        for i in (1, 2, 3):
            getattr(m, f"y_embedder_{i}").dropout_prob = 0.0
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2])
    a(x, t, y).square().sum().backward()
    b(x, t, y).square().sum().backward()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_registry_rejects_duplicates_and_lists_valid_names():
    reg = Registry("thing")
    reg.register("a")(object)
    with pytest.raises(ValueError, match="duplicate"):
        reg.register("a")(int)
    with pytest.raises(UserError, match="valid: a"):
        reg.get("b")


@pytest.mark.parametrize("spec,msg", [
    ({"family": "no-such-family"}, f"unknown block family 'no-such-family'; valid: {', '.join(BLOCKS.names())}$"),
    ({"mixer": "no-such-mixer"}, f"unknown channel mixer 'no-such-mixer'; valid: {', '.join(MIXERS.names())}$"),
    ({"mixer": {"name": "no-such-mixer"}}, f"unknown channel mixer 'no-such-mixer'; valid: {', '.join(MIXERS.names())}$"),
    ({"mixer": 3}, r"block.mixer must be str \(a quoted string\) or a table, got 3$"),
    ({"mixer": {"rd_ratio": 0.5}}, "block.mixer: a mixer table needs 'name'"),
    ({"kernel": 4}, "odd"),
    ({"kernel": "big"}, "must be int"),
    ({"kernel": "5"}, "must be int"),  # strings never become numbers (config.check_value)
    ({"ffn": "true"}, "must be bool"),
    ({"ratio": -1.0}, "positive"),
    ({"colour": 1}, "unknown option 'colour'"),
])
def test_bad_block_specs(spec, msg):
    with pytest.raises(UserError, match=msg):
        resolve_block_spec(spec)


@pytest.mark.parametrize("spec", list(mixer_specs()), ids=lambda s: s if isinstance(s, str) else _spec_id(s))
def test_mixer_specs_resolve_to_a_canonical_form_that_round_trips(spec):
    """A mixer without options resolves to its plain name (what older specs, tags and checkpoints
    say); one with options to a table of the name and every declared option. Either resolves to
    itself and survives JSON (MLflow tags, config.json) and TOML (config.toml) unchanged."""
    name = spec if isinstance(spec, str) else spec["name"]
    options = getattr(MIXERS.get(name), "OPTIONS", {})
    resolved = resolve_mixer_spec(spec)
    if not options:
        assert resolved == name and resolve_mixer_spec({"name": name}) == name
    else:
        defaults = {k: d for k, (_, d, _) in options.items()}
        given = {} if isinstance(spec, str) else spec
        assert resolved == {"name": name, **defaults, **{k: v for k, v in given.items() if k != "name"}}
    assert resolve_mixer_spec(resolved) == resolved
    assert json.loads(json.dumps(resolved)) == resolved
    assert tomllib.loads(tomli_w.dumps({"mixer": resolved}))["mixer"] == resolved
    block = resolve_block_spec({"mixer": spec})
    assert block["mixer"] == resolved and resolve_block_spec(json.loads(json.dumps(block))) == block


def _wrong_type(typ):
    return "x" if typ in (int, float, bool) else 1.5


@pytest.mark.parametrize("name", MIXERS.names())
def test_bad_mixer_options_are_one_line_errors(name):
    """Unknown and mistyped mixer options fail when the block spec resolves, naming the key and the
    valid choices; derived from each mixer's declared OPTIONS."""
    options = getattr(MIXERS.get(name), "OPTIONS", {})
    with pytest.raises(UserError) as e:
        resolve_block_spec({"mixer": {"name": name, "no_such_option": 1}}, where="model.block")
    msg = str(e.value)
    assert msg.startswith("model.block.mixer: ") and "'no_such_option'" in msg and "\n" not in msg
    assert (f"valid: {', '.join(['name', *options])}" in msg) if options else "takes no options" in msg
    for opt, (typ, default, _) in options.items():
        with pytest.raises(UserError, match=rf"^model.block.mixer.{opt} must be "):
            resolve_block_spec({"mixer": {"name": name, opt: _wrong_type(typ)}}, where="model.block")


@pytest.mark.parametrize("family", BLOCKS.names())
def test_block_options_resolve_to_declared_defaults(family):
    """A family's spec resolves to exactly its declared options (whatever they are), each default
    kept, whole floats accepted for ints and ints for floats (the one coercion policy)."""
    options = BLOCKS.get(family).OPTIONS
    resolved = resolve_block_spec({"family": family})
    assert resolved == {"family": family, **{k: resolve_mixer_spec(default) if typ == MixerSpec else default
                                             for k, (typ, default, _) in options.items()}}
    loose = {k: (float(d) if typ is int else int(d) if typ is float and float(d).is_integer() else d)
             for k, (typ, d, _) in options.items()}
    again = resolve_block_spec({"family": family, **loose})
    assert again == resolved and all(type(again[k]) is type(v) for k, v in resolved.items())


@pytest.mark.parametrize("kw,msg", [
    ({"L": 0}, "L .* >= 1"), ({"C": 7}, "even"), ({"C": 6}, ">= 8"), ({"input_size": 10}, "divisible by 4"),
])
def test_bad_model_args(kw, msg):
    with pytest.raises(UserError, match=msg):
        FCDM(**{"input_size": 8, "in_channels": 1, "num_classes": 10, "L": 1, "C": 8, **kw})


# Paper ablation rows at FCDM-L (facts section 6): the three re-balanced ones must land within 1%.
MATCHED_ROWS = [
    ({"family": "convnext", "ffn": True, "ffn_ratio": 1.5}, "ratio"),
    ({"family": "convnext", "bottleneck": False}, "width"),
    ({"family": "resnet"}, "ratio"),
    ({"family": "resnet"}, "width"),
    ({"family": "convnext", "mixer": "cca"}, "ratio"),
]


@pytest.mark.parametrize("block,knob", MATCHED_ROWS)
def test_compute_matched_variants_within_1_percent(block, knob):
    base = dict(L=2, C=512, input_size=32, in_channels=4, num_classes=1000, block=block)
    kwargs, res = match_flops(base, knob)
    assert res.knob == knob and res.matched and abs(res.rel_err) <= 0.01
    assert res.target_gmacs == pytest.approx(48.231, rel=1e-3)
    with torch.device("meta"):
        m = FCDM(**kwargs)
    assert count_gmacs(m, (4, 32, 32)) == pytest.approx(res.gmacs)


@pytest.mark.parametrize("block,knob", [(b, k) for b, k in MATCHED_ROWS if k != "width"])
def test_matched_ratio_is_the_closest_whole_channel_count(block, knob):
    """The solve's answer against its neighbouring whole channel counts (GMACs grow with the channels,
    so no farther count is closer): none is closer to the target."""
    base = dict(L=1, C=8, input_size=8, in_channels=1, num_classes=10, block=block)
    kwargs, res = match_flops(base, knob)
    spec, h = resolve_block_spec(block), round(kwargs["block"][knob] * 8)
    gmacs = {k: fcdm_gmacs({**base, "block": {**spec, knob: k / 8}}) for k in range(h - 2, h + 3)}
    assert list(gmacs.values()) == sorted(gmacs.values()) and gmacs[h] == res.gmacs
    assert all(abs(gmacs[h] - res.target_gmacs) <= abs(g - res.target_gmacs) for g in gmacs.values())


def test_unmatched_kernel_rows_follow_the_paper():
    for k, gm in ((5, 48.11), (3, 48.02)):
        assert profile_model("FCDM-L", overrides={"kernel": k})["gmacs"] == pytest.approx(gm, abs=0.01)


def test_match_knob_errors():
    base = dict(L=1, C=16, input_size=8, in_channels=1, num_classes=10)
    with pytest.raises(UserError, match="valid: ratio, ffn_ratio, width"):
        match_flops({**base, "block": None}, "depth")
    with pytest.raises(UserError, match="ffn = true"):
        match_flops({**base, "block": None}, "ffn_ratio")
    assert set(KNOBS) == {"ratio", "ffn_ratio", "width"}


def test_grn_hand_written_backward_matches_autograd():
    from fcdm_lab.models.blocks import _GRNFunction

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.double, requires_grad=True)
    x.data[1, :, :, 2] = 0  # a dead channel: its norm is 0
    gamma = torch.randn(1, 1, 1, 5, dtype=torch.double, requires_grad=True)
    beta = torch.randn(1, 1, 1, 5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_GRNFunction.apply, (x, gamma, beta))


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_depthwise_conv_hand_written_backward(kernel):
    """The block's depthwise conv computes its weight gradient as a conv of its own (faster on CPU):
    gradcheck in double precision (plain and channels_last inputs), and the same gradients as
    nn.Conv2d's autograd in float32."""
    from fcdm_lab.models.blocks import DepthwiseConv2d, _DepthwiseConvFunction

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.double, requires_grad=True)
    w = torch.randn(3, 1, kernel, kernel, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_DepthwiseConvFunction.apply, (x, w, b))
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(_DepthwiseConvFunction.apply, (x_cl, w, b))

    ours = DepthwiseConv2d(16, kernel).to(memory_format=torch.channels_last)
    plain = torch.nn.Conv2d(16, 16, kernel, padding=kernel // 2, groups=16)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(4, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 16, 12, 12)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), plain(xb)
    assert torch.allclose(ya, yb, atol=1e-6)
    ya.backward(g), yb.backward(g)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    assert torch.allclose(ours.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)
    assert torch.allclose(ours.bias.grad, plain.bias.grad, rtol=1e-4, atol=1e-4)
