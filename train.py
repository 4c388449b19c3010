"""Stable-Layers training: Flow-GRPO with LoRA on Qwen-Image-Layered, rewarded by a VLM judge, no paired data.

    # CPU dry run, tiny random model and tiny random judge (seconds)
    python train.py --images examples --pretrained_model_name_or_path tiny --judge tiny --resolution 64 \\
        --layers 2 3 --group_size 4 --images_per_step 2 --num_inference_steps 4 --max_train_steps 4 \\
        --checkpointing_steps 2 --sample_every 2 --output_dir outputs/dry-run --rank 4 --lora_alpha 8
    # one 80 GB GPU, judge served elsewhere (vLLM/SGLang/Gemini, OpenAI-compatible; key in $OPENAI_API_KEY)
    python train.py --images my_designs/ --judge_url http://judge-host:8000/v1 --judge_model Qwen/Qwen3.5-9B
    # eight GPUs on one node: the same flags, the same algorithm, 8 data-parallel ranks
    torchrun --nproc_per_node 8 train.py --images my_designs/ --judge_url http://judge-host:8000/v1 \\
        --images_per_step 8
    # resume after a crash or kill (any number of ranks): same step numbers, data order and random draws
    python train.py --images my_designs/ ... --resume_from_checkpoint latest

The algorithm (main's loop, one call per line of it), for each optimizer step s:
    plan        images_per_step images, the layer count, the SDE window and the seeds, from (seed, s) alone
    roll out    G candidates per image with no gradient (rollout.sample: SDE on the window's K steps, ODE elsewhere)
    score       r = reward(images, layers) (--reward: reward.vlm_reward by default, the VLM judge)
    advantages  A = group_advantages(r) (grpo.py: centred per image, divided by the step's std, clipped)
    update      per inner epoch: re-score every stored transition j with gradients (rollout.step_log_prob);
                loss = MEAN over (candidate, trained step j) of [policy_loss + beta * KL to the reference policy];
                clip the gradient norm; one AdamW step
    log         metrics.jsonl and the tracker, a sample picture, a checkpoint
Every random draw of step s derives from (--seed, s, image position), never from the rank or the number of ranks,
so 1 or 8 processes train the same LoRA. Scaffolding sits behind one interface each, in support/: scoring.py (the
judge's overlap with rollouts, gathering across ranks, a judge that answers nothing), runfolder.py and
checkpoints.py (one run per folder, checkpoints, resume), tracking.py (metrics, timers, stopping with one line),
parallel.py (ranks and collectives), memory.py (the start-up memory check), cli.py (flags and bad input).

Recipe: Flow-GRPO's Qwen-Image trainer (config pickscore_qwenimage, arXiv:2505.05470) wherever the paper and the
released Stable-Layers model are silent, the released model where they speak (640 px longest side, 4 layers,
CFG off, fixed prompt). Every departure, as `setting: upstream -> here. Why.` (tests/test_train.py checks these
against UPSTREAM and parse_args' defaults, and that docs/training.md's table says the same):
  --group_size: 16 -> 8. One GPU: a rollout holds G candidates at once and a step costs G; noisier advantages.
  --images_per_step: 8 -> 4. One GPU: 32 samples per optimizer step instead of 128; use 8 with 8 GPUs.
  --true_cfg_scale: 4.0 -> 1.0. The released Stable-Layers setting (CFG off); CFG during RL collapses upstream; halves
      the forwards.
  --beta: 0.0 -> 0.04. The Flow-GRPO paper's KL weight, kept as a guard against hacking a VLM judge (upstream answers
      grid artefacts and blur by raising beta); costs a reference forward per trained sample; --beta 0 is upstream.
  --train_batch_size: 4 -> 2. Memory: 2 is what cards under 80 GB need; 4 fits 80 GB with the judge elsewhere and is a
      little faster per updated sample.
  rollout batch: 4 -> G. One image's G candidates share one batch (Layer-3D RoPE needs same-size rows; fewer launches).
  sampler state between steps: bf16 -> fp32. Exact log-probs of the stored transitions, for a small share of a step's
      memory.
  advantage groups: prompt text -> image. The prompt is fixed, so the image is what a group shares.
"""

import argparse
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

import grpo
import lora
import reward
import rollout
from support import checkpoints, cli, memory, parallel, quantize, runfolder, tracking
from support.images import find_images, open_image
from support.pictures import sample_picture
from support.scoring import Scoring

# flag -> upstream value (Flow-GRPO's Qwen-Image recipe); a default that differs is a departure in the docstring
UPSTREAM = {
    "group_size": 16,
    "images_per_step": 8,
    "num_inference_steps": 10,
    "noise_level": 1.2,
    "sde_type": "sde",
    "sde_window": 2,
    "true_cfg_scale": 4.0,
    "cfg_normalize": True,
    "clip_range": 1e-4,
    "beta": 0.0,
    "adv_clip_max": 5.0,
    "adv_std": "global",
    "num_inner_epochs": 1,
    "train_batch_size": 4,
    "learning_rate": 3e-4,
    "adam_weight_decay": 1e-4,
    "max_grad_norm": 1.0,
    "rank": 64,
    "lora_alpha": 128,
    "mixed_precision": "bf16",
}


def parse_args(argv=None):
    p = cli.ArgumentParser(
        description="Flow-GRPO + LoRA fine-tuning of Qwen-Image-Layered with a VLM reward.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--images", required=True, help="folder of unlabelled training images (searched recursively)")
    a(
        "--init_lora",
        default=None,
        help="start from this LoRA (a train.py/sft.py output folder or a PEFT adapter folder); it is also the KL "
        "reference; its rank and targets replace --rank/--lora_alpha",
    )
    g = p.add_argument_group("rollouts: G candidates per image, Flow-GRPO's SDE sampler")
    a = g.add_argument
    a("--group_size", type=int, default=8, help="G: candidates per image")
    a(
        "--images_per_step",
        type=int,
        default=4,
        help="images (groups) per optimizer step, over all ranks (a multiple of their number); step times: "
        "docs/performance.md",
    )
    a("--layers", type=int, nargs="+", default=[4], help="layer count N, or a list to draw from per step")
    a("--resolution", type=int, default=640, help="longest side of the condition image in px (released: 640)")
    a(
        "--sizing",
        choices=["longest", "area"],
        default="longest",
        help="condition size rule: longest side = resolution, multiples of 16 (released inference) or diffusers' "
        "area rule",
    )
    a("--prompt", default=rollout.DEFAULT_PROMPT, help="fixed prompt (released setting); '' auto-captions")
    a("--num_inference_steps", type=int, default=10, help="T: sampling steps during training rollouts")
    a("--noise_level", type=float, default=1.2, help="a: SDE noise level (Flow-GRPO's Qwen-Image setting)")
    a("--sde_type", choices=["sde", "cps"], default="sde", help="Flow-GRPO SDE step or coefficients-preserving")
    a(
        "--sde_window",
        type=int,
        default=2,
        help="K: consecutive SDE (trained) steps per rollout; 0 = every step but the last (0..T-2: the last step, to "
        "sigma 0, is never trained)",
    )
    a(
        "--sde_window_range",
        type=int,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="window start drawn per step so the window lies in steps LO..HI-1 (default: 0..max(K, T/2))",
    )
    a("--true_cfg_scale", type=float, default=1.0, help="true CFG scale in rollouts; 1 = off (released setting)")
    a(
        "--cfg_normalize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with CFG: rescale the guided velocity to the conditional norm per token (upstream)",
    )
    g = p.add_argument_group("reward: the VLM judge, or a reward of your own")
    a = g.add_argument
    reward.add_reward_flags(g)  # --reward, --reward_args and the judge's flags, as in distill.py and reward.py
    a(
        "--judge_concurrency",
        type=int,
        default=None,
        help="http: requests in flight at once, across the groups of a step (default: all of a step's, images per "
        "rank x (G + 1), so no group waits for a slot)",
    )
    a(
        "--judge_offload",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="local: keep the judge's weights in CPU memory except while it scores (the peak is max(update, resident "
        "+ judge), not their sum)",
    )
    a(
        "--judge_overlap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="http: judge each group in a thread while the GPU rolls out the next (same rewards, same LoRA as serial)",
    )
    a(
        "--judge_max_failed_steps",
        type=int,
        default=1,
        help="stop after this many steps in a row in which the judge answered none of its requests (such steps are "
        "never trained), saving the state for --resume_from_checkpoint latest once the judge is back",
    )
    g = p.add_argument_group("objective and update: group advantages, the clipped ratio, the KL, the LoRA")
    a = g.add_argument
    a("--clip_range", type=float, default=1e-4, help="eps of the clipped ratio (small: log-probs are dim means)")
    a("--beta", type=float, default=0.04, help="KL weight (see the departures table); 0 skips the reference forward")
    a("--adv_clip_max", type=float, default=5.0, help="advantages are clipped to [-x, x]")
    a(
        "--adv_std",
        choices=["global", "group"],
        default="global",
        help="advantage normaliser: std of all rewards of the optimizer step (upstream) or of each image's group",
    )
    a("--num_inner_epochs", type=int, default=1, help="passes over one step's rollouts (1 = fully on-policy)")
    a("--train_batch_size", type=int, default=2, help="candidates per forward/backward when re-scoring")
    a("--learning_rate", type=float, default=3e-4, help="AdamW learning rate of the LoRA")
    a("--adam_weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    a("--max_grad_norm", type=float, default=1.0, help="gradient-norm clip")
    a("--rank", type=int, default=64, help="LoRA rank r")
    a("--lora_alpha", type=int, default=128, help="LoRA alpha (scale alpha / r)")
    g = p.add_argument_group("model, memory and speed")
    a = g.add_argument
    rollout.add_model_flags(g)
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True, help="recompute blocks")
    a(
        "--decode_chunk",
        type=int,
        default=8,
        help="VAE frames decoded at a time after a rollout (fewer: less memory; python -m bench.memory)",
    )
    a(
        "--memory_check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA, compare the memory plan for these flags (python -m bench.memory) with the card at start-up "
        "and stop with one line if it does not fit",
    )
    a(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="under torchrun: shard the frozen transformer across the ranks (FSDP2), so that several smaller GPUs "
        "train the bf16 model; the LoRA, the algorithm and the checkpoints are unchanged (support/parallel.py)",
    )
    g = p.add_argument_group("the run: its folder, length, checkpoints, tracker and seed")
    a = g.add_argument
    tracking.add_run_flags(g, "outputs/stable-layers", 300, 25, sample_every=10)
    a("--seed", type=int, default=42, help="seed of every random draw (data order, layers, noise, window)")
    args = p.parse_args(argv)
    T = args.num_inference_steps
    checks = [
        (args.group_size >= 2, "--group_size must be >= 2 (advantages are relative within a group)"),
        (min(args.layers) >= 1, "--layers must be >= 1"),
        (T >= 2, "--num_inference_steps must be >= 2 (the last step is never trained)"),
        (
            0 <= args.sde_window <= T - 1,
            f"--sde_window must be in 0..{T - 1} (--num_inference_steps - 1: the "
            "last step, to sigma 0, is never trained)",
        ),
        (args.resolution % 16 == 0, "--resolution must be a multiple of 16 (the model uses 640 or 1024)"),
        (args.images_per_step >= 1, "--images_per_step must be >= 1"),
        (args.judge_concurrency is None or args.judge_concurrency >= 1, "--judge_concurrency must be >= 1"),
        (args.judge_max_failed_steps >= 1, "--judge_max_failed_steps must be >= 1"),
        (args.decode_chunk >= 1, "--decode_chunk must be >= 1"),
        (
            not (args.judge_url and args.judge not in (None, "http")),
            f"--judge {args.judge} with --judge_url: the URL is for --judge http; drop one of them",
        ),
        (
            args.group_size <= 26 or args.judge is None and args.reward != "vlm",
            "--group_size must be <= 26 with the VLM judge (the grid labels candidates A-Z)",
        ),
        (args.max_train_steps >= 0 and args.checkpointing_steps >= 1, "--max_train_steps/--checkpointing_steps"),
    ]
    cli.check(p, checks)
    return args


# ----------------------------------------------------------------------------- the method
class Plan(NamedTuple):
    indices: list  # the step's image indices, one per image position k
    layers: int  # N, the layer count of every rollout of the step
    window: tuple  # (start, end): the SDE (trained) steps start..end-1
    seeds: list  # one rollout seed per image position k


def step_plan(args, step, num_images):
    """Everything random about step `step`, from (seed, step) alone: image indices (epoch-wise permutations),
    layer count, window, and one rollout seed per image position k (so no draw depends on the rank)."""
    rng = random.Random(args.seed * 1_000_003 + step)
    indices = []
    for k in range(args.images_per_step):
        position = step * args.images_per_step + k
        epoch = position // num_images
        epoch_order = torch.randperm(num_images, generator=torch.Generator().manual_seed(args.seed + epoch))
        indices.append(int(epoch_order[position % num_images]))
    T = args.num_inference_steps
    K = args.sde_window or T - 1
    lo, hi = args.sde_window_range or (0, max(K, T // 2))
    start = rng.randint(lo, max(lo, min(hi, T - 1) - K))
    layers = rng.choice(args.layers)
    seeds = [random.Random(f"{args.seed}/{step}/{k}").getrandbits(63) for k in range(args.images_per_step)]
    return Plan(indices, layers, (start, start + K), seeds)


@torch.no_grad()
def roll_out(pipe, args, path, plan, k, device, decode=True):
    """The G candidates of image position k of the step: rollout.sample with the policy (LoRA on), SDE on the plan's
    window and ODE elsewhere, log-probs of the window's transitions kept; layers decoded (if decode), on the CPU for
    the reward. distill.py rolls out its student with it too."""
    pipe.transformer.eval()
    with lora.lora_precision(pipe.transformer):
        traj = rollout.sample(
            pipe,
            [open_image(path)],
            layers=plan.layers,
            prompt=args.prompt or None,
            group_size=args.group_size,
            num_inference_steps=args.num_inference_steps,
            noise_level=args.noise_level,
            sde_window=plan.window,
            sde_type=args.sde_type,
            resolution=args.resolution,
            sizing=args.sizing,
            true_cfg_scale=args.true_cfg_scale,
            cfg_normalize=args.cfg_normalize,
            decode=decode,
            decode_chunk=args.decode_chunk,
            generator=torch.Generator(device).manual_seed(plan.seeds[k]),
        )
    traj.layers = traj.layers.cpu() if decode else None
    return traj


def policy_update(transformer, trajectories, advantages, args, params, optimizer):
    """One optimizer step per inner epoch over all stored transitions (Flow-GRPO's objective):

        loss = MEAN over (candidate b, trained step j) of [ policy_loss(b, j) + beta * KL(b, j) ]

    policy_loss is grpo.policy_loss's clipped surrogate at re-scored log-prob vs the rollout's; KL is grpo.kl_loss
    against the reference policy (lora.reference_policy: the LoRA off, or the --init_lora start). trajectories: this
    rank's groups; advantages: (their candidates,) in the same order. Each rank holds the same number of pairs, so
    the step's mean weighs each pair 1 / (pairs per rank x ranks); the gradients are summed across ranks
    (parallel.sum_gradients) and the update is one process's. A non-finite loss or gradient skips the step."""
    stats = dict.fromkeys(["loss/policy", "loss/kl", "diag/clipfrac", "diag/approx_kl", "diag/ratio_mean"], 0.0)
    skipped, grad_norms = 0, []
    K = trajectories[0].log_probs.shape[1]  # trained steps per candidate
    total = len(advantages) * K * parallel.world_size()  # (candidate, step) pairs of the optimizer step
    per_group = advantages.split([len(t.log_probs) for t in trajectories])
    transformer.train()
    for _ in range(args.num_inner_epochs):
        optimizer.zero_grad(set_to_none=True)
        finite = True
        for traj, adv in zip(trajectories, per_group):
            for j in range(K):
                for rows in torch.arange(len(adv)).split(args.train_batch_size):
                    log_prob, prev_mean, std_dev_t = rollout.step_log_prob(transformer, traj, j, rows)
                    loss_pg, diag = grpo.policy_loss(
                        log_prob, traj.log_probs[rows, j], adv[rows].to(log_prob.device), args.clip_range
                    )
                    loss_kl = torch.zeros((), device=log_prob.device)
                    if args.beta > 0:
                        with torch.no_grad(), lora.reference_policy(transformer):
                            _, ref_mean, _ = rollout.step_log_prob(transformer, traj, j, rows)
                        loss_kl = grpo.kl_loss(prev_mean, ref_mean, std_dev_t)
                    loss = loss_pg + args.beta * loss_kl
                    weight = len(rows) / total
                    finite = parallel.all_true(finite and bool(torch.isfinite(loss)))  # every rank backward, or none
                    if finite:
                        (loss * weight).backward()
                    for key, value in [("loss/policy", loss_pg), ("loss/kl", loss_kl), *diag.items()]:
                        stats[key] += value.item() * weight / args.num_inner_epochs
        parallel.sum_gradients(params)  # the sum over ranks (`finite` already agrees across them)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        if finite and torch.isfinite(grad_norm):
            optimizer.step()
            grad_norms.append(grad_norm.item())
        else:
            skipped += 1
            tqdm.write("non-finite loss or gradient: update skipped")
        optimizer.zero_grad(set_to_none=True)
    stats = parallel.sum_floats(stats, params[0].device)
    return {
        **stats,
        "train/grad_norm": float(np.mean(grad_norms)) if grad_norms else 0.0,
        "train/skipped_updates": skipped,
    }


NOT_TRAINED = {"train/grad_norm": 0.0, "train/skipped_updates": 1}  # a step the judge did not answer


def log_step(log, step, plan, scores, advantages, stats, traj, args, timer, device, save):
    """One row of metrics.jsonl (and the tracker): the rewards and what the reward reported (the judge's stage1/*,
    stage2/*, judge/*), the update's losses and diagnostics, times and memory; a checkpoint every
    --checkpointing_steps (time/checkpoint_s) and at the end, unless the judge did not answer; every --sample_every
    steps the picture of this rank's first group, captioned with rewards, advantages and scores."""
    G, done = args.group_size, step + 1
    record = {
        "step": done,
        **scores.metrics,
        "reward/mean": scores.rewards.mean().item(),
        "reward/std": scores.rewards.std(unbiased=False).item(),
        **stats,
        "layers": plan.layers,
        "window": list(plan.window),
        "time/reward_s": scores.reward_s,
    }
    due = scores.answered and (done % args.checkpointing_steps == 0 or done == args.max_train_steps)
    log.step(record, timer, device, save if due else None)
    if args.sample_every and done % args.sample_every == 0:
        log.sample(
            sample_picture(traj.images[0], traj.layers, scores.rewards[:G], advantages[:G], scores.candidates), done
        )


def build_policy(args, device, dtype):
    """The pipeline with its trainable LoRA: the model loaded (with --fsdp on the CPU, so that a GPU never holds the
    whole transformer), the fixed prompt encoded once (then the text encoder freed, unless it is the judge), the LoRA
    added (fresh, or --init_lora's), gradient checkpointing, the speed levers, and with --fsdp the frozen weights
    sharded. Returns (pipe, LoRA parameters)."""
    pipe = rollout.load_pipeline(
        args.pretrained_model_name_or_path,
        torch_dtype=dtype,
        device=None if args.fsdp else device,
        captioning=args.prompt == "",
        kind=args.quantize,
    )
    if args.prompt:  # a fixed prompt: encoded once, cached on the pipeline
        for prompt in [args.prompt, " "] if args.true_cfg_scale > 1 else [args.prompt]:
            rollout.encode_prompt(pipe, prompt)
        if args.judge != "text_encoder":
            rollout.free_text_encoder(pipe)  # needed no more
    transformer = pipe.transformer
    torch.manual_seed(args.seed)  # the LoRA's gaussian init
    params = (
        lora.add_init_lora(transformer, args.init_lora)
        if args.init_lora
        else lora.add_lora(transformer, args.rank, args.lora_alpha)
    )
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    rollout.speed_up(transformer, args.attention_backend, args.compile)
    if args.fsdp:
        whole, local = parallel.shard(transformer, params, device)
        print(
            f"rank {parallel.rank()}: {local / 2**30:.3g} of the frozen transformer's {whole / 2**30:.3g} GiB (--fsdp)"
        )
        for module in (pipe.vae, pipe.text_encoder):  # the rest of the pipeline, whole on every rank
            if module is not None:
                module.to(device)
    return pipe, params


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    with cli.input_errors():  # setup: bad input (flags, files, servers, environment) is one line, exit 2
        reward_fn = reward.resolve_reward(args.reward)
        reward_args = reward.reward_kwargs(reward_fn, args.reward, args.reward_args)
        if runfolder.finished(output_dir, args.resume_from_checkpoint, args.max_train_steps):
            return None  # resumed at or past --max_train_steps: nothing to train, nothing written
        device, dtype = cli.pick_device(args.device, args.mixed_precision)
        rank, world, device = parallel.init_distributed(device)
        parallel.check_fsdp(args.fsdp, world, args.quantize, args.compile)
        if args.images_per_step % world:
            raise cli.InputError(
                f"--images_per_step {args.images_per_step} must be a multiple of the number of ranks ({world})"
            )
        lock = runfolder.claim_output_dir(output_dir, args.resume_from_checkpoint) if rank == 0 else None
        paths = find_images(args.images)
        if device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 parts, as upstream
            cli.check_attention(device, dtype)
        quantize.check(args.quantize, device)
        cli.check_hub(args.pretrained_model_name_or_path, cli.flag_value(args, "pretrained_model_name_or_path"))
        G, per_rank = args.group_size, args.images_per_step // world
        judge = reward.load_judge(
            args, [reward_fn], device, dtype, concurrency=args.judge_concurrency or per_rank * (G + 1)
        )  # checked before the model load; all of a step's requests
        pipe, params = parallel.in_turn(lambda: build_policy(args, device, dtype), turns=args.fsdp)
        transformer = pipe.transformer
        judge = judge or reward.load_judge(args, [reward_fn], device, dtype, pipeline=pipe)  # --judge text_encoder
        if device.startswith("cuda") and args.memory_check:  # the plan for these flags against this rank's card
            line = memory.check_run(args, pipe, params, judge, world if args.fsdp else 1)
            if rank == 0:
                print(line)
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
        start = (
            checkpoints.load_checkpoint(args.resume_from_checkpoint, output_dir, transformer, optimizer, rank == 0)
            if args.resume_from_checkpoint
            else 0
        )
        log = tracking.RunLog(output_dir, args.report_to, vars(args)) if rank == 0 else None
    if rank == 0:
        print(
            f"{len(paths)} images, {sum(p.numel() for p in params) / 1e6:.2f}M LoRA parameters, {world} rank(s), "
            + cli.device_line(device, dtype, args.quantize)
        )
    mine = range(rank * per_rank, (rank + 1) * per_rank)  # this rank's image positions of every step
    rows = slice(mine.start * G, mine.stop * G)  # ... and their candidates' rows
    timer = tracking.Timer()
    scorer = Scoring(
        reward_fn,
        args.reward,
        judge,
        G,
        timer,
        reward_args,
        threads=per_rank,
        overlap=judge is not None and judge.kind == "http" and args.judge_overlap,
        max_failed_steps=args.judge_max_failed_steps,
        last_step=args.max_train_steps,
    )
    bar = tqdm(
        range(start, args.max_train_steps), initial=start, total=args.max_train_steps, desc="train", disable=rank != 0
    )

    save = checkpoints.saver(output_dir, transformer, optimizer, args)
    with (
        tracking.guard(
            output_dir, timer, save, close=lambda: (bar.close(), log and log.close(), runfolder.release(lock))
        ),
        scorer,
    ):
        for step in bar:
            plan = step_plan(args, step, len(paths))
            trajectories = []
            for k in mine:
                with timer("rollout"):
                    trajectories.append(roll_out(pipe, args, paths[plan.indices[k]], plan, k, device))
                scorer.submit(trajectories[-1], step, plan.seeds[k])  # an HTTP judge scores while the next rolls out
            scores = scorer.gather(step)  # every rank's rewards in image order (tracking.Stop if the judge is down)
            global_std = args.adv_std == "global"
            advantages = grpo.group_advantages(scores.rewards, G, global_std, adv_clip_max=args.adv_clip_max)  # (B,)
            with timer("train"), lora.lora_precision(transformer):
                if scores.answered:  # never train on fallback rewards alone
                    stats = policy_update(transformer, trajectories, advantages[rows], args, params, optimizer)
                else:
                    stats = NOT_TRAINED
            if rank == 0:
                with timer("log"):
                    log_step(log, step, plan, scores, advantages, stats, trajectories[0], args, timer, device, save)
                    bar.set_postfix(reward=f"{scores.rewards.mean().item():.3f}")
    if rank == 0:
        checkpoints.save_final(output_dir, transformer, args)
        log.close()
        runfolder.release(lock)
        print(runfolder.written(output_dir))
    parallel.close()
    return pipe


if __name__ == "__main__":
    main()
