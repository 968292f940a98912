"""The generator family: every registered architecture, the STU and AUC units, configs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.attributes import condition_vector, edit_gain_spec, gain_text, gain_vector, validate_attributes
from models.blocks import AttentionUNetConnection, SelectiveTransferUnit, SelfAttention
from models.config import EncoderDecoderConfig, config_from_dict, config_to_dict
from models.generators import Encoded
from models.registry import ARCHITECTURES, GENERATOR_ARCHITECTURES, all_presets, build, get_preset

TINY_GENERATORS = [f"{a}-tiny" for a in GENERATOR_ARCHITECTURES]


def _inputs(cfg, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    c = torch.randint(-1, 2, (batch, cfg.n_attrs), generator=g).float()
    return x, c


@pytest.mark.parametrize("preset", TINY_GENERATORS)
@pytest.mark.parametrize("mask_head", [False, True])
def test_generator_shapes_ranges_and_split_forward(preset: str, mask_head: bool) -> None:
    arch, cfg = get_preset(preset)
    cfg = dataclasses.replace(cfg, mask_head=mask_head)
    gen = build(arch, cfg).eval()
    x, c = _inputs(cfg)
    with torch.no_grad():
        y, mask = gen(x, c)
        y2, mask2 = gen.decode(gen.encode(x), c)
    assert y.shape == x.shape
    assert mask.shape == (x.shape[0], 1, cfg.image_size, cfg.image_size)
    assert float(y.min()) >= -1.0 and float(y.max()) <= 1.0
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    torch.testing.assert_close(mask, mask2, rtol=0, atol=0)
    # the condition matters: another condition gives another image
    with torch.no_grad():
        y3, _ = gen(x, -c)
    assert not torch.allclose(y, y3)


@pytest.mark.parametrize("preset", TINY_GENERATORS)
def test_gradients_reach_every_parameter(preset: str) -> None:
    arch, cfg = get_preset(preset)
    cfg = dataclasses.replace(cfg, mask_head=True)
    gen = build(arch, cfg).train()
    for m in gen.modules():  # gamma starts at 0, which would block the attention branch's gradient
        if isinstance(m, SelfAttention):
            m.gamma.data.fill_(0.5)
    x, c = _inputs(cfg, batch=4)
    y, mask = gen(x, c)
    (y.square().mean() + mask.mean()).backward()
    dead = [n for n, p in gen.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]
    assert not dead, f"no gradient for {dead}"


def test_mask_head_blends_with_the_input() -> None:
    arch, cfg = get_preset("stgan-tiny")
    gen = build(arch, dataclasses.replace(cfg, mask_head=True)).eval()
    x, c = _inputs(gen.config)
    with torch.no_grad():
        enc = gen.encode(x)
        x_edit, mask = gen.decode_parts(enc, c)
        y, mask2 = gen.decode(enc, c)
    assert mask is not None
    torch.testing.assert_close(y, mask * x_edit + (1 - mask) * x)
    torch.testing.assert_close(mask, mask2)


def test_models_without_mask_head_return_normalised_change() -> None:
    arch, cfg = get_preset("attgan-tiny")
    gen = build(arch, cfg).eval()
    x, c = _inputs(cfg)
    with torch.no_grad():
        y, mask = gen(x, c)
    change = (y - x).abs().mean(1, keepdim=True)
    expected = change / change.amax(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(mask, expected)
    assert torch.allclose(mask.amax(dim=(2, 3)), torch.ones(x.shape[0], 1))


def test_stu_shapes_and_gate_ranges() -> None:
    stu = SelectiveTransferUnit(enc_ch=6, state_ch=10, n_attrs=4, kernel=3)
    f_enc = torch.randn(2, 6, 8, 8)
    state = torch.randn(2, 10, 4, 4)
    c = torch.tensor([[1.0, 0, -1, 0], [0, 0, 0, 1]])
    f_t, s_new = stu(f_enc, state, c)
    assert f_t.shape == (2, 6, 8, 8) and s_new.shape == (2, 6, 8, 8)
    r, z, _ = stu.gates(f_enc, state, c)
    for gate in (r, z):
        assert float(gate.detach().min()) > 0 and float(gate.detach().max()) < 1
    # f_t is a convex combination of s_hat and tanh(...): with z -> 0 it equals s_hat
    s_hat = stu.upsample(torch.cat([state, c.view(2, 4, 1, 1).expand(2, 4, 4, 4)], 1))
    torch.testing.assert_close(s_new, r * s_hat)
    # the attribute difference changes what is transferred
    f_t2, _ = stu(f_enc, state, -c)
    assert not torch.allclose(f_t, f_t2)


def test_auc_gates_the_encoder_feature() -> None:
    auc = AttentionUNetConnection(enc_ch=6, dec_ch=8, inner_ch=3, norm="batch").eval()
    x_enc, g_dec = torch.randn(2, 6, 16, 16), torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        out, psi = auc(x_enc, g_dec)
    assert out.shape == x_enc.shape and psi.shape == (2, 1, 16, 16)
    assert float(psi.min()) >= 0 and float(psi.max()) <= 1
    torch.testing.assert_close(out, x_enc * psi)


def test_self_attention_starts_as_identity() -> None:
    sa = SelfAttention(16)
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(sa(x), x)
    sa.gamma.data.fill_(1.0)
    assert not torch.allclose(sa(x), x)


def test_zero_difference_means_reconstruct_for_both_conditionings() -> None:
    c_src = torch.tensor([[1.0, 0.0, 1.0]])
    zero = torch.zeros_like(c_src)
    assert torch.equal(condition_vector(c_src, zero, "diff"), zero)
    assert torch.equal(condition_vector(c_src, zero, "target"), torch.tensor([[1.0, -1.0, 1.0]]))
    # a full flip in target mode reaches the opposite coding and is clamped beyond it
    assert torch.equal(
        condition_vector(c_src, torch.tensor([[-1.0, 1.0, 1.0]]), "target"), torch.tensor([[-1.0, 1.0, 1.0]])
    )
    with pytest.raises(ValueError, match="conditioning"):
        condition_vector(c_src, zero, "nonsense")


def test_edit_gain_scales_the_edit_and_keeps_zero_as_reconstruct() -> None:
    c_src = torch.tensor([[1.0, 0.0, 0.0]])
    c_diff = torch.tensor([[-1.0, 0.5, 0.0]])
    assert torch.equal(condition_vector(c_src, c_diff, "diff", gain=2.0), torch.tensor([[-2.0, 1.0, 0.0]]))
    # target coding: source (1, -1, -1), target (-1, 0, -1); gain 2 doubles the move away from the source
    assert torch.equal(condition_vector(c_src, c_diff, "target", gain=2.0), torch.tensor([[-3.0, 1.0, -1.0]]))
    zero = torch.zeros_like(c_src)
    for mode in ("diff", "target"):
        assert torch.equal(condition_vector(c_src, zero, mode, gain=2.5), condition_vector(c_src, zero, mode))


def test_attribute_gains_scale_their_own_attribute_only() -> None:
    attrs = ("Bald", "Bangs", "Young")
    # no slider of its own (or all at the common gain): one float, the exact arithmetic of before
    assert edit_gain_spec(attrs, 1.25) == 1.25 == edit_gain_spec(attrs, 1.25, {"Bangs": 1.25})
    assert gain_vector(attrs, 1.25) == 1.25
    spec = edit_gain_spec(attrs, 1.0, {"Bangs": 2.0})
    assert spec == {"Bald": 1.0, "Bangs": 2.0, "Young": 1.0} and gain_text(spec) == "×1 (Bangs ×2)"
    gains = gain_vector(attrs, spec)
    assert torch.equal(gains, torch.tensor([1.0, 2.0, 1.0]))  # type: ignore[arg-type]
    c_src = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    c_diff = torch.tensor([[-1.0, 0.5, 0.5], [0.0, 1.0, -1.0]])
    assert torch.equal(
        condition_vector(c_src, c_diff, "diff", gains), torch.tensor([[-1.0, 1.0, 0.5], [0.0, 2.0, -1.0]])
    )
    # target coding: only the Bangs move away from the source is doubled
    plain, own = condition_vector(c_src, c_diff, "target"), condition_vector(c_src, c_diff, "target", gains)
    assert torch.equal(own[:, [0, 2]], plain[:, [0, 2]]) and torch.equal(own[:, 1], torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match="Mustache"):
        edit_gain_spec(attrs, 1.0, {"Mustache": 1.5})
    with pytest.raises(ValueError, match="exactly"):
        gain_vector(attrs, {"Bangs": 2.0})


def test_encoded_select_and_cat_round_trip() -> None:
    arch, cfg = get_preset("mugan-tiny")
    gen = build(arch, cfg).eval()
    x, c = _inputs(cfg, batch=4)
    with torch.no_grad():
        enc = gen.encode(x)
        parts = [enc.select(i) for i in range(4)]
        joined = Encoded.cat(parts)
        torch.testing.assert_close(gen.decode(joined, c)[0], gen.decode(enc, c)[0])


@pytest.mark.parametrize("upsample", ["deconv", "resize"])
def test_prepared_decode_equals_plain_decode(upsample: str) -> None:
    """STGAN's STU gate terms on the encoder features, computed once per face, change no output: not for
    one condition, not for a merged batch, not after the weights change (the split kernels are kept)."""
    arch, cfg = get_preset("stgan-tiny")
    gen = build(arch, dataclasses.replace(cfg, upsample=upsample)).eval()
    x, c = _inputs(cfg, batch=3)
    with torch.no_grad():
        enc = gen.encode(x)
        prepared = gen.prepare_decode(enc)
        # one per STU, and with resize up-sampling the first decoder layer's and the first STU's
        assert len(prepared.decoder_terms) == cfg.n_skip_layers + (2 if upsample == "resize" else 0)
        assert gen.prepare_decode(prepared) is prepared
        for c_move in (c, -c, 2.5 * c):
            want, want_mask = gen.decode(enc, c_move)
            got, got_mask = gen.decode(prepared, c_move)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got_mask, want_mask, atol=1e-5, rtol=1e-4)
        merged = Encoded.cat([prepared.select(2), prepared.select(slice(0, 2))])
        full = gen.decode(enc, c)[0]
        torch.testing.assert_close(gen.decode(merged, c[[2, 0, 1]])[0], full[[2, 0, 1]], atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="prepared and unprepared"):
            Encoded.cat([prepared.select(0), enc.select(1)])
        gen.stus[0].hidden.weight.mul_(0.5)  # the kept split kernels must notice
        torch.testing.assert_close(
            gen.decode(gen.prepare_decode(gen.encode(x)), c)[0], gen.decode(gen.encode(x), c)[0], atol=1e-5, rtol=1e-4
        )
    mugan_arch, mugan_cfg = get_preset("mugan-tiny")
    for mugan_upsample, n_terms in (("deconv", 0), ("resize", 1)):
        mugan = build(mugan_arch, dataclasses.replace(mugan_cfg, upsample=mugan_upsample)).eval()
        with torch.no_grad():
            plain = mugan.encode(x)
            prepared = mugan.prepare_decode(plain)
            assert len(prepared.decoder_terms) == n_terms  # no STUs: at most the first decoder layer's
            torch.testing.assert_close(mugan.decode(prepared, c)[0], mugan.decode(plain, c)[0], atol=1e-5, rtol=1e-4)


def test_presets_include_paper_sizes() -> None:
    presets = all_presets()
    assert presets["stgan"][1].base_channels == 64 and presets["stgan"][1].image_size == 128
    assert presets["stgan"][1].skip == "stu" and presets["stgan"][1].conditioning == "diff"
    assert presets["mugan"][1].skip == "auc" and presets["mugan"][1].conditioning == "target"
    assert presets["attgan"][1].skip == "concat"
    assert {"stgan-cpu", "mugan-cpu"} <= set(presets)
    assert set(GENERATOR_ARCHITECTURES) == {"attgan", "stgan", "mugan", "stargan"}
    assert ARCHITECTURES["classifier"].kind == "classifier"


def test_config_round_trip_and_errors() -> None:
    _, cfg = get_preset("mugan-cpu")
    data = config_to_dict(cfg)
    assert config_from_dict(EncoderDecoderConfig, data) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict(EncoderDecoderConfig, data | {"wings": 2})
    with pytest.raises(ValueError, match="base_channels"):
        config_from_dict(EncoderDecoderConfig, data | {"base_channels": "many"})
    with pytest.raises(ValueError, match="skip"):
        config_from_dict(EncoderDecoderConfig, data | {"skip": "teleport"})
    # any identifier is an attribute (a user's own column); malformed names are refused by name
    assert validate_attributes(["Bald", "Purple_Hair"]) == ("Bald", "Purple_Hair")
    with pytest.raises(ValueError, match="Purple-Hair"):
        validate_attributes(["Bald", "Purple-Hair"])


def test_self_attention_is_sagan_attention() -> None:
    torch.manual_seed(0)
    sa = SelfAttention(16).double()
    with torch.no_grad():
        sa.gamma.fill_(0.7)
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    # reference: out = gamma * (V softmax(Q^T K)^T) + x, per pixel, as SAGAN writes it
    q, k, v = (m(x).flatten(2) for m in (sa.query, sa.key, sa.value))  # B, C', N
    beta = torch.softmax(torch.einsum("bci,bcj->bij", q, k), dim=-1)  # B, N(query), N(key)
    ref = 0.7 * torch.einsum("bcj,bij->bci", v, beta).reshape(2, 16, 5, 6) + x
    torch.testing.assert_close(sa(x), ref)
    with torch.no_grad():
        sa.gamma.zero_()
    torch.testing.assert_close(sa(x), x)  # gamma starts at 0: identity


@pytest.mark.parametrize("preset", ["stgan-cpu", "mugan-cpu"])
def test_a_channels_last_generator_stays_channels_last_through_its_decoder(preset: str) -> None:
    """Every conv of the decoder gets a channels_last input when the face does (a layer fed NCHW makes
    oneDNN convert back and forth)."""
    arch, cfg = get_preset(preset)
    net = build(arch, cfg).eval().to(memory_format=torch.channels_last)
    x, c = _inputs(cfg, batch=2)
    nchw: list[str] = []

    def check(name: str) -> object:
        def hook(_: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            h = args[0]
            if h.shape[2] * h.shape[3] > 1 and not h.is_contiguous(memory_format=torch.channels_last):
                nchw.append(f"{name} {tuple(h.shape)}")

        return hook

    for name, module in net.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) or type(module).__name__ == "ResizeConv":
            module.register_forward_pre_hook(check(name))
    with torch.no_grad():
        net.decode(net.encode(x.contiguous(memory_format=torch.channels_last)), c)
    assert not nchw, nchw


def test_a_resize_conv_takes_the_condition_as_a_bias() -> None:
    """The condition's tiled channels, constant over the image, reach every output pixel alike: as a bias
    the layer gives what it gives them concatenated, borders included, and the same gradients."""
    from models.blocks import ResizeConv, cat_condition

    torch.manual_seed(0)
    layer = ResizeConv(6 + 3, 5)
    x = torch.randn(2, 6, 7, 5, requires_grad=True)
    c = torch.randn(2, 3, requires_grad=True)
    want = layer.reference_forward(cat_condition(x, c))
    got = layer(x, c)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (x, c, layer.weight, layer.bias), grad_out)
    got_grads = torch.autograd.grad(got, (x, c, layer.weight, layer.bias), grad_out)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # eval mode keeps the 4x4 kernel: the slice must follow the weight
        layer.eval()
        torch.testing.assert_close(layer(x, c), layer(cat_condition(x, c)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="condition channels"):
        layer(x, c[:, :2])


@pytest.mark.parametrize("with_condition", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_resize_conv_takes_its_kernel_gradient_from_the_uncropped_conv(
    with_condition: bool, channels_last: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In training on a CPU a resize conv's backward takes the 4×4 kernel's gradient from the padding-1
    transposed conv with the output gradient zero-padded: the output and every gradient are those of the
    literal resize + 3×3 conv (odd, unequal sizes, so a misplaced border shows)."""
    import models.blocks
    from models.blocks import ResizeConv, cat_condition

    calls = []
    kernel_grad = models.blocks._kernel_grad_uncropped
    monkeypatch.setattr(models.blocks, "_kernel_grad_uncropped", lambda *a: calls.append(1) or kernel_grad(*a))
    torch.manual_seed(0)
    n_cond = 3 if with_condition else 0
    layer = ResizeConv(5 + n_cond, 6)
    x = torch.randn(2, 5, 7, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    c = torch.randn(2, n_cond, requires_grad=True)
    got = layer(x, c) if with_condition else layer(x)
    want = layer.reference_forward(cat_condition(x, c) if with_condition else x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    inputs = (x, layer.weight, layer.bias) + ((c,) if with_condition else ())
    grad_out = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, inputs, grad_out)
    want_grads = torch.autograd.grad(want, inputs, grad_out)
    assert calls, "the uncropped conv's kernel gradient was not used"
    for name, g, w in zip(("x", "weight", "bias", "c"), got_grads, want_grads, strict=False):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")


def test_the_strided_transposed_conv_passes_gradcheck_and_follows_bf16_autocast() -> None:
    from models.blocks import _StridedTransposedConv, resize_transposed_conv

    gen = torch.Generator().manual_seed(0)
    x_pad, kernel, bias = (
        torch.randn(shape, dtype=torch.double, generator=gen, requires_grad=True)
        for shape in ((2, 3, 5, 6), (3, 2, 4, 4), (2,))
    )
    assert torch.autograd.gradcheck(_StridedTransposedConv.apply, (x_pad, kernel, bias))
    # under autocast it runs in bf16, as the conv it replaces does, with the same gradients
    x_pad = torch.randn(4, 16, 6, 7, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    kernel = (0.1 * torch.randn(16, 40, 4, 4, generator=gen)).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        got = resize_transposed_conv(x_pad, kernel, None)
        want = torch.nn.functional.conv_transpose2d(x_pad, kernel, None, stride=2, padding=3)
    assert got.dtype == want.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    grad_out = torch.randn(got.shape, generator=gen)
    for g, w in zip(
        torch.autograd.grad(got, (x_pad, kernel), grad_out),
        torch.autograd.grad(want, (x_pad, kernel), grad_out),
        strict=True,
    ):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=0.02 * float(w.abs().max()), rtol=0)


@pytest.mark.parametrize(
    ("preset", "changes", "fewer_flops"),
    [
        ("stgan-tiny", {}, True),
        ("mugan-tiny", {}, False),  # its attention follows every injection: nothing to save after the first
        ("mugan-tiny", {"dec_attention": ()}, True),
    ],
)
def test_decoders_hand_the_condition_to_resize_convs_with_the_same_outputs(
    preset: str, changes: dict[str, object], fewer_flops: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoded with the condition as a bias of each resize conv it enters (every decoder and STU layer that
    reads it directly, not one after MU-GAN's attention, which mixes it), a generator gives what it gives
    with the condition concatenated everywhere, in fewer FLOPs where the condition reaches such a layer."""
    from torch.utils.flop_counter import FlopCounterMode

    import models.blocks
    import models.generators
    from models.blocks import cat_condition

    arch, cfg = get_preset(preset)
    gen = build(arch, dataclasses.replace(cfg, upsample="resize", **changes)).eval()
    x, c = _inputs(cfg, batch=2)

    def decode() -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        with torch.no_grad():
            encoded = gen.prepare_decode(gen.encode(x))
            gen.decode(encoded, c)  # the resize convs' kept kernels computed before counting
            with FlopCounterMode(display=False) as counter:
                out = gen.decode(encoded, c)
        return out, counter.get_total_flops()

    (got, got_mask), got_flops = decode()

    def concatenated(layer: torch.nn.Module, h: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return layer(h if cond is None else cat_condition(h, cond))

    for module in (models.blocks, models.generators):
        monkeypatch.setattr(module, "upsample_with_condition", concatenated)
    (want, want_mask), want_flops = decode()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_mask, want_mask, atol=1e-5, rtol=1e-4)
    assert got_flops < want_flops if fewer_flops else got_flops == want_flops
