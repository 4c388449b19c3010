"""The command line and bad input: one parser style for every script, one line for every input error.

The line between bad input and a bug: bad input (a flag, a file, a server, the environment) stops with one line on
stderr and exit code 2; a bug keeps its traceback. Every script's parser is `ArgumentParser` (one-line errors, an
unknown flag named with the closest known one), and its setup runs under `input_errors()`.

    python train.py --imgs examples   # error: unrecognized argument --imgs: did you mean --images? ...
"""

import argparse
import difflib
import os
import socket
import sys
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

import torch

from support import quantize

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --mixed_precision -> model dtype
HUB = "huggingface.co"
_AT_FAIL = []  # called by fail() before it exits: what a failed start must not leave behind (runfolder.py)


class InputError(Exception):
    """Bad input: a flag, a file, a server or the environment is not as it must be. One line, exit 2."""


def fail(message, code=2):
    """Stop with one line on stderr and exit `code` (2: argparse's code for bad input), after the cleanups
    registered with at_fail (an output folder this process claimed and left without a run goes again)."""
    print(f"error: {message}", file=sys.stderr)
    for cleanup in list(_AT_FAIL):
        cleanup()
    raise SystemExit(code) from None


def at_fail(cleanup):
    if cleanup not in _AT_FAIL:
        _AT_FAIL.append(cleanup)


@contextmanager
def input_errors():
    """Exceptions raised inside that come from the user's input (a missing or unreadable file or folder, a value
    that is not accepted, a server that cannot be reached, a package that is not installed) become one line and exit
    code 2; Ctrl-C becomes one line and exit 130. Use it around setup: inside the training loop an exception is a bug
    (in a forked reward, a shape) and keeps its traceback (tracking.guard handles the loop's own ways to stop)."""
    try:
        yield
    except (InputError, ValueError, OSError, ImportError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted (Ctrl-C) before training started; nothing was trained", code=130)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors (`error: <what>`, exit 2; the usage and every flag stay on --help), an
    unknown flag named with the closest known one, and no abbreviated flags. parse_args records in GIVEN the flags
    the command line set (the others are defaults, which error messages say: flag_value)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a typo is named, never silently taken for a longer flag
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (python {self.prog} --help lists the flags)\n")

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else [str(a) for a in args]
        dests = self._option_dests()
        for token in args:  # before argparse, which would first complain of a missing required flag
            flag = token.split("=", 1)[0]
            if flag.startswith("--") and flag not in dests:
                self.error(f"unrecognized argument {flag}{did_you_mean(flag, dests)}")
        GIVEN.clear()
        GIVEN.update(dests[t.split("=", 1)[0]] for t in args if t.split("=", 1)[0] in dests)
        return super().parse_args(args, namespace)

    def _option_dests(self):
        found, parsers = {}, [self]
        while parsers:  # subcommands' flags too (data.py)
            p = parsers.pop()
            for action in p._actions:
                found.update(dict.fromkeys(action.option_strings, action.dest))
                if isinstance(action, argparse._SubParsersAction):
                    parsers += action.choices.values()
        return found


GIVEN = set()  # the dests of the flags the last command line set


def did_you_mean(flag, known):
    """': did you mean --group_size?' for --group-size, ': did you mean --images?' for --imgs, or ''."""
    norm = {k.replace("-", "_"): k for k in known if k.startswith("--")}
    near = difflib.get_close_matches(flag.replace("-", "_"), list(norm), n=1)
    return f": did you mean {norm[near[0]]}?" if near else ""


def check(parser, checks):
    """parser.error(message) for the first (ok, message) of `checks` that is not ok."""
    for ok, message in checks:
        if not ok:
            parser.error(message)


def flag_value(args, dest):
    """`--dest value`, with "(the default)" where the command line did not set it: what an error names."""
    return f"--{dest} {getattr(args, dest)}" + ("" if dest in GIVEN else " (the default)")


# ----------------------------------------------------------------------------- the machine
def pick_device(device=None, mixed_precision="bf16"):
    """(device, dtype) of a run: --device cpu, cuda or cuda:N (default cuda when a GPU is visible, else cpu, said in
    one line at start-up) and the frozen weights' dtype: --mixed_precision on CUDA, float32 on the CPU (bf16 matmuls
    are slow there)."""
    if device is None and not torch.cuda.is_available():
        if os.environ.get("RANK", "0") == "0":
            print(
                "no CUDA GPU is visible: running on the CPU in float32 (--device cpu). The released model needs a "
                "GPU; the CPU suits the tiny dry run (README)",
                file=sys.stderr,
            )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            f"--device {device}: no CUDA GPU is visible to torch {torch.__version__}; use --device cpu "
            "or install a CUDA build of torch"
        )
    if not device.startswith(("cuda", "cpu")):
        raise InputError(f"--device {device}: use cpu, cuda or cuda:N")
    return device, DTYPES[mixed_precision] if device.startswith("cuda") else torch.float32


def device_line(device, dtype, kind=None):
    """The start-up line's words for where and in what precision the model runs, and its --quantize if given."""
    line = f"device {device}, {str(dtype).removeprefix('torch.')} weights"
    if kind is None:
        return line
    return line + (
        ", no quantization (--quantize none)"
        if kind == "none"
        else f", blocks quantized to {kind} ({quantize.QUANTIZE[kind]})"
    )


def check_attention(device, dtype):
    """At 640 px only flash or memory-efficient attention fits (the math path's N x N scores do not:
    docs/performance.md): on CUDA, check that one of them runs, and say how to fix it if not."""
    if not str(device).startswith("cuda"):
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 24, 256, 128, device=device, dtype=dtype)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as e:
        raise InputError(
            f"no memory-efficient attention kernel on {device} ({str(e).splitlines()[0][:120]}): the "
            "math path cannot fit a 640 px step; install a CUDA build of torch >= 2.4 and use "
            "--mixed_precision bf16"
        ) from None


# ----------------------------------------------------------------------------- the hub
def is_hub_id(name):
    """A name from_pretrained would look up on the hub: not a folder here, of the form owner/name."""
    return not Path(name).expanduser().exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def check_hub(name, what, timeout=3.0):
    """Before an expensive load from the hub: a hub id that is neither in the local cache nor reachable stops at once
    with one line (from_pretrained would retry for about a minute first). `what` names the flag in effect, e.g.
    "--pretrained_model_name_or_path Qwen/Qwen-Image-Layered (the default)". Nothing is checked offline
    (HF_HUB_OFFLINE=1: the cache decides), behind a proxy, or for a local folder."""
    if not is_hub_id(name) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # the hub is reached through a proxy: a direct connection says nothing
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{name.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):  # this repo's folder alone, not a scan of the whole cache
        return
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or HUB
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise InputError(
            f"{what}: not in the Hugging Face cache and {host} cannot be reached ({e.__class__.__name__}"
            f"); download it where there is a connection (hf download {name} --local-dir DIR) and give "
            "the folder instead, or try the offline dry run first (README: tiny model, tiny judge)"
        ) from None
