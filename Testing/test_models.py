"""Tests for LumbarSegmentLib.models (CPU only, small widths to stay fast).

Run with:  cd <repo> && PYTHONPATH=. python -m pytest Testing/test_models.py -q
"""

import json

import pytest
import torch
import torch.nn.functional as F

from LumbarSegmentLib.models import (
    VARIANTS,
    VariantSpec,
    build_model,
    count_parameters,
    replace_heads,
)

torch.set_num_threads(min(2, torch.get_num_threads()))

ALL = list(VARIANTS)
DS_VARIANTS = [n for n, s in VARIANTS.items() if s.deep_supervision]
SMALL = 8  # init_filters used for the fast forward/backward tests


def _split(out):
    """Return (main, aux_list) whatever the output form."""
    if isinstance(out, tuple):
        main, aux = out
        assert isinstance(aux, list)
        return main, aux
    assert isinstance(out, torch.Tensor)
    return out, []


# --------------------------------------------------------------------------
# seed table
# --------------------------------------------------------------------------

def test_table_names():
    assert set(VARIANTS) == {"UAD", "UVAD", "UAMD", "UVD", "UMD", "UD", "U1", "FCN8"}
    for name, spec in VARIANTS.items():
        assert isinstance(spec, VariantSpec)
        assert spec.name == name
        assert spec.optimizer in ("adam", "rmsprop", "adadelta")
        assert spec.activation in ("relu", "prelu")
        assert spec.encoder in ("unet", "vgg16")
        assert spec.block in ("conv", "inception")


def test_table_literal_values():
    uvd = VARIANTS["UVD"]
    assert (uvd.optimizer, uvd.lr, uvd.activation, uvd.init_filters) == ("adam", 3.3e-4, "prelu", 32)
    assert uvd.encoder == "vgg16" and uvd.deep_supervision and not uvd.attention
    u1 = VARIANTS["U1"]
    assert (u1.optimizer, u1.lr, u1.activation, u1.init_filters) == ("adadelta", 1.0, "relu", 64)
    assert not (u1.attention or u1.deep_supervision or u1.fcn8) and u1.block == "conv"
    uad = VARIANTS["UAD"]
    assert (uad.optimizer, uad.lr, uad.activation, uad.init_filters) == ("rmsprop", 1e-3, "relu", 16)
    assert uad.attention and uad.deep_supervision
    uamd = VARIANTS["UAMD"]
    assert uamd.block == "inception" and uamd.attention and uamd.init_filters == 16
    assert VARIANTS["UMD"].init_filters == 32 and VARIANTS["UD"].init_filters == 64
    assert VARIANTS["UVAD"].activation == "prelu" and VARIANTS["UVAD"].attention
    fcn = VARIANTS["FCN8"]
    assert fcn.fcn8 and fcn.encoder == "vgg16" and not fcn.deep_supervision
    with pytest.raises(Exception):
        uvd.lr = 1.0  # frozen


def test_unknown_variant_raises():
    with pytest.raises(ValueError) as err:
        build_model("UNET3000")
    for name in VARIANTS:
        assert name in str(err.value)


def test_case_insensitive():
    m = build_model("uvd", init_filters=SMALL)
    assert m.spec.name == "UVD"
    assert build_model(" fcn8 ", init_filters=SMALL).spec.name == "FCN8"


def test_bad_overrides():
    with pytest.raises(ValueError):
        build_model("UD", activation="tanh")
    with pytest.raises(ValueError):
        build_model("UD", init_filters=0)
    with pytest.raises(ValueError):
        build_model("FCN8", deep_supervision=True)


# --------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_defaults_build(name):
    m = build_model(name)
    assert m.spec == VARIANTS[name]
    assert m.builder_args == {
        "variant": name, "in_channels": 1, "num_classes": 12,
        "init_filters": VARIANTS[name].init_filters,
        "activation": VARIANTS[name].activation,
        "deep_supervision": VARIANTS[name].deep_supervision,
    }
    assert m.head.out_channels == 12 and m.head.kernel_size == (1, 1)
    assert isinstance(m.aux_heads, torch.nn.ModuleList)
    assert (len(m.aux_heads) > 0) == VARIANTS[name].deep_supervision
    n = count_parameters(m)
    assert n == sum(p.numel() for p in m.parameters()) and n > 0
    if VARIANTS[name].activation == "prelu":
        assert any(isinstance(x, torch.nn.PReLU) for x in m.modules())
    else:
        assert not any(isinstance(x, torch.nn.PReLU) for x in m.modules())


@pytest.mark.parametrize("name", ALL)
def test_overrides_applied(name):
    spec = VARIANTS[name]
    flipped = "relu" if spec.activation == "prelu" else "prelu"
    ds = None if spec.fcn8 else not spec.deep_supervision
    m = build_model(name, in_channels=2, num_classes=4, init_filters=SMALL,
                    activation=flipped.upper(), deep_supervision=ds)
    assert m.spec.init_filters == SMALL and m.spec.activation == flipped
    assert m.spec.deep_supervision == (spec.deep_supervision if ds is None else ds)
    assert m.spec.optimizer == spec.optimizer and m.spec.lr == spec.lr
    assert m.builder_args["in_channels"] == 2 and m.builder_args["num_classes"] == 4
    assert (len(m.aux_heads) > 0) == m.spec.deep_supervision
    x = torch.randn(2, 2, 64, 64)
    m.train()
    main, aux = _split(m(x))
    assert main.shape == (2, 4, 64, 64)
    assert len(aux) == len(m.aux_heads)
    for a in aux:
        assert a.shape == (2, 4, 64, 64)
    with pytest.raises(ValueError):
        m(torch.randn(1, 1, 64, 64))  # wrong channel count


# --------------------------------------------------------------------------
# forward / backward
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_train_forward_backward(name):
    torch.manual_seed(0)
    m = build_model(name, init_filters=SMALL).train()
    x = torch.randn(2, 1, 64, 64)
    target = torch.randint(0, 12, (2, 64, 64))
    main, aux = _split(m(x))
    assert main.shape == (2, 12, 64, 64)
    if VARIANTS[name].deep_supervision:
        assert len(aux) == len(m.aux_heads) >= 1
    else:
        assert aux == [] and len(m.aux_heads) == 0
    for a in aux:
        assert a.shape == (2, 12, 64, 64)
    loss = F.cross_entropy(main, target) + sum(F.cross_entropy(a, target) for a in aux)
    loss.backward()
    for pname, p in m.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ALL)
def test_eval_and_odd_sizes(name):
    torch.manual_seed(0)
    m = build_model(name, init_filters=SMALL)
    m.eval()
    with torch.no_grad():
        y = m(torch.randn(2, 1, 64, 64))
        assert isinstance(y, torch.Tensor) and y.shape == (2, 12, 64, 64)
        y = m(torch.randn(2, 1, 70, 90))
        assert isinstance(y, torch.Tensor) and y.shape == (2, 12, 70, 90)
        assert torch.isfinite(y).all()
    m.train()
    main, aux = _split(m(torch.randn(2, 1, 70, 90)))
    assert main.shape == (2, 12, 70, 90)
    for a in aux:
        assert a.shape == (2, 12, 70, 90)


def test_default_width_uvd_256():
    m = build_model("UVD").eval()
    with torch.no_grad():
        y = m(torch.randn(1, 1, 256, 256))
    assert isinstance(y, torch.Tensor) and y.shape == (1, 12, 256, 256)


@pytest.mark.parametrize("name", ["UAMD", "UVD", "FCN8"])
def test_bf16_autocast_channels_last(name):
    m = build_model(name, init_filters=SMALL).to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 64, 80).to(memory_format=torch.channels_last)
    m.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        main, aux = _split(m(x))
        loss = main.float().mean() + sum(a.float().mean() for a in aux)
    loss.backward()
    assert main.shape == (2, 12, 64, 80)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    m.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 12, 64, 80)
    assert torch.isfinite(y.float()).all()


# --------------------------------------------------------------------------
# serialisation / fine-tuning helpers
# --------------------------------------------------------------------------

def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ALL)
def test_builder_args_roundtrip(name):
    m = build_model(name, in_channels=2, num_classes=5, init_filters=SMALL)
    args = json.loads(json.dumps(m.builder_args))
    m2 = build_model(**args)
    assert _shapes(m) == _shapes(m2)
    assert m2.spec == m.spec
    m2.load_state_dict(m.state_dict())  # strict


@pytest.mark.parametrize("name", ALL)
def test_replace_heads(name):
    m = build_model(name, init_filters=SMALL)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    head_names = set(m.head_modules())
    assert "head" in head_names
    replace_heads(m, 15)
    after = m.state_dict()
    assert set(before) == set(after)
    for k in before:
        module_name = k.rsplit(".", 1)[0]
        if module_name in head_names:
            assert after[k].shape[0] == 15, k
        else:
            assert torch.equal(before[k], after[k]), k
    assert m.head.out_channels == 15
    assert all(h.conv.out_channels == 15 for h in m.aux_heads)
    assert m.num_classes == 15 and m.builder_args["num_classes"] == 15
    assert _shapes(build_model(**m.builder_args)) == _shapes(m)
    m.eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 64, 64)).shape == (1, 15, 64, 64)
