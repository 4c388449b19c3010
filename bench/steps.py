"""The table: one rollout step, the VAE decode and a training micro-step, timed and weighed, on random weights; and
two figures beside it: the on-policy ratio's rounding (--ratio) and --quantize's velocity error (--quant_error).

Everything timed is the project's own code: rollout.predict_velocity + rollout.sde_step_with_logprob (a rollout
step), rollout.decode_layers, train.policy_update (rollout.step_log_prob + grpo.policy_loss, + the KL with
lora.reference_policy, backward with gradient checkpointing, grad clip, AdamW) on lora.add_lora's LoRA; beside it
the loop body of diffusers' QwenImageLayeredPipeline (transformer + scheduler.step). FLOP and scaling: bench/common.py.
"""

import dataclasses
import math
from types import SimpleNamespace

import torch

import lora
import rollout
import train
from bench.common import (
    PEAK_TFLOPS,
    STEP,
    block_bytes,
    build_pipeline,
    failure,
    fmt,
    make_trajectory,
    measure,
    set_schedule,
    transformer_flops,
    write_json,
)
from support import cli, quantize


# ----------------------------------------------------------------------------- the benchmark
def run(args):
    """Build, then time every row, print it and write --json as soon as it is measured; return the results (what
    --json holds at the end)."""
    device, dtype = args.device, cli.DTYPES[args.mixed_precision]
    if args.threads or (device == "cpu" and args.size == "toy"):
        torch.set_num_threads(args.threads or 1)
    judge = torch.empty(int(args.judge_gib * 2**30), dtype=torch.uint8, device=device) if args.judge_gib else None
    pipe, blocks, total_blocks = build_pipeline(args, device, dtype)
    transformer, cfg = pipe.transformer, pipe.transformer.config
    traj, x = make_trajectory(pipe, args, device, dtype)
    card = hold_above(args.card_gib, device) if args.card_gib else None  # the built (quantized) model stays below
    held = card.numel() / 2**30 if card is not None else 0.0
    G, B, h, D = args.group_size, args.train_batch_size, args.resolution // 16, transformer.inner_dim
    n_noise, n_txt = (args.layers + 1) * h * h, args.text_tokens
    n_img = n_noise + h * h

    def flops(k, kind, rank=0):
        return transformer_flops(cfg, n_img, n_txt, k, rank)[kind]

    t, sigma, sigma_next = traj.timesteps[STEP], traj.sigmas[STEP], traj.sigmas[STEP + 1]
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS if k in name), None)
    rows, out = {}, {}
    res = dict(
        device=name,
        dtype=str(dtype).removeprefix("torch."),
        size=args.size,
        quantize=args.quantize,
        blocks_built=blocks,
        blocks_full=total_blocks,
        hidden=D,
        resolution=args.resolution,
        layers=args.layers,
        tokens=dict(noise=n_noise, condition=h * h, text=n_txt),
        group_size=G,
        train_batch_size=B,
        rank=args.rank,
        judge_gib=args.judge_gib,
        card_gib=args.card_gib,
        peak_tflops=peak_tflops,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=torch.get_num_threads(),
        rows=rows,
        complete=False,
    )
    print("\n".join(table_head(res)), flush=True)

    def record(key, label, batch, fn, flop_of, resident_bytes, setup=None):
        """Time one row, print it, write --json; flop_of(k) is its FLOP with k blocks; resident_bytes is what one
        block keeps resident. A row that raises is recorded as such and the next one runs."""
        try:
            seconds, alloc, reserved = measure(fn, device, args.warmup, args.repeats, setup)
        except Exception as e:  # out of memory answers "does not fit"; any other error is this row's, not the run's
            rows[key] = dict(label=label, batch=batch, **failure(e))
        else:
            alloc, reserved = (alloc and alloc - held), (reserved and reserved - held)  # the run's own memory
            flop = flop_of(blocks) if flop_of else None
            factor = flop_of(total_blocks) / flop if flop_of else 1.0  # ~ total_blocks / blocks
            extra = (total_blocks - blocks) * resident_bytes / 2**30
            tflops = flop / seconds / 1e12 if flop else None
            rows[key] = dict(
                label=label,
                batch=batch,
                seconds=seconds * factor,
                flop=flop and flop * factor,
                tflops=tflops,
                pct_peak=100 * tflops / peak_tflops if tflops and peak_tflops else None,
                alloc_gib=alloc and alloc + extra,
                reserved_gib=reserved and reserved + extra,
                measured=dict(seconds=seconds, flop=flop, alloc_gib=alloc, reserved_gib=reserved),
                resident_bytes_per_block=resident_bytes,
            )
        if device.startswith("cuda"):
            torch.cuda.empty_cache()  # after a failure: what its frames held is free now
        print(table_row(rows[key], args.card_gib), flush=True)
        write_json(args.json, res)

    # 1-2. one rollout step of G candidates: ours, then diffusers' loop body (transformer + scheduler.step)
    weights, _ = block_bytes(transformer)
    generator = torch.Generator(device).manual_seed(args.seed)

    @torch.no_grad()
    def ours():
        v = rollout.predict_velocity(transformer, traj, x, t)  # (G, S, 64)
        out["step"] = rollout.sde_step_with_logprob(v, x, sigma, sigma_next, args.noise_level, generator=generator)

    record(
        "rollout_ours",
        "rollout step, ours (predict_velocity+SDE)",
        G,
        ours,
        lambda k: G * flops(k, "forward"),
        weights,
        setup=transformer.eval,
    )
    scheduler, x_low, is_rgb = pipe.scheduler, x.to(dtype), torch.zeros(G, dtype=torch.long, device=device)

    @torch.no_grad()
    def diffusers_step():  # QwenImageLayeredPipeline.__call__'s loop body with CFG off; latents in the model dtype
        with transformer.cache_context("cond"):
            v = transformer(
                hidden_states=torch.cat([x_low, traj.image_latents], dim=1),
                guidance=None,
                timestep=t.expand(G).to(dtype) / 1000,
                encoder_hidden_states_mask=None,
                encoder_hidden_states=traj.prompt_embeds,
                img_shapes=traj.img_shapes(G),
                attention_kwargs={},
                additional_t_cond=is_rgb,
                return_dict=False,
            )[0][:, :n_noise]
        scheduler.step(v, t, x_low, return_dict=False)

    record(
        "rollout_diffusers",
        "rollout step, diffusers (transformer+Euler)",
        G,
        diffusers_step,
        lambda k: G * flops(k, "forward"),
        weights,
        setup=lambda: set_schedule(scheduler, args, device).set_begin_index(STEP),
    )
    if "step" not in out:
        raise RuntimeError(
            "the first rollout step did not run (its row says why); the rows after it need its output: "
            "try --num_blocks, --group_size, --judge_gib"
        )
    # 3. decode the G x N layers (VAE frames in chunks of 8), under the autocast that lora.lora_precision holds
    #    around rollout.sample in training (a bf16 model: the decode runs inside it)
    if not args.no_decode:
        final = out["step"][0]

        def decode():
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                return rollout.decode_layers(
                    pipe, final, args.resolution, args.resolution, args.layers, args.decode_chunk
                )

        record(
            "decode",
            f"decode G x {args.layers} layers (decode_layers, autocast)",
            G * args.layers,
            decode,
            None,
            weights,
        )
    # 4-5. one training micro-step, as train.py runs it: B candidates, one trained timestep
    prev_sample, log_prob = out.pop("step")[:2]
    tt = dataclasses.replace(
        traj,
        latents=torch.stack([x, prev_sample], 1)[:B],
        log_probs=log_prob[:B, None],
        image_latents=traj.image_latents[:B],
        prompt_embeds=traj.prompt_embeds[:B],
        group_size=B,
    )
    params = lora.add_lora(transformer, args.rank, args.lora_alpha)
    transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=1e-4)  # lr 0: the whole update runs, weights stay
    advantages = torch.randn(B, generator=torch.Generator().manual_seed(args.seed))
    weights, lora_bytes = block_bytes(transformer)
    saved_input = B * (n_img + n_txt) * D * torch.finfo(dtype).bits // 8  # kept per block by gradient checkpointing

    def train_step(beta):
        targs = SimpleNamespace(train_batch_size=B, num_inner_epochs=1, clip_range=1e-4, beta=beta, max_grad_norm=1.0)

        def fn():
            transformer.train()
            with lora.lora_precision(transformer):  # as train.py runs it
                stats = train.policy_update(transformer, [tt], advantages, targs, params, optimizer)
            if stats["train/skipped_updates"]:
                raise RuntimeError("non-finite loss on these random weights, no backward ran; try another --seed")

        return fn

    for key, beta, kind in [("train_no_kl", 0.0, "train"), ("train_kl", args.beta, "train_kl")]:
        record(
            key,
            f"train micro-step, beta {beta:g}" + (" (+ref forward)" if beta else ""),
            B,
            train_step(beta),
            lambda k, kind=kind: B * flops(k, kind, args.rank),
            weights + 3 * lora_bytes + saved_input,
        )

    # 6. the rollout step again with the LoRA on: what train.py's rollouts run
    def ours_lora():
        with lora.lora_precision(transformer):  # as train.py's rollouts run
            ours()

    record(
        "rollout_lora",
        f"rollout step, ours, LoRA r {args.rank} on",
        G,
        ours_lora,
        lambda k: G * flops(k, "forward", args.rank),
        weights + 2 * lora_bytes,
        setup=transformer.eval,
    )
    del judge, card

    s = {k: v["measured"]["seconds"] for k, v in rows.items() if "measured" in v}

    def ratio(a, b):
        return s[a] / s[b] if a in s and b in s else None

    micro_steps, train_key = math.ceil(G / B) * args.sde_window, "train_kl" if args.beta > 0 else "train_no_kl"
    estimate = (
        (
            args.num_inference_steps * rows["rollout_lora"]["seconds"]
            + rows.get("decode", {}).get("seconds", 0)
            + micro_steps * rows[train_key]["seconds"]
        )
        if {"rollout_lora", train_key} <= set(s)
        else None
    )
    res.update(
        ratios={
            "rollout ours / diffusers": ratio("rollout_ours", "rollout_diffusers"),
            "rollout LoRA on / off": ratio("rollout_lora", "rollout_ours"),
            "train with KL / without KL": ratio("train_kl", "train_no_kl"),
        },
        train_step_estimate=dict(seconds=estimate, rollout_steps=args.num_inference_steps, micro_steps=micro_steps),
        complete=True,
    )
    print("\n".join(table_tail(res)), flush=True)
    return res


def hold_above(card_gib, device):
    """Hold (allocate, never touch) all of the GPU's memory above card_gib GiB, so the rest of the run has what a card
    of that size would have left with the same model on it: total - card_gib GiB, the model and the CUDA context
    counted in the part that stays. Returns the held tensor (free it to give the memory back), or None where this GPU
    is no larger than the card."""
    torch.cuda.empty_cache()  # what the build left cached counts as free: a card would have it
    free, total = torch.cuda.mem_get_info(device)
    hold = total - int(card_gib * 2**30)
    if hold <= 0:
        print(f"--card_gib {card_gib:g}: this GPU has {total / 2**30:.2f} GiB, no more than the card: nothing held")
        return None
    if hold > free:  # the weights and the context are already more than the card
        raise ValueError(
            f"--card_gib {card_gib:g}: the model built here and the CUDA context already take "
            f"{(total - free) / 2**30:.1f} GiB: it does not fit a {card_gib:g} GiB card at all"
        )
    return torch.empty(hold, dtype=torch.uint8, device=device)


def table_head(res):
    tok, built, full = res["tokens"], res["blocks_built"], res["blocks_full"]
    card = f" | as on a {res['card_gib']:g} GiB card (the rest held away)" if res["card_gib"] else ""
    return [
        f"device {res['device']} ({res['threads']} CPU threads) | {res['dtype']}, quantize {res['quantize']} | "
        f"{res['size']} size, hidden {res['hidden']} | bf16 dense peak {fmt(res['peak_tflops'], 'g')} TFLOP/s | "
        f"judge stand-in {res['judge_gib']:g} GiB{card}",
        f"{res['resolution']} px, {res['layers']} layers: {tok['noise']} noise + {tok['condition']} condition + "
        f"{tok['text']} text tokens | G {res['group_size']}, train_batch_size {res['train_batch_size']}, LoRA r "
        f"{res['rank']}, gradient checkpointing | median of {res['repeats']} after {res['warmup']} warm-up",
        f"{built} of {full} blocks built"
        + (
            ""
            if built == full
            else f"; figures scaled to {full}: time x FLOP("
            f"{full})/FLOP({built}), memory + {full - built} x one block's "
            "resident bytes (measured ones in --json)"
        ),
        "",
        f"{'measurement':<44}{'batch':>6}{'time s':>9}{'FLOP':>10}{'TFLOP/s':>9}{'% peak':>8}"
        f"{'alloc GiB':>10}{'resv GiB':>9}",
        "-" * 105,
    ]


def table_row(r, card_gib=None):
    if r.get("oom"):
        return f"{r['label']:<44}{r['batch']:>6}   out of GPU memory" + (
            f": does not fit a {card_gib:g} GiB card" if card_gib else ""
        )
    if r.get("error"):
        return f"{r['label']:<44}{r['batch']:>6}   failed: {r['error']}"
    return (
        f"{r['label']:<44}{r['batch']:>6}{r['seconds']:>9.3g}{fmt(r['flop'], '.3g'):>10}"
        f"{fmt(r['tflops'], '.3g'):>9}{fmt(r['pct_peak'], '.1f'):>8}{fmt(r['alloc_gib'], '.2f'):>10}"
        f"{fmt(r['reserved_gib'], '.2f'):>9}"
    )


def table_tail(res):
    e = res["train_step_estimate"]
    return [
        "",
        *[f"ratio {k}: {fmt(v, '.3f')}" for k, v in res["ratios"].items()],
        f"one train.py step, 1 image, judge excluded: {e['rollout_steps']} rollout steps (LoRA)"
        f"{' + decode' if 'seconds' in res['rows'].get('decode', {}) else ''} + {e['micro_steps']} micro-steps = "
        f"{fmt(e['seconds'], '.4g')} s",
    ]


def format_table(res):
    """The results as a plain-text table (run() prints it a row at a time)."""
    return "\n".join(
        [*table_head(res), *(table_row(r, res["card_gib"]) for r in res["rows"].values()), *table_tail(res)]
    )


def onpolicy_ratio(args):
    """One SDE step of G rows at batch G (as a rollout), re-scored in micro-batches of --train_batch_size (as the
    update): ratio = exp(log_prob_new - log_prob_old) per row, with LoRA B weights drawn N(0, 0.02) so the adapter
    is active. Fully on-policy, so any distance from 1 is the batch shape's rounding in --mixed_precision."""
    device, dtype = args.device, cli.DTYPES[args.mixed_precision]
    pipe, blocks, _ = build_pipeline(args, device, dtype)
    transformer = pipe.transformer
    params = lora.add_lora(transformer, args.rank, args.lora_alpha)
    traj, x = make_trajectory(pipe, args, device, dtype)
    g = torch.Generator(device).manual_seed(args.seed)
    with torch.no_grad(), lora.lora_precision(transformer):
        for p in params:
            p.normal_(0, 0.02, generator=g)
        v = rollout.predict_velocity(transformer, traj, x, traj.timesteps[STEP])  # (G, S, 64) at batch G
        prev, old, _, _ = rollout.sde_step_with_logprob(
            v, x, traj.sigmas[STEP], traj.sigmas[STEP + 1], args.noise_level, generator=g
        )
        traj.latents, traj.log_probs = torch.stack([x, prev], 1), old[:, None]
        new = torch.cat(
            [
                rollout.step_log_prob(transformer, traj, 0, rows)[0]
                for rows in torch.arange(args.group_size).split(args.train_batch_size)
            ]
        )
    ratio = torch.exp(new - old).double()
    return {
        "blocks": blocks,
        "dtype": args.mixed_precision,
        "resolution": args.resolution,
        "group_size": args.group_size,
        "train_batch_size": args.train_batch_size,
        "ratio_mean_minus_1": (ratio.mean() - 1).item(),
        "ratio_max_abs_minus_1": (ratio - 1).abs().max().item(),
    }


def quant_error(args):
    """The price of --quantize in accuracy: the velocity of the quantized base against the model dtype's, on the same
    random inputs and the same random weights of the released configuration (--num_blocks K at full width):
    relative L2 error ||v_q - v|| / ||v|| and max |v_q - v| / max |v|, per kind."""
    device, dtype = args.device, cli.DTYPES[args.mixed_precision]
    out = {"blocks": args.num_blocks or 60, "dtype": args.mixed_precision, "resolution": args.resolution}
    for kind in quantize.QUANTIZE:
        pipe, _, _ = build_pipeline(args, device, dtype, kind)  # the same seed: the same weights before quantizing
        traj, x = make_trajectory(pipe, args, device, dtype)
        with torch.no_grad():
            v = rollout.predict_velocity(pipe.transformer, traj, x, traj.timesteps[STEP]).float()
        if kind == "none":
            reference = v
            continue
        out[f"{kind}_rel_l2"] = ((v - reference).norm() / reference.norm()).item()
        out[f"{kind}_rel_max"] = ((v - reference).abs().max() / reference.abs().max()).item()
        del pipe
    return out
