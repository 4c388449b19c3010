"""Speed and memory of Stable-Layers' hot paths: a rollout step, a VAE decode, a training micro-step; and the loop.

Random weights, no download: the transformer is built from the public Qwen-Image-Layered configuration (60
blocks, 20.4B parameters, 38 GiB bf16) directly on the GPU in bf16 (support/tiny.released_pipeline, which train.py,
sft.py and evaluate.py load as --pretrained_model_name_or_path random), or K of its blocks at full width
(--num_blocks K) with the figures scaled to 60. On a CPU the default is the tiny pipeline (seconds).

    python -m bench                                                 # CPU, toy size, ~10 s
    python -m bench --device cuda --json outputs/bench-gpu.json     # one H100/H200: full size, all 60 blocks
    python -m bench --device cuda --judge_gib 18                    # ... with 18 GiB held for a judge
    python -m bench --device cuda --num_blocks 8                    # a smaller GPU: 8 blocks, scaled to 60
    python -m bench --ratio --mixed_precision bf16 --group_size 8   # on-policy ratio - 1: batch G vs micro-batches
    python -m bench --overlap 0.8                                   # judge latency hidden behind rollouts?
    python -m bench --overlap 0.8 --resolution 128                  # ... when a group's torch work > client work
    python -m bench --scaling                                       # images/s of train.py, 1 vs 2 gloo ranks (CPU)
    python -m bench --levers --device cuda                          # speed levers against eager, in one run
    python -m bench --levers eager --device cuda                    # ... its eager half; --levers compiled the other
    python -m bench --device cuda --quantize int8                   # the table on the int8 base (48 GB class)
    python -m bench --device cuda --quantize int8 --card_gib 44.99  # ... as on a 48 GB L40S: the rest held away
    python -m bench --quant_error --num_blocks 2 --resolution 128   # --quantize's velocity error, CPU
    python -m bench --loop --device cuda                            # train.py's whole loop at full size: 2 steps
                                                                    # with a resume, time, memory, checkpoint
    python -m bench.memory                                          # a step's memory, planned (and simulated)

By what they measure: bench/steps.py (the table, --ratio, --quant_error), bench/levers.py (--levers), bench/loop.py
(--loop, --overlap, --scaling), bench/memory.py (the plan and its simulation); bench/common.py: building, FLOP,
timing. Every row is printed and written to --json as soon as it is measured (a run stopped by a timeout keeps the
rows before); a row that raises is recorded ("out of GPU memory" is an answer; another error prints its traceback,
and the run exits 1 at the end) and the next row runs.
"""

import torch

import rollout
from bench.common import write_json
from bench.levers import LEVER_SETS, levers
from bench.loop import loop, overlap, scaling
from bench.steps import onpolicy_ratio, quant_error, run
from support import cli, quantize


def parse_args(argv=None):
    p = cli.ArgumentParser(
        description="Time and peak memory of a rollout step, a decode and a training "
        "micro-step of Stable-Layers, on random weights; prints a table."
    )
    a = p.add_argument
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    a(
        "--size",
        choices=["toy", "full"],
        default=None,
        help="tiny pipeline or the real configuration (default: full on cuda, toy on cpu)",
    )
    a(
        "--num_blocks",
        type=int,
        default=None,
        help="full size: build K of the 60 blocks, scale the figures to 60 (K >= 2: a lone block is also the last "
        "one, which has 3 fewer LoRA modules)",
    )
    a("--mixed_precision", choices=["no", "bf16"], default=None, help="model dtype (default: bf16 on cuda, no on cpu)")
    a("--resolution", type=int, default=None, help="condition side in px (default: 640 full, 64 toy)")
    a("--layers", type=int, default=4, help="RGBA layers N: (N+1) (res/16)^2 noise tokens")
    a("--text_tokens", type=int, default=11, help="prompt tokens after the template drop (the fixed prompt has 11)")
    a("--group_size", type=int, default=None, help="G, candidates per rollout step (default: 8 full, 4 toy)")
    a("--train_batch_size", type=int, default=2, help="candidates per training forward/backward (train.py's flag)")
    a("--rank", type=int, default=64, help="LoRA rank r")
    a("--lora_alpha", type=int, default=128, help="LoRA alpha")
    a("--noise_level", type=float, default=1.2, help="SDE noise level a")
    a("--beta", type=float, default=0.04, help="KL weight of the with-KL training row")
    a("--num_inference_steps", type=int, default=10, help="T: the schedule, and the train-step estimate")
    a("--sde_window", type=int, default=2, help="trained steps per rollout, for the train-step estimate")
    a("--no_decode", action="store_true", help="skip the VAE decode row")
    a("--decode_chunk", type=int, default=8, help="VAE frames decoded at a time (train.py's flag)")
    a(
        "--quantize",
        default="none",
        choices=list(quantize.QUANTIZE),
        help="the transformer blocks quantized as train.py --quantize does; the table measures the quantized base",
    )
    a(
        "--quant_error",
        action="store_true",
        help="instead of the table: the velocity of each --quantize kind against the model dtype's on the same "
        "inputs (released configuration, --num_blocks K at full width; CPU is enough)",
    )
    a(
        "--judge_gib",
        type=float,
        default=0.0,
        help="hold this many GiB on the GPU all along, as a judge on the same GPU would (Qwen3.5-9B bf16: 18); out "
        "of memory then answers 'does not fit'",
    )
    a(
        "--card_gib",
        type=float,
        default=None,
        help="the table as on a smaller card: once the model is built, all of the GPU's memory above this many GiB "
        "(the card's total as nvidia-smi gives it; docs/performance.md lists the classes') is held away, so a "
        "row that would not fit that card says so; its GiB figures leave the held memory out",
    )
    a("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    a("--repeats", type=int, default=3, help="timed calls; the median is reported")
    a("--peak_tflops", type=float, default=None, help="device bf16 dense peak (default: from the device name)")
    a(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default 1 at toy size: its kernels are too small to gain and OpenMP spin-waits wreck "
        "timings on a busy machine; else torch's default)",
    )
    a("--seed", type=int, default=0, help="random seed")
    a("--json", default=None, help="also write the numbers to this JSON file (any mode)")
    a(
        "--overlap",
        type=float,
        default=None,
        metavar="D",
        help="instead of the table: train.py's step time on the tiny model (--resolution, default 64; --threads, "
        "default 1), 4 images per step, with a loopback HTTP judge answering after D seconds: serial, "
        "overlapped, and the lower bound",
    )
    a(
        "--scaling",
        action="store_true",
        help="instead of the table: images/s of train.py on the tiny model as 1 process and as torchrun "
        "--nproc_per_node 2 (CPU, gloo, one thread per rank), and their ratio",
    )
    a(
        "--ratio",
        action="store_true",
        help="instead of the table: the on-policy ratio's distance from 1 when the rollout runs batch G and "
        "re-scoring runs micro-batches of --train_batch_size (bf16 rounding differs)",
    )
    a(
        "--levers",
        nargs="?",
        const="all",
        default=None,
        choices=list(LEVER_SETS),
        help="instead of the table: the speed levers against eager in one run (--attention_backend, default "
        "_native_cudnn on cuda; --compile; twice --train_batch_size): rollout step, micro-step, one image's "
        "step, the on-policy ratio and the log-prob distance from eager under each. 'eager' or 'compiled' runs "
        "one half (each fits a lent GPU's part; 'compiled' starts with eager, its reference)",
    )
    a(
        "--attention_backend",
        default=None,
        choices=rollout.ATTENTION_BACKENDS,
        help="--levers: the attention kernel to try (default _native_cudnn on cuda, _native_math on cpu)",
    )
    a(
        "--loop",
        action="store_true",
        help="instead of the table: train.py's whole loop on the released configuration with random weights "
        "(--pretrained_model_name_or_path random; --num_blocks K builds K blocks), one image per step, the vlm "
        "reward with the tiny judge: a step and its checkpoint, then a resumed second step; prints each step's "
        "time and peak memory and the checkpoint's size and write time",
    )
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.size = args.size or ("full" if cuda or args.loop or args.quant_error else "toy")
    args.resolution = args.resolution or (640 if args.size == "full" else 64)
    args.group_size = args.group_size or (8 if args.size == "full" else 4)
    args.mixed_precision = args.mixed_precision or ("bf16" if cuda else "no")
    checks = [
        (not cuda or torch.cuda.is_available(), "--device cuda: no GPU is visible"),
        (args.resolution > 0 and args.resolution % 32 == 0, "--resolution must be a positive multiple of 32"),
        (args.layers >= 1 and args.text_tokens >= 1, "--layers and --text_tokens must be >= 1"),
        (1 <= args.train_batch_size <= args.group_size, "--train_batch_size must be in 1..--group_size"),
        (
            args.num_blocks is None or (args.size == "full" and 1 <= args.num_blocks <= 60),
            "--num_blocks needs --size full and a value in 1..60",
        ),
        (args.num_inference_steps >= 3, "--num_inference_steps must be >= 3"),
        (args.judge_gib == 0 or cuda, "--judge_gib needs --device cuda"),
        (args.card_gib is None or (cuda and args.card_gib > 0), "--card_gib needs --device cuda and a value > 0"),
        (args.warmup >= 0 and args.repeats >= 1, "--warmup must be >= 0 and --repeats >= 1"),
        (not args.loop or args.size == "full", "--loop runs the released configuration: drop --size toy"),
        (args.decode_chunk >= 1, "--decode_chunk must be >= 1"),
    ]
    cli.check(p, checks)
    return args


MODES = {  # flag -> the measurement it runs instead of the table (each returns one line of figures)
    "loop": loop,
    "overlap": lambda args: overlap(args, args.overlap),
    "scaling": scaling,
    "ratio": onpolicy_ratio,
    "quant_error": quant_error,
}


def main(argv=None):
    args = parse_args(argv)
    mode = next((fn for flag, fn in MODES.items() if getattr(args, flag) not in (None, False)), None)
    threads = torch.get_num_threads()
    with cli.input_errors():  # bad input (a quantization this machine lacks, a card too small): one line
        quantize.check(args.quantize, args.device)
        try:
            res = mode(args) if mode else levers(args) if args.levers else run(args)  # a table, a row at a time
        finally:
            torch.set_num_threads(threads)  # the table may lower it; callers (tests) get theirs back
    if mode:
        print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
    write_json(args.json, res)
    if args.json:
        print(f"wrote {args.json}")
    return res
