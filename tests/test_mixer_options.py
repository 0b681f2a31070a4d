"""Channel mixers take options: a mixer registered inside the test with an option of its own is
set from a block spec (`mixer = { name = ..., scale = 2.0 }`), validated when the spec resolves (and
when an experiment loads), built into blocks and models, counted, compute-matched and saved; the
registry is left as it was."""
import json
import tomllib

import pytest
import tomli_w
import torch
import torch.nn as nn

from fcdm_lab.errors import UserError
from fcdm_lab.models import FCDM
from fcdm_lab.models.blocks import build_block, resolve_block_spec
from fcdm_lab.models.flops import count_gmacs
from fcdm_lab.models.matching import match_flops
from fcdm_lab.models.registry import MIXERS

NAME = "test-scaled-identity"


class ScaledIdentity(nn.Module):
    """A mixer with one option and no parameters: out = scale * x."""

    OPTIONS = {"scale": (float, 1.0, "factor applied to the activation")}

    def __init__(self, channels: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


SPEC = {"family": "convnext", "mixer": {"name": NAME, "scale": 2.0}}
TINY = dict(input_size=8, in_channels=1, num_classes=10, L=1, C=8)


@pytest.fixture(autouse=True)
def dummy_mixer():
    assert NAME not in MIXERS
    with MIXERS.registered(NAME, ScaledIdentity, doc="test mixer: scale * x"):
        yield
    assert NAME not in MIXERS


def test_spec_resolves_to_the_canonical_table():
    resolved = resolve_block_spec(SPEC)
    assert resolved["mixer"] == {"name": NAME, "scale": 2.0}
    # the name alone fills in the declared default; an int is a float under the coercion policy
    assert resolve_block_spec({"mixer": NAME})["mixer"] == {"name": NAME, "scale": 1.0}
    again = resolve_block_spec({"mixer": {"name": NAME, "scale": 2}})
    assert again == resolved and type(again["mixer"]["scale"]) is float
    assert resolve_block_spec(json.loads(json.dumps(resolved))) == resolved
    assert resolve_block_spec(tomllib.loads(tomli_w.dumps(resolved))) == resolved


def test_block_and_model_build_with_the_option():
    blk = build_block(16, SPEC)
    assert isinstance(getattr(blk, NAME), ScaledIdentity) and getattr(blk, NAME).scale == 2.0
    h = torch.randn(2, 4, 4, 48)
    assert torch.equal(blk.mixer(h), 2.0 * h)
    m = FCDM(**TINY, block=SPEC)
    assert all(getattr(b, NAME).scale == 2.0 for b in m.encoder_level_1)
    out = m(torch.randn(2, 1, 8, 8), torch.tensor([1, 500]), torch.tensor([0, 9]))
    assert out.shape == (2, 2, 8, 8)
    out.sum().backward()


@pytest.mark.parametrize("mixer,message", [
    ({"name": NAME, "scal": 2.0}, f"model.block.mixer: unknown option 'scal' for channel mixer '{NAME}'; valid: name, scale$"),
    ({"name": NAME, "scale": "2"}, r"model.block.mixer.scale must be float \(a number\), got '2'$"),
    ({"name": NAME, "scale": True}, r"model.block.mixer.scale must be float \(a number\), got True$"),
    ({"name": NAME, "scale": float("nan")}, "model.block.mixer.scale must be a finite number"),
    ({"scale": 2.0}, "model.block.mixer: a mixer table needs 'name'"),
])
def test_bad_options_fail_when_the_spec_resolves(mixer, message):
    with pytest.raises(UserError, match=message) as e:
        resolve_block_spec({"family": "convnext", "mixer": mixer}, where="model.block")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=message.replace("model.block", "block")):  # the model refuses it too
        FCDM(**TINY, block={"mixer": mixer})


def test_experiment_files_carry_mixer_options():
    from fcdm_lab.config import load_experiment

    cfg = load_experiment("tiny-digits", {"model.block": SPEC})
    assert cfg.model.block["mixer"] == {"name": NAME, "scale": 2.0}
    with pytest.raises(UserError, match=f"^model.block.mixer: unknown option 'scal' for channel mixer '{NAME}'"):
        load_experiment("tiny-digits", {"model.block": {"mixer": {"name": NAME, "scal": 2.0}}})


def test_gmacs_and_compute_matching_see_through_mixer_options():
    kw = dict(TINY, input_size=16)
    with torch.device("meta"):
        plain = count_gmacs(FCDM(**kw, block={"mixer": "none"}), (1, 16, 16))
        scaled = count_gmacs(FCDM(**kw, block=SPEC), (1, 16, 16))
    assert scaled == pytest.approx(plain)  # the dummy mixer does no multiply-accumulates
    target = plain * 1.2
    matched, res = match_flops({**kw, "block": SPEC}, "ratio", target)
    assert res.matched and matched["block"]["mixer"] == {"name": NAME, "scale": 2.0}


def test_saved_model_keeps_the_mixer_options(tmp_path):
    m = FCDM(**TINY, block=SPEC)
    m.save_pretrained(tmp_path / "model")
    loaded = FCDM.from_pretrained(tmp_path / "model")
    assert resolve_block_spec(loaded.config.block) == resolve_block_spec(SPEC)
    assert getattr(loaded.encoder_level_1[0], NAME).scale == 2.0
