"""Rewards for Stable-Layers: the two-stage VLM judge, plus programmatic rewards for ablations.

    # score a folder written by `python rollout.py --images DIR --output_dir OUT`, no GPU, no download
    python reward.py --decompositions OUT --judge tiny
    # a real judge: any transformers Qwen-VL checkpoint, or any OpenAI-compatible server
    python reward.py --decompositions OUT --judge local --judge_model Qwen/Qwen2.5-VL-7B-Instruct
    vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000 &
    python reward.py --decompositions OUT --judge http --judge_url http://localhost:8000/v1 \
        --judge_model Qwen/Qwen2.5-VL-7B-Instruct --output_dir judge_view   # saves what the judge saw
    python reward.py --decompositions OUT --reward recon                   # no judge at all
    python reward.py --decompositions OUT --judge tiny --reward_args combine=mean weights=separation=2

Every reward is fn(images, layers, group_size, **kwargs) -> (rewards (B,) float32 CPU, info dict), with
layers (B, N, 4, H, W) in [0, 1], straight alpha, layer 0 = background, and the G = group_size candidates
of image i in rows i*G .. i*G+G-1. --reward names one of REWARDS or a function of your own (FILE.py:FUNCTION,
MODULE:FUNCTION: resolve_reward); the loop passes judge= and seed= (one seed per group), and --reward_args the
rest (reward_kwargs). A reward's `**_` says it ignores keyword arguments it does not name.

The "vlm" reward (Stable-Layers' two-stage judge: structured per-candidate scoring, then grid calibration):
  stage 1, each candidate b alone (its panel: input + N layers on a checkerboard), criteria k = prompts/criteria.txt:
      s_bk = E[score] = sum_{d=1..9} p(d) * d, p = softmax of the digit logits at the score position,
             renormalised over the digits 1..9 (local judges; HTTP: top_logprobs, else the parsed integer)
      t_b  = sum_k w_k * s_bk / sum_k w_k                      (weights w equal by default)
  stage 2, one grid per image i with its G panels in the order perm_i = randperm(G) (a torch generator seeded
      with `seed`, one draw per image of the call; train.py calls once per group, with the group's own seed, so
      every group of a step has its own order); position p is labelled letter p and shows candidate perm_i[p]:
      c_{i*G + perm_i[p]} = E[score of letter p]               (so position bias cannot become reward)
  combine = "calibrated" (default): r_b = c_b;  "mean": r_b = (t_b + c_b) / 2;  "stage1": r_b = t_b (no grid).
Fallbacks (counted in info, never raised): a candidate whose stage 1 failed gets the mean t of its group's
successful candidates, or 5 (mid-scale) if none succeeded; a group whose stage 2 failed uses t for all its
candidates. A group scored by one constant therefore gets zero advantage. Rewards live on the 1..9 scale.
info["judge/answered"] counts the queries answered; train.py trains no step in which the judge answered none.
A reward of your own may call vlm_reward and add a term; marked @uses_judge, it gets the default judge from
train.py as judge= (README, "Forking a reward"). prompts/ is the default prompt set; --prompts_dir another.
Why "mean" is offered: scored alone, t is squeezed into a narrow band, so it barely moves the within-group
ranking, but it breaks ties where the grid gives equal scores and averages two independent looks.
"""

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import re
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from support import cli, pictures
from support.judges import HIGH, LOW, Query, make_judge
from support.scoring import call_reward

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_JUDGE = "Qwen/Qwen3.5-9B"  # the open judge the released LoRA was retrained with (the paper's is Gemini)
LETTERS = string.ascii_uppercase
MID = 5.0  # the score a group with no answer gets (mid-scale of LOW..HIGH)
COMBINE = ("calibrated", "mean", "stage1")


# ----------------------------------------------------------------------------------------------- prompts
@dataclass
class Prompts:
    stage1: str  # template with {num_layers} {criteria} {answer_format}
    stage2: str  # template with {num_candidates} {num_layers} {labels} {criteria} {answer_format}
    criteria: dict  # key -> description, in file order


def load_prompts(prompts_dir=PROMPTS_DIR) -> Prompts:
    """Read criteria.txt, stage1.txt and stage2.txt from prompts_dir, each one it does not hold from prompts/ (so a
    folder with only a criteria.txt is a new set of criteria); fail now, naming the file, rather than at step 1."""
    d, texts, criteria, paths = Path(prompts_dir), {}, {}, {}
    if not d.is_dir():
        raise FileNotFoundError(f"--prompts_dir {d}: no such folder (it holds criteria.txt, stage1.txt, stage2.txt)")
    if unknown := sorted(p.name for p in d.glob("*.txt") if p.stem not in ("criteria", "stage1", "stage2")):
        raise ValueError(f"--prompts_dir {d}: {unknown} is not one of criteria.txt, stage1.txt, stage2.txt")
    for name in ("criteria", "stage1", "stage2"):
        paths[name] = d / f"{name}.txt" if (d / f"{name}.txt").is_file() else PROMPTS_DIR / f"{name}.txt"
        texts[name] = paths[name].read_text(encoding="utf-8")
    for line in texts["criteria"].splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, desc = line.partition(":")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
                raise ValueError(f"{paths['criteria']}: line {line[:40]!r} is not 'key: description'")
            criteria[key.strip()] = desc.strip()
    if not criteria:
        raise ValueError(f"{paths['criteria']}: no criteria found (one 'key: description' per line)")
    for name, ok in (
        ("stage1", {"num_layers", "criteria", "answer_format"}),
        ("stage2", {"num_candidates", "num_layers", "labels", "criteria", "answer_format"}),
    ):
        fields = {f for _, f, _, _ in string.Formatter().parse(texts[name]) if f is not None}
        if fields - ok or "answer_format" not in fields:
            raise ValueError(
                f"{paths[name]}: placeholders must be among {sorted(ok)} and include "
                f"{{answer_format}}; found {sorted(fields)} (write literal braces as {{{{ }}}})"
            )
    return Prompts(texts["stage1"], texts["stage2"], criteria)


def _fill(template, prompts: Prompts, keys, **fields) -> str:
    """A prompt template with the criteria list and the JSON answer format {"key": <1-9>, ...} filled in."""
    return template.format(
        criteria="\n".join(f"- {k}: {v}" for k, v in prompts.criteria.items()),
        answer_format="{" + ", ".join(f'"{k}": <{LOW}-{HIGH}>' for k in keys) + "}",
        **fields,
    )


# ----------------------------------------------------------------------------------------------- rewards
def _check(images, layers, group_size):
    if layers.ndim != 5 or layers.shape[2] != 4:
        raise ValueError(f"layers must be (B, N, 4, H, W), got {tuple(layers.shape)}")
    if layers.shape[0] != len(images) * group_size:
        raise ValueError(f"layers has {layers.shape[0]} rows but {len(images)} images x group_size {group_size}")


def uses_judge(fn):
    """Mark a reward that scores with the VLM judge (it reads kwargs["judge"]): train.py and distill.py then build
    the default judge for it even when none is named on the command line. A judge that is named (--judge,
    --judge_url) is built and passed as judge= to every reward."""
    fn.uses_judge = True
    return fn


def needs_judge(fn):
    return getattr(fn, "uses_judge", False)


@uses_judge
def vlm_reward(images, layers, group_size, judge=None, seed=0, weights=None, combine="calibrated", save_dir=None, **_):
    """The two-stage Stable-Layers reward, term by term (formulas in the module docstring): the judge's queries
    (one panel per candidate, one grid per group), its answers as s_bk and c_b, then `combine_scores` gives r_b.
    weights: {criterion: w} or a list in criteria order; combine: calibrated | mean | stage1; save_dir: write the
    panels, grids and prompts exactly as sent to the judge."""
    _check(images, layers, group_size)
    if judge is None:
        raise ValueError("this reward scores with a VLM judge and needs judge=load_judge(...) (train.py builds it)")
    if combine not in COMBINE:
        raise ValueError(f"combine={combine!r}: choose one of {COMBINE}")
    t0 = time.perf_counter()
    B, G, keys = layers.shape[0], group_size, list(judge.prompts.criteria)
    w = _criterion_weights(weights, keys)  # (K,)
    queries, perms = judge_queries(images, layers, G, judge, seed, grid=combine != "stage1", save_dir=save_dir)
    t_judge = time.perf_counter()
    answers, stats = judge.score(queries)
    t_judge = time.perf_counter() - t_judge
    s = torch.tensor([[a[k] for k in keys] if a else [math.nan] * len(keys) for a in answers[:B]])  # (B, K) s_bk
    c = torch.full((B,), math.nan)  # (B,) c_b: grid position p of group i shows candidate perm_i[p]
    for i, (perm, a) in enumerate(zip(perms, answers[B:])):
        if a is not None:
            for p, cand in enumerate(perm):
                c[i * G + cand] = a[LETTERS[p]]
    rewards, t, fallback = combine_scores(s, c, w, G, combine)
    info = judge_metrics(s, t, c, rewards, fallback, keys, G)
    info.update(
        {
            "judge/failed_stage2": float(sum(a is None for a in answers[B:])),
            "judge/requests": float(stats["requests"]),
            "judge/retries": float(stats["retries"]),
            "judge/answered": float(sum(a is not None for a in answers)),  # queries answered, of B + groups
            "time/judge_s": t_judge,
            "time/reward_s": time.perf_counter() - t0,
            "judge_last_error": stats.get("last_error"),
        }
    )  # the last failure's text or None (train.py names it)
    for b, cand in enumerate(info["candidates"]):  # its letter in the grid
        cand["label"] = LETTERS[perms[b // G].index(b % G)] if combine != "stage1" else None
    return rewards.float(), info


def combine_scores(s, c, w, group_size, combine="calibrated"):
    """The reward r_b from the two stages (module docstring), NaN marking a query the judge did not answer:

        t_b = sum_k w_k s_bk / sum_k w_k             the stage-1 total; a failed candidate gets the mean t of its
                                                     group's scored ones, or MID if none was scored
        r_b = c_b (calibrated) | (t_b + c_b) / 2 (mean) | t_b (stage1);   r_b = t_b where c_b failed

    s: (B, K) criterion scores, c: (B,) calibrated scores, w: (K,) weights; B = groups x group_size.
    Returns (rewards (B,), t (B,) with NaN where stage 1 failed, fallback (B,) bool: r_b rests on a fill-in)."""
    t = (s * w).sum(1) / w.sum()  # (B,) t_b
    groups = t.view(-1, group_size)  # (num_groups, G)
    scored = ~groups.isnan()
    group_mean = torch.where(scored, groups, 0).sum(1, keepdim=True) / scored.sum(1, keepdim=True).clamp_min(1)
    filled = torch.where(scored, groups, torch.where(scored.any(1, keepdim=True), group_mean, MID)).view(-1)
    ok_t, ok_c = ~t.isnan(), ~c.isnan()
    rewards, fallback = {
        "calibrated": (torch.where(ok_c, c, filled), ~ok_c),
        "mean": (torch.where(ok_c, (filled + c) / 2, filled), ~ok_c | ~ok_t),
        "stage1": (filled, ~ok_t),
    }[combine]
    return rewards, t, fallback


def judge_metrics(s, t, c, rewards, fallback, keys, group_size):
    """What is logged of one call: each criterion's and each stage's mean over the scored candidates, the mean
    within-group std of t and c (how much the group is told apart), failures and fallbacks, and per candidate its
    scores (train.py's sample pictures, reward.py's table)."""
    ok_t, ok_c, G = ~t.isnan(), ~c.isnan(), group_size

    def mean(x, ok):  # mean over the scored candidates, 0 if none
        return float(x[ok].mean()) if ok.any() else 0.0

    def group_std(x, ok):  # mean over groups (with every member scored) of the population std within the group
        stds = [x[i : i + G].std(unbiased=False) for i in range(0, len(x), G) if ok[i : i + G].all()]
        return float(torch.stack(stds).mean()) if stds else 0.0

    info = {f"stage1/{k}": mean(s[:, j], ok_t) for j, k in enumerate(keys)}
    info.update(
        {
            "stage1/total": mean(t, ok_t),
            "stage1/group_std": group_std(t, ok_t),
            "stage2/score": mean(c, ok_c),
            "stage2/group_std": group_std(c, ok_c),
            "reward/mean": float(rewards.mean()),
            "judge/failed_stage1": float((~ok_t).sum()),
            "judge/fallbacks": float(fallback.sum()),
        }
    )
    info["candidates"] = [
        {
            "criteria": {k: (float(s[b, j]) if ok_t[b] else None) for j, k in enumerate(keys)},
            "stage1": float(t[b]) if ok_t[b] else None,
            "stage2": float(c[b]) if ok_c[b] else None,
            "reward": float(rewards[b]),
            "fallback": bool(fallback[b]),
        }
        for b in range(len(t))
    ]
    return info


def judge_queries(images, layers, group_size, judge, seed, grid=True, save_dir=None):
    """The judge's queries: stage 1, one panel per candidate b (the input and its N layers on a checkerboard) asking
    for the criteria; stage 2 (grid), one grid per image i with its G panels in the order perm_i = randperm(G)
    (a torch generator seeded with `seed`, one draw per group), labelled A, B, ... by position, asking for a score
    per letter. Returns (queries: B panels then the grids, perms); save_dir: write them as sent."""
    B, N, G, P = layers.shape[0], layers.shape[1], group_size, judge.prompts
    keys, labels = list(P.criteria), list(LETTERS[:G])
    if G > len(LETTERS):
        raise ValueError(f"group_size {G} > 26: the grid cannot label more than A-Z")
    prompt = {"stage1": _fill(P.stage1, P, keys, num_layers=N)}

    def tile(size):  # render at ~2x the size sent, then downscale
        return max(48, min(256, 2 * size // (N + 1)))

    panels = [
        pictures.render_candidate_panel(images[b // G], layers[b], tile=tile(judge.panel_size)) for b in range(B)
    ]
    queries = [Query(pictures.fit(panel, judge.panel_size), prompt["stage1"], keys) for panel in panels]
    gen = torch.Generator().manual_seed(int(seed))
    perms = [torch.randperm(G, generator=gen).tolist() for _ in range(len(images))]  # position p shows perm[p]
    if grid:
        prompt["stage2"] = _fill(P.stage2, P, labels, num_candidates=G, num_layers=N, labels=", ".join(labels))
        grids = [
            pictures.render_group_grid(
                images[i], layers[i * G : (i + 1) * G][perm], labels, tile=tile(judge.grid_size)
            )
            for i, perm in enumerate(perms)
        ]
        queries += [Query(pictures.fit(g, judge.grid_size), prompt["stage2"], labels) for g in grids]
    if save_dir:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        for j, q in enumerate(queries):
            q.image.save(Path(save_dir) / (f"stage1_panel_{j:02d}.png" if j < B else f"stage2_grid_{j - B:02d}.png"))
        for stage, text in prompt.items():
            (Path(save_dir) / f"{stage}_prompt.txt").write_text(text, encoding="utf-8")
    return queries, perms


def _criterion_weights(weights, keys):
    if isinstance(weights, str):  # --reward_args weights=separation=2,alpha=1
        pairs = [kv.split("=") for kv in weights.split(",")]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"weights {weights}: write key=value pairs, e.g. separation=2,alpha=1")
        weights = {k.strip(): float(v) for k, v in pairs}
    w = torch.tensor(
        [float(weights.get(k, 1.0)) for k in keys]
        if isinstance(weights, dict)
        else ([1.0] * len(keys) if weights is None else [float(x) for x in weights])
    )
    if isinstance(weights, dict) and set(weights) - set(keys) or len(w) != len(keys) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights {weights}: give non-negative weights for the criteria {keys}, not all zero")
    return w


def composite(layers: torch.Tensor, background=1.0) -> torch.Tensor:
    """Porter-Duff "over" from layer 0 upward onto an opaque background (white by default), straight alpha:
    out <- rgb_i * a_i + out * (1 - a_i). (B, N, 4, H, W) -> (B, 3, H, W)."""
    out = torch.full_like(layers[:, 0, :3], float(background))
    for i in range(layers.shape[1]):
        a = layers[:, i, 3:4]
        out = layers[:, i, :3] * a + out * (1 - a)
    return out


def recon_reward(images, layers, group_size, **_):
    """r_b = -mean_{c,y,x} |composite(layers_b) - image_b|, composite over white, the image resized to (W, H)
    (bilinear) and scaled to [0, 1]; mean over the 3 colour channels and all pixels."""
    _check(images, layers, group_size)
    H, W = layers.shape[-2:]
    target = torch.stack(
        [
            torch.from_numpy(np.asarray(im.convert("RGB").resize((W, H), Image.BILINEAR), np.float32) / 255).permute(
                2, 0, 1
            )
            for im in images
        ]
    )  # (len(images), 3, H, W)
    l1 = (composite(layers.float()) - target.repeat_interleave(group_size, 0)).abs().mean((1, 2, 3))  # (B,)
    return (-l1).float(), {"recon/l1": float(l1.mean())}


def layer_usage_reward(images, layers, group_size, blank_tol=1e-3, dup_tol=0.05, **_):
    """r_b = -(number of bad layers) / N. Layer i is blank if mean_{y,x} alpha_i < blank_tol; a non-blank
    layer j duplicates an earlier non-blank layer i if sum|P_i - P_j| / sum max(P_i, P_j) < dup_tol, where
    P = premultiplied RGBA (rgb * alpha, alpha) and the sums run over channels and pixels. A layer is bad
    if it is blank or a duplicate (counted once)."""
    _check(images, layers, group_size)
    alpha = layers[:, :, 3].float()  # (B, N, H, W)
    blank = alpha.mean((-1, -2)) < blank_tol  # (B, N)
    P = torch.cat([layers[:, :, :3] * layers[:, :, 3:4], layers[:, :, 3:4]], 2).float().flatten(2)  # (B, N, 4HW)
    dup = torch.zeros_like(blank)
    for j in range(1, layers.shape[1]):
        for i in range(j):
            rel = (P[:, i] - P[:, j]).abs().sum(-1) / torch.maximum(P[:, i], P[:, j]).sum(-1).clamp_min(1e-8)
            dup[:, j] |= (rel < dup_tol) & ~blank[:, i] & ~blank[:, j]
    bad = blank | dup
    return (-bad.float().mean(1)).float(), {
        "layer_usage/blank": float(blank.float().sum(1).mean()),
        "layer_usage/duplicate": float(dup.float().sum(1).mean()),
        "layer_usage/coverage": float(alpha.mean()),
    }


def opaque_background_reward(images, layers, group_size, **_):
    """r_b = mean_{y,x} alpha of layer 0. The background layer of a decomposition should be fully opaque
    (occluded areas inpainted, no holes); a cheap regulariser and the reward of the CPU learning test."""
    _check(images, layers, group_size)
    r = layers[:, 0, 3].float().mean((-1, -2))  # (B,)
    return r, {"opaque_background/alpha": float(r.mean())}


REWARDS = {
    "vlm": vlm_reward,
    "recon": recon_reward,
    "layer_usage": layer_usage_reward,
    "opaque_background": opaque_background_reward,
}


# ----------------------------------------------------------------------------- a reward from the command line
def add_reward_flags(parser):
    """The flags that pick the reward and its judge, the same in train.py and reward.py (distill.py: the judge's)."""
    a = parser.add_argument
    a(
        "--reward",
        default="vlm",
        help=f"a name ({', '.join(REWARDS)}), or a reward of your own: path/to/file.py:"
        "function (loaded by path, from any folder) or module:function (README, 'Forking a reward')",
    )
    a(
        "--reward_args",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="keyword arguments of the reward, e.g. combine=mean weights=separation=2,alpha=1 (vlm); a VALUE that "
        "reads as JSON is that number, list or dict",
    )
    add_judge_flags(parser)


def add_judge_flags(parser):
    """The judge's flags, the same in train.py, distill.py and reward.py."""
    a = parser.add_argument
    a(
        "--judge",
        default=None,
        choices=["local", "http", "tiny", "text_encoder"],
        help="VLM judge, built when named here or when the reward uses one (default: http when --judge_url is given, "
        "else local). A local judge shares the GPU and scores serially; an http judge scores while the GPU "
        "rolls out the next group; text_encoder is the pipeline's own Qwen2.5-VL (train.py, distill.py)",
    )
    a(
        "--judge_model",
        default=None,
        help=f"local: hub id or folder (default {DEFAULT_JUDGE}); http: served model name",
    )
    a("--judge_url", default=None, help="http: OpenAI-compatible base URL, e.g. http://host:8000/v1")
    a("--judge_api_key_env", default="OPENAI_API_KEY", help="http: environment variable holding the API key")
    a(
        "--judge_extra_body",
        default=None,
        help="http: JSON merged into each request, e.g. "
        '\'{"chat_template_kwargs": {"enable_thinking": false}}\' (docs/reward.md: each server\'s way)',
    )
    a(
        "--prompts_dir",
        default=str(PROMPTS_DIR),
        help="the judge's prompt set: criteria.txt, stage1.txt, stage2.txt (a file it lacks comes from prompts/); "
        "its criteria are logged as stage1/<key>",
    )
    a(
        "--panel_size",
        type=int,
        default=None,
        help="longest side in px of a stage-1 panel sent to the judge (default: 1024, the tiny judge 128)",
    )
    a("--grid_size", type=int, default=None, help="longest side in px of a stage-2 grid sent to the judge")


def resolve_reward(spec):
    """The reward function --reward names: a name in REWARDS, `path/to/file.py:function` (the file loaded by path:
    it may sit in any folder and import this repository's modules, e.g. `import reward`) or `module:function` (an
    importable module, the current folder included). Anything else is bad input, in one line."""
    if spec in REWARDS:
        return REWARDS[spec]
    target, sep, name = spec.rpartition(":")
    if not (sep and target and name.isidentifier()):
        raise cli.InputError(
            f"--reward {spec}: choose one of {', '.join(REWARDS)}, or give FILE.py:FUNCTION or "
            "MODULE:FUNCTION for a reward of your own"
        )
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise cli.InputError(f"--reward {spec}: no file {path}")
        key = f"reward_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"  # never shadows ours
        if key not in sys.modules:
            module_spec = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[key] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[key]
                raise
        module = sys.modules[key]
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.append(str(Path.cwd()))  # as `python -m` would: a module in the current folder
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name != target.split(".")[0]:
                raise
            raise cli.InputError(
                f"--reward {spec}: no module {target} (here or installed); for a file, give its "
                "path: path/to/file.py:function"
            ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise cli.InputError(f"--reward {spec}: {target} has no function {name} (its functions: {found})")
    return fn


def reward_kwargs(fn, spec, pairs):
    """--reward_args KEY=VALUE ... as keyword arguments of the reward fn: VALUE parsed as JSON where it reads as
    JSON (2, 0.5, [1, 2], {"a": 1}, true), else kept as text. A KEY must name a parameter of fn, unless fn takes
    **kwargs under a name other than `_` (a reward's `**_` says it ignores what it does not use)."""
    kwargs = {}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature to read: its arguments are its business
        params = {"kwargs": inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)}
    open_ended = any(p.kind is p.VAR_KEYWORD and p.name != "_" for p in params.values())
    named = [n for n, p in params.items() if p.kind is not p.VAR_KEYWORD][3:]  # after images, layers, group_size
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key.isidentifier():
            raise cli.InputError(f"--reward_args {pair}: write KEY=VALUE, e.g. combine=mean")
        if key in ("judge", "seed"):
            raise cli.InputError(f"--reward_args {key}: set by the training loop (--judge flags, --seed)")
        if key not in named and not open_ended:
            raise cli.InputError(
                f"--reward_args {key}: --reward {spec} takes none such; its arguments: "
                f"{[n for n in named if n not in ('judge', 'seed')]}"
            )
        try:
            kwargs[key] = json.loads(text)
        except ValueError:
            kwargs[key] = text
    return kwargs


def load_judge(args, rewards=(), device="cpu", dtype=None, pipeline=None, concurrency=16):
    """The judge of the command line's judge flags (add_reward_flags), built and checked now, before the expensive
    model load; or None when no judge is named and none of `rewards` (reward functions) scores with one
    (uses_judge). The kind defaults to http when --judge_url is given, else local (DEFAULT_JUDGE unless
    --judge_model); --judge text_encoder is the pipeline's own text encoder: None until `pipeline` is given."""
    if args.judge is None and args.judge_url is None and not any(needs_judge(fn) for fn in rewards):
        return None
    kind = args.judge or ("http" if args.judge_url else "local")
    if kind == "text_encoder" and pipeline is None:
        return None
    if args.judge_url and kind != "http":
        raise cli.InputError(f"--judge {kind} with --judge_url: the URL is for --judge http; drop one of them")
    model = args.judge_model or (DEFAULT_JUDGE if kind == "local" else None)
    if kind == "local":
        how = "--judge local" + ("" if args.judge else " (the default: no --judge or --judge_url given)")
        cli.check_hub(model, f"{how} with --judge_model {model}" + ("" if args.judge_model else " (the default)"))
    try:
        extra = json.loads(args.judge_extra_body) if args.judge_extra_body else None
    except ValueError as e:
        raise cli.InputError(f"--judge_extra_body {args.judge_extra_body}: not JSON ({e})") from None
    cuda = str(device).startswith("cuda")
    options = {
        "tiny": {},
        "local": {"device": device, "dtype": dtype, "offload": getattr(args, "judge_offload", False) and cuda},
        "http": {"api_key_env": args.judge_api_key_env, "concurrency": concurrency, "extra_body": extra},
        "text_encoder": {"pipeline": pipeline},
    }[kind]
    sizes = {"panel_size": args.panel_size, "grid_size": args.grid_size}
    return make_judge(kind, model, args.judge_url, prompts=load_prompts(args.prompts_dir), **sizes, **options)


# ------------------------------------------------------------------------------------------------- CLI
def load_decompositions(root):
    """rollout.py's PNG layout -> [(stem, image, layers (G, N, 4, H, W))], one entry per <stem> folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--decompositions {root}: no such folder")
    stems = [root] if (root / "image.png").is_file() else sorted(p.parent for p in root.glob("*/image.png"))
    groups = []
    for d in stems:
        cands = sorted(d.glob("candidate_*"))
        if not cands:
            raise ValueError(f"{d}: image.png but no candidate_*/ folders (write them with rollout.py)")
        stack = []
        for c in cands:
            files = sorted(c.glob("layer_*.png"), key=lambda p: int(p.stem.split("_")[-1]))
            if not files:
                raise ValueError(f"{c}: no layer_<i>.png files")
            arr = [np.asarray(Image.open(f).convert("RGBA"), np.float32) / 255 for f in files]
            if len({a.shape for a in arr}) != 1:
                raise ValueError(f"{c}: the layer PNGs differ in size")
            stack.append(torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2))  # (N, 4, H, W)
        if len({s.shape for s in stack}) != 1:
            raise ValueError(
                f"{d}: candidates differ in layer count or size {sorted({tuple(s.shape) for s in stack})}"
            )
        groups.append((d.name, Image.open(d / "image.png").convert("RGB"), torch.stack(stack)))
    if not groups:
        raise ValueError(
            f"--decompositions {root}: no <stem>/image.png found; write it with "
            f"python rollout.py --images DIR --output_dir {root}"
        )
    return groups


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a(
        "--decompositions",
        required=True,
        help="rollout.py output folder: <stem>/image.png, <stem>/candidate_<kk>/layer_<i>.png; each <stem> is one "
        "group",
    )
    add_reward_flags(p)
    a("--seed", type=int, default=0, help="seeds the grid order shuffle")
    a("--output_dir", default=None, help="save the panels, grids and prompts the judge saw here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    with cli.input_errors():
        if args.judge == "text_encoder":
            raise cli.InputError(
                "--judge text_encoder is the diffusion pipeline's own: use it in train.py or "
                "distill.py, or --judge tiny, local or http here"
            )
        fn = resolve_reward(args.reward)
        kwargs = {"seed": args.seed, **reward_kwargs(fn, args.reward, args.reward_args)}
        groups = load_decompositions(args.decompositions)
        judge = load_judge(args, [fn])
        rows = []
        for stem, image, layers in tqdm(groups, desc="groups", disable=len(groups) < 2):
            save = str(Path(args.output_dir) / stem) if args.output_dir else None
            extra = {"save_dir": save} if "save_dir" in inspect.signature(fn).parameters else {}
            rewards, info = call_reward(
                fn, f"--reward {args.reward}", [image], layers, layers.shape[0], judge=judge, **extra, **kwargs
            )
            for k, r in enumerate(rewards.tolist()):
                row = {"group": stem, "cand": f"{k:02d}"}
                if c := info.get("candidates", [None] * len(rewards))[k]:  # vlm: per-candidate scores
                    row.update({"label": c["label"], **c["criteria"], "stage1": c["stage1"], "stage2": c["stage2"]})
                rows.append({**row, "reward": r, **({"fallback": c["fallback"]} if c else {})})
            tqdm.write(f"{stem}: " + "  ".join(f"{k}={v:.3g}" for k, v in info.items() if isinstance(v, (int, float))))
    cols = list(rows[0])
    width = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in cols}
    for r in [dict(zip(cols, cols))] + rows:
        print("  ".join(_cell(r.get(c)).rjust(width[c]) for c in cols))
    if args.output_dir:
        print(f"what the judge saw: {args.output_dir}/<stem>/stage1_panel_*.png, stage2_grid_*.png, *_prompt.txt")


def _cell(v):
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main()
