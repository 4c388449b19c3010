"""The frozen base transformer in fewer bits, the LoRA on top in full precision (QLoRA's recipe), so that the method
runs on the GPUs people have: a 48 GB card with int8, a 24 GB card with nf4 (docs/performance.md has the plan).

    --quantize int8   torchao's int8 weight-only (Int8WeightOnlyConfig): 1 byte per weight + one scale per output
                      row; the matmul dequantizes on the fly. 38.0 -> 19.0 GiB for the 60 blocks' linears.
    --quantize nf4    bitsandbytes' 4-bit NormalFloat (Linear4bit, double-quantised block scales, compute in the
                      model dtype), QLoRA's format and diffusers' Qwen-Image LoRA example's. 38.0 -> 9.8 GiB.

Only the linear layers of the 60 transformer blocks are quantized (99.8 % of the weights); the input and output
projections, the time embedding and the norms keep the model dtype, as QLoRA keeps its heads. The quantization is
done in place with each library's own API on a model already built or loaded (tiny, random, or a hub id/folder
loaded on the CPU and quantized before it moves to the GPU: one code path for all three, tested on CPU for both
backends), so rollouts, re-scoring and the KL reference (the LoRA disabled) all run the same quantized weights and
the on-policy ratio stays 1. peft wraps the quantized linears (torchao: TorchaoLoraLinear; bitsandbytes: its
Linear4bit as base layer) and saves only the LoRA, with the same keys as on the bf16 base: a LoRA trained on a
quantized base loads on the bf16 model in diffusers and peft, and reproduces the trained policy up to the
quantization's error (tests/test_quantize.py states it).

    python -c "from support import quantize, tiny; t = tiny.tiny_pipeline().transformer; \\
        quantize.quantize_blocks(t, 'int8'); print(t.transformer_blocks[0].attn.to_q)"
"""

import importlib
import logging
import types
from contextlib import contextmanager

import torch

# what importing diffusers, peft or transformers' models logs whenever torchao and bitsandbytes are installed (they
# import both): the kernels these could not load for this torch build, torch's notes on their types, and the torchao
# tensor types diffusers registers for torchao checkpoints (not used here). check() probes what --quantize uses
NOISY_AT_IMPORT = ["torchao", "bitsandbytes", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"]


@contextmanager
def quiet_imports():
    """Around an import of diffusers, peft or transformers' models (`with quantize.quiet_imports(): from diffusers
    import ...`): the quantization backends' import-time warnings (NOISY_AT_IMPORT) are dropped there, only there."""
    loggers = [logging.getLogger(name) for name in NOISY_AT_IMPORT]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


QUANTIZE = {
    "none": "the model dtype (bf16 on CUDA)",
    "int8": "torchao int8 weight-only",
    "nf4": "bitsandbytes 4-bit NormalFloat, double-quantised scales",
}
PACKAGE = {"int8": ("torchao", "torchao"), "nf4": ("bitsandbytes", "bitsandbytes")}  # kind -> (module, pip name)


def check(kind, device):
    """Refuse, in one line naming what would work, a quantization this machine cannot run: an unknown kind, a backend
    that is not installed, or one that fails on `device` (a probe: one small linear quantized and run there, before
    the expensive load). Returns kind."""
    if kind not in QUANTIZE:
        raise ValueError(f"--quantize {kind!r}: choose one of {', '.join(QUANTIZE)}")
    if kind == "none":
        return kind
    module, pip = PACKAGE[kind]
    working = [k for k in PACKAGE if k != kind and _installed(PACKAGE[k][0])]
    instead = f" (or --quantize {working[0]}, whose backend is installed)" if working else ""
    if not _installed(module):
        raise ValueError(f"--quantize {kind} needs {pip}: pip install {pip}{instead}")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    probe = types.SimpleNamespace(transformer_blocks=torch.nn.Sequential(torch.nn.Linear(128, 64)).to(device, dtype))
    try:
        quantize_blocks(probe, kind).transformer_blocks(torch.ones(2, 128, device=device, dtype=dtype))
    except Exception as e:  # whatever the backend raises on a device it cannot serve
        raise ValueError(
            f"--quantize {kind}: {pip} cannot run on {device} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]}){instead or '; use --quantize none'}"
        ) from None
    return kind


def _installed(module):
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def quantize_blocks(transformer, kind, device=None):
    """Quantize, in place, every nn.Linear of the transformer's blocks (the 60 repeated blocks: the weights that
    matter) with `kind`'s library. int8: torchao.quantize_ (weights become Int8Tensor on their device). nf4: each
    linear becomes a bitsandbytes Linear4bit holding its weight as Params4bit, quantized when it reaches a device
    (bitsandbytes' own mechanism). `device`: where the quantized blocks go (default: where they are); each linear is
    moved there and quantized there, so the model dtype's weights never need to fit that device at once. Returns
    the transformer."""
    if kind == "none":
        return transformer
    blocks = transformer.transformer_blocks
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        # set_inductor_config=False: its default True turns on inductor's coordinate-descent tuning for the whole
        # process, so --quantize int8 --compile would compile far slower; nothing here needs it
        quantize_(blocks, Int8WeightOnlyConfig(set_inductor_config=False), device=device)  # every nn.Linear
        return transformer
    import bitsandbytes as bnb

    for parent in list(blocks.modules()):
        for name, linear in list(parent.named_children()):
            if type(linear) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                compute_dtype=linear.weight.dtype,
                quant_type="nf4",
                compress_statistics=True,
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                linear.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True
            )
            if linear.bias is not None:
                q.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
            # bitsandbytes repacks the weight for an AVX512-BF16 CPU kernel in eval mode only: rollouts (eval) and
            # re-scoring (train) would then run different kernels (the ratio leaves 1), and the repack breaks
            # narrow layers and a later backward; the one dequantize-and-matmul path serves both modes
            q.support_avx512bf16_for_cpu = False
            setattr(parent, name, q.to(device or linear.weight.device))  # quantized where it lands
    return transformer


def weight_bytes(module):
    """Bytes the module's weights and buffers hold, quantized ones as stored: a tensor subclass (torchao) by the
    tensors it flattens into (int8 data, scales, zero points); a bitsandbytes Params4bit by its packed data plus its
    quant_state's block statistics (absmax, and the nested statistics of double quantisation)."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        inner = [getattr(t, n) for n in t.__tensor_flatten__()[0]] if hasattr(t, "__tensor_flatten__") else [t]
        total += sum(x.numel() * x.element_size() for x in inner)
        state = getattr(t, "quant_state", None)
        for s in [state, getattr(state, "state2", None)] if state is not None else []:
            if s is not None:
                total += sum(x.numel() * x.element_size() for x in (s.absmax, s.code) if isinstance(x, torch.Tensor))
    return total
