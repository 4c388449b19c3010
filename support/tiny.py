"""Offline models built in code: a tiny Qwen-Image-Layered pipeline and a tiny Qwen2.5-VL judge, and the released
Qwen-Image-Layered configuration with random weights (`released_pipeline`: the real loop's speed and memory
measured where the weights cannot be downloaded).

Randomly initialised, seeded, with the real architecture flags and no download; the tiny pipeline's RGBA VAE alone
has its weights set in code so that it reconstructs (`tiny_vae`: no training, no weights file), so the paper's
per-layer L1 means something on the toy model (tests/test_metric.py measures its round trip). The tests and the CPU
dry runs use them through `--pretrained_model_name_or_path tiny` and `--judge tiny`.

    python -c "from support import tiny; print(tiny.tiny_pipeline().transformer)"
"""

import torch

from support import quantize

with quantize.quiet_imports():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageLayeredPipeline,
        QwenImageTransformer2DModel,
    )
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import (
        QwenImageAttentionBlock,
        QwenImageResample,
        QwenImageResidualBlock,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# the flow-matching schedule of both pipelines: dynamic shifting, linear time shift (mu set per call by rollout.py)
SCHEDULER = dict(
    use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.5, max_shift=0.9, max_image_seq_len=8192
)
# Qwen/Qwen-Image-Layered's transformer/config.json and vae/config.json, field by field; 60 blocks, 20.4B parameters,
# 38 GiB in bf16
FULL_TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=60,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    axes_dims_rope=(16, 56, 56),
    use_layer3d_rope=True,
    use_additional_t_cond=True,
    zero_cond_t=False,
    guidance_embeds=False,
)
FULL_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    temperal_downsample=[False, True, True],
    input_channels=4,
)
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def byte_level_tokenizer():
    """A Qwen2Tokenizer over the 256 byte-level characters (token id = byte value, GPT-2's byte-to-character
    map) plus Qwen's specials at 256..262, no merges (no chat template: the judge falls back to
    support/judges.py's CHATML). Returns (tokenizer, {special: id})."""

    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted = iter(range(256, 512))  # GPT-2 byte-level alphabet: non-printable bytes move above 255
    vocab = {(chr(b) if b in printable else chr(next(shifted))): b for b in range(256)}
    vocab.update({s: 256 + i for i, s in enumerate(SPECIALS)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tok.add_tokens(SPECIALS, special_tokens=True)
    return tok, {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}


def tiny_qwen2_5_vl(
    ids, vocab_size, seed=0, hidden=16, intermediate=32, layers=2, heads=2, kv_heads=2, mrope_section=(1, 1, 2)
):
    """A randomly initialised Qwen2.5-VL (by default text hidden 16, 2 layers, 2 heads, M-RoPE sections [1, 1, 2];
    vision depth 2, hidden 16), the architecture of both the pipeline's text encoder and the default judge;
    released_pipeline asks for the released text width (3584, 28 heads, 4 KV heads) in one layer."""

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=hidden,
            fullatt_block_indexes=[1],
            window_size=56,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_judge(seed=0):
    """(model, tokenizer, image processor) of a 43K-parameter Qwen2.5-VL judge (PIL image processor: no
    torchvision needed)."""

    tok, ids = byte_level_tokenizer()
    return tiny_qwen2_5_vl(ids, len(tok), seed), tok, Qwen2VLImageProcessorPil()


# ----------------------------------------------------------------------------- an RGBA VAE that reconstructs
# Per-channel statistics of tiny_vae's latents (RGBA 4x4 block means; the same 4 values for each of the 4
# sub-blocks) over the composites and layers of 600 synthetic 64 px designs (data.make_design with
# numpy.random.default_rng([s, k]), s in 1..3, k < 200, L = 2, 3, 4 in turn; 2,397 frames), rounded: the pipeline
# normalises latents with them, as the released VAE's config does with its own. Measured 2026-12-04.
LATENTS_MEAN = [-0.36, -0.35, -0.36, 0.11] * 4
LATENTS_STD = [0.57, 0.58, 0.57, 0.98] * 4
BIG = 1e3  # the constant channel that sets each RMS norm (tiny_vae's heads)


def _place(conv, entries):
    """Zero a convolution (weight and bias), then weight[out, in, centre tap] = value for each (out, in, value).
    A causal 3D convolution sees a single frame at its last temporal tap (the two before it are causal zero padding).
    """
    w = conv.weight
    w.zero_()
    conv.bias.zero_()
    for out, inp, value in entries:
        w[(out, inp) + ((-1,) if w.dim() == 5 else ()) + (w.shape[-2] // 2, w.shape[-1] // 2)] = value


def _linear_head(last_block, norm, conv, n):
    """Make a head (RMS norm over C channels -> SiLU -> conv) pass its first n channels through, given channels
    n..2n-1 hold their negatives: the last residual block's (zeroed) convolution adds the constant BIG on channel 2n,
    so the norm sqrt(BIG^2 + 2 |s|^2) is BIG to a relative |s|^2 / BIG^2 <= n * 1e-6 (each |s_k| <= 1);
    gamma = BIG / sqrt(C) undoes the normalisation; SiLU(s) - SiLU(-s) = s exactly."""
    last_block.conv2.bias[2 * n] = BIG
    norm.gamma.zero_()
    norm.gamma[: 2 * n] = BIG / norm.gamma.shape[0] ** 0.5
    _place(conv, [(k, k, 1.0) for k in range(n)] + [(k, n + k, -1.0) for k in range(n)])


def tiny_vae(seed=0, base_dim=12):
    """An RGBA AutoencoderKLQwenImage (z_dim 16, 8x smaller sides) whose weights are set, not trained, so that it
    reconstructs (round trip on 64 px synthetic designs: tests/test_metric.py):
        encode: z = the 4x4 block means of R, G, B, A, space-to-depth: channel 4 p + c holds colour c of sub-block
                p = 2 dy + dx of each 8x8 cell (the image at a quarter of its size, (B, 16, 1, H/8, W/8));
        decode: every pixel of an 8x8 cell = the mean of the cell's 4 sub-blocks (its 8x8 block mean).
    The decoder cannot place the sub-blocks (after a nearest upsampling, a convolution cannot tell which half of a
    cell a pixel lies in), so it averages them. How the architecture becomes this map:
    every residual block's last convolution and the attention's output projection are 0 (each block passes its
    input through); conv_in, the 1x1 shortcuts, the stride-2 and upsampling convolutions and quant_conv copy,
    average or rearrange channels; each head is made exact by `_linear_head`. The residual branches' first
    convolutions keep their random weights, seeded by `seed`. base_dim >= 9: the encoder's last 4 base_dim channels
    hold 16 latents, their negatives and BIG, the decoder's last base_dim 4 + 4 + 1. 1.47M parameters at 12."""

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(  # the released VAE, narrower, one residual block per level
            **{**FULL_VAE, "base_dim": base_dim, "num_res_blocks": 1},
            latents_mean=LATENTS_MEAN,
            latents_std=LATENTS_STD,
        )
    enc, dec = vae.encoder, vae.decoder
    with torch.no_grad():
        for block in vae.modules():
            if isinstance(block, QwenImageResidualBlock):
                block.conv2.weight.zero_()
                block.conv2.bias.zero_()
                if not isinstance(block.conv_shortcut, torch.nn.Identity):
                    _place(block.conv_shortcut, [(c, c, 1.0) for c in range(8)])
            elif isinstance(block, QwenImageAttentionBlock):
                block.proj.weight.zero_()
                block.proj.bias.zero_()
        # encoder: RGBA on channels 0-3; each downsampling (right/bottom zero pad, 3x3 stride 2: taps 0 and 1 stay
        # inside the image) takes 2x2 means twice, then lays the 2x2 sub-blocks out in depth, and their negatives
        _place(enc.conv_in, [(c, c, 1.0) for c in range(4)])
        down = [m.resample[1] for m in enc.down_blocks if isinstance(m, QwenImageResample)]  # 3 stride-2 Conv2d
        for conv in down:
            _place(conv, [])
        for c in range(4):
            for dy in range(2):
                for dx in range(2):
                    p = 2 * dy + dx
                    down[0].weight[c, c, dy, dx] = down[1].weight[c, c, dy, dx] = 0.25
                    down[2].weight[4 * p + c, c, dy, dx] = 1.0
                    down[2].weight[16 + 4 * p + c, c, dy, dx] = -1.0
        _linear_head(enc.mid_block.resnets[-1], enc.norm_out, enc.conv_out, 16)  # mean: channels 0-15; log-var 0
        _place(vae.quant_conv, [(k, k, 1.0) for k in range(32)])
        # decoder: the 4 sub-blocks' mean of each colour and its negative, carried through nearest upsamplings
        _place(vae.post_quant_conv, [(k, k, 1.0) for k in range(16)])
        _place(
            dec.conv_in,
            [
                (c + 4 * sign, 4 * p + c, 0.25 * (1 - 2 * sign))
                for sign in range(2)
                for p in range(4)
                for c in range(4)
            ],
        )
        for m in dec.modules():
            if isinstance(m, QwenImageResample):
                _place(m.resample[1], [(c, c, 1.0) for c in range(8)])
        _linear_head(dec.up_blocks[-1].resnets[-1], dec.norm_out, dec.conv_out, 4)
    return vae


def tiny_pipeline(seed=0):
    """A QwenImageLayeredPipeline at toy sizes: layer-3D RoPE, the additional time condition, an RGBA VAE with
    z_dim 16 (z_dim 4 would be mistaken for latents) that reconstructs (`tiny_vae`), the linear dynamic time shift;
    ~92K transformer parameters. Every module is seeded from `seed`; the global RNG is left as it was."""

    tok, ids = byte_level_tokenizer()
    text_encoder = tiny_qwen2_5_vl(ids, len(tok), seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        transformer = QwenImageTransformer2DModel(  # the released transformer at toy sizes
            **{
                **FULL_TRANSFORMER,
                "num_layers": 2,
                "attention_head_dim": 16,
                "num_attention_heads": 2,
                "joint_attention_dim": 16,
                "axes_dims_rope": (8, 4, 4),
            }
        )
    vae = tiny_vae(seed + 2)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return QwenImageLayeredPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, processor=None, transformer=transformer
    )


# ----------------------------------------------------------------------------- the released configuration, random
def released_pipeline(num_blocks=None, device="cpu", dtype=torch.bfloat16, seed=0):
    """Qwen-Image-Layered's released transformer and VAE configuration with random weights, built directly on
    `device` in `dtype` (never 76 GiB of fp32 in CPU memory): the real loop measured where the weights cannot be
    downloaded (`--pretrained_model_name_or_path random`, or `random:K` for the first K of the 60 blocks at full
    width). Its text encoder is a one-layer Qwen2.5-VL of the released width (3584) over the byte-level tokenizer,
    enough to encode the prompt (train.py frees it then, as it frees the 7B one); the template's system part is
    dropped as the real tokenizer drops its 34 tokens, so the fixed prompt is 41 byte tokens (11 with Qwen's
    tokenizer: 0.3% more tokens in a 9,611-token forward)."""

    tok, ids = byte_level_tokenizer()
    old = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)  # parameters are made in dtype where they are made
        try:
            transformer = QwenImageTransformer2DModel(
                **{**FULL_TRANSFORMER, "num_layers": num_blocks or FULL_TRANSFORMER["num_layers"]}
            )
            vae = AutoencoderKLQwenImage(**FULL_VAE)
            text_encoder = tiny_qwen2_5_vl(
                ids,
                len(tok),
                seed,
                hidden=3584,
                intermediate=128,
                layers=1,
                heads=28,
                kv_heads=4,
                mrope_section=(16, 24, 24),
            )
        finally:
            torch.set_default_dtype(old)
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    pipe = QwenImageLayeredPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, processor=None, transformer=transformer
    )
    pipe.prompt_template_encode_start_idx = len(tok(pipe.prompt_template_encode.split("{}")[0]).input_ids)
    return pipe
