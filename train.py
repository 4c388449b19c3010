"""Stable-Layers training: Flow-GRPO with LoRA on Qwen-Image-Layered, rewarded by a VLM judge, no paired data.

    # CPU dry run, tiny random model and tiny random judge (about a minute)
    python train.py --images examples --pretrained_model_name_or_path tiny --judge tiny --resolution 64 \\
        --layers 2 3 --group_size 4 --num_inference_steps 4 --max_train_steps 4 --checkpointing_steps 2 \\
        --output_dir outputs/dry-run --rank 4 --lora_alpha 8 --mixed_precision no
    # one 80 GB GPU, judge served elsewhere (vLLM/SGLang/Gemini, OpenAI-compatible; key in $OPENAI_API_KEY)
    python train.py --images my_designs/ --judge http --judge_url http://judge-host:8000/v1 \\
        --judge_model Qwen/Qwen3.5-9B
    # resume after a crash or kill: same step numbers, same data order, same random draws
    python train.py --images my_designs/ ... --resume_from_checkpoint latest

Per step (the algorithm box): draw images_per_step images; roll out G candidates each with no gradient
(rollout.sample; SDE on a window of K steps, ODE elsewhere); score them (reward.REWARDS[--reward]);
group-relative advantages (grpo.group_advantages); then for each inner epoch: for every stored transition j
of every group, re-score it with gradients (rollout.step_log_prob), loss = policy_loss + beta * KL to the same
transformer with the LoRA disabled, accumulate; clip the gradient norm; one optimizer step.

Departures from Flow-GRPO (arXiv:2505.05470) and its Qwen-Image recipe, all deliberate:
- one GPU, no FSDP; group_size 8 by default (upstream 16-24) to keep a step at a few minutes;
- CFG off during rollouts and training (the released Stable-Layers setting; CFG during RL collapses upstream);
- the "Fast" window: only --sde_window consecutive steps (default 2), drawn per step from the first half of
  the schedule, are SDE and trained; group members get independent initial noise;
- every random draw of step s comes from seeds derived from (--seed, s), so a resumed run repeats it exactly;
- the accumulated loss is the mean over all (candidate, trained step) pairs of the step; one optimizer step
  per inner epoch; the KL uses upstream's variance std_dev_t^2 (see grpo.kl_loss).
"""

import argparse
import json
import os
import random
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import data
import grpo
import reward
import rollout

LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                "txt_mlp.net.2"]
DEFAULT_JUDGE = "Qwen/Qwen3.5-9B"  # the open judge the released LoRA was retrained with
# the last block's text output is discarded, so these modules of it would get no gradient
UNUSED_IN_LAST_BLOCK = ["attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Flow-GRPO + LoRA fine-tuning of Qwen-Image-Layered with a VLM reward.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--images", required=True, help="folder of unlabelled training images (searched recursively)")
    a("--pretrained_model_name_or_path", default=rollout.DEFAULT_MODEL, help="hub id, local folder, or 'tiny'")
    a("--output_dir", default="outputs/stable-layers", help="checkpoints, metrics.jsonl, samples/, final LoRA")
    a("--seed", type=int, default=42, help="seed of every random draw (data order, layers, noise, window)")
    a("--resolution", type=int, default=640, help="condition bucket: 640 (released) or 1024; tiny: multiple of 32")
    a("--layers", type=int, nargs="+", default=[4], help="layer count N, or a list to draw from per step")
    a("--prompt", default=rollout.DEFAULT_PROMPT, help="fixed prompt (released setting); '' auto-captions")
    a("--group_size", type=int, default=8, help="G: candidates per image")
    a("--images_per_step", type=int, default=1, help="images (groups) per training step")
    a("--num_inference_steps", type=int, default=10, help="T: sampling steps during training rollouts")
    a("--noise_level", type=float, default=1.2, help="a: SDE noise level (Flow-GRPO's Qwen-Image setting)")
    a("--sde_type", choices=["sde", "cps"], default="sde", help="Flow-GRPO SDE step or coefficients-preserving")
    a("--sde_window", type=int, default=2, help="K: consecutive SDE (trained) steps per rollout; 0 = all T")
    a("--sde_window_range", type=int, nargs=2, default=None, metavar=("LO", "HI"),
      help="window start drawn per step so the window lies in steps LO..HI-1 (default: first half)")
    a("--true_cfg_scale", type=float, default=1.0, help="true CFG scale in rollouts; 1 = off (released setting)")
    a("--reward", default="vlm", help=f"reward function, one of {sorted(reward.REWARDS)}")
    a("--judge", default="local", help="VLM judge backend: local, http, tiny, text_encoder")
    a("--judge_model", default=None, help=f"local: hub id/folder (default {DEFAULT_JUDGE}); http: served model name")
    a("--judge_url", default=None, help="http: OpenAI-compatible base URL, e.g. http://host:8000/v1")
    a("--judge_api_key_env", default="OPENAI_API_KEY", help="http: environment variable holding the API key")
    a("--clip_range", type=float, default=1e-4, help="eps of the clipped ratio (small: log-probs are dim means)")
    a("--beta", type=float, default=0.04, help="KL weight; 0 skips the reference forward")
    a("--adv_clip_max", type=float, default=5.0, help="advantages are clipped to [-x, x]")
    a("--global_std", action="store_true", help="normalise advantages by the std of the whole step's rewards")
    a("--num_inner_epochs", type=int, default=1, help="passes over one step's rollouts (1 = fully on-policy)")
    a("--train_batch_size", type=int, default=2, help="candidates per forward/backward when re-scoring")
    a("--learning_rate", type=float, default=3e-4, help="AdamW learning rate of the LoRA")
    a("--adam_weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    a("--max_grad_norm", type=float, default=1.0, help="gradient-norm clip")
    a("--rank", type=int, default=64, help="LoRA rank r")
    a("--lora_alpha", type=int, default=128, help="LoRA alpha (scale alpha / r)")
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True, help="recompute blocks")
    a("--mixed_precision", choices=["no", "bf16", "fp16"], default="bf16", help="frozen weights' dtype on CUDA")
    a("--max_train_steps", type=int, default=300, help="number of training steps (the loop's bound)")
    a("--checkpointing_steps", type=int, default=25, help="save a checkpoint every N steps")
    a("--checkpoints_total_limit", type=int, default=3, help="keep at most this many checkpoints")
    a("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest' in --output_dir")
    a("--sample_every", type=int, default=10, help="write a PNG of one scored group every N steps (0 = never)")
    args = p.parse_args(argv)
    T = args.num_inference_steps
    checks = [(args.group_size >= 2, "--group_size must be >= 2 (advantages are relative within a group)"),
              (min(args.layers) >= 1, "--layers must be >= 1"),
              (0 <= args.sde_window <= T, f"--sde_window must be in 0..--num_inference_steps ({T})"),
              (args.reward in reward.REWARDS, f"--reward {args.reward!r}: choose one of {sorted(reward.REWARDS)}"),
              (args.resolution % 32 == 0, "--resolution must be a multiple of 32 (the model uses 640 or 1024)"),
              (args.max_train_steps >= 0 and args.checkpointing_steps >= 1, "--max_train_steps/--checkpointing_steps")]
    for ok, message in checks:
        if not ok:
            p.error(message)
    return args


# ----------------------------------------------------------------------------- setup
def add_lora(transformer, rank, lora_alpha):
    """LoRA on the attention and MLP projections of every block (Flow-GRPO's Qwen-Image targets), gaussian
    init (B = 0: the policy starts as the reference); the last block's text-stream output modules are left
    out: the text queries, the text attention output and the text MLP, whose output is discarded (they would
    get no gradient, checked in test_smoke.py). Trainable weights in float32."""
    from peft import LoraConfig

    last = len(transformer.transformer_blocks) - 1
    transformer.requires_grad_(False)
    excluded = [f"transformer_blocks.{last}.{m}" for m in UNUSED_IN_LAST_BLOCK]
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS, exclude_modules=excluded))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


@contextmanager
def lora_precision(transformer):
    """Frozen bf16/fp16 weights with fp32 LoRA weights (the optimizer's master copy): run the LoRA matmuls in
    the model dtype under autocast, instead of peft's default of upcasting every adapted layer's input to
    fp32 (bench.py, real width on CPU: ~20% slower rollout steps, ~2x transient activation memory).
    Gradients still reach the fp32 weights. A no-op for an fp32 model (the CPU tests)."""
    from peft.helpers import disable_input_dtype_casting

    if transformer.dtype == torch.float32:
        yield
        return
    with torch.autocast(transformer.device.type, dtype=transformer.dtype), disable_input_dtype_casting(transformer):
        yield


@contextmanager
def reference_policy(transformer):
    """The reference policy: the same transformer with its LoRA disabled (no second copy of the weights)."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


def step_plan(args, step, num_images):
    """Everything random about step `step`, derived from (seed, step) alone: image indices (epoch-wise
    permutations), layer count, window start, and the rollout generator's seed."""
    rng = random.Random(args.seed * 1_000_003 + step)
    indices = []
    for k in range(args.images_per_step):
        position = step * args.images_per_step + k
        epoch = position // num_images
        epoch_order = torch.randperm(num_images, generator=torch.Generator().manual_seed(args.seed + epoch))
        indices.append(int(epoch_order[position % num_images]))
    T, K = args.num_inference_steps, args.sde_window or args.num_inference_steps
    lo, hi = args.sde_window_range or (0, max(K, T // 2))
    start = rng.randint(lo, max(lo, hi - K))
    return indices, rng.choice(args.layers), (start, start + K), rng.getrandbits(63)


# ----------------------------------------------------------------------------- checkpoints
def checkpoints(output_dir):
    """output_dir's checkpoint-{step} folders, oldest first (temporary .checkpoint-*.tmp ones excluded)."""
    return sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(output_dir, step, transformer, optimizer, args, limit):
    """output_dir/checkpoint-{step}/: the LoRA in both formats + training_state.pt (optimizer, step, RNG
    states, args). Written under a temporary name and renamed, so a kill never leaves a broken one."""
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rollout.save_lora(transformer, tmp, base_model=args.pretrained_model_name_or_path)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "args": vars(args),
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
               tmp / "training_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    found = checkpoints(output_dir)
    for old in found[: max(0, len(found) - limit)]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path, output_dir, transformer, optimizer):
    if path == "latest":
        found = checkpoints(output_dir)
        if not found:
            print(f"no checkpoint in {output_dir}: starting at step 0")
            return 0
        path = found[-1]
    path = Path(path)
    if not (path / "training_state.pt").is_file():
        raise SystemExit(f"--resume_from_checkpoint {path}: no training_state.pt there")
    rollout.load_peft_weights(transformer, path / "peft")
    state = torch.load(path / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    metrics = output_dir / "metrics.jsonl"  # steps logged after this checkpoint will be run (and logged) again
    if metrics.is_file():
        kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= state["step"]]
        metrics.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept))
        os.replace(metrics.with_suffix(".tmp"), metrics)
    print(f"resumed from {path} at step {state['step']}")
    return state["step"]


# ----------------------------------------------------------------------------- one step
def policy_update(transformer, trajectories, advantages, args, params, optimizer):
    """One optimizer step per inner epoch over all stored transitions (Flow-GRPO's objective):
    loss = MEAN over (candidate, trained step j) of [clipped policy loss + beta * KL(policy || reference)]."""
    stats = {"loss/policy": 0.0, "loss/kl": 0.0, "diag/clipfrac": 0.0, "diag/approx_kl": 0.0, "diag/ratio_mean": 0.0,
             "train/grad_norm": 0.0, "train/skipped_updates": 0}
    K = trajectories[0].log_probs.shape[1]
    total = sum(t.log_probs.shape[0] for t in trajectories) * K  # (candidate, step) pairs
    rows_of = [torch.arange(len(t.log_probs)).split(args.train_batch_size) for t in trajectories]
    offsets = np.cumsum([0] + [len(t.log_probs) for t in trajectories])
    for _ in range(args.num_inner_epochs):
        optimizer.zero_grad(set_to_none=True)
        finite = True
        for traj, offset, chunks in zip(trajectories, offsets, rows_of):
            for j in range(K):
                for rows in chunks:
                    log_prob, prev_mean, std_dev_t = rollout.step_log_prob(transformer, traj, j, rows)
                    adv = advantages[offset + rows].to(log_prob.device)
                    loss_pg, diag = grpo.policy_loss(log_prob, traj.log_probs[rows, j], adv, args.clip_range)
                    loss_kl = torch.zeros((), device=log_prob.device)
                    if args.beta > 0:
                        with torch.no_grad(), reference_policy(transformer):
                            _, ref_mean, _ = rollout.step_log_prob(transformer, traj, j, rows)
                        loss_kl = grpo.kl_loss(prev_mean, ref_mean, std_dev_t)
                    loss = loss_pg + args.beta * loss_kl
                    weight = len(rows) / total
                    finite = finite and bool(torch.isfinite(loss))
                    if finite:
                        (loss * weight).backward()
                    for key, value in [("loss/policy", loss_pg.item()), ("loss/kl", loss_kl.item()), *diag.items()]:
                        stats[key] += value * weight / args.num_inner_epochs
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        if finite and torch.isfinite(grad_norm):
            optimizer.step()
            stats["train/grad_norm"] += grad_norm.item() / args.num_inner_epochs
        else:
            stats["train/skipped_updates"] += 1
            tqdm.write("non-finite loss or gradient: update skipped")
        optimizer.zero_grad(set_to_none=True)
    return stats


def save_group_png(path, traj, rewards, advantages, candidates):
    """One scored group: the input and each candidate's layers, captioned with its reward, advantage and,
    for the VLM reward, the stage-1 total, the stage-2 score and each criterion's score."""
    captions = []
    for k, (r, a) in enumerate(zip(rewards.tolist(), advantages.tolist())):
        c = candidates[k] if k < len(candidates) else {}
        stages = [f"{n} {c[n]:.2f}" for n in ("stage1", "stage2") if isinstance(c.get(n), (int, float))]
        criteria = [f"{n[:5]} {v:.1f}" for n, v in (c.get("criteria") or {}).items()]
        captions.append("  ".join([f"r {r:.3f}  A {a:+.2f}", *stages, *criteria]))
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [chr(ord("A") + k) for k in range(len(rewards))]
    reward.render_group_grid(traj.images[0], traj.layers, labels, captions=captions).save(path)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    paths = data.find_images(args.images)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
    dtype = dtype if device == "cuda" else torch.float32
    judge = None
    if args.reward == "vlm" and args.judge != "text_encoder":  # fail fast, before the expensive model load
        options = {"local": {"device": device, "dtype": dtype},
                   "http": {"api_key_env": args.judge_api_key_env}}.get(args.judge, {})
        judge = reward.load_judge(args.judge, url=args.judge_url, **options,
                                  model=args.judge_model or (DEFAULT_JUDGE if args.judge == "local" else None))
    torch.manual_seed(args.seed)
    pipe = rollout.load_pipeline(args.pretrained_model_name_or_path, torch_dtype=dtype, device=device,
                                 captioning=args.prompt == "")
    prompt = args.prompt or None
    if prompt is not None:
        rollout.encode_prompt(pipe, prompt)  # cached on the pipeline: the text encoder is needed once
        if args.true_cfg_scale > 1:
            rollout.encode_prompt(pipe, " ")
        if args.reward == "vlm" and args.judge == "text_encoder":
            judge = reward.load_judge("text_encoder", pipeline=pipe)
        else:
            pipe.text_encoder = None  # 16 GiB on the real model, needed no more
            if device == "cuda":
                torch.cuda.empty_cache()
    transformer = pipe.transformer
    params = add_lora(transformer, args.rank, args.lora_alpha)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    start = load_checkpoint(args.resume_from_checkpoint, output_dir, transformer, optimizer) \
        if args.resume_from_checkpoint else 0
    reward_fn = reward.REWARDS[args.reward]
    print(f"{len(paths)} images, {sum(p.numel() for p in params) / 1e6:.2f}M LoRA parameters, device {device}")

    bar = tqdm(range(start, args.max_train_steps), initial=start, total=args.max_train_steps, desc="train")
    with open(output_dir / "metrics.jsonl", "a") as log:
        for step in bar:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            indices, layers, window, seed = step_plan(args, step, len(paths))
            generator = torch.Generator(device).manual_seed(seed)

            t0 = time.perf_counter()
            transformer.eval()
            trajectories = []
            for i in indices:
                with lora_precision(transformer):
                    traj = rollout.sample(pipe, [data.open_image(paths[i])], layers=layers, prompt=prompt,
                                          group_size=args.group_size,
                                          num_inference_steps=args.num_inference_steps, noise_level=args.noise_level,
                                          sde_window=window, sde_type=args.sde_type, resolution=args.resolution,
                                          true_cfg_scale=args.true_cfg_scale, generator=generator)
                traj.layers = traj.layers.cpu()
                trajectories.append(traj)

            t1 = time.perf_counter()
            rewards, infos = [], []
            for traj in trajectories:
                r, info = reward_fn(traj.images, traj.layers, args.group_size, judge=judge, seed=step)
                rewards.append(torch.as_tensor(r, dtype=torch.float32))
                infos.append(info)
            rewards = torch.cat(rewards)
            advantages = grpo.group_advantages(rewards, args.group_size, args.global_std,
                                               adv_clip_max=args.adv_clip_max)

            t2 = time.perf_counter()
            transformer.train()
            with lora_precision(transformer):
                stats = policy_update(transformer, trajectories, advantages, args, params, optimizer)
            t3 = time.perf_counter()

            scalars = {k: float(np.mean([i[k] for i in infos])) for k, v in infos[0].items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GPU allocated, or CPU process RSS
            record = {"step": step + 1, "reward/mean": rewards.mean().item(),
                      "reward/std": rewards.std(unbiased=False).item(),
                      **{f"reward/{k}" if "/" not in k else k: v for k, v in scalars.items()}, **stats,
                      "layers": layers, "window": list(window), "time/rollout_s": t1 - t0,
                      "time/reward_s": t2 - t1, "time/train_s": t3 - t2, "mem/peak_gb": peak}
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(reward=f"{record['reward/mean']:.3f}", loss=f"{stats['loss/policy']:.2e}")
            if args.sample_every and (step + 1) % args.sample_every == 0:
                save_group_png(output_dir / "samples" / f"step-{step + 1:06d}.png", trajectories[0],
                               rewards[: args.group_size], advantages[: args.group_size],
                               infos[0].get("candidates", []))
            if (step + 1) % args.checkpointing_steps == 0 or step + 1 == args.max_train_steps:
                save_checkpoint(output_dir, step + 1, transformer, optimizer, args, args.checkpoints_total_limit)

    tmp = output_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rollout.save_lora(transformer, tmp, base_model=args.pretrained_model_name_or_path)
    for item in tmp.iterdir():
        shutil.rmtree(output_dir / item.name, ignore_errors=True)
        os.replace(item, output_dir / item.name)
    tmp.rmdir()
    print(f"final LoRA in {output_dir} (pytorch_lora_weights.safetensors and peft/)")
    return pipe


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
