"""The speed levers against eager, in one run on one build: --attention_backend, --compile, twice --train_batch_size.

python -m bench --levers --device cuda            # all of them; --levers eager or --levers compiled: one half
"""

import dataclasses
import math
import time
from types import SimpleNamespace

import torch

import lora
import rollout
import train
from bench.common import (
    PEAK_TFLOPS,
    STEP,
    build_pipeline,
    compiler_missing,
    failure,
    fmt,
    make_trajectory,
    measure,
    transformer_flops,
    write_json,
)
from support import cli

LEVER_SETS = {
    "all": [
        "eager",
        "eager, attention",
        "eager, micro-batch",
        "compiled",
        "compiled, attention",
        "compiled, attention, micro-batch",
    ],
    "eager": ["eager", "eager, attention", "eager, micro-batch"],
    "compiled": ["eager", "compiled", "compiled, attention"],
}


def levers(args):
    """The speed levers against eager, in one run on one build (rollout.speed_up; train.py's flags): SDPA's own
    kernel choice or --attention_backend (default _native_cudnn on CUDA), eager or --compile, the update at
    --train_batch_size or twice it; --levers eager / compiled runs one half (LEVER_SETS). Compilation cannot be
    undone, so the eager configurations run first. Per configuration: the rollout step of G candidates with the LoRA
    on, the training micro-step (with the KL when --beta > 0), one image's step from them (T rollout steps +
    ceil(G/B) K micro-steps; the decode, no lever's business, left out), first_calls_s (the first rollout step,
    re-scoring and update of the configuration: where compiled, every graph's compile), peak GiB reserved, and two
    numbers that must not move: max |ratio - 1| of the rollout's log-probs (batch G, no grad) re-scored in
    micro-batches with gradients (the on-policy ratio under that configuration), and max |log p - log p eager| of
    the same transition. Each configuration's row is printed and written to --json as soon as it is measured; one
    that raises is recorded as such and the next one runs."""
    device, dtype = args.device, cli.DTYPES[args.mixed_precision]
    cuda = device.startswith("cuda")
    if args.threads or (device == "cpu" and args.size == "toy"):
        torch.set_num_threads(args.threads or 1)
    pipe, blocks, total_blocks = build_pipeline(args, device, dtype)
    transformer, cfg = pipe.transformer, pipe.transformer.config
    traj, x = make_trajectory(pipe, args, device, dtype)
    G, B, h, T = args.group_size, args.train_batch_size, args.resolution // 16, args.num_inference_steps
    n_img, n_txt = (args.layers + 2) * h * h, args.text_tokens
    params = lora.add_lora(transformer, args.rank, args.lora_alpha)
    g = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad():
        for p in params:  # B = 0 would hide the adapter from the numbers
            p.normal_(0, 0.02, generator=g)
    transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=1e-4)  # lr 0: the whole update runs, weights stay
    t, sigma, sigma_next = traj.timesteps[STEP], traj.sigmas[STEP], traj.sigmas[STEP + 1]
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS if k in name), None)
    flop = transformer_flops(cfg, n_img, n_txt, blocks, args.rank)
    factor = transformer_flops(cfg, n_img, n_txt, total_blocks, args.rank)["forward"] / flop["forward"]
    kind = "train_kl" if args.beta > 0 else "train"
    backend = args.attention_backend or ("_native_cudnn" if cuda else "_native_math")
    configs = [
        (
            c.replace("attention", backend).replace("micro-batch", f"micro-batch {2 * B}"),
            backend if "attention" in c else None,
            c.startswith("compiled"),
            2 * B if "micro-batch" in c else B,
        )
        for c in LEVER_SETS[args.levers]
    ]
    configs = [c for c in configs if c[3] <= G]
    missing = compiler_missing(device)
    if missing and any(c[2] for c in configs):
        print(f"skipping the compiled configurations: torch.compile needs {missing}, which this machine lacks")
        configs = [c for c in configs if not c[2]]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows, eager, compiled_yet = [], None, False
    res = dict(
        device=name,
        dtype=str(dtype).removeprefix("torch."),
        blocks_built=blocks,
        blocks_full=total_blocks,
        resolution=args.resolution,
        layers=args.layers,
        group_size=G,
        rank=args.rank,
        beta=args.beta,
        peak_tflops=peak_tflops,
        levers=args.levers,
        rows=rows,
        complete=False,
    )
    print("\n".join(levers_head(res)), flush=True)
    for label, attention, compiled, batch in configs:
        try:
            if compiled and not compiled_yet:  # the first compiled configuration (the eager ones ran before)
                rollout.speed_up(transformer, compile=True)
                compiled_yet = True
            transformer.set_attention_backend(attention or "native")  # native: PyTorch's SDPA picks the kernel

            def rollout_step():
                transformer.eval()
                with torch.no_grad(), lora.lora_precision(transformer):
                    v = rollout.predict_velocity(transformer, traj, x, t)  # (G, S, 64)
                    return rollout.sde_step_with_logprob(
                        v,
                        x,
                        sigma,
                        sigma_next,
                        args.noise_level,
                        generator=torch.Generator(device).manual_seed(args.seed),
                    )

            t0 = time.perf_counter()  # first calls: where compiled, they compile every graph this configuration runs
            prev, old = rollout_step()[:2]
            full = dataclasses.replace(traj, latents=torch.stack([x, prev], 1), log_probs=old[:, None])
            micro = dataclasses.replace(
                full,
                latents=full.latents[:batch],
                log_probs=full.log_probs[:batch],
                image_latents=traj.image_latents[:batch],
                prompt_embeds=traj.prompt_embeds[:batch],
                group_size=batch,
            )
            targs = SimpleNamespace(
                train_batch_size=batch, num_inner_epochs=1, clip_range=1e-4, beta=args.beta, max_grad_norm=1.0
            )
            advantages = torch.randn(batch, generator=torch.Generator().manual_seed(args.seed))

            def update():
                transformer.train()
                with lora.lora_precision(transformer):
                    train.policy_update(transformer, [micro], advantages, targs, params, optimizer)

            transformer.train()  # the on-policy ratio: the rollout's log-probs re-scored in micro-batches, with grads
            with lora.lora_precision(transformer):
                new = torch.cat(
                    [
                        rollout.step_log_prob(transformer, full, 0, part)[0].detach()
                        for part in torch.arange(G).split(batch)
                    ]
                )
            update()
            sync()
            first = time.perf_counter() - t0
            eager = (
                eager or full
            )  # the first configuration's transition, scored by every configuration's rollout graph
            transformer.eval()
            with torch.no_grad(), lora.lora_precision(transformer):
                vs_eager = (rollout.step_log_prob(transformer, eager, 0)[0] - eager.log_probs[:, 0]).abs().max().item()
            roll_s, _, roll_gib = measure(rollout_step, device, args.warmup, args.repeats)
            train_s, _, train_gib = measure(update, device, args.warmup, args.repeats)
        except Exception as e:  # out of memory answers "does not fit"; any other error is this configuration's
            row = dict(label=label, batch=batch, **failure(e))
        else:
            tflops = batch * flop[kind] / train_s / 1e12
            row = dict(
                label=label,
                rollout_s=roll_s * factor,
                micro_step_s=train_s * factor,
                batch=batch,
                step_per_image_s=factor * (T * roll_s + math.ceil(G / batch) * args.sde_window * train_s),
                micro_step_pct_peak=100 * tflops / peak_tflops if peak_tflops else None,
                first_calls_s=first,
                reserved_gib=max(roll_gib or 0, train_gib or 0) or None,
                ratio_max_abs_minus_1=(torch.exp(new - old).double() - 1).abs().max().item(),
                log_prob_max_abs_vs_eager=vs_eager,
            )
            base = (
                row
                if label == "eager"
                else next((r for r in rows if r["label"] == "eager" and "rollout_s" in r), None)
            )
            row["speedup_per_image"] = base["step_per_image_s"] / row["step_per_image_s"] if base else None
        if cuda:
            torch.cuda.empty_cache()  # after a failure: what its frames held is free now
        rows.append(row)
        print(levers_row(row), flush=True)
        write_json(args.json, res)
    transformer.set_attention_backend("native")  # diffusers keeps the last choice process-wide
    res["complete"] = True
    return res


def levers_head(res):
    return [
        f"device {res['device']} | {res['dtype']} | {res['blocks_built']} of {res['blocks_full']} blocks built "
        f"(times scaled to {res['blocks_full']}) | {res['resolution']} px, {res['layers']} layers, G "
        f"{res['group_size']}, LoRA r {res['rank']}, beta {res['beta']:g}",
        "1st calls: the configuration's first rollout step, re-scoring and update (compiled: their compiles)",
        "",
        f"{'configuration':<40}{'rollout s':>10}{'micro s':>9}{'B':>3}{'image s':>9}{'x eager':>8}"
        f"{'% peak':>8}{'1st calls':>10}{'|r-1|':>9}{'|dlogp|':>9}{'resv GiB':>9}",
        "-" * 124,
    ]


def levers_row(r):
    if "rollout_s" not in r:
        return f"{r['label']:<40}   " + ("out of GPU memory" if r.get("oom") else f"failed: {r['error']}")
    return (
        f"{r['label']:<40}{r['rollout_s']:>10.3g}{r['micro_step_s']:>9.3g}{r['batch']:>3}"
        f"{r['step_per_image_s']:>9.4g}{fmt(r['speedup_per_image'], '.3f'):>8}"
        f"{fmt(r['micro_step_pct_peak'], '.1f'):>8}{r['first_calls_s']:>10.3g}"
        f"{r['ratio_max_abs_minus_1']:>9.2e}{r['log_prob_max_abs_vs_eager']:>9.2e}{fmt(r['reserved_gib'], '.1f'):>9}"
    )


def format_levers(res):
    return "\n".join([*levers_head(res), *map(levers_row, res["rows"])])
