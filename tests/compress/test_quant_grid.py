"""The shared quantisation grid: error bounds, ranges, packing, straight-through gradient, bad specs."""

import pytest
import torch

from llmtrain.compress.quant.grid import (
    QuantSpec,
    check_spec,
    dequantize,
    fake_quantize,
    group_params,
    pack_int4,
    quantize,
    unpack_int4,
)
from llmtrain.errors import UserError


@pytest.mark.parametrize("bits,group_size", [(8, 128), (8, 0), (4, 32), (4, 0)])
def test_round_trip_error_is_at_most_half_a_step(bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 256) + 0.3  # off-centre rows exercise the asymmetric zero point
    spec = QuantSpec(bits, group_size)
    scale, zero = group_params(w, spec)
    q = quantize(w, scale, zero, spec)
    assert spec.qmin <= int(q.min()) and int(q.max()) <= spec.qmax
    step = scale.repeat_interleave(256 // spec.groups(256), dim=1)
    assert ((dequantize(q, scale, zero, spec) - w).abs() <= step / 2 + 1e-6).all()


def test_zero_group_stays_zero_and_int4_packs_two_per_byte():
    w = torch.zeros(4, 64)
    w[1] = torch.linspace(-1, 1, 64)
    spec = QuantSpec(4, 32)
    scale, zero = group_params(w, spec)
    q = quantize(w, scale, zero, spec)
    assert torch.equal(dequantize(q, scale, zero, spec)[0], torch.zeros(64))
    packed = pack_int4(q)
    assert packed.shape == (4, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)


def test_fake_quantize_forward_is_rounded_backward_is_identity():
    torch.manual_seed(1)
    w = torch.randn(8, 64, requires_grad=True)
    spec = QuantSpec(4, 64)
    out = fake_quantize(w, spec)
    scale, zero = group_params(w, spec)
    assert torch.equal(out.detach(), dequantize(quantize(w, scale, zero, spec), scale, zero, spec))
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize(
    "spec,width,needle", [(QuantSpec(3, 32), 64, "bits=3"), (QuantSpec(4, 48), 64, "group_size=48")]
)
def test_bad_spec_names_the_key(spec, width, needle):
    with pytest.raises(UserError, match=needle):
        check_spec(spec, width)
