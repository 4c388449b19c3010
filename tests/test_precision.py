"""Precision and speed levers keep the numbers: bf16 frozen weights with an fp32 LoRA, the compiled blocks and
diffusers' attention backends, on the tiny model (CPU)."""

import torch

import lora
import rollout
import train


def test_bf16_model_with_fp32_lora(design):
    """On a bf16 model, lora_precision runs the fp32 LoRA in bf16 under autocast: the same policy as peft's
    fp32 path up to bf16 rounding, ratio 1 on re-scoring, and fp32 gradients on every LoRA weight."""
    torch.manual_seed(0)
    pipe = rollout.load_pipeline("tiny", torch_dtype=torch.bfloat16)
    params = lora.add_lora(pipe.transformer, 4, 8)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3)  # lora_B starts at 0: make the adapter matter
    kw = dict(layers=2, group_size=2, num_inference_steps=3, noise_level=1.0, resolution=64, sde_window=(0, 2))
    with lora.lora_precision(pipe.transformer):
        traj = rollout.sample(pipe, [design()], generator=torch.Generator().manual_seed(0), **kw)
        log_prob, _, _ = rollout.step_log_prob(pipe.transformer, traj, 1)
        (-log_prob.mean()).backward()
        v_autocast = rollout.predict_velocity(pipe.transformer, traj, traj.latents[:, 0], traj.timesteps[0]).float()
    torch.testing.assert_close(log_prob.detach(), traj.log_probs[:, 1], rtol=0, atol=1e-5)
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with torch.no_grad():  # peft's default: inputs upcast to the fp32 LoRA weights
        v_peft = rollout.predict_velocity(pipe.transformer, traj, traj.latents[:, 0], traj.timesteps[0]).float()
    assert (v_autocast - v_peft).abs().max() < 0.05 * v_peft.abs().max()


def bf16_policy(blocks=None):
    """The tiny pipeline in bf16 with an active fp32 LoRA (B drawn N(0, 0.3): the adapter matters), gradient
    checkpointing on, as train.py runs a GPU model; `blocks` keeps the first K transformer blocks."""
    torch.manual_seed(0)
    pipe = rollout.load_pipeline("tiny", torch_dtype=torch.bfloat16)
    if blocks:
        pipe.transformer.transformer_blocks = pipe.transformer.transformer_blocks[:blocks]
    params = lora.add_lora(pipe.transformer, 4, 8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3, generator=g)
    pipe.transformer.enable_gradient_checkpointing()
    return pipe, params


def rollouts_and_updates(pipe, params, steps, image):
    """`steps` of train.py's inner loop by hand: a rollout of 2 candidates (3 steps, 2 in the SDE window) under
    lora_precision, then policy_update with fixed advantages. Returns [(trajectory, stats)] per step."""
    args = train.parse_args(["--images", ".", "--reward", "recon", "--beta", "0", "--train_batch_size", "2"])
    optimizer, out = torch.optim.AdamW(params, lr=1e-2), []
    for step in range(steps):
        pipe.transformer.eval()
        with lora.lora_precision(pipe.transformer):
            traj = rollout.sample(
                pipe,
                [image],
                layers=2,
                group_size=2,
                num_inference_steps=3,
                noise_level=1.0,
                resolution=64,
                sde_window=(0, 2),
                generator=torch.Generator().manual_seed(step),
            )
        pipe.transformer.train()
        with lora.lora_precision(pipe.transformer):
            stats = train.policy_update(pipe.transformer, [traj], torch.tensor([1.0, -1.0]), args, params, optimizer)
        out.append((traj, stats))
    return out


def test_compiled_blocks_give_eager_numbers_in_bf16(design):
    """--compile (rollout.speed_up: regional torch.compile of the repeated block, LoRA inside) on CPU inductor,
    bf16 weights and fp32 LoRA as on a GPU: two steps of rollouts and updates give the eager run's log-probs, ratio
    and gradient norms exactly, and its trained LoRA within 1e-5 (one element of 40 tensors differed, by 5.4e-7:
    the compiled backward's summation order). Inductor is told to round where eager rounds; without that the
    log-probs differ from eager's, and with both blocks the first ratio moved by 1.3e-4, more than --clip_range. One
    transformer block, so each mode compiles one graph (about a minute on 2 cores with a cold inductor cache)."""
    eager, compiled = bf16_policy(blocks=1), bf16_policy(blocks=1)
    rollout.speed_up(compiled[0].transformer, compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    a, b = (
        rollouts_and_updates(*eager, steps=2, image=design()),
        rollouts_and_updates(*compiled, steps=2, image=design()),
    )
    for (traj_a, stats_a), (traj_b, stats_b) in zip(a, b):
        assert torch.equal(traj_a.log_probs, traj_b.log_probs) and stats_b["diag/ratio_mean"] == 1.0
        assert stats_b["train/grad_norm"] == stats_a["train/grad_norm"] > 0
    assert max((p - q).abs().max().item() for p, q in zip(eager[1], compiled[1])) < 1e-5
    assert 2 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs <= 3  # made in step 1, reused in 2


def test_attention_backend_keeps_the_numbers(design):
    """--attention_backend (rollout.speed_up through diffusers' dispatcher): the math kernel against PyTorch's SDPA
    choice on the same transitions: log-probs within 1e-3 in bf16 (measured 4.3e-4 at most: bf16 rounding inside the
    attention), and the re-scoring's ratio under the chosen backend is 1 (rollout and update run the same kernel)."""
    pipe, params = bf16_policy()
    ((traj, _),) = rollouts_and_updates(pipe, params, steps=1, image=design())
    pipe.transformer.eval()
    try:
        with torch.no_grad(), lora.lora_precision(pipe.transformer):
            sdpa = torch.stack([rollout.step_log_prob(pipe.transformer, traj, j)[0] for j in range(2)], 1)
            rollout.speed_up(pipe.transformer, attention_backend="_native_math")
            math_ = torch.stack([rollout.step_log_prob(pipe.transformer, traj, j)[0] for j in range(2)], 1)
        assert 0 < (math_ - sdpa).abs().max() < 1e-3
        ((_, stats),) = rollouts_and_updates(pipe, params, steps=1, image=design())
        assert float(stats["diag/ratio_mean"]) == 1.0
    finally:
        pipe.transformer.set_attention_backend("native")  # diffusers keeps the choice process-wide
