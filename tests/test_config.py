import pytest

from bitfx import BinarizeConfig
from bitfx.config import PRESETS, CompileOptions


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = BinarizeConfig.preset(name)
    assert cfg.method == name


def test_preset_values_follow_the_papers():
    assert BinarizeConfig.preset("bitnet158").weight == "ternary"
    assert BinarizeConfig.preset("bitnet").act_bits == 8
    assert BinarizeConfig.preset("bivit").prob == "bivit"
    assert BinarizeConfig.preset("bibert").prob == "bool"
    assert BinarizeConfig.preset("bipft").estimators is True
    assert BinarizeConfig.preset("bit").estimators is False


def test_invalid_fields_are_all_named_with_accepted_values():
    with pytest.raises(ValueError) as e:
        BinarizeConfig(weight="binary", prob="hard", act_bits=3)
    msg = str(e.value)
    assert "weight='binary'" in msg and "'sign_channel'" in msg
    assert "prob='hard'" in msg and "'bivit'" in msg
    assert "act_bits=3" in msg


def test_unknown_preset_and_override():
    with pytest.raises(ValueError, match="unknown preset 'xnor'.*'bipft'"):
        BinarizeConfig.preset("xnor")
    with pytest.raises(ValueError, match=r"unknown BinarizeConfig fields \['bits'\]"):
        BinarizeConfig.preset("bit", bits=2)


def test_absmax_bits_range():
    with pytest.raises(ValueError, match="act_bits=9"):
        BinarizeConfig(act="absmax", act_bits=9, act_scale="token", act_move=False)


def test_keep_patterns():
    cfg = BinarizeConfig.preset("bipft")
    assert cfg.keeps("bert.embeddings.word") == "*embed*"
    assert cfg.keeps("classifier") == "*classifier*"
    assert cfg.keeps("head") == "head"
    assert cfg.keeps("encoder.layer.0.attention.self.query") is None


def test_coerce_and_options():
    assert BinarizeConfig.coerce(None).method == "bipft"
    assert BinarizeConfig.coerce("bivit").method == "bivit"
    assert BinarizeConfig.coerce({"preset": "bit", "min_features": 10}).min_features == 10
    opts = CompileOptions.from_dict({"config": "bibert", "kernels": "reference"})
    assert opts.config.kernels == "reference" and opts.config.method == "bibert"
    with pytest.raises(ValueError, match=r"unknown bitfx backend options \['kernel'\]"):
        CompileOptions.from_dict({"kernel": "tvm"})
    with pytest.raises(ValueError, match="kernels='cuda'"):
        CompileOptions.from_dict({"kernels": "cuda"})
