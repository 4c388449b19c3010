"""Several rewards, one LoRA: on-policy distillation of per-reward teacher LoRAs into one student (DiffusionOPD).

Train one teacher LoRA per reward with train.py, then distil all of them into one student LoRA along the
student's own rollouts, with the closed-form KL between the student's and each teacher's Gaussian step.

    # CPU dry run, tiny random model (about a minute): two teachers, then one student that learns from both
    T="--pretrained_model_name_or_path tiny --resolution 64 --layers 2 --group_size 4 --num_inference_steps 4 \\
       --images_per_step 1 --rank 4 --lora_alpha 8 --mixed_precision no --report_to none --max_train_steps 20"
    python train.py --images examples $T --reward opaque_background --beta 0 --learning_rate 3e-2 \
        --output_dir outputs/t-opaque
    python train.py --images examples $T --reward recon --beta 0 --learning_rate 3e-2 --output_dir outputs/t-recon
    python distill.py --images examples $T --learning_rate 1e-2 --output_dir outputs/distill \\
        --teacher opaque=outputs/t-opaque --teacher recon=outputs/t-recon/peft \\
        --teacher_reward opaque=opaque_background --teacher_reward recon=recon
    # one GPU: teacher "alpha" only on the images of its folder, at half weight; resume after a kill
    python distill.py --images my_designs/ --teacher layout=runs/layout --teacher alpha=runs/alpha:my_designs/alpha/ \\
        --teacher_weight alpha=0.5 --output_dir outputs/distill --resume_from_checkpoint latest

Per step (DiffusionOPD: Li, Yu, Jiang et al. 2026, "A unified view of on-policy distillation for diffusion
models"): draw --images_per_step images; roll out G candidates each with the STUDENT (rollout.sample, no
gradient; SDE on a window of K steps, ODE elsewhere); for every stored transition x_t -> x_{t-1} re-score it
under the student (with gradients) and under each teacher that applies (no gradients: the same transformer
with the teacher's adapter active, no second copy of the base weights), and take one AdamW step on
    loss = MEAN over (candidate b, window step j) of sum_k W[b, k] * KL_k(b, j)       (grpo.gaussian_mean_kl)
where W[b, k] = w_k (--teacher_weight, default 1, NOT normalised) if teacher k applies to b's image, else 0.

Choices that are ours (no public code for the paper is known):
- the exact step variance var = std_dev_t^2 |dt| (rollout.py's Gaussian), not upstream Flow-GRPO's habit of
  dropping |dt|: that habit only keeps beta's meaning next to a policy loss, and here the KL is the whole loss;
- SDE steps only: a window of K transitions drawn per step anywhere in 0..T-2, so over a run every step but
  the last is distilled (the last, sigma_next = 0, has std 0 and no KL). ODE steps outside the window are not
  trained: they store no state, and an Euler step has no variance to divide by;
- images, layer count, window and noise come from train.step_plan (seed, step), so a resume repeats a step;
  a teacher restricted to a folder (NAME=PATH:FOLDER) applies only to the images under it, as DiffusionOPD
  gives each teacher its own task's prompts;
- the student is a fresh LoRA (B = 0, so it starts as the base model) or a copy of one teacher
  (--student_init NAME); it is the adapter "default", which support/checkpoints.py saves and loads;
- one process (train.py's torchrun data parallelism is not wired in here).
Logs: loss/distill, kl/<teacher> (its mean per-element KL where it applies) and reward/<teacher>, that
teacher's reward (--teacher_reward NAME=REWARD) on the student's samples. Choices that are ours (flags):
--sde_type sde|cps, --report_to tensorboard|wandb|none, the model's flags of every script (rollout.add_model_flags:
--mixed_precision, --quantize, --compile, ...), the judge's flags for a --teacher_reward that scores with one (any
--reward of train.py: a name, FILE.py:FUNCTION or MODULE:FUNCTION).
"""

import argparse
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

import grpo
import lora
import reward
import rollout
import train
from support import checkpoints, cli, quantize, runfolder, tracking
from support.checkpoints import load_lora
from support.images import find_images
from support.pictures import render_group_grid
from support.scoring import call_reward

METHOD = "on-policy distillation of per-reward teachers (DiffusionOPD)"  # the model card's words


def parse_args(argv=None):
    p = cli.ArgumentParser(
        description="Distil several per-reward teacher LoRAs into one student LoRA (on-policy, DiffusionOPD).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--images", required=True, help="folder of unlabelled training images (searched recursively)")
    a(
        "--teacher",
        action="append",
        required=True,
        metavar="NAME=PATH[:FOLDER]",
        help="a teacher LoRA (diffusers .safetensors or folder, or PEFT folder); repeat per teacher; with :FOLDER it "
        "applies only to the images under FOLDER (which are added to the pool)",
    )
    a(
        "--teacher_weight",
        action="append",
        default=[],
        metavar="NAME=W",
        help="weight w_k of a teacher's KL (default 1)",
    )
    a(
        "--teacher_reward",
        action="append",
        default=[],
        metavar="NAME=REWARD",
        help="log this reward of the student's samples as reward/NAME: a name (" + ", ".join(reward.REWARDS) + "), "
        "FILE.py:FUNCTION or MODULE:FUNCTION, as train.py's --reward",
    )
    a(
        "--student_init",
        default=None,
        metavar="NAME",
        help="start the student as a copy of this teacher (default: a fresh LoRA)",
    )
    g = p.add_argument_group("the student's rollouts: Flow-GRPO's SDE sampler")
    a = g.add_argument
    a("--group_size", type=int, default=8, help="G: student rollouts per image")
    a("--images_per_step", type=int, default=4, help="images per optimizer step (train.py's default)")
    a("--layers", type=int, nargs="+", default=[4], help="layer count N, or a list to draw from per step")
    a("--resolution", type=int, default=640, help="longest side of the condition image in px (released: 640)")
    a(
        "--sizing",
        choices=["longest", "area"],
        default="longest",
        help="condition size rule, as the teachers were trained: longest side = resolution (released inference) or "
        "diffusers' area rule",
    )
    a("--prompt", default=rollout.DEFAULT_PROMPT, help="fixed prompt (the teachers' training prompt)")
    a("--num_inference_steps", type=int, default=10, help="T: sampling steps of the student's rollouts")
    a("--noise_level", type=float, default=1.2, help="a: SDE noise level (> 0: the KL divides by the variance)")
    a("--sde_type", choices=["sde", "cps"], default="sde", help="Flow-GRPO SDE step or coefficients-preserving")
    a("--sde_window", type=int, default=2, help="K: distilled (SDE) steps per rollout; 0 = all but the last")
    a(
        "--sde_window_range",
        type=int,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="window start drawn per step so the window lies in steps LO..HI-1 (default: 0..T-1, all but the last)",
    )
    g = p.add_argument_group("the update: the student's LoRA and its optimizer")
    a = g.add_argument
    a("--train_batch_size", type=int, default=2, help="candidates per forward/backward when re-scoring")
    a("--learning_rate", type=float, default=3e-4, help="AdamW learning rate of the student LoRA")
    a("--adam_weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    a("--max_grad_norm", type=float, default=1.0, help="gradient-norm clip")
    a("--rank", type=int, default=64, help="student LoRA rank r (ignored with --student_init)")
    a("--lora_alpha", type=int, default=128, help="student LoRA alpha (ignored with --student_init)")
    g = p.add_argument_group("the judge of a --teacher_reward that scores with one")
    a = g.add_argument
    reward.add_judge_flags(g)  # the judge of a --teacher_reward that scores with one, as in train.py and reward.py
    g = p.add_argument_group("model, memory and speed")
    a = g.add_argument
    rollout.add_model_flags(g)
    a("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True, help="recompute blocks")
    g = p.add_argument_group("the run: its folder, length, checkpoints, tracker and seed")
    a = g.add_argument
    tracking.add_run_flags(g, "outputs/distill", 300, 25, sample_every=10)
    a("--seed", type=int, default=42, help="seed of every random draw (images, layers, noise, window)")
    args = p.parse_args(argv)
    T = args.num_inference_steps
    args.sde_window_range = args.sde_window_range or [0, T - 1]  # train.step_plan draws the window in it
    args.true_cfg_scale, args.cfg_normalize, args.decode_chunk = 1.0, True, 8  # train.roll_out with CFG off
    args.teachers, names = {}, []
    for spec in args.teacher:
        name, eq, rest = spec.partition("=")
        path, _, folder = rest.partition(":")
        if not eq or not path or not re.fullmatch(r"[A-Za-z_]\w*", name) or name == "default" or name in names:
            p.error(
                f"--teacher {spec!r}: write NAME=PATH or NAME=PATH:FOLDER, NAME a distinct identifier, "
                "not 'default' (the student's adapter)"
            )
        names.append(name)
        args.teachers[name] = {"path": path, "folder": folder or None, "weight": 1.0, "reward": None}
    for flag, key, cast in (("--teacher_weight", "weight", float), ("--teacher_reward", "reward", str)):
        for spec in getattr(args, flag[2:]):
            name, eq, value = spec.partition("=")
            if not eq or name not in args.teachers:
                p.error(f"{flag} {spec!r}: write NAME=VALUE with NAME one of {names}")
            try:
                args.teachers[name][key] = cast(value)
            except ValueError:
                p.error(f"{flag} {spec!r}: {value!r} is not a number")
    checks = [
        (T >= 2 and 0 <= args.sde_window <= T - 1, f"--sde_window must be in 0..T-1 = {T - 1} (T >= 2)"),
        (args.noise_level > 0, "--noise_level must be > 0 (the KL divides by the step variance)"),
        (all(t["weight"] >= 0 for t in args.teachers.values()), "--teacher_weight must be >= 0"),
        (args.student_init in (None, *names), f"--student_init must be one of {names}"),
        (min(args.layers) >= 1 and args.group_size >= 1 and args.prompt, "--layers/--group_size/--prompt"),
        (args.resolution % 16 == 0, "--resolution must be a multiple of 16 (the model uses 640 or 1024)"),
        (args.max_train_steps >= 0 and args.checkpointing_steps >= 1, "--max_train_steps/--checkpointing_steps"),
    ]
    cli.check(p, checks)
    return args


# ----------------------------------------------------------------------------- the images and their teachers
def image_pool(args):
    """(image paths, W (num_images, num_teachers) float weights): --images plus every teacher's folder;
    W[i, k] = w_k where teacher k applies to image i (no folder, or the image lies under its folder), else 0."""
    paths = {p.resolve(): p for p in find_images(args.images)}
    for t in args.teachers.values():
        if t["folder"]:
            paths.update({p.resolve(): p for p in find_images(t["folder"])})
    resolved = sorted(paths)
    W = torch.tensor(
        [
            [
                t["weight"] if not t["folder"] or p.is_relative_to(Path(t["folder"]).resolve()) else 0.0
                for t in args.teachers.values()
            ]
            for p in resolved
        ]
    )  # (num_images, num_teachers)
    if not (W > 0).any(1).all():
        raise cli.InputError(
            f"{paths[resolved[int((W > 0).any(1).logical_not().nonzero()[0])]]}: no teacher with "
            "weight > 0 applies to this image; give a teacher without :FOLDER"
        )
    return [paths[p] for p in resolved], W


# ----------------------------------------------------------------------------- one step
def distill_update(transformer, trajectories, weights, names, args, params, optimizer):
    """One optimizer step on loss = MEAN over (candidate b, window step j) of sum_k W[b, k] KL_k(b, j).
    trajectories: one per image, weights: (num_images_this_step, num_teachers). Returns the step's stats."""
    K = trajectories[0].log_probs.shape[1]
    total = sum(t.log_probs.shape[0] for t in trajectories) * K  # (candidate, step) pairs
    kl_sum, kl_count = torch.zeros(len(names)), torch.zeros(len(names))
    stats = {"loss/distill": 0.0, "train/grad_norm": 0.0, "train/skipped_updates": 0}
    transformer.train()
    optimizer.zero_grad(set_to_none=True)
    finite = True
    for traj, w in zip(trajectories, weights):
        for j in range(K):
            i = traj.window[0] + j
            for rows in torch.arange(traj.log_probs.shape[0]).split(args.train_batch_size):
                teacher_means = {}
                with torch.no_grad():
                    for k in w.nonzero().flatten().tolist():
                        with lora.active_adapter(transformer, names[k]):
                            teacher_means[k] = rollout.step_log_prob(transformer, traj, j, rows)[1]
                _, student_mean, std_dev_t = rollout.step_log_prob(transformer, traj, j, rows)
                dt = traj.sigmas[i + 1] - traj.sigmas[i]  # < 0
                var = std_dev_t**2 * (dt.abs() if traj.sde_type == "sde" else 1.0)
                loss = 0.0
                for k, teacher_mean in teacher_means.items():
                    kl = grpo.gaussian_mean_kl(student_mean, teacher_mean, var)  # (b,)
                    loss = loss + w[k] * kl.sum() / total
                    kl_sum[k] += kl.sum().item()
                    kl_count[k] += len(rows)
                finite = finite and bool(torch.isfinite(loss))
                if finite:
                    loss.backward()
                stats["loss/distill"] += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
    if finite and torch.isfinite(grad_norm):
        optimizer.step()
        stats["train/grad_norm"] = grad_norm.item()
    else:
        stats["train/skipped_updates"] = 1
        tqdm.write("non-finite loss or gradient: update skipped")
    optimizer.zero_grad(set_to_none=True)
    stats.update({f"kl/{n}": (kl_sum[k] / kl_count[k]).item() for k, n in enumerate(names) if kl_count[k]})
    return stats


@torch.no_grad()
def log_step(log, step, plan, scores, stats, traj, args, timer, device, save):
    """One row of metrics.jsonl (and the tracker), a checkpoint every --checkpointing_steps, a sample picture (the
    first group, captioned with each teacher's reward) every --sample_every steps: train.log_step's plumbing."""
    done = step + 1
    record = {
        "step": done,
        **stats,
        **{f"reward/{n}": r.mean().item() for n, r in scores.items()},
        "layers": plan.layers,
        "window": list(plan.window),
    }
    due = done % args.checkpointing_steps == 0 or done == args.max_train_steps
    log.step(record, timer, device, save if due else None)
    if args.sample_every and done % args.sample_every == 0:
        captions = [" ".join(f"{n} {r[k]:.3f}" for n, r in scores.items()) for k in range(args.group_size)]
        labels = [chr(ord("A") + k) for k in range(args.group_size)]
        log.sample(render_group_grid(traj.images[0], traj.layers, labels, captions), done)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    names = list(args.teachers)
    with cli.input_errors():  # setup: bad input (flags, files, servers, environment) is one line, exit 2
        rewards = {n: reward.resolve_reward(t["reward"]) for n, t in args.teachers.items() if t["reward"]}
        if runfolder.finished(output_dir, args.resume_from_checkpoint, args.max_train_steps):
            return None  # resumed at or past --max_train_steps: nothing to train, nothing written
        lock = runfolder.claim_output_dir(output_dir, args.resume_from_checkpoint)
        device, dtype = cli.pick_device(args.device, args.mixed_precision)
        paths, W = image_pool(args)
        cli.check_hub(args.pretrained_model_name_or_path, cli.flag_value(args, "pretrained_model_name_or_path"))
        judge = reward.load_judge(args, list(rewards.values()), device, dtype)
        quantize.check(args.quantize, device)
        pipe = rollout.load_pipeline(
            args.pretrained_model_name_or_path, torch_dtype=dtype, device=device, kind=args.quantize
        )
        rollout.encode_prompt(pipe, args.prompt)  # cached on the pipeline: the text encoder is needed once
        judge = judge or reward.load_judge(args, list(rewards.values()), device, dtype, pipeline=pipe)
        if args.judge != "text_encoder":
            rollout.free_text_encoder(pipe)
        transformer = pipe.transformer
        transformer.requires_grad_(False)
        if args.student_init:
            load_lora(pipe, args.teachers[args.student_init]["path"], "default", f"--teacher {args.student_init}=")
        else:
            torch.manual_seed(args.seed)  # the LoRA's gaussian init of A (B = 0)
            lora.add_lora(transformer, args.rank, args.lora_alpha)
        for name, t in args.teachers.items():
            load_lora(pipe, t["path"], name, f"--teacher {name}=")
        transformer.set_adapter("default")
        params = lora.trainable_lora(transformer)  # the student's LoRA only, in fp32 (the optimizer's copy)
        if args.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        rollout.speed_up(transformer, args.attention_backend, args.compile)
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
        start = 0
        if args.resume_from_checkpoint:
            start = checkpoints.load_checkpoint(args.resume_from_checkpoint, output_dir, transformer, optimizer)
        log = tracking.RunLog(output_dir, args.report_to, config=vars(args), project="stable-layers-distill")
    print(
        f"{len(paths)} images, teachers {names}, {sum(p.numel() for p in params) / 1e6:.2f}M student "
        "LoRA parameters, " + cli.device_line(device, dtype, args.quantize)
    )
    timer = tracking.Timer()
    bar = tqdm(range(start, args.max_train_steps), initial=start, total=args.max_train_steps, desc="distill")

    save = checkpoints.saver(output_dir, transformer, optimizer, args, METHOD)
    with tracking.guard(
        output_dir, timer, save, close=lambda: (bar.close(), log and log.close(), runfolder.release(lock))
    ):
        for step in bar:
            plan = train.step_plan(args, step, len(paths))  # all from (seed, step), as train.py's
            decode = bool(rewards) or bool(args.sample_every and (step + 1) % args.sample_every == 0)
            with timer("rollout"):
                trajectories = [
                    train.roll_out(pipe, args, paths[i], plan, k, device, decode) for k, i in enumerate(plan.indices)
                ]
            with timer("reward"):  # name -> (B,): each teacher's reward of the student's samples, logged only
                scores = {
                    n: torch.cat(
                        [
                            call_reward(
                                fn,
                                f"--teacher_reward {n}={args.teachers[n]['reward']}",
                                t.images,
                                t.layers,
                                args.group_size,
                                judge=judge,
                                seed=s,
                            )[0]
                            for t, s in zip(trajectories, plan.seeds)
                        ]
                    )
                    for n, fn in rewards.items()
                }
            with timer("train"), lora.lora_precision(transformer):
                stats = distill_update(transformer, trajectories, W[plan.indices], names, args, params, optimizer)
            with timer("log"):
                log_step(log, step, plan, scores, stats, trajectories[0], args, timer, device, save)
                bar.set_postfix(loss=f"{stats['loss/distill']:.3e}")
    checkpoints.save_final(output_dir, transformer, args, method=METHOD)  # the student: adapter "default"
    log.close()
    runfolder.release(lock)
    print(runfolder.written(output_dir))
    return pipe


if __name__ == "__main__":
    main()
