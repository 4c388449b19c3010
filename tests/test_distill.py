"""Tests of distill.py on the tiny random model (CPU, offline): the per-step KL against torch.distributions,
reaching one teacher, teachers per folder, --student_init, resume, bad input, two rewards in one student.

    python -m pytest -q test_distill.py -s     # -s shows the two-reward figures
"""

import json
import time

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from torch.distributions import Normal, kl_divergence

import data
import distill
import grpo
import lora
import reward
import rollout
import train
from support.checkpoints import load_lora, save_lora
from support.cli import InputError
from support.images import open_image

# tiny settings shared by train.py and distill.py (64 px, G = 4, T = 4, rank 4, one image per step); sizing "area":
# with "longest" (64x32 px for these 48x32 images) 20-30 train.py steps lowered both rewards on this toy model


@pytest.fixture(scope="module")
def tiny_run(tiny_flags):
    """This file's runs: conftest's tiny flags at diffusers' area sizing, 2 layers, no pictures, no checkpoints."""
    return tiny_flags(sizing="area", layers=2, sample_every=0, checkpointing_steps=1000)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    for i in range(4):
        data.make_design(np.random.default_rng(i), 3, size=(48, 32))[0].save(d / f"{i}.png")
    return d


def tiny_pipe(student=None, teachers=()):
    """The tiny pipeline with the student as adapter "default" (a saved LoRA, or a fresh one = the base model)
    and each (name, folder) of `teachers` as a named adapter."""
    pipe = rollout.load_pipeline("tiny")
    if student:
        load_lora(pipe, student, "default")
    else:
        lora.add_lora(pipe.transformer, 4, 8)  # B = 0: exactly the base model
    for name, folder in teachers:
        load_lora(pipe, folder, name)
    pipe.transformer.set_adapter("default")
    return pipe


def scores(pipe, images, names=("opaque_background", "recon")):
    """Mean reward of 2 images x 8 candidates on fixed seeds (the same noise for every model compared)."""
    traj = rollout.sample(
        pipe,
        images,
        layers=2,
        group_size=8,
        num_inference_steps=4,
        noise_level=1.2,
        resolution=64,
        sizing="area",
        generator=torch.Generator().manual_seed(100),
    )
    return {n: reward.REWARDS[n](images, traj.layers, 8)[0].mean().item() for n in names}


# ----------------------------------------------------------------------------- the KL
def test_gaussian_mean_kl_is_the_kl_of_rollouts_gaussians_and_pulls_the_student_to_the_teacher():
    """For the Gaussian of one rollout.py SDE step (variance std_dev_t^2 |dt|), gaussian_mean_kl equals
    torch.distributions' KL of the student's and the teacher's Normals (mean over elements); a gradient step on
    it moves every element of the student's mean toward the teacher's."""
    g = torch.Generator().manual_seed(0)
    x, v_s, v_t = (torch.randn(3, 6, 8, generator=g) for _ in range(3))
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.8, 0.4, 0.1])
    sample, log_prob, mean_s, std_dev_t = rollout.sde_step_with_logprob(v_s, x, sigma, sigma_next, 1.2, generator=g)
    _, _, mean_t, _ = rollout.sde_step_with_logprob(v_t, x, sigma, sigma_next, 1.2, prev_sample=sample)
    var = std_dev_t**2 * (sigma_next - sigma).abs().view(-1, 1, 1)
    torch.testing.assert_close(log_prob, Normal(mean_s, var.sqrt()).log_prob(sample).mean((1, 2)))  # the same var
    mean_s = mean_s.clone().requires_grad_(True)
    kl = grpo.gaussian_mean_kl(mean_s, mean_t, var)
    torch.testing.assert_close(kl, kl_divergence(Normal(mean_s, var.sqrt()), Normal(mean_t, var.sqrt())).mean((1, 2)))
    kl.sum().backward()
    with torch.no_grad():
        stepped = mean_s - 1e-3 * mean_s.grad
    assert ((stepped - mean_t).abs() < (mean_s - mean_t).abs()).all()


# ----------------------------------------------------------------------------- one teacher
def velocity_gap(pipe, images, teacher="t"):
    """Mean squared difference of the student's and the teacher's velocity at every state of the student's own
    rollout (fixed seeds, steps 0..T-2)."""
    tr = pipe.transformer
    traj = rollout.sample(
        pipe,
        images,
        layers=2,
        group_size=4,
        num_inference_steps=4,
        resolution=64,
        sizing="area",
        sde_window=(0, 3),
        decode=False,
        generator=torch.Generator().manual_seed(7),
    )
    gaps = []
    with torch.no_grad():
        for j in range(3):
            v_s = rollout.predict_velocity(tr, traj, traj.latents[:, j], traj.timesteps[j])
            with lora.active_adapter(tr, teacher):
                v_t = rollout.predict_velocity(tr, traj, traj.latents[:, j], traj.timesteps[j])
            gaps.append(((v_s - v_t) ** 2).mean().item())
    return float(np.mean(gaps))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A teacher LoRA made without training: random B (std 0.1) and its own A, saved as train.py saves
    (pytorch_lora_weights.safetensors + peft/)."""
    folder = tmp_path_factory.mktemp("teacher")
    pipe = rollout.load_pipeline("tiny")
    torch.manual_seed(123)
    lora.add_lora(pipe.transformer, 4, 8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=g)
    save_lora(pipe.transformer, folder, base_model="tiny")
    return folder


def test_distillation_reaches_one_teacher(image_dir, teacher, tmp_path, tiny_run):
    """A teacher LoRA (diffusers format) distilled into a fresh student: the student's velocity error to the
    teacher falls by at least half in 15 steps; the LoRA written is the student's, not the teacher's."""
    images = [open_image(p) for p in sorted(image_dir.glob("*.png"))[:2]]
    before = velocity_gap(tiny_pipe(teachers=[("t", teacher)]), images)
    student = distill.main(
        [
            "--images",
            str(image_dir),
            "--output_dir",
            str(tmp_path / "student"),
            *tiny_run,
            "--teacher",
            f"t={teacher}",
            "--max_train_steps",
            "15",
            "--learning_rate",
            "1e-2",
            "--sde_window",
            "0",
        ]
    )
    after = velocity_gap(tiny_pipe(tmp_path / "student" / "peft", [("t", teacher / "peft")]), images)
    print(f"velocity error to the teacher: {before:.3e} -> {after:.3e}")
    assert after <= 0.5 * before
    saved = load_file(tmp_path / "student" / "peft" / "adapter_model.safetensors")
    live = get_peft_model_state_dict(student.transformer, adapter_name="default", save_embedding_layers=False)
    taught = load_file(teacher / "peft" / "adapter_model.safetensors")
    assert all(torch.equal(saved[f"base_model.model.{k}"], v) for k, v in live.items())
    assert not all(torch.equal(saved[k], taught[k]) for k in taught)
    logged = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 15 and logged[-1]["kl/t"] < logged[0]["kl/t"]


def test_resume_repeats_the_run(image_dir, tmp_path, tiny_run):
    """2 steps + resume to 4 give the same student LoRA as 4 steps in one go (a teacher being a train.py output)."""
    train.main(
        [
            "--images",
            str(image_dir),
            "--output_dir",
            str(tmp_path / "teacher"),
            "--reward",
            "recon",
            "--max_train_steps",
            "1",
            "--beta",
            "0",
            *tiny_run,
        ]
    )
    argv = [
        "--images",
        str(image_dir),
        *tiny_run,
        "--teacher",
        f"t={tmp_path / 'teacher'}",
        "--checkpointing_steps",
        "2",
        "--group_size",
        "2",
        "--learning_rate",
        "1e-2",
    ]
    distill.main([*argv, "--output_dir", str(tmp_path / "once"), "--max_train_steps", "4"])
    distill.main([*argv, "--output_dir", str(tmp_path / "twice"), "--max_train_steps", "2"])
    distill.main(
        [
            *argv,
            "--output_dir",
            str(tmp_path / "twice"),
            "--max_train_steps",
            "4",
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    once, twice = (load_file(tmp_path / d / "peft" / "adapter_model.safetensors") for d in ("once", "twice"))
    assert all(torch.equal(once[k], twice[k]) for k in once)
    assert [json.loads(line)["step"] for line in (tmp_path / "twice" / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
    ]


def test_teacher_folders_and_student_init(image_dir, teacher, tmp_path, tiny_run):
    """NAME=PATH:FOLDER applies a teacher to its folder's images only (which join the pool); an image no teacher
    applies to is refused; --student_init copies a teacher into the student (0 steps: the teacher itself)."""
    extra = tmp_path / "extra"
    extra.mkdir()
    data.make_design(np.random.default_rng(9), 2, size=(48, 32))[0].save(extra / "x.png")
    args = distill.parse_args(
        [
            "--images",
            str(image_dir),
            "--teacher",
            f"all={teacher}",
            "--teacher_weight",
            "all=0.5",
            "--teacher",
            f"own={teacher}:{extra}",
        ]
    )
    paths, W = distill.image_pool(args)
    assert [p.name for p in paths] == ["0.png", "1.png", "2.png", "3.png", "x.png"]
    assert W.tolist() == [[0.5, 0.0]] * 4 + [[0.5, 1.0]]
    with pytest.raises(InputError, match="no teacher"):
        distill.image_pool(distill.parse_args(["--images", str(image_dir), "--teacher", f"own={teacher}:{extra}"]))
    distill.main(
        [
            "--images",
            str(image_dir),
            "--output_dir",
            str(tmp_path / "copy"),
            *tiny_run,
            "--teacher",
            f"t={teacher / 'peft'}",
            "--student_init",
            "t",
            "--max_train_steps",
            "0",
        ]
    )
    copy, taught = (load_file(f / "peft" / "adapter_model.safetensors") for f in (tmp_path / "copy", teacher))
    assert copy.keys() == taught.keys() and all(torch.equal(copy[k], taught[k]) for k in taught)


def test_bad_input(image_dir, tmp_path, capsys, tiny_run):
    """Bad flags stop in parse_args (exit 2); a teacher that is not a LoRA, or a teacher reward that names no reward,
    stops with one line naming it."""
    for argv, message in [
        (["--teacher", "nope"], "--teacher 'nope'"),
        (["--teacher", "default=x"], "'default'"),
        (["--teacher", "a=x", "--teacher_weight", "b=1"], "--teacher_weight 'b=1'"),
    ]:
        with pytest.raises(SystemExit) as e:
            distill.parse_args(["--images", str(image_dir), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        distill.main(
            [
                "--images",
                str(image_dir),
                "--output_dir",
                str(tmp_path / "r"),
                *tiny_run,
                "--teacher",
                "a=x",
                "--teacher_reward",
                "a=nope",
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--reward nope: choose one of" in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:
        distill.main(
            [
                "--images",
                str(image_dir),
                "--output_dir",
                str(tmp_path),
                *tiny_run,
                "--teacher",
                f"a={tmp_path / 'missing'}",
            ]
        )
    assert e.value.code == 2 and f"error: --teacher a={tmp_path / 'missing'}: neither" in capsys.readouterr().err


# ----------------------------------------------------------------------------- two rewards
def test_two_rewards_in_one_student(image_dir, tmp_path, tiny_run):
    """Two teachers trained by train.py on two programmatic rewards (background opacity, reconstruction), distilled
    into one student: on fixed evaluation seeds the student beats the base model on each reward."""
    t0 = time.perf_counter()
    steps, distill_steps = 30, 20
    images = [open_image(p) for p in sorted(image_dir.glob("*.png"))[:2]]
    for name in ("opaque_background", "recon"):
        train.main(
            [
                "--images",
                str(image_dir),
                "--output_dir",
                str(tmp_path / name),
                "--reward",
                name,
                "--max_train_steps",
                str(steps),
                "--beta",
                "0",
                "--learning_rate",
                "3e-2",
                *tiny_run,
            ]
        )
    distill.main(
        [
            "--images",
            str(image_dir),
            "--output_dir",
            str(tmp_path / "student"),
            *tiny_run,
            "--teacher",
            f"opaque={tmp_path / 'opaque_background'}",
            "--teacher",
            f"recon={tmp_path / 'recon'}",
            "--teacher_reward",
            "opaque=opaque_background",
            "--teacher_reward",
            "recon=recon",
            "--max_train_steps",
            str(distill_steps),
            "--learning_rate",
            "1e-2",
        ]
    )
    figures = {"base": scores(tiny_pipe(), images)}
    for name in ("opaque_background", "recon", "student"):
        figures[name] = scores(tiny_pipe(tmp_path / name / "peft"), images)
    logged = json.loads((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()[-1])
    print(
        f"\ntwo rewards, {steps} teacher steps and {distill_steps} distillation steps of G = 4 (fixed seeds, "
        "2 images x 8):"
    )
    for model, s in figures.items():
        print(
            f"  {model:18s} opaque_background {s['opaque_background']:.4f}  recon {s['recon']:.4f}  "
            f"sum {sum(s.values()):.4f}"
        )
    print(
        f"  student's last logged KL: opaque {logged['kl/opaque']:.3g}, recon {logged['kl/recon']:.3g}; "
        f"time {time.perf_counter() - t0:.0f} s"
    )
    for name in ("opaque_background", "recon"):
        assert figures["student"][name] > figures["base"][name]
