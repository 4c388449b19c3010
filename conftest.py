"""What the tests share (test_smoke.py here, every other test in tests/): one intra-op thread, the tiny models' flag
sets, small pictures and folders of them, and a loopback judge. A test file never imports another; it asks for
these fixtures by name."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

import data
import reward
from support import openai_server
from support.judges import make_judge

# train.py's and distill.py's flags for the tiny model on the CPU: 64 px, G 4, T 4, LoRA r 4, float32, one image
# per step, no tracker. The `tiny_flags` fixture returns them, with changes: tiny_flags(group_size=2, device=None)
# (None drops a flag; a list is several values, e.g. layers=[2, 3])
TINY = {
    "pretrained_model_name_or_path": "tiny",
    "resolution": 64,
    "group_size": 4,
    "num_inference_steps": 4,
    "rank": 4,
    "lora_alpha": 8,
    "mixed_precision": "no",
    "train_batch_size": 4,
    "images_per_step": 1,
    "report_to": "none",
    "device": "cpu",
}
CRITERIA = list(reward.load_prompts().criteria)  # the default prompt set's criteria: the stage-1 answer's keys


def flags(values):
    """{flag: value} -> argv: None drops the flag, True is a bare switch, a list is several values."""
    argv = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        argv.append(f"--{key}")
        if value is not True:
            argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return argv


@pytest.fixture(scope="session")
def tiny_flags():
    return lambda **changes: flags({**TINY, **changes})


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole session, module-scoped fixtures included: on two busy cores, torch's spinning
    OpenMP pool made toy-sized runs 4-20x slower (measured: 10 train.py steps 3.5 s with 1 thread, 37-71 s with 2,
    same load). bench's runs set their own and give the count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def draw_design(size=(48, 32), seed=0):
    """A small non-square 'layered design': background, a rectangle, an ellipse, a line of text."""
    g = torch.Generator().manual_seed(seed)
    c = [tuple(int(x) for x in torch.randint(0, 256, (3,), generator=g)) for _ in range(3)]
    im = Image.new("RGB", size, c[0])
    d = ImageDraw.Draw(im)
    d.rectangle([4, 4, size[0] // 2, size[1] // 2], fill=c[1])
    d.ellipse([size[0] // 2, size[1] // 3, size[0] - 3, size[1] - 3], fill=c[2])
    d.text((2, size[1] - 12), "Hi", fill=(255, 255, 255))
    return im


@pytest.fixture(scope="session")
def design():
    """draw_design(size=(48, 32), seed=0) -> a PIL picture."""
    return draw_design


@pytest.fixture(scope="module")
def design_images(tmp_path_factory):
    """Two synthetic designs, 64 x 48 px, flattened (`python data.py synthetic --images_only`)."""
    folder = tmp_path_factory.mktemp("designs")
    data.write_references(folder, 2, seed=0, size=(64, 48), images_only=True)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Designs in awkward formats (CMYK JPEG, palette GIF, 16-bit grey PNG), one corrupt PNG and a text file."""
    d = tmp_path_factory.mktemp("images")
    draw_design((48, 32), seed=0).save(d / "a.png")
    draw_design((40, 40), seed=1).convert("CMYK").save(d / "b.jpg")
    draw_design((48, 32), seed=2).convert("P").save(d / "c.gif")
    Image.fromarray(np.asarray(draw_design((32, 48), seed=3).convert("L"), np.uint16) * 257).save(d / "d16.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (d / "README.txt").write_text("not an image")
    return d


@pytest.fixture(scope="session")
def peft_weights():
    """peft_weights(folder) -> the PEFT adapter's tensors a run saved in folder/peft."""
    return lambda folder: load_file(folder / "peft" / "adapter_model.safetensors")


# ----------------------------------------------------------------------------- a judge on 127.0.0.1
@pytest.fixture(scope="session")
def criteria():
    return list(CRITERIA)


@pytest.fixture(scope="session")
def judge_server():
    """judge_server(answer, models_status=200): a context manager serving answer(body) -> (status, payload) on a
    free loopback port; yields (server, url). support/openai_server.py builds the answers."""
    return openai_server.serve


@pytest.fixture(scope="session")
def http_judge():
    """http_judge(url, **options): the HTTP judge against a loopback server, quick retries, small pictures."""
    return lambda url, **options: make_judge(
        "http",
        openai_server.MODEL,
        url,
        prompts=reward.load_prompts(),
        **{"backoff": 0.01, "panel_size": 96, "grid_size": 160, **options},
    )


@pytest.fixture(scope="session")
def load_judge():
    """load_judge(kind, model=None, url=None, **options): a judge backend (support/judges.make_judge) carrying the
    default prompt set."""
    return lambda kind, model=None, url=None, **options: make_judge(
        kind, model, url, prompts=reward.load_prompts(), **options
    )


@pytest.fixture(scope="module")
def tiny_judge():
    return make_judge("tiny", prompts=reward.load_prompts())
