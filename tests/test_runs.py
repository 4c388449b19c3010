"""A rerun never destroys a run, and a newcomer's first minutes are clean (CPU, offline, tiny models, ~15 s):
the same command twice, a finished run resumed, output folders that cannot be used, one-line command-line errors,
the memory plan's flags, a skipped image, peft's noise.

    python -m pytest -q tests/test_runs.py
"""

import fcntl
import hashlib
import importlib.util
import json
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import bench
import data
import distill
import evaluate as ev
import lora
import reward
import rollout
import sft
import train
from bench import memory
from support import cli, runfolder
from support.checkpoints import load_lora, save_lora
from support.images import find_images

ROOT = Path(__file__).resolve().parents[1]  # the repository


@pytest.fixture(scope="module")
def tiny_run(tiny_flags):
    """This file's runs: G 2, T 2, one trained step per rollout, the recon reward, the tracker left at its default."""
    return tiny_flags(
        layers=2, group_size=2, num_inference_steps=2, sde_window=1, train_batch_size=2, reward="recon", report_to=None
    )


def hashes(folder):
    """{relative path: sha256} of every file under folder."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def last_line(capsys):
    """The one error line a run ends with, after its progress bar: (stdout, that line)."""
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    return out, errors[0]


def one_line(capsys):
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return out, lines[0]


def test_the_same_command_twice_leaves_the_first_run_byte_identical(design_images, tmp_path, capsys, tiny_run):
    """The README's situation: a command run again (up-arrow, Enter) into the same --output_dir. train.main is called
    in this process as `python train.py ...` calls it (the same parse_args(argv), exit code and streams; only the
    imports are shared). The second stops before loading a model with one line naming the folder, its last step and
    the two ways on, and every file of the first run keeps its bytes; sft.py and distill.py refuse that folder alike.
    The way on works: resumed with the same --max_train_steps it says it is done and writes nothing; with more
    steps it continues."""
    out = tmp_path / "run"
    argv = [
        "--images",
        str(design_images),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "1",
        "--sample_every",
        "1",
        "--report_to",
        "tensorboard",
        *tiny_run,
    ]
    train.main(argv)
    printed = capsys.readouterr().out.strip().splitlines()
    assert "device cpu, float32 weights, no quantization (--quantize none)" in printed[0]
    assert printed[-1] == (
        f"wrote in {out}: the final LoRA (pytorch_lora_weights.safetensors, peft/, model card "
        f"README.md); checkpoint-1/, checkpoint-2/; metrics.jsonl (to step 2); samples/ (2 "
        f"pictures); logs/ (tensorboard --logdir {out / 'logs'})"
    )
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000001.png", "step-000002.png"]
    first = hashes(out)
    assert {"metrics.jsonl", "pytorch_lora_weights.safetensors", "checkpoint-2/training_state.pt"} <= set(first)

    with pytest.raises(SystemExit) as e:
        train.main(argv)
    stdout, line = one_line(capsys)
    assert e.value.code == 2 and "LoRA parameters" not in stdout  # stopped before loading anything
    assert line == (
        f"error: --output_dir {out} holds a run, to step 2 (checkpoint-1, checkpoint-2, metrics.jsonl, "
        "the final LoRA); nothing was changed. To go on from its last checkpoint add "
        "--resume_from_checkpoint latest; to start a new run choose another --output_dir"
    )
    assert hashes(out) == first
    for script, other in (
        (sft, ["--synthetic", "4"]),
        (distill, ["--images", str(design_images), "--teacher", f"t={out}"]),
    ):
        other = [*other, "--pretrained_model_name_or_path", "tiny", "--device", "cpu", "--max_train_steps", "2"]
        with pytest.raises(SystemExit) as e:
            script.main([*other, "--output_dir", str(out)])
        assert e.value.code == 2 and "holds a run, to step 2" in one_line(capsys)[1]
        assert script.main([*other, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]) is None
        assert "nothing to do" in capsys.readouterr().out
    assert hashes(out) == first

    assert train.main([*argv, "--resume_from_checkpoint", "latest"]) is None  # finished: said, nothing written
    assert capsys.readouterr().out.strip() == (
        f"{out} is trained to step 2 (--max_train_steps 2) and holds its final "
        "LoRA: nothing to do. To train further, raise --max_train_steps"
    )
    assert hashes(out) == first
    train.main([*argv, "--resume_from_checkpoint", "latest", "--max_train_steps", "3"])  # the way on
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_folder_that_only_holds_what_a_run_writes_is_refused_too(design_images, tmp_path, capsys, tiny_run):
    """--output_dir . in a project folder would write the model card over its README.md: refused, nothing changed;
    a run killed before its first checkpoint is a run too, and the line says that resuming it starts at step 0."""
    (tmp_path / "README.md").write_text("my notes")
    with pytest.raises(SystemExit) as e:
        train.main(["--images", str(design_images), "--output_dir", str(tmp_path), *tiny_run])
    assert e.value.code == 2 and one_line(capsys)[1] == (
        f"error: --output_dir {tmp_path} holds README.md, which a run writes; nothing was changed. Choose another "
        "--output_dir, or add --resume_from_checkpoint latest to write there"
    )
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
        and (tmp_path / "README.md").read_text() == "my notes"
    )
    killed = tmp_path / "killed"  # a run killed at step 3, before its first checkpoint (the last row cut short)
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    with pytest.raises(SystemExit) as e:
        train.main(["--images", str(design_images), "--output_dir", str(killed), *tiny_run])
    assert e.value.code == 2 and one_line(capsys)[1] == (
        f"error: --output_dir {killed} holds a run, to step 3 (metrics.jsonl); nothing was changed. It saved no "
        "checkpoint: to redo it from step 0 add --resume_from_checkpoint latest; to start a new run choose another "
        "--output_dir"
    )
    assert [p.name for p in killed.iterdir()] == ["metrics.jsonl"]


def test_output_folder_errors_name_the_flag_and_leave_nothing_behind(design_images, tmp_path, capsys, tiny_run):
    """A folder that cannot be made (under a file) is one line naming --output_dir in each script; a start that
    fails after the folder was made (a missing --images) removes it again, with the parents it made; a folder that
    was there before stays, without a .lock."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for script, other in (
        (train, ["--images", str(design_images), *tiny_run]),
        (sft, ["--synthetic", "2"]),
        (distill, ["--images", str(design_images), "--teacher", f"t={tmp_path}"]),
    ):
        with pytest.raises(SystemExit) as e:
            script.main(
                [
                    *other,
                    "--output_dir",
                    str(blocker / "out"),
                    "--pretrained_model_name_or_path",
                    "tiny",
                    "--device",
                    "cpu",
                ]
            )
        assert e.value.code == 2 and one_line(capsys)[1] == (
            f"error: --output_dir {blocker / 'out'}: {blocker} is a file, not a folder; choose another --output_dir"
        )
    with pytest.raises(SystemExit) as e:
        train.main(["--images", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "new" / "run"), *tiny_run])
    assert e.value.code == 2 and "no such folder" in one_line(capsys)[1]
    (tmp_path / "mine").mkdir()
    with pytest.raises(SystemExit):
        train.main(["--images", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "mine"), *tiny_run])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "mine"] and not any((tmp_path / "mine").iterdir())


@pytest.mark.parametrize("module", [train, sft, distill, rollout, reward, memory, ev])
def test_command_line_errors_are_one_line_and_help_keeps_the_usage(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--no_such_flag", "1"])
    assert e.value.code == 2 and "--help lists the flags" in one_line(capsys)[1]
    with pytest.raises(SystemExit) as e:
        module.parse_args(["--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: ")


def test_memory_flags_are_train_flags_with_its_forms_and_defaults(capsys):
    """Every bench.memory flag but --simulate and torchrun's --nproc_per_node is a train.py flag with its default; a
    list of layers and random:K parse as train.py parses them (the plan takes the largest layer count); a bad value is
    one line."""
    planned, trained = vars(memory.parse_args([])), vars(train.parse_args(["--images", "x"]))
    shared = set(planned) - {"simulate", "num_blocks", "nproc_per_node"}
    assert shared <= set(trained) and {k: planned[k] for k in shared} == {k: trained[k] for k in shared}
    args = memory.parse_args(
        ["--layers", "2", "3", "--pretrained_model_name_or_path", "random:2", "--quantize", "nf4"]
    )
    assert args.layers == [2, 3] and args.num_blocks == 2
    rows = memory.main(["--layers", "2", "3", "--pretrained_model_name_or_path", "random:2"])
    assert rows[0][1] == memory.Setup(num_blocks=2, layers=3)
    rows = memory.main(["--fsdp", "--nproc_per_node", "4", "--pretrained_model_name_or_path", "random:2"])
    assert rows[0][1] == memory.Setup(num_blocks=2, shards=4)
    capsys.readouterr()
    for bad in (
        ["--quantize", "bogus"],
        ["--pretrained_model_name_or_path", "random:61"],
        ["--group_size", "1"],
        ["--num_blocks", "4"],
        ["--pretrained_model_name_or_path", "tiny"],
        ["--fsdp", "--quantize", "int8"],
    ):
        with pytest.raises(SystemExit) as e:
            memory.parse_args(bad)
        assert e.value.code == 2 and bad[0] in one_line(capsys)[1]


def test_a_skipped_image_is_one_plain_line(design_images, tmp_path, capsys):
    for p in design_images.iterdir():
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(find_images(tmp_path)) == 2
    assert not [w for w in caught if "broken" in str(w.message)]
    err = capsys.readouterr().err
    assert err.startswith(f"skipping {tmp_path / 'broken.png'}: not a readable image (") and err.count("\n") == 1


def test_peft_noise_is_silenced_where_it_arises_and_only_there(tmp_path):
    """Loading a LoRA (what evaluate.py --lora does) and a LoRA on int8 blocks (--quantize int8) raise none of peft's
    noise warnings through our code; the diffusers file loads without one through diffusers itself too (its metadata
    names the modules its weights adapt); the int8 warning and other warnings still show outside our code."""
    from peft import LoraConfig

    pipe = rollout.load_pipeline("tiny")
    lora.add_lora(pipe.transformer, 4, 8)
    save_lora(pipe.transformer, tmp_path, base_model="tiny")
    noise = ("exclude_modules", "get_apply_tensor_subclass")
    int8 = importlib.util.find_spec("torchao") is not None  # requirements.txt installs it; a GPU image may lack it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_lora(rollout.load_pipeline("tiny"), tmp_path)
        load_lora(rollout.load_pipeline("tiny"), tmp_path / "peft")
        if int8:
            lora.add_lora(rollout.load_pipeline("tiny", kind="int8").transformer, 4, 8)
    assert not [w for w in caught if any(n in str(w.message) for n in noise)], [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rollout.load_pipeline("tiny").load_lora_weights(str(tmp_path))  # diffusers directly, as README says
        if int8:
            rollout.load_pipeline("tiny", kind="int8").transformer.add_adapter(LoraConfig(target_modules=["to_q"]))
        warnings.warn("a warning of someone else's", stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert not any("exclude_modules" in m or "inconsistency" in m for m in messages), messages  # the file is clean
    assert "a warning of someone else's" in messages
    assert not int8 or any("get_apply_tensor_subclass" in m for m in messages)


# ----------------------------------------------------------------------------- the front door
def _documented_commands():
    """(file, script, argv) of every `python SCRIPT.py ...` / `torchrun ... SCRIPT.py ...` line in the README's and
    docs/'s bash blocks, with line continuations joined."""
    import importlib
    import shlex

    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = "" if line.lstrip().startswith("#") else line.split("&&")[-1].split(" #")[0].strip()
                words = shlex.split(line) if line else []
                if words[:3] in (["python", "-m", "bench"], ["python", "-m", "bench.memory"]):
                    found.append((path.name, importlib.import_module(words[2]), words[3:]))
                    continue
                scripts = [i for i, w in enumerate(words) if re.fullmatch(r"[\w./-]*\w\.py", w)]
                if scripts and (words[0] in ("python", "torchrun") or "=" in words[0]) and words[1:2] != ["-m"]:
                    i = scripts[0]
                    script = Path(words[i]).stem
                    if (ROOT / f"{script}.py").is_file():  # the repository's scripts, wherever the command runs
                        found.append((path.name, importlib.import_module(script), words[i + 1 :]))
    return found


def test_documented_commands_parse():
    """The commands the README and docs/ show (dry runs, the real runs, each script's examples) are accepted by
    the scripts' own parse_args, so the front door cannot drift from the code."""
    commands = _documented_commands()
    assert {m.__name__ for _, m, _ in commands} >= {"train", "rollout", "reward", "data", "evaluate", "bench"}
    for name, module, argv in commands:
        try:
            module.parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{name}: {module.__name__} {' '.join(argv)} does not parse") from e


# ----------------------------------------------------------------------------- a newcomer's rough edges
def test_a_reward_that_returns_the_wrong_thing_stops_in_one_line_and_leaves_the_folder_reusable(
    design_images, tmp_path, capsys, tiny_run
):
    """A reward's return is checked where it is called: the wrong shape, a non-finite value or no info dict stops
    the run with one line naming the reward and what it returned (exit 2) and leaves nothing in the folder; a crash
    (a bug: its traceback) in the first step leaves no run either. The same command then runs there."""
    (tmp_path / "bad.py").write_text(
        "import torch\n\n\n"
        "def wide(images, layers, group_size, **_):\n    return torch.zeros(len(layers), 2), {}\n\n\n"
        "def nan(images, layers, group_size, **_):\n    return torch.full((len(layers),), float('nan')), {}\n\n\n"
        "def bare(images, layers, group_size, **_):\n    return torch.zeros(len(layers))\n\n\n"
        "def crash(images, layers, group_size, **_):\n    raise RuntimeError('a bug in my reward')\n"
    )
    out = tmp_path / "out"
    argv = ["--images", str(design_images), "--output_dir", str(out), "--max_train_steps", "1", *tiny_run]
    for name, said in [
        ("wide", "returned rewards of shape (2, 2); give shape (2,)"),
        ("nan", "returned non-finite rewards at rows [0, 1]"),
        ("bare", "returned a Tensor of shape (2,); a reward returns a pair"),
    ]:
        with pytest.raises(SystemExit) as e:
            train.main([*argv, "--reward", f"{tmp_path / 'bad.py'}:{name}"])
        assert e.value.code == 2 and f"--reward {tmp_path / 'bad.py'}:{name} {said}" in last_line(capsys)[1]
        assert not out.exists()  # nothing left behind: the folder this start made went again
    with pytest.raises(RuntimeError, match="a bug in my reward"):
        train.main([*argv, "--reward", f"{tmp_path / 'bad.py'}:crash"])
    assert not runfolder.holds_run(out)  # a bug keeps its traceback and leaves no run
    train.main([*argv, "--reward", "recon"])  # the same folder, no --resume_from_checkpoint needed
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    with pytest.raises(SystemExit):  # now it holds a run: never written over
        train.main([*argv, "--reward", "recon"])
    assert "holds a run, to step 1" in capsys.readouterr().err


def test_each_group_of_a_step_gets_its_own_seed(design_images, tmp_path, monkeypatch, tiny_run):
    """The reward's seed (the VLM reward's grid order) is drawn per group, from (--seed, step, image position), as
    reward.py's docstring says: four groups over two steps, four seeds, the plan's own."""
    seen = []

    def record(images, layers, group_size, seed=None, **_):
        seen.append(seed)
        return layers[:, 0, 3].float().mean((1, 2)), {}

    monkeypatch.setitem(reward.REWARDS, "record", record)
    argv = ["--images", str(design_images), "--output_dir", str(tmp_path), "--max_train_steps", "2"]
    train.main([*argv, *tiny_run, "--reward", "record", "--images_per_step", "2"])
    args = train.parse_args([*argv, *tiny_run, "--images_per_step", "2"])
    assert seen == [s for step in range(2) for s in train.step_plan(args, step, 2).seeds] and len(set(seen)) == 4


@pytest.mark.parametrize("signal_name, code, said", [("SIGINT", 130, "Ctrl-C"), ("SIGTERM", 143, "SIGTERM")])
def test_ctrl_c_and_sigterm_stop_in_one_line_with_the_way_on(
    design_images, tmp_path, signal_name, code, said, tiny_run
):
    """Mid-run, Ctrl-C (SIGINT) and SIGTERM stop train.py with one line, no traceback: the step reached, the last
    checkpoint and the command that goes on; exit 130 / 143, the folder's lock released. The command it prints
    resumes the run."""
    out = tmp_path / "run"
    argv = [
        sys.executable,
        str(ROOT / "train.py"),
        "--images",
        str(design_images),
        "--output_dir",
        str(out),
        "--max_train_steps",
        "1000",
        "--checkpointing_steps",
        "1",
        "--sample_every",
        "0",
        *tiny_run,
    ]
    run = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not runfolder.checkpoints(out) and time.time() < deadline and run.poll() is None:
            time.sleep(0.2)
        run.send_signal(getattr(signal, signal_name))
        err = run.communicate(timeout=60)[1]
    finally:
        if run.poll() is None:
            run.kill()
    last = [line for line in err.splitlines() if line.startswith("error: ")]
    assert run.returncode == code and "Traceback" not in err and len(last) == 1, err
    saved = runfolder.checkpoints(out)[-1]
    assert last[0].startswith(f"error: stopped by {said} after step ") and f"last checkpoint {saved}" in last[0]
    resume = last[0].split("To go on: ", 1)[1]
    assert resume.endswith("--resume_from_checkpoint latest") and str(out) in resume
    with open(out / ".lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: nobody holds it
        fcntl.flock(lock, fcntl.LOCK_UN)
    words = shlex.split(resume)
    assert words[:2] == ["python", str(ROOT / "train.py")]
    step = int(saved.name.split("-")[1])
    train.main([*words[2:], "--max_train_steps", str(step + 1)])  # the printed command, one step further
    assert runfolder.run_step(out) == step + 1


def test_an_unreachable_hub_fails_within_seconds_naming_the_flag_in_effect(
    design_images, tmp_path, monkeypatch, capsys, tiny_run
):
    """With no hub and an empty cache, the default model stops the run at once with one line naming the flag in
    effect and that it is the default, a local folder as the way out and the dry run; then the default judge alike.
    Without --device on a machine with no CUDA, the first line says the run is on the CPU."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for variable in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    base = ["--images", str(design_images), "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    for argv, flag in [
        (base, "--pretrained_model_name_or_path Qwen/Qwen-Image-Layered (the default)"),
        (
            [*base, "--pretrained_model_name_or_path", "tiny"],
            "--judge local (the default: no --judge or --judge_url given) with --judge_model Qwen/Qwen3.5-9B (the "
            "default)",
        ),
    ]:
        started = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        seconds = time.perf_counter() - started
        err = capsys.readouterr().err
        line = err.strip().splitlines()[-1]
        assert e.value.code == 2 and seconds < 10 and line.startswith(f"error: {flag}: not in the Hugging Face cache")
        assert "127.0.0.1 cannot be reached" in line and "--local-dir DIR" in line and "dry run" in line, line
        if not torch.cuda.is_available():
            assert err.startswith("no CUDA GPU is visible: running on the CPU")
        assert not (tmp_path / "out").exists()
    assert "given" not in train.parse_args([*base, *tiny_run]).__dict__  # the record of given flags stays apart
    (tmp_path / "hub" / "models--Qwen--Qwen-Image-Layered" / "snapshots" / "0123abc").mkdir(parents=True)
    assert cli.check_hub("Qwen/Qwen-Image-Layered", "--pretrained_model_name_or_path") is None  # cached: no hub asked


@pytest.mark.parametrize(
    "module, argv, said",
    [
        (train, ["--imgs", "x"], "unrecognized argument --imgs: did you mean --images?"),
        (
            train,
            ["--images", "x", "--group-size", "4"],
            "unrecognized argument --group-size: did you mean --group_size?",
        ),
        (distill, ["--images", "x", "--teacher", "a=b", "--judge-url", "u"], "--judge-url: did you mean --judge_url?"),
        (sft, ["--synthetic", "2", "--learning-rate", "1"], "--learning-rate: did you mean --learning_rate?"),
        (rollout, ["--images", "x", "--group_sizes", "2"], "--group_sizes: did you mean --group_size?"),
        (reward, ["--decompositions", "x", "--reward-args", "a=1"], "--reward-args: did you mean --reward_args?"),
        (ev, ["--reference", "x"], "unrecognized argument --reference: did you mean --references?"),
        (data, ["synthetic", "x", "--num-samples", "3"], "--num-samples: did you mean --num_samples?"),
        (memory, ["--group-size", "4"], "--group-size: did you mean --group_size?"),
        (bench, ["--warm_up", "1"], "--warm_up: did you mean --warmup?"),
    ],
)
def test_an_unknown_flag_names_itself_and_the_closest_one(module, argv, said, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args(argv)
    assert e.value.code == 2 and said in one_line(capsys)[1]


def parser_of(module, argv):
    """The cli.ArgumentParser a script's parse_args(argv) builds."""
    parser = {}
    original = cli.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        parser.setdefault("p", self)
        return original(self, args, namespace)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(cli.ArgumentParser, "parse_args", grab)
        module.parse_args(argv)
    return parser["p"]


def test_flag_names_agree_across_scripts():
    """The reward's and the judge's flags are one set, with one name each, in train.py, distill.py and reward.py (the
    reward's own in train.py and reward.py); no script spells a concept another way."""

    def flags(module, argv):
        return set(parser_of(module, argv)._option_dests())

    judge = {
        "--judge",
        "--judge_model",
        "--judge_url",
        "--judge_api_key_env",
        "--judge_extra_body",
        "--prompts_dir",
        "--panel_size",
        "--grid_size",
    }
    found = {
        "train": flags(train, ["--images", "x"]),
        "distill": flags(distill, ["--images", "x", "--teacher", "a=b"]),
        "reward": flags(reward, ["--decompositions", "x"]),
    }
    assert (
        all(judge <= f for f in found.values()) and {"--reward", "--reward_args"} <= found["train"] & found["reward"]
    )
    everything = set().union(
        *found.values(),
        flags(sft, ["--synthetic", "1"]),
        flags(rollout, ["--images", "x"]),
        flags(ev, []),
        flags(memory, []),
        flags(bench, []),
    )
    assert not everything & {"--api_key_env", "--combine", "--weights", "--num_blocks_built"}


def test_the_model_flags_are_one_definition_in_every_script_that_loads_the_model():
    """The model, its dtype, its quantization and the device (and the speed levers where a script applies them) are
    the same flags with the same defaults, choices and help in all five scripts that load the pipeline."""
    model = ["--pretrained_model_name_or_path", "--mixed_precision", "--quantize", "--device"]
    speed = ["--compile", "--attention_backend"]

    def options(module, argv):
        actions = parser_of(module, argv)._option_string_actions
        return {f: (actions[f].default, actions[f].choices, actions[f].help) for f in model + speed if f in actions}

    found = {
        "train": options(train, ["--images", "x"]),
        "sft": options(sft, ["--synthetic", "1"]),
        "distill": options(distill, ["--images", "x", "--teacher", "a=b"]),
        "rollout": options(rollout, ["--images", "x"]),
        "evaluate": options(ev, []),
    }
    assert all(list(f) == model + speed for name, f in found.items() if name != "evaluate")
    assert list(found["evaluate"]) == model  # evaluate.py swaps LoRAs on one base: no compiled graphs to keep
    assert all(f[k] == found["train"][k] for f in found.values() for k in f)
    assert found["train"]["--pretrained_model_name_or_path"][0] == rollout.DEFAULT_MODEL


def test_the_run_flags_are_one_definition_in_the_three_training_scripts():
    """Where a run writes, how long it runs, what it keeps and how it is watched: the same flags with the same help
    in train.py, sft.py and distill.py; only the defaults are each script's (sft.py draws no sample pictures)."""
    run = ["--output_dir", "--max_train_steps", "--checkpointing_steps", "--checkpoints_total_limit"]
    run += ["--resume_from_checkpoint", "--sample_every", "--report_to"]
    found = {}
    for module, argv in [(train, ["--images", "x"]), (sft, ["--synthetic", "1"]), (distill, ["--images", "x"])]:
        actions = parser_of(module, argv + ["--teacher", "a=b"] * (module is distill))._option_string_actions
        found[module.__name__] = {f: (actions[f].help, actions[f].choices) for f in run if f in actions}
    assert list(found["train"]) == list(found["distill"]) == run and "--sample_every" not in found["sft"]
    assert all(f[k] == found["train"][k] for f in found.values() for k in f)
    assert parser_of(sft, ["--synthetic", "1"]).get_default("output_dir") == "outputs/sft"


def test_the_docs_flag_table_lists_every_flag_of_train_py():
    """docs/training.md's "Flags by group" names each flag train.py takes, and none it does not."""
    actions = parser_of(train, ["--images", "x"])._actions
    flags = {s for a in actions for s in a.option_strings if s.startswith("--") and not s.startswith("--no-")}
    text = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    table = text[text.index("## Flags by group") :]
    table = table[: table.index("\n## ")]
    assert set(re.findall(r"`(--[a-z_]+)", table)) == flags - {"--help"}


def test_the_last_line_counts_in_words(tmp_path):
    """What a run wrote, as its last line says it: one picture, two pictures."""
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "step-000001.png").write_bytes(b"")
    assert runfolder.written(tmp_path) == f"wrote in {tmp_path}: samples/ (1 picture)"
    (tmp_path / "samples" / "step-000002.png").write_bytes(b"")
    assert runfolder.written(tmp_path) == f"wrote in {tmp_path}: samples/ (2 pictures)"
