"""Offline models built in code: a tiny Qwen-Image-Layered pipeline and a tiny Qwen2.5-VL judge, and the released
Qwen-Image-Layered configuration with random weights (`released_pipeline`: the real loop's speed and memory
measured where the weights cannot be downloaded).

Randomly initialised, seeded, with the real architecture flags and no download. The tests and the CPU dry
runs use them through `rollout.load_pipeline("tiny")` and `reward.load_judge("tiny")`, which import this
file lazily. Sizes and flags: ../shared/NOTES.md sections 4 and 5.

    python -c "import tiny; print(tiny.tiny_pipeline().transformer)"
"""

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]


def byte_level_tokenizer():
    """A Qwen2Tokenizer over the 256 byte-level characters (token id = byte value, GPT-2's byte-to-character
    map) plus Qwen's specials at 256..262, no merges (no chat template: the judge falls back to
    reward.CHATML). Returns (tokenizer, {special: id})."""
    from transformers import Qwen2Tokenizer

    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted = iter(range(256, 512))  # GPT-2 byte-level alphabet: non-printable bytes move above 255
    vocab = {(chr(b) if b in printable else chr(next(shifted))): b for b in range(256)}
    vocab.update({s: 256 + i for i, s in enumerate(SPECIALS)})
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    tok.add_tokens(SPECIALS, special_tokens=True)
    return tok, {s: tok.convert_tokens_to_ids(s) for s in SPECIALS}


def tiny_qwen2_5_vl(ids, vocab_size, seed=0):
    """A randomly initialised Qwen2.5-VL (text hidden 16, 2 layers, 2 heads, M-RoPE sections [1, 1, 2]; vision
    depth 2, hidden 16), the architecture of both the pipeline's text encoder and the default judge."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[1], window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_judge(seed=0):
    """(model, tokenizer, image processor) of a 43K-parameter Qwen2.5-VL judge (PIL image processor: no
    torchvision needed)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok, ids = byte_level_tokenizer()
    return tiny_qwen2_5_vl(ids, len(tok), seed), tok, Qwen2VLImageProcessorPil()


def tiny_pipeline(seed=0):
    """A QwenImageLayeredPipeline at toy sizes: layer-3D RoPE, the additional time condition, an RGBA VAE with
    z_dim 16 (z_dim 4 would be mistaken for latents), the linear dynamic time shift; ~92K transformer
    parameters. Every module is seeded from `seed`; the global RNG is left as it was."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline,
                           QwenImageTransformer2DModel)

    tok, ids = byte_level_tokenizer()
    text_encoder = tiny_qwen2_5_vl(ids, len(tok), seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, axes_dims_rope=(8, 4, 4), use_layer3d_rope=True, use_additional_t_cond=True)
        vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], input_channels=4,
                                     latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear",
                                                base_shift=0.5, max_shift=0.9, max_image_seq_len=8192)
    return QwenImageLayeredPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                    processor=None, transformer=transformer)


# ----------------------------------------------------------------------------- the released configuration, random
# Qwen/Qwen-Image-Layered's transformer/config.json and vae/config.json (checked field by field: ../shared/NOTES.md
# section 8); 60 blocks, 20.4B parameters, 38 GiB in bf16
FULL_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
                        use_layer3d_rope=True, use_additional_t_cond=True, zero_cond_t=False, guidance_embeds=False)
FULL_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True],
                input_channels=4)


def released_pipeline(num_blocks=None, device="cpu", dtype=torch.bfloat16, seed=0):
    """Qwen-Image-Layered's released transformer and VAE configuration with random weights, built directly on
    `device` in `dtype` (never 76 GiB of fp32 in CPU memory): the real loop measured where the weights cannot be
    downloaded (`--pretrained_model_name_or_path random`, or `random:K` for the first K of the 60 blocks at full
    width). Its text encoder is a one-layer Qwen2.5-VL of the released width (3584) over the byte-level tokenizer,
    enough to encode the prompt (train.py frees it then, as it frees the 7B one); the template's system part is
    dropped as the real tokenizer drops its 34 tokens, so the fixed prompt is 41 byte tokens (11 with Qwen's
    tokenizer: 0.3% more tokens in a 9,611-token forward)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageLayeredPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok, ids = byte_level_tokenizer()
    text = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=3584, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=3584,
                           fullatt_block_indexes=[0], window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    old = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)  # parameters are made in dtype where they are made
        try:
            transformer = QwenImageTransformer2DModel(**{**FULL_TRANSFORMER,
                                                         "num_layers": num_blocks or FULL_TRANSFORMER["num_layers"]})
            vae = AutoencoderKLQwenImage(**FULL_VAE)
            text_encoder = Qwen2_5_VLForConditionalGeneration(text).eval()
        finally:
            torch.set_default_dtype(old)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.5,
                                                max_shift=0.9, max_image_seq_len=8192)
    pipe = QwenImageLayeredPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                    processor=None, transformer=transformer)
    pipe.prompt_template_encode_start_idx = len(tok(pipe.prompt_template_encode.split("{}")[0]).input_ids)
    return pipe
