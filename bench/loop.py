"""train.py's whole loop, measured: at full size with a resume (--loop), against a judge that takes its time
(--overlap), and on 1 against 2 ranks (--scaling).
"""

import functools
import gc
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import data
import train
from bench.common import write_json
from support import openai_server


def scaling(args, steps=6, images_per_step=4):
    """train.py on the tiny model, --images_per_step 4, as 1 process and as 2 gloo ranks (OMP_NUM_THREADS=1 each):
    images per second from the steps' wall time (time/step_s in metrics.jsonl, the first step left out)."""
    out, env = {}, {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        data.write_references(tmp + "/images", 4, seed=args.seed, size=(64, 48), images_only=True)
        flags = [
            "train.py",
            "--images",
            tmp + "/images",
            "--pretrained_model_name_or_path",
            "tiny",
            "--resolution",
            "64",
            "--layers",
            "2",
            "--group_size",
            "4",
            "--num_inference_steps",
            "4",
            "--rank",
            "4",
            "--lora_alpha",
            "8",
            "--mixed_precision",
            "no",
            "--reward",
            "recon",
            "--report_to",
            "none",
            "--sample_every",
            "0",
            "--images_per_step",
            str(images_per_step),
            "--max_train_steps",
            str(steps),
        ]
        for ranks in (1, 2):
            launch = (
                [sys.executable]
                if ranks == 1
                else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
            )
            subprocess.run(
                [*launch, *flags, "--output_dir", f"{tmp}/r{ranks}"], env=env, check=True, capture_output=True
            )
            rows = [json.loads(line) for line in Path(f"{tmp}/r{ranks}/metrics.jsonl").read_text().splitlines()]
            out[f"images_per_s_{ranks}"] = images_per_step * (len(rows) - 1) / sum(r["time/step_s"] for r in rows[1:])
    out["ratio_2_over_1"] = out["images_per_s_2"] / out["images_per_s_1"]
    return out


def _answer_after(delay, body):
    """The judge of --overlap: deterministic scores for the JSON keys the prompt asks for, after `delay` seconds."""
    keys = openai_server.keys_asked(body)
    time.sleep(delay)
    return 200, openai_server.completion(json.dumps({k: 1 + (len(k) + i) % 9 for i, k in enumerate(keys)}))


def overlap(args, delay, steps=4, images=4):
    """train.py on the tiny model (G 4, 4 images per step) against a real OpenAI-compatible judge on 127.0.0.1 (its
    own process, as a judge elsewhere would be) that answers every request after `delay` seconds. Median step
    time and time the loop waited for the judge, with each group judged after its rollout in the main thread
    (serial) and in threads while the next groups roll out (overlapped, the default). The first step is left out.
    The bound uses the serial run's parts, R (rollouts), U (update) and c (a group's judge time beyond D):
        gpu_s   = R + U                  the torch work alone
        bound_s = R + c + D + U          the update needs every group's rewards (either --adv_std)
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answer = functools.partial(_answer_after, delay)
    server = multiprocessing.get_context("spawn").Process(
        target=openai_server.serve_forever, args=(port, answer), daemon=True
    )
    server.start()
    url, out = f"http://127.0.0.1:{port}/v1", {}
    modes = {"serial": ["--no-judge_overlap"], "overlapped": ["--judge_overlap"]}
    side, threads = args.resolution or 64, torch.get_num_threads()
    torch.set_num_threads(args.threads or 1)  # as the table's toy rows; the other core is the judge client's
    flags = (
        f"--pretrained_model_name_or_path tiny --resolution {side} --layers 2 --group_size 4 --num_inference_steps 4 "
        f"--rank 4 --lora_alpha 8 --mixed_precision no --judge_url {url} --judge_model {openai_server.MODEL} "
        f"--report_to none --sample_every 0 --images_per_step {images} --max_train_steps {steps}"
    ).split()
    try:
        for _ in range(100):  # wait until it listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        with tempfile.TemporaryDirectory() as tmp:
            size = (side, side * 3 // 4)
            data.write_references(tmp + "/images", images, seed=args.seed, size=size, images_only=True)
            for name, mode in modes.items():
                train.main(["--images", tmp + "/images", "--output_dir", f"{tmp}/{name}", *flags, *mode])
                rows = [json.loads(line) for line in Path(f"{tmp}/{name}/metrics.jsonl").read_text().splitlines()][1:]
                for key in ("step", "judge_wait", "rollout", "train"):
                    out[f"{name}_{key}_s"] = statistics.median(r[f"time/{key}_s"] for r in rows)
    finally:
        server.terminate()
        torch.set_num_threads(threads)
    R, U, c = out["serial_rollout_s"], out["serial_train_s"], out["serial_judge_wait_s"] / images - delay
    out.update(delay_s=delay, gpu_s=R + U, bound_s=R + c + delay + U)
    out.update(overlapped_over_bound=out["overlapped_step_s"] / out["bound_s"])
    return out


def loop(args):
    """train.py's whole loop at full width without a download: --pretrained_model_name_or_path random[:K]
    (tiny.released_pipeline), one square synthetic image per step, --reward vlm with the tiny judge (on the CPU),
    the other flags train.py's defaults or this benchmark's (--group_size, --train_batch_size, --rank, --layers,
    --resolution, --num_inference_steps, --sde_window, --beta, --mixed_precision). Step 1 runs and is checkpointed;
    a second train.main resumes from it (a fresh build, as a restarted job) and runs step 2. Per step, from its
    metrics.jsonl row: time/step_s and its parts (time/checkpoint_s: the checkpoint's write, train.py's own timer),
    peak GiB allocated and reserved (CUDA); and the checkpoint's size on disk. Written to --json after each step, so
    a run stopped in step 2 keeps step 1."""
    model = "random" + (f":{args.num_blocks}" if args.num_blocks else "")
    keys = [
        "time/step_s",
        "time/rollout_s",
        "time/train_s",
        "time/checkpoint_s",
        "mem/peak_gb",
        "mem/reserved_gb",
        "diag/ratio_mean",
        "reward/mean",
    ]
    flags = (
        f"--pretrained_model_name_or_path {model} --device {args.device} --mixed_precision {args.mixed_precision} "
        f"--resolution {args.resolution} --layers {args.layers} --group_size {args.group_size} "
        f"--train_batch_size {args.train_batch_size} --rank {args.rank} --lora_alpha {args.lora_alpha} "
        f"--num_inference_steps {args.num_inference_steps} --sde_window {args.sde_window} --beta {args.beta} "
        f"--seed {args.seed} --images_per_step 1 --reward vlm --judge tiny --checkpointing_steps 1 "
        "--sample_every 0 --report_to none"
    ).split()
    with tempfile.TemporaryDirectory() as tmp:
        data.write_references(tmp + "/images", 2, seed=args.seed, size=(args.resolution,) * 2, images_only=True)
        run = Path(tmp, "run")
        for steps, resume in ((1, []), (2, ["--resume_from_checkpoint", "latest"])):
            pipe = train.main(
                [
                    "--images",
                    tmp + "/images",
                    "--output_dir",
                    str(run),
                    *flags,
                    "--max_train_steps",
                    str(steps),
                    *resume,
                ]
            )
            del pipe  # free the first build before the second: two copies of 38 GiB need not fit
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            out = {"model": model, "steps": [r["step"] for r in rows]}
            out.update({f"step{r['step']} {k}": r[k] for r in rows for k in keys if k in r})
            saved = run / f"checkpoint-{steps}"
            out.update(
                checkpoint_mib=sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()) / 2**20,
                complete=steps == 2,
            )
            print(
                f"bench --loop, after step {steps}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in out.items() if isinstance(v, float)),
                flush=True,
            )
            write_json(args.json, out)
    return out
