"""The child process that compiles a served decoder ahead of time (started by :mod:`server.compiled`).

``python -m server.compile_worker MODEL_DIR OUT_PREFIX --device cpu --precision bf16 --layout channels_last``
loads the model from ``MODEL_DIR`` (``config.json`` + ``model.safetensors``, written by the server from
the network it serves), exports its ``decode`` with ``torch.export`` and compiles it with AOTInductor and
``freezing`` (the weights become constants: oneDNN prepacks the convolutions, element-wise ops fuse into
them), into two packages: ``OUT_PREFIX-b1.pt2`` for batch 1 (a slider move) and ``OUT_PREFIX-batched.pt2``
for any larger batch (micro-batches, several faces). Each is written under a temporary name and renamed
when complete, so a reader never sees half a package.

Compiling is tens of seconds of Python (tracing, lowering) and C++ compiles per model. In the server's
process that Python held the GIL, and every small op of an edit waited for it: on the 2-core EPYC with
avx512-bf16 the README's REST call took 4.4 s instead of 0.29 s while MU-GAN compiled on a thread. Here it
holds only this process's GIL, at the lowest CPU priority.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import torch
from torch import nn

from models.blocks import ResizeConv
from models.checkpoint import load_pretrained
from models.generators import AttributeGenerator, Encoded
from models.precision import separate_inductor_cache

log = logging.getLogger(__name__)

#: The batched package's batch dimension: from 2 (batch 1 has its own package) to this.
MAX_BATCH = 1024
#: The package metadata entry listing each input's dtype and whether it is channels_last.
INPUTS_KEY = "face_editor_inputs"
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


class DecodeModule(nn.Module):
    """``net.decode`` over flat tensors (what ``torch.export`` takes): the encoding's image, features and
    decoder terms, then the condition; in bf16 autocast when the model serves bf16."""

    def __init__(self, net: AttributeGenerator, n_features: int, n_terms: int, device_type: str, bf16: bool) -> None:
        super().__init__()
        self.net, self.n_features, self.n_terms = net, n_features, n_terms
        self.device_type, self.bf16 = device_type, bf16

    def forward(self, x: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nf, nt = self.n_features, self.n_terms
        encoded = Encoded(x, tuple(rest[:nf]), tuple(rest[nf : nf + nt]))
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.net.decode(encoded, rest[-1])


def example_inputs(
    net: AttributeGenerator, batch: int, device: torch.device, precision: str, layout: torch.memory_format
) -> tuple[Encoded, torch.Tensor]:
    """A random face batch encoded as the server encodes it (``ServedGenerator.encode``), and a condition."""
    size, n_attrs = net.config.image_size, len(net.config.attributes)
    g = torch.Generator().manual_seed(batch)
    x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    cond = torch.randint(-1, 2, (batch, n_attrs), generator=g).float().to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        encoded = net.prepare_decode(net.encode(x.contiguous(memory_format=layout)))
    return encoded, cond


def compile_package(
    net: AttributeGenerator,
    path: Path,
    device: torch.device,
    precision: str,
    layout: torch.memory_format,
    batched: bool,
) -> Path:
    """Export ``net.decode`` and compile it into the AOTInductor package ``path``."""
    import torch._inductor.config as inductor_config

    encoded, cond = example_inputs(net, 2 if batched else 1, device, precision, layout)
    module = DecodeModule(net, len(encoded.features), len(encoded.decoder_terms), device.type, precision == "bf16")
    args = (*encoded.tensors(), cond)
    dynamic_shapes = None
    if batched:
        batch = torch.export.Dim("batch", min=2, max=MAX_BATCH)
        dynamic_shapes = ({0: batch}, tuple({0: batch} for _ in args[1:]))
    inductor_config.freezing = True
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")  # the packager wants .pt2
    # freezing applies only without autograd (inductor's compile_fx), as the server decodes
    with torch.no_grad():
        program = torch.export.export(module.eval(), args, dynamic_shapes=dynamic_shapes, strict=False)
        # what the inputs must look like (compiled code reads them with the strides it was built for)
        inputs = [[str(t.dtype).removeprefix("torch."), t.dim() == 4 and layout == torch.channels_last] for t in args]
        metadata = {INPUTS_KEY: json.dumps(inputs)}
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(partial), inductor_configs={"aot_inductor.metadata": metadata}
        )
    os.replace(partial, path)
    return path


def compile_decoder_packages(
    model_dir: Path, out_prefix: Path, device: torch.device, precision: str, layout: str
) -> tuple[Path, Path]:
    """The two packages (batch 1, batched) of the decoder of the model in ``model_dir``, prepared as the
    server serves it (fp32 weights in ``layout``, eval mode, frozen)."""
    net, info = load_pretrained(model_dir, device)
    if info.kind != "generator":
        raise ValueError(f"{model_dir}: a {info.kind}, not a generator")
    memory_format = LAYOUTS[layout]
    net = net.float().to(memory_format=memory_format).eval().requires_grad_(False)
    for module in net.modules():
        if isinstance(module, ResizeConv):
            module.bake_kernel()  # the 4x4 kernel as a constant (see ResizeConv.bake_kernel)
    single = compile_package(net, Path(f"{out_prefix}-b1.pt2"), device, precision, memory_format, batched=False)
    batched = compile_package(net, Path(f"{out_prefix}-batched.pt2"), device, precision, memory_format, batched=True)
    return single, batched


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("out_prefix", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--layout", choices=tuple(LAYOUTS), default="channels_last")
    p.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="the server's torch threads: inductor writes the count into the C++ kernels it generates "
        "(bench/slider.py, fp32 STGAN: a package built with 1 thread 19.9 ms a decode, with 2 threads 14.8)",
    )
    args = p.parse_args(argv)
    # the lowest CPU priority (the C++ compilers it starts inherit it): the server's edits come first
    with contextlib.suppress(AttributeError, OSError):
        os.nice(19)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    separate_inductor_cache()  # under an instruction-set cap, a cache of the cap's own (models.precision)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    paths = compile_decoder_packages(args.model_dir, args.out_prefix, device, args.precision, args.layout)
    log.info("compiled %s", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
