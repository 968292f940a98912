"""Shared building blocks: conv/deconv blocks, SAGAN self-attention, STGAN's STU, MU-GAN's AUC."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


def activation(kind: str) -> nn.Module:
    if kind == "lrelu":
        return nn.LeakyReLU(0.2)
    if kind == "relu":
        return nn.ReLU()
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown activation {kind!r}")


class ConvBlock(nn.Sequential):
    """Conv (default 4x4 stride 2) + norm + activation; no conv bias when a norm follows."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        kernel: int = 4,
        stride: int = 2,
        padding: int = 1,
        norm: str = "batch",
        act: str = "lrelu",
        transposed: bool = False,
    ) -> None:
        conv_cls = nn.ConvTranspose2d if transposed else nn.Conv2d
        super().__init__(
            conv_cls(in_ch, out_ch, kernel, stride, padding, bias=norm == "none"),
            norm_layer(norm, out_ch),
            activation(act),
        )


UPSAMPLING = ("deconv", "resize")


#: Row j of this matrix says which taps of a 3-tap kernel land on offset j - 1 of a ×2 nearest-upsampled
#: signal, seen from one low-resolution pixel (see :class:`ResizeConv`).
_RESIZE_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def tracing() -> bool:
    """Whether the code runs under a tracer (``torch.compile`` or ``torch.export``, whose non-strict mode
    ``is_compiling`` does not report): tensors may be fakes without data, so nothing is cached."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def replicate_pad1(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its border pixels repeated once on each side, in ``x``'s dtype. CPU autocast lists
    ``replication_pad2d`` among its fp32 ops: under bf16 it cast a decoder's largest activations to fp32 for
    the pad and back for the next conv, forward and backward (a pad only copies values, so the round trip
    changed nothing). In a bf16 STGAN-cpu training step on the 2-core EPYC with avx512-bf16 those casts and
    the fp32 pad's backward took about 300 ms of 1.56 s (torch.profiler, one step)."""
    if tracing() and torch.is_grad_enabled():
        # compiled for training (training.trainer): inductor could not lower replication_pad2d_backward
        # (its strides); as concatenations it lowers the pad and its gradient (the same values)
        x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)
        return torch.cat([x[:, :, :, :1], x, x[:, :, :, -1:]], dim=3)
    with torch.autocast(x.device.type, enabled=False):
        return F.pad(x, (1, 1, 1, 1), mode="replicate")


def _kernel_grad_uncropped(grad_out: torch.Tensor, x_pad: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """The gradient of ``kernel`` in ``conv_transpose2d(x_pad, kernel, stride=2, padding=3)``.

    A transposed conv's padding crops its output: at padding 3 the output is that of padding 1 without its
    two outer rows and columns on each side, so the kernel's gradient is that of the padding-1 conv with the
    output gradient zero-padded by 2. oneDNN took the padding-1 form's weight gradient at 1.5–2.6× the
    speed of the padding-3 one at the CPU presets' decoder shapes (bf16 on a Xeon with AMX, batch 32: 17
    against 38 ms at 128 -> 64 channels and a 64×64 output; fp32 1.0–1.7×), where the padding-3 one ran at
    a seventh of its forward's speed; the input gradient stays at padding 3, the faster form for it."""
    return torch.ops.aten.convolution_backward(
        F.pad(grad_out, (2, 2, 2, 2)),
        x_pad,
        kernel,
        None,
        [2, 2],
        [1, 1],
        [1, 1],
        True,
        [0, 0],
        1,
        [False, True, False],
    )[1]


class _StridedTransposedConv(torch.autograd.Function):
    """``conv_transpose2d(x_pad, kernel, bias, stride=2, padding=3)`` whose backward takes the kernel's
    gradient from the uncropped conv (:func:`_kernel_grad_uncropped`); the input's gradient is autograd's."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x_pad: torch.Tensor,
        kernel: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.save_for_backward(x_pad, kernel)
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        return F.conv_transpose2d(x_pad, kernel, bias, stride=2, padding=3)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        x_pad, kernel = ctx.saved_tensors  # type: ignore[attr-defined]
        channels_last = x_pad.is_contiguous(memory_format=torch.channels_last)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        need_x, need_kernel, need_bias = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_x = grad_kernel = grad_bias = None
        if need_x:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x_pad, kernel, None, [2, 2], [3, 3], [1, 1], True, [0, 0], 1, [True, False, False]
            )[0]
        if need_kernel:
            grad_kernel = _kernel_grad_uncropped(grad_out, x_pad, kernel)
        if need_bias and ctx.has_bias:  # type: ignore[attr-defined]
            grad_bias = grad_out.sum(dim=(0, 2, 3))
        return grad_x, grad_kernel, grad_bias


def resize_transposed_conv(x_pad: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv_transpose2d(x_pad, kernel, bias, stride=2, padding=3)``, :class:`ResizeConv`'s core. When the
    kernel's gradient is wanted on a CPU, the backward takes it from the uncropped conv (the same values; a
    bf16 training step 1.11× (STGAN-cpu) and 1.15× (MU-GAN-cpu) faster on a Xeon with AMX, bench/RESULTS.md);
    autocast's cast is done here, as it would be for the conv."""
    if not (torch.is_grad_enabled() and kernel.requires_grad and x_pad.device.type == "cpu"):
        return F.conv_transpose2d(x_pad, kernel, bias, stride=2, padding=3)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x_pad.dtype
    with torch.autocast("cpu", enabled=False):
        return _StridedTransposedConv.apply(x_pad.to(dtype), kernel.to(dtype), None if bias is None else bias.to(dtype))


class ResizeConv(nn.Module):
    """×2 nearest-neighbour resize, then a 3×3 conv with reflected borders (Odena et al., 2016).

    A 4×4 stride-2 transposed conv gives the four output phases independent kernels, which draws a
    checkerboard into images and masks; here every phase derives from one 3×3 kernel, so a constant
    input gives a constant output, borders included.

    Computed without materialising the ×4 larger resized tensor: nearest ×2 followed by a 3×3 conv is
    a stride-2 transposed conv with the 4×4 kernel ``A W Aᵀ`` (``A`` = ``_RESIZE_TAPS``), and a
    reflected border of the resized image is a replicated border of the input. That costs what the
    4×4 transposed conv costs, 2.25x fewer multiply-adds than the 3×3 conv at the high resolution
    (:meth:`reference_forward` is the literal version; a test holds them equal).
    """

    def __init__(self, in_ch: int, out_ch: int, bias: bool = True) -> None:
        super().__init__()
        conv = nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=bias)  # for its default initialisation
        self.weight = conv.weight
        self.bias = conv.bias
        self._kernel_cache: tuple[tuple[object, ...], torch.Tensor] | None = None
        #: The 4×4 kernel as a constant for a compiled decoder (:meth:`bake_kernel`); None otherwise.
        self._baked_kernel: torch.Tensor | None = None

    def bake_kernel(self) -> None:
        """Keep the 4×4 kernel of the current weight for a decoder about to be compiled with inductor's
        freezing (server/compiled.py). Traced, :meth:`_kernel_for` would recompute it in the graph: the
        einsum was not folded away (two bmm per layer, a third of the compiled STGAN decode) and the
        transposed conv, fed a computed kernel, was not prepacked. Dropped by train() and eval(): the
        weight may change after that."""
        self._baked_kernel = self.transposed_kernel().detach()

    def transposed_kernel(self) -> torch.Tensor:
        taps = _RESIZE_TAPS.to(self.weight)
        # (out, in, 3, 3) -> (in, out, 4, 4), the layout conv_transpose2d takes
        return torch.einsum("ja,oiab,kb->iojk", taps, self.weight, taps)

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """``c``: a (B, n) condition that :func:`cat_condition` would tile after ``x``'s channels (the
        weight's last ``n`` input channels read it). A constant map stays constant through the resize,
        the reflected border and the 3×3 conv, so its share of every output pixel is the same: ``c``
        enters as a per-image bias (``c`` times the kernel's sum over its taps), the same output as
        ``self(cat_condition(x, c))`` without the condition's multiply-adds or the tiled copy."""
        if c is None:
            x = replicate_pad1(x)
            return resize_transposed_conv(x, self._kernel_for(x), self._bias(x))
        if x.shape[1] + c.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"{x.shape[1]} image and {c.shape[1]} condition channels for a {self.weight.shape[1]}-channel conv"
            )
        return self.from_image_term(self.image_term(x), c)

    def image_term(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the output that reads ``x`` (the input channels before a condition's), without the
        bias: no condition changes it, so a caller decoding one ``x`` under many conditions computes it
        once (:meth:`from_image_term`)."""
        kernel = self._kernel_for(x)[: x.shape[1]]
        return resize_transposed_conv(replicate_pad1(x), kernel, None)

    def from_image_term(self, term: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``self(x, c)`` given ``term = self.image_term(x)``: the bias and the condition's bias added."""
        n = self.weight.shape[1] - c.shape[1]
        bias = F.linear(c.to(term.dtype), self.weight[:, n:].sum(dim=(2, 3)).to(term.dtype), self._bias(term))
        return term + bias[:, :, None, None]

    def _kernel_for(self, x: torch.Tensor) -> torch.Tensor:
        """The 4×4 kernel in ``x``'s dtype. In eval mode without autograd (serving, evaluation) it is kept
        until the weight changes: recomputing it (an einsum and its copies) took 45 % of a batch-1 STGAN
        decode. Never in training mode: a fused optimiser step changes the weight without bumping its
        version counter, so the key below cannot see it; switching modes drops the kernel."""
        if tracing() and self._baked_kernel is not None and not self.training:
            return self._baked_kernel.to(x.dtype)
        if self.training or torch.is_grad_enabled() or tracing():
            return self.transposed_kernel().to(x.dtype)
        w = self.weight
        key = (w._version, w.data_ptr(), w.device, x.dtype, torch.is_autocast_enabled(x.device.type))
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            self._kernel_cache = (key, self.transposed_kernel().to(x.dtype))
        return self._kernel_cache[1]

    def train(self, mode: bool = True) -> ResizeConv:
        self._kernel_cache = None
        self._baked_kernel = None
        return super().train(mode)

    def _bias(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.pad(F.interpolate(x, scale_factor=2, mode="nearest"), (1, 1, 1, 1), mode="reflect")
        return F.conv2d(up, self.weight.to(x.dtype), self._bias(x))


def resize_weight_from_deconv(deconv_weight: torch.Tensor) -> torch.Tensor:
    """The 3×3 :class:`ResizeConv` kernel closest (least squares) to a 4×4 stride-2 transposed conv's.

    ``(in, out, 4, 4) -> (out, in, 3, 3)``: the four phases of the transposed conv averaged into the
    one kernel a resize conv has, so a released ``deconv`` generator can warm-start a ``resize`` one.
    """
    pinv = torch.linalg.pinv(_RESIZE_TAPS.double())  # (3, 4)
    w = torch.einsum("aj,iojk,bk->oiab", pinv, deconv_weight.double(), pinv)
    return w.to(deconv_weight.dtype)


def up_conv(in_ch: int, out_ch: int, upsample: str, bias: bool = True) -> nn.Module:
    """The ×2 up-sampling layer of a decoder: ``deconv`` (4×4 stride-2 transposed conv) or ``resize``."""
    if upsample == "deconv":
        return nn.ConvTranspose2d(in_ch, out_ch, 4, 2, 1, bias=bias)
    if upsample == "resize":
        return ResizeConv(in_ch, out_ch, bias=bias)
    raise ValueError(f"upsample must be one of {UPSAMPLING}, got {upsample!r}")


class UpBlock(nn.Sequential):
    """×2 up-sampling (see :func:`up_conv`) + norm + activation."""

    def __init__(self, in_ch: int, out_ch: int, *, upsample: str, norm: str = "batch", act: str = "relu") -> None:
        super().__init__(
            up_conv(in_ch, out_ch, upsample, bias=norm == "none"), norm_layer(norm, out_ch), activation(act)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """``c``: the condition as a bias of a :class:`ResizeConv` (see :func:`upsample_with_condition`)."""
        return self.after_upsample(upsample_with_condition(self[0], x, c))

    def after_upsample(self, h: torch.Tensor) -> torch.Tensor:
        """The norm and activation on the up-sampling layer's output ``h``."""
        for layer in list(self)[1:]:
            h = layer(h)
        return h


def upsample_with_condition(layer: nn.Module, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
    """``layer(cat_condition(x, c))`` (``layer(x)`` without ``c``), as a bias where the layer takes one."""
    if c is None:
        return layer(x)
    if isinstance(layer, ResizeConv):
        return layer(x, c)
    return layer(cat_condition(x, c))


def tile_condition(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Tile a (B, n) condition vector to (B, n, H, W) matching ``like``'s spatial size and dtype."""
    b, n = c.shape
    return c.to(like.dtype).view(b, n, 1, 1).expand(b, n, like.shape[2], like.shape[3])


def cat_condition(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``[h, c tiled]`` on the channel axis, in ``h``'s memory format. An expanded tile is contiguous in
    neither format, so ``torch.cat`` fell back to NCHW and every layer after it converted back: for a
    channels_last STGAN that was the whole decoder (bf16 training step on the AMX Xeon, one thread, three
    interleaved A/B pairs: STGAN-cpu 7.5-7.7 -> 8.0-8.6 images/s; MU-GAN-cpu 11.7-11.9 -> 11.1-12.4, noise)."""
    tile = tile_condition(c, h)
    if h.dim() == 4 and not h.is_contiguous() and h.is_contiguous(memory_format=torch.channels_last):
        tile = tile.contiguous(memory_format=torch.channels_last)
    return torch.cat([h, tile], dim=1)


class SelfAttention(nn.Module):
    """SAGAN self-attention: ``gamma * softmax(Q K^T) V + x`` with gamma starting at 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # B, HW, C/8
        k = self.key(x).flatten(2).transpose(1, 2)
        v = self.value(x).flatten(2).transpose(1, 2)  # B, HW, C
        # SAGAN has no 1/sqrt(d) scaling; keep the paper's softmax(Q K^T). Written out rather than with
        # F.scaled_dot_product_attention: V is wider than Q and K, which sends SDPA on CPU to its NaN-safe
        # math fallback, 2.8x slower forward + backward here (same result).
        attn = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)  # B, HW, HW
        o = torch.bmm(attn.to(v.dtype), v).transpose(1, 2).reshape(b, c, h, w)
        return self.gamma.to(o.dtype) * o + x


class SelectiveTransferUnit(nn.Module):
    """STGAN's STU: a GRU-like cell that selects what of an encoder feature reaches the decoder.

    ``s_hat = deconv([state, c])`` brings the deeper state up one resolution; reset ``r`` and update
    ``z`` gates read ``[f_enc, s_hat]``; ``s = r * s_hat`` is passed on as the next state and
    ``f_t = (1 - z) * s_hat + z * tanh(W_h [f_enc, s])`` goes to the decoder.
    """

    def __init__(self, enc_ch: int, state_ch: int, n_attrs: int, kernel: int = 3, upsample: str = "deconv") -> None:
        super().__init__()
        pad = kernel // 2
        self.upsample = up_conv(state_ch + n_attrs, enc_ch, upsample)
        self.reset_gate = nn.Conv2d(2 * enc_ch, enc_ch, kernel, padding=pad)
        self.update_gate = nn.Conv2d(2 * enc_ch, enc_ch, kernel, padding=pad)
        self.hidden = nn.Conv2d(2 * enc_ch, enc_ch, kernel, padding=pad)
        self._split_cache: (
            tuple[tuple[object, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None
        ) = None

    def gates(
        self, f_enc: torch.Tensor, state: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reset gate r, update gate z, up-sampled state s_hat). Returned, never stored on the module:
        the server runs one module from several threads."""
        s_hat = upsample_with_condition(self.upsample, state, c)
        both = torch.cat([f_enc, s_hat], dim=1)
        return torch.sigmoid(self.reset_gate(both)), torch.sigmoid(self.update_gate(both)), s_hat

    def forward(self, f_enc: torch.Tensor, state: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, z, s_hat = self.gates(f_enc, state, c)
        s_new = r * s_hat
        f_hat = torch.tanh(self.hidden(torch.cat([f_enc, s_new], dim=1)))
        f_t = (1 - z) * s_hat + z * f_hat
        return f_t, s_new

    def encoder_terms(self, f_enc: torch.Tensor) -> torch.Tensor:
        """The part of the reset, update and hidden convs over ``[f_enc, ·]`` that reads ``f_enc``, with
        their biases, stacked on the channel axis (``3 * enc_ch``). No condition changes it, so a caller
        that decodes one face many times computes it once (:meth:`forward_from_terms`)."""
        w_enc, bias, _, _ = self._split_weights()
        return F.conv2d(f_enc, w_enc, bias, padding=self.reset_gate.padding)

    def forward_from_terms(
        self, terms: torch.Tensor, state: torch.Tensor, c: torch.Tensor, state_term: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` given ``terms = encoder_terms(f_enc)``: the gates convolve only the state half
        of their input, half the multiply-adds. ``state_term``: ``self.upsample.image_term(state)`` where
        the state is known before the condition (the first STU's is the bottleneck feature)."""
        _, _, w_gates, w_hidden = self._split_weights()
        k = terms.shape[1] // 3
        if state_term is not None:
            s_hat = self.upsample.from_image_term(state_term, c)
        else:
            s_hat = upsample_with_condition(self.upsample, state, c)
        pad = self.reset_gate.padding
        gates = torch.sigmoid(terms[:, : 2 * k] + F.conv2d(s_hat, w_gates, padding=pad))
        r, z = gates[:, :k], gates[:, k:]
        s_new = r * s_hat
        f_hat = torch.tanh(terms[:, 2 * k :] + F.conv2d(s_new, w_hidden, padding=pad))
        f_t = (1 - z) * s_hat + z * f_hat
        return f_t, s_new

    def _split_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoder halves of the reset, update and hidden kernels stacked, their biases, state halves of
        the reset and update kernels stacked, state half of the hidden kernel). Kept between calls in eval
        mode without autograd until a weight changes (as :class:`ResizeConv` keeps its kernel)."""
        convs = (self.reset_gate, self.update_gate, self.hidden)
        cacheable = not (self.training or torch.is_grad_enabled() or tracing())
        key = (
            tuple((p._version, p.data_ptr(), p.device, p.dtype) for m in convs for p in (m.weight, m.bias))
            if cacheable
            else ()
        )
        if cacheable and self._split_cache is not None and self._split_cache[0] == key:
            return self._split_cache[1]
        k = self.reset_gate.weight.shape[1] // 2
        split = (
            torch.cat([m.weight[:, :k] for m in convs]),
            torch.cat([m.bias for m in convs]),
            torch.cat([m.weight[:, k:] for m in convs[:2]]),
            self.hidden.weight[:, k:].contiguous(),
        )
        self._split_cache = (key, split) if cacheable else None
        return split

    def train(self, mode: bool = True) -> SelectiveTransferUnit:
        self._split_cache = None
        return super().train(mode)


class AttentionUNetConnection(nn.Module):
    """MU-GAN's AUC: an additive attention gate that weights an encoder feature before concatenation.

    ``psi = sigmoid(N(W_psi * relu(N(W_g * g) + N(W_x * x))))`` (one channel); returns ``x * psi``.
    """

    def __init__(self, enc_ch: int, dec_ch: int, inner_ch: int, norm: str = "batch") -> None:
        super().__init__()
        self.w_g = nn.Sequential(nn.Conv2d(dec_ch, inner_ch, 1, bias=norm == "none"), norm_layer(norm, inner_ch))
        self.w_x = nn.Sequential(nn.Conv2d(enc_ch, inner_ch, 1, bias=norm == "none"), norm_layer(norm, inner_ch))
        self.psi = nn.Sequential(nn.Conv2d(inner_ch, 1, 1, bias=norm == "none"), norm_layer(norm, 1))

    def forward(self, x_enc: torch.Tensor, g_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        psi = torch.sigmoid(self.psi(F.relu(self.w_g(g_dec) + self.w_x(x_enc))))
        return x_enc * psi, psi


class ResidualBlock(nn.Module):
    """StarGAN residual block: conv3x3-norm-ReLU-conv3x3-norm plus identity."""

    def __init__(self, channels: int, norm: str = "instance") -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBlock(channels, channels, kernel=3, stride=1, padding=1, norm=norm, act="relu"),
            ConvBlock(channels, channels, kernel=3, stride=1, padding=1, norm=norm, act="none"),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def conv_trunk(
    in_ch: int, base: int, max_ch: int, n_layers: int, norm: str, act: str = "lrelu"
) -> tuple[nn.ModuleList, list[int]]:
    """``n_layers`` stride-2 4x4 conv blocks with channels ``min(base * 2**i, max_ch)``."""
    layers, channels = nn.ModuleList(), []
    for i in range(n_layers):
        out_ch = min(base * 2**i, max_ch)
        layers.append(ConvBlock(in_ch, out_ch, norm=norm, act=act))
        channels.append(out_ch)
        in_ch = out_ch
    return layers, channels
