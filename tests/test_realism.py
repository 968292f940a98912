"""Realism measures (matched KID / FID, background change), checkerboard-free up-sampling, and how
selection and calibration use realism."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from models.blocks import ResizeConv, UpBlock, replicate_pad1, resize_weight_from_deconv
from models.generators import convert_upsampling
from models.registry import build, get_preset
from training.metrics import choose_gain, selection_score
from training.realism import (
    FeatureCache,
    FeatureExtractor,
    RealismConfig,
    RealismUnavailableError,
    SplitFaces,
    background_change,
    fid,
    inception_path,
    kid,
    realism_penalty,
    realism_report,
)
from training.reports import realism_markdown


def _inception_or_skip() -> Path:
    try:
        return inception_path()
    except RealismUnavailableError as exc:  # CI installs it (.ci/setup.sh); a bare checkout may not
        pytest.skip(str(exc))


def _faces(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields as uint8 (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (img * 255).round().to(torch.uint8)


# ------------------------------------------------------------------ KID / FID


def test_kid_of_identical_feature_sets_is_zero_in_expectation_and_positive_for_shifted_ones() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    same, _ = kid(a, a.copy(), n_subsets=20, subset_size=100)
    b = rng.normal(size=(200, 16))
    independent, _ = kid(a, b, n_subsets=20, subset_size=100)
    shifted, _ = kid(a, b + 1.0, n_subsets=20, subset_size=100)
    # the unbiased estimator of identical sets is ~0 (not exactly: subsets are drawn independently)
    assert abs(same) < 0.05 * shifted
    assert abs(independent) < 0.05 * shifted
    assert shifted > 0.1
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid(a, b + 1.0) > fid(a, b)


@pytest.mark.parametrize(("n_a", "n_b", "dims"), [(12, 15, 40), (300, 250, 24)])  # fewer samples than dims; more
def test_fid_equals_the_matrix_square_root_form(n_a: int, n_b: int, dims: int) -> None:
    from scipy import linalg

    rng = np.random.default_rng(1)
    mix = rng.normal(size=(dims, dims))
    a = np.maximum(rng.normal(size=(n_a, dims)) @ mix, 0)  # non-negative and correlated, as Inception's pool features
    b = np.maximum((rng.normal(size=(n_b, dims)) + 0.3) @ mix, 0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = (
        ((a.mean(0) - b.mean(0)) ** 2).sum()
        + np.trace(cov_a)
        + np.trace(cov_b)
        - 2 * np.trace(linalg.sqrtm(cov_a @ cov_b)).real
    )
    assert fid(a, b) == pytest.approx(reference, rel=1e-6)


@pytest.mark.slow
def test_inception_kid_sees_noise_and_caches_real_features(tmp_path: Path) -> None:
    path = _inception_or_skip()
    torch.manual_seed(0)
    extractor = FeatureExtractor(path, batch_size=8)
    images = _faces(12)
    noisy = (images.float() + torch.randn(images.shape) * 60).clamp(0, 255).to(torch.uint8)
    cache = FeatureCache(tmp_path / "features", extractor)
    loads: list[int] = []

    def load(rows: np.ndarray) -> torch.Tensor:
        loads.append(len(rows))
        return images[torch.as_tensor(rows)]

    rows = np.arange(12)
    f_real = cache.features("tiny:test", rows, load)
    assert f_real.shape == (12, 2048)
    again = FeatureCache(tmp_path / "features", extractor).features("tiny:test", rows[::-1], load)
    assert loads == [12]  # the second call read every row from disk
    np.testing.assert_allclose(again, f_real[::-1])
    f_same = extractor(images)
    f_noisy = extractor(noisy)
    kid_same, _ = kid(f_same, f_real, n_subsets=10, subset_size=12)
    kid_noisy, _ = kid(f_noisy, f_real, n_subsets=10, subset_size=12)
    # the unbiased estimator of a set against itself is slightly negative (its diagonal), not exactly 0
    assert abs(kid_same) < 0.05 * kid_noisy
    assert kid_noisy > 0.1


# ------------------------------------------------------------------ background change


def test_background_change_is_exact_on_a_synthetic_edit() -> None:
    x = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    edit = x.clone()
    edit[0, :, 16:48, 16:48] = 200  # the face only: corners untouched
    edit[1, :, :8, :8] = 80  # the whole top-left corner square (side/8 = 8) by 80
    edit[1, 0, -8:, -8:] = 30  # one channel of the bottom-right square by 30
    change = background_change(edit, x)
    assert change[0].item() == 0.0
    assert change[1].item() == pytest.approx((80 + 30 / 3) / 4)
    # [-1, 1] floats are quantised to 8 bits first, as a PNG would be
    assert background_change(edit.float() / 127.5 - 1, x.float() / 127.5 - 1)[1].item() == pytest.approx(22.5)


# ------------------------------------------------------------------ up-sampling without checkerboard


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_resize_upsampling_of_a_constant_is_constant(norm: str) -> None:
    torch.manual_seed(0)
    block = UpBlock(5, 7, upsample="resize", norm=norm, act="relu").eval()
    out = block(torch.full((2, 5, 6, 6), 0.7))
    assert out.shape == (2, 7, 12, 12)
    spread = (out.amax(dim=(2, 3)) - out.amin(dim=(2, 3))).max().item()
    assert spread < 1e-5
    deconv = UpBlock(5, 7, upsample="deconv", norm=norm, act="none").eval()
    out = deconv(torch.full((2, 5, 6, 6), 0.7))
    inner = out[..., 2:-2, 2:-2]  # away from the borders, the four phases still differ
    assert (inner.amax(dim=(2, 3)) - inner.amin(dim=(2, 3))).max().item() > 1e-3


def test_fused_resize_conv_equals_nearest_resize_then_3x3_conv() -> None:
    torch.manual_seed(0)
    layer = ResizeConv(4, 6)
    x = torch.randn(3, 4, 7, 5)
    torch.testing.assert_close(layer(x), layer.reference_forward(x), atol=1e-5, rtol=1e-5)


def test_resize_conv_pads_in_bf16_under_autocast_with_no_fp32_round_trip() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate").dtype == torch.float32  # autocast's cast
        padded = replicate_pad1(x)
    assert padded.dtype == torch.bfloat16
    assert padded.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(padded.float(), torch.nn.functional.pad(x.float(), (1, 1, 1, 1), mode="replicate"))
    layer = ResizeConv(4, 6)
    x_grad = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x_grad)
    out.float().sum().backward()
    graph, stack = [], [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            graph.append(type(node).__name__)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert "ReplicationPad2DBackward0" in graph
    assert x_grad.grad is not None and x_grad.grad.dtype == torch.bfloat16
    assert graph.count("ToCopyBackward0") == 2  # the bias's cast and the weight's into its kernel; none at the pad


def test_resize_conv_keeps_its_kernel_in_eval_without_autograd_until_the_weight_changes() -> None:
    torch.manual_seed(0)
    layer = ResizeConv(4, 6).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        first = layer(x)
        cached = layer._kernel_cache
        assert cached is not None
        torch.testing.assert_close(layer(x), first, atol=0, rtol=0)
        assert layer._kernel_cache is cached  # the kernel was not recomputed
        layer.weight.mul_(-1)  # what load_state_dict or an EMA update does: in place
        torch.testing.assert_close(layer(x), layer.reference_forward(x), atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a kernel of its own, as autocast computes it
            got = layer(x)
            assert got.dtype == torch.bfloat16
            with torch.enable_grad():
                torch.testing.assert_close(got, layer(x).detach(), atol=0, rtol=0)


def test_resize_conv_never_serves_a_stale_kernel_after_a_fused_optimiser_step() -> None:
    torch.manual_seed(0)
    layer = ResizeConv(4, 6)
    x = torch.randn(2, 4, 5, 5)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)  # does not bump the weight's version
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        with torch.no_grad():
            layer(x)  # a validation pass between steps
        layer.train()
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        getattr(layer, mode)()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.reference_forward(x), atol=1e-5, rtol=1e-5)


def test_a_baked_resize_conv_kernel_is_a_constant_of_the_compiled_graph_until_train_or_eval() -> None:
    torch.manual_seed(0)
    layer = ResizeConv(4, 6).eval()
    x = torch.randn(2, 4, 5, 5)

    def traced_ops() -> set[str]:
        graphs: list[torch.fx.GraphModule] = []

        def backend(gm: torch.fx.GraphModule, _: list[torch.Tensor]) -> object:
            graphs.append(gm)
            return gm.forward

        torch._dynamo.reset()
        with torch.no_grad():
            got = torch.compile(layer, backend=backend)(x)
        torch.testing.assert_close(got, layer.reference_forward(x), atol=1e-5, rtol=1e-5)
        return {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}

    assert any("einsum" in op for op in traced_ops())  # not baked: the kernel is computed in the graph
    layer.bake_kernel()
    assert not any("einsum" in op for op in traced_ops())  # baked: a constant, which freezing prepacks
    with torch.no_grad():
        layer.weight.mul_(-1)
    layer.eval()  # a weight changed after baking: eval()/train() drop the baked kernel
    assert layer._baked_kernel is None and any("einsum" in op for op in traced_ops())
    torch._dynamo.reset()


def test_deconv_kernels_convert_to_the_least_squares_resize_kernel() -> None:
    torch.manual_seed(0)
    resize = ResizeConv(3, 2, bias=False)
    # a transposed conv whose four phases come from one 3x3 kernel converts back to that kernel exactly
    deconv_weight = resize.transposed_kernel().detach()
    torch.testing.assert_close(resize_weight_from_deconv(deconv_weight), resize.weight.detach(), atol=1e-5, rtol=0)

    arch, cfg = get_preset("stgan-tiny")
    old = build(arch, dataclasses.replace(cfg, upsample="deconv"))
    new = build(arch, dataclasses.replace(cfg, upsample="resize"))
    converted = convert_upsampling(old.state_dict(), new)
    new.load_state_dict(converted)  # every tensor fits
    torch.testing.assert_close(converted["encoder.0.0.weight"], old.state_dict()["encoder.0.0.weight"])


# ------------------------------------------------------------------ the report on tiny data


@pytest.mark.slow
def test_realism_report_on_a_tiny_model(tmp_path: Path) -> None:
    path = _inception_or_skip()
    torch.manual_seed(0)
    arch, cfg = get_preset("stgan-tiny")
    gen = build(arch, cfg).eval()
    attrs = tuple(cfg.attributes)
    g = torch.Generator().manual_seed(1)
    faces = SplitFaces("tiny:test", _faces(10).permute(0, 2, 3, 1), torch.randint(0, 2, (10, len(attrs)), generator=g))
    other = SplitFaces("tiny:val", _faces(10, seed=1).permute(0, 2, 3, 1), torch.randint(0, 2, (10, 13), generator=g))
    cache = FeatureCache(tmp_path / "f", FeatureExtractor(path, batch_size=32))
    config = RealismConfig(n_faces=3, n_combined=4, n_subsets=3, batch_size=13)
    report = realism_report(gen, faces, other, attrs, cache, 1.0, config)
    assert report["protocol"]["single_edits"] == 3 * len(attrs)
    assert set(report["kid_x1000_per_attribute"]) == set(attrs)
    assert report["kid_x1000_worst"] == max(report["kid_x1000_per_attribute"].values())
    assert "kid_x1000_combined" in report
    assert "| Bald |" in realism_markdown(report)
    probe = {k: report[k] for k in ("kid_x1000", "kid_x1000_worst", "background_change_worst", "protocol")}
    assert "Realism probe" in realism_markdown(probe)  # the trainer's val probe renders too


# ------------------------------------------------------------------ selection and calibration


def _val_metrics(edit: float, kid_x1000: float | None = None, background: float = 0.0) -> dict:
    m = {"psnr": 40.0, "ssim": 0.99, "mean_edit_success": edit, "mean_preservation": 0.95}
    if kid_x1000 is not None:
        m["realism"] = {"kid_x1000": kid_x1000, "background_change_worst": background}
    return m


def test_selection_ranks_a_realism_regression_below_a_checkpoint_without_one() -> None:
    steady = _val_metrics(0.80, kid_x1000=8.0, background=1.0)
    texture = _val_metrics(0.85, kid_x1000=40.0, background=1.0)  # 5 points more edit success, 5x the KID
    recolour = _val_metrics(0.85, kid_x1000=8.0, background=30.0)  # same, but the background changes
    assert selection_score(steady) > selection_score(texture)
    assert selection_score(steady) > selection_score(recolour)
    assert realism_penalty(_val_metrics(0.8)) == 0.0  # unmeasured realism changes nothing


def test_calibration_does_not_buy_edit_success_with_realism() -> None:
    rows = [
        {"edit_gain": 1.5, "mean_edit_success": 0.80, "mean_preservation": 0.95},
        {"edit_gain": 2.0, "mean_edit_success": 0.84, "mean_preservation": 0.94},
    ]
    assert choose_gain(rows, 0.92) == 2.0
    rows[0]["realism"] = {"kid_x1000": 10.0, "background_change_worst": 1.0}
    rows[1]["realism"] = {"kid_x1000": 30.0, "background_change_worst": 6.0}
    assert choose_gain(rows, 0.92) == 1.5


def test_a_slider_gets_its_own_gain_only_where_its_edits_gain_without_artifacts() -> None:
    from training.metrics import choose_attribute_gains
    from training.reports import calibration_table

    attrs = ("Bald", "Mustache", "Young")

    def row(gain: float, edit: dict, kid: dict, background: dict | None = None) -> dict:
        return {
            "edit_gain": gain,
            "mean_edit_success": float(np.mean(list(edit.values()))),
            "mean_preservation": 0.93,
            "edit_success": edit,
            "preservation": dict.fromkeys(attrs, 0.93),
            "realism": {
                "kid_x1000": 10.0,
                "background_change_worst": 1.0,
                "kid_x1000_per_attribute": kid,
                "background_change": background or dict.fromkeys(attrs, 0.5),
            },
        }

    rows = [
        row(1.0, {"Bald": 0.20, "Mustache": 0.45, "Young": 0.95}, {"Bald": 60.0, "Mustache": 30.0, "Young": 5.0}),
        # ×1.5: Mustache +30 points at +5 KID (worth it); Bald +20 points at +60 KID (not); Young nothing
        row(1.5, {"Bald": 0.40, "Mustache": 0.75, "Young": 0.95}, {"Bald": 120.0, "Mustache": 35.0, "Young": 5.0}),
    ]
    assert choose_attribute_gains(rows, 1.0, attrs) == {"Mustache": 1.5}  # Young ties: the common gain
    # a background that changes a lot at ×1.5 keeps Mustache at the common gain too
    rows[1]["realism"]["background_change"]["Mustache"] = 40.0
    assert choose_attribute_gains(rows, 1.0, attrs) == {}
    # from a common gain of ×1.5, the sliders better at ×1 get ×1 of their own
    assert choose_attribute_gains(rows, 1.5, attrs) == {"Bald": 1.0, "Mustache": 1.0}
    del rows[0]["realism"]["kid_x1000_per_attribute"]
    with pytest.raises(ValueError, match="per-attribute"):
        choose_attribute_gains(rows, 1.0, attrs)
    rows[0]["realism"]["kid_x1000_per_attribute"] = {"Bald": 60.0, "Mustache": 30.0, "Young": 5.0}
    calibration = {"n_images": 10, "split": "val", "min_preservation": 0.92, "chosen": 1.0, "rows": rows}
    table = calibration_table(calibration | {"per_attribute": True, "attribute_gains": {"Bald": 1.5}})
    assert (
        "own gain: Bald ×1.5" in table
        and "| Bald | 20% / 93% / 60.0 / 0.50 | 40% / 93% / 120.0 / 0.50 | ×1.5 |" in table
    )
    assert "| Young |" in table and "| Young |" not in calibration_table(calibration)
    # the common gain's row says which sliders it serves
    assert "| ×1 ← sliders without a gain of their own |" in table and "← served" not in table


def test_the_background_loss_sees_changes_off_the_face_only() -> None:
    from training.losses import background_change, background_map

    weight = background_map(32)
    assert weight[0, 0, 16, 16] == 0 and weight[0, 0, 0, 0] == 1 and weight[0, 0, -1, -1] == 1
    x = torch.zeros(1, 3, 32, 32)
    face_edit = x.clone()
    face_edit[..., 10:22, 10:22] = 1.0  # the middle of the crop
    corner_edit = x.clone()
    corner_edit[..., :4, :4] = 1.0
    assert background_change(face_edit, x, weight)[0].item() == 0.0
    assert background_change(corner_edit, x, weight)[0].item() > 0.01


def test_the_card_says_when_no_gain_kept_the_preservation() -> None:
    from training.reports import calibration_table

    def row(gain: float, preservation: float) -> dict:
        return {"edit_gain": gain, "mean_edit_success": 0.8, "mean_preservation": preservation}

    kept = {
        "n_images": 10,
        "split": "val",
        "min_preservation": 0.92,
        "chosen": 1.5,
        "rows": [row(1.0, 0.95), row(1.5, 0.93)],
    }
    none = kept | {"chosen": 1.0, "rows": [row(1.0, 0.90), row(1.5, 0.89)]}
    assert "fallback" not in calibration_table(kept) and "| ×1.5 ← served |" in calibration_table(kept)
    assert "No gain kept that preservation" in calibration_table(none) and "| ×1 ← served |" in calibration_table(none)
