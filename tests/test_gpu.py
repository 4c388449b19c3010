"""What only a CUDA GPU exercises, on the tiny models: bf16 autocast and TF32 in the real loop, the fused attention
kernels, a real CUDA out-of-memory error, the local judge's trips to and from the GPU, torchrun's device per rank
(with 2 GPUs or more; its refusal of more ranks than GPUs on one), and memory.plan against the peaks the CUDA
allocator reaches at full width. Skipped without CUDA (the README's test command runs them where a GPU is visible);
`bash .ci/gpu correct` runs them with the full-size loop (python -m bench --loop)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

import bench
import reward
import rollout
import train
from support import cli, memory, tiny

ROOT = Path(__file__).resolve().parents[1]  # the repository

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def tiny_run(tiny_flags):
    """This file's runs: conftest's tiny flags on CUDA in bf16 (its default dtype), 2 layers, the recon reward."""
    return tiny_flags(device="cuda", mixed_precision=None, layers=2, sample_every=0, reward="recon")


def test_bf16_loop_with_tf32_and_fp32_lora(design_images, tmp_path, tiny_run):
    """train.py at --mixed_precision bf16 on CUDA: the frozen weights in bf16, the LoRA (the optimizer's copy) in
    fp32, TF32 turned on for the fp32 parts (upstream's setting; both flags are off before it runs, so it is train.py
    that turns them on), and the first ratio 1 within a tenth of --clip_range, bench --levers' bound (a rollout in
    eval without gradients against a re-scoring in train mode with checkpointing, in bf16)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        pipe = train.main(
            [
                "--images",
                str(design_images),
                "--output_dir",
                str(tmp_path),
                "--max_train_steps",
                "2",
                "--mixed_precision",
                "bf16",
                "--learning_rate",
                "1e-2",
                *tiny_run,
            ]
        )
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    lora = [p for n, p in pipe.transformer.named_parameters() if "lora_" in n]
    frozen = [p for n, p in pipe.transformer.named_parameters() if "lora_" not in n]
    assert lora and all(p.dtype == torch.float32 and p.is_cuda for p in lora)
    assert all(p.dtype == torch.bfloat16 for p in frozen if p.is_floating_point())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["train/skipped_updates"] == 0 for r in rows)
    assert abs(rows[0]["diag/ratio_mean"] - 1) < 1e-5
    assert all(0 < r["mem/peak_gb"] <= r["mem/reserved_gb"] for r in rows)


def test_attention_check_and_the_rollout_runs_on_flash_alone():
    """runs.check_attention passes on CUDA in bf16, and a rollout step runs with the flash kernel alone allowed:
    no attention mask reaches it when every text token is real (a mask would need another kernel)."""
    cli.check_attention("cuda", torch.bfloat16)
    pipe = rollout.load_pipeline("tiny", torch_dtype=torch.bfloat16, device="cuda")
    rollout.encode_prompt(pipe, rollout.DEFAULT_PROMPT)  # the text encoder's causal mask is not the question here
    image = Image.new("RGB", (64, 48), "teal")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        traj = rollout.sample(
            pipe,
            [image],
            layers=2,
            group_size=2,
            num_inference_steps=3,
            resolution=64,
            generator=torch.Generator("cuda").manual_seed(0),
        )
    assert traj.prompt_embeds_mask is None and torch.isfinite(traj.log_probs).all()


def test_a_real_cuda_out_of_memory_gives_one_actionable_line(design_images, tmp_path, capsys, tiny_run):
    """A real CUDA OOM in the loop (the process capped at 0.25 GiB, a 1024 px rollout of 16 candidates): one line
    naming the phase and the flags that lower it, exit 2."""
    torch.cuda.empty_cache()
    cap = (torch.cuda.memory_allocated() + 0.25 * 2**30) / torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap)
    try:
        with pytest.raises(SystemExit) as e:
            train.main(
                [
                    "--images",
                    str(design_images),
                    "--output_dir",
                    str(tmp_path),
                    "--max_train_steps",
                    "1",
                    *tiny_run,
                    "--resolution",
                    "1024",
                    "--group_size",
                    "16",
                ]
            )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("error: CUDA out of memory during the rollout")
    assert "--group_size" in err and "--resume_from_checkpoint" in err


def test_local_judge_visits_the_gpu_only_while_it_scores(tmp_path, load_judge):
    """--judge_offload: the weights live in CPU memory, go to the GPU for a score() call and come back (the GPU holds
    less than half their bytes before and after, all of them during), and the scores equal those of the judge kept
    on the GPU."""
    parts = tiny.tiny_judge(seed=0)
    for part in parts:
        part.save_pretrained(tmp_path)
    weights = sum(p.numel() * 2 for p in parts[0].parameters())  # bytes in bf16, the judge's dtype on CUDA
    images = [Image.new("RGB", (32, 24), "orange")]
    layers = torch.rand(2, 2, 4, 24, 32, generator=torch.Generator().manual_seed(0))
    resident = load_judge("local", model=str(tmp_path), device="cuda", panel_size=128)
    expected, _ = reward.vlm_reward(images, layers, 2, judge=resident, combine="stage1")
    del resident
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    offloaded = load_judge("local", model=str(tmp_path), device="cuda", panel_size=128, offload=True)
    assert torch.cuda.memory_allocated() - before < weights / 2  # loaded, then parked in CPU memory
    torch.cuda.reset_peak_memory_stats()
    got, info = reward.vlm_reward(images, layers, 2, judge=offloaded, combine="stage1")
    assert torch.cuda.max_memory_allocated() - before >= weights  # on the GPU while it scored
    assert torch.cuda.memory_allocated() - before < weights / 2 and info["judge/answered"] == 2
    assert torch.equal(got, expected)


def _torchrun(nproc, argv, **kw):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), str(ROOT / "train.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **kw,
    )


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="rank k on cuda:k needs 2 GPUs or more: one rank creates no process group"
)
def test_torchrun_puts_each_rank_on_its_gpu(design_images, tmp_path, tiny_run):
    """One rank per GPU: rank k on cuda:k, nccl."""
    n = torch.cuda.device_count()
    ok = _torchrun(
        n,
        [
            "--images",
            str(design_images),
            "--max_train_steps",
            "1",
            *tiny_run,
            "--images_per_step",
            str(n),
            "--output_dir",
            str(tmp_path),
        ],
    )
    assert ok.returncode == 0, ok.stderr[-800:]
    assert f"{n} rank(s), device cuda:0" in ok.stdout  # rank 0's line; each rank k set_device(k) before nccl


def test_torchrun_refuses_more_ranks_than_gpus(design_images, tmp_path, tiny_run):
    """One rank more than the node's GPUs (2 ranks on one GPU): one line naming what to launch, no rendezvous."""
    n = torch.cuda.device_count()
    bad = _torchrun(
        n + 1,
        [
            "--images",
            str(design_images),
            "--max_train_steps",
            "1",
            *tiny_run,
            "--output_dir",
            str(tmp_path),
            "--images_per_step",
            str(n + 1),
        ],
    )
    lines = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode != 0 and lines == [
        f"error: {n + 1} ranks on this node but {n} GPU(s) visible: use "
        f"--nproc_per_node {n} (or --device cpu for gloo ranks)"
    ]


def test_memory_plan_against_the_peaks_cuda_allocates():
    """memory.plan, which train.py checks at start-up on CUDA, against the peaks the CUDA allocator reaches in bench's
    rows at full width (2 of the 60 blocks, 512 px, 2 layers, G 4, micro-batch 2, LoRA r 64, bf16): the update
    micro-step with the KL and the rollout step with the LoRA, each within 10 % (the plan is within 1 % of
    memory.simulate here; the rest is the GPU's own: kernel workspaces, the allocator's rounding). The decode is left
    out: the H200's full-size table put its activations about a fifth above the plan's (docs/performance.md). Then
    memory.check, which reads the card's free memory: one line if the setup fits, and one refusal line naming what
    would fit if nothing can."""
    flags = dict(num_blocks=2, resolution=512, layers=2, group_size=4, train_batch_size=2)
    res = bench.main(
        [
            "--device",
            "cuda",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--no_decode",
            *[f for k, v in flags.items() for f in (f"--{k}", str(v))],
        ]
    )
    planned = memory.plan(memory.Setup(**flags))
    measured = {k: r["measured"]["alloc_gib"] for k, r in res["rows"].items()}
    assert measured["train_kl"] == pytest.approx(planned["update"], rel=0.1)
    assert measured["rollout_lora"] == pytest.approx(planned["rollout"], rel=0.1)
    line = memory.check(memory.Setup(**flags), "cuda", 0)
    assert line.startswith("memory plan: ~") and "GiB on cuda" in line
    with pytest.raises(ValueError, match=r"more than the .* GiB cuda has for this run; what fits: ") as e:
        memory.check(memory.Setup(resolution=2048, group_size=64), "cuda", 0)
    assert "\n" not in str(e.value)
