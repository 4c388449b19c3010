"""LayerD's layer-decomposition evaluation protocol, written from its definition.

LayerD (Suzuki et al., "LayerD: Decomposing Raster Graphic Designs into Layers", ICCV 2025, arXiv 2509.25134)
scores a predicted layer stack against a reference stack that may have another number of layers and another
granularity. Qwen-Image-Layered reports its Crello table "following LayerD". This file restates the definition
of LayerD's code (CyberAgentAILab/LayerD at 6b95bc5, Apache-2.0: src/layerd/evaluation/{metrics,dtw,edits,
edit_distance}.py, group_top_layers_indices in src/layerd/data/crello.py, the aggregation of tools/evaluate.py);
none of its code is copied. tests/test_layerd.py checks it against LayerD's own numbers.

Layers are 8-bit straight-alpha RGBA arrays (H, W, 4) uint8, back to front (index 0 the background), as PNG files
hold them. Every float is the 8-bit value / 255 in float64; every merge is PIL's 8-bit Image.alpha_composite(lower,
upper). Written as LayerD computes them (same operations in the same order, so ties break the same way):
  rgb_l1(x, y)    = sum_{p: a_y(p) > 0} mean_c |x_c(p) - y_c(p)|  /  (#{p: a_y(p) > 0} + 1e-8)
                    straight colour over the pixels where y (the second argument) is not transparent; x's stored
                    colour counts there even where x itself is transparent
  alpha_iou(x, y) = sum_p min(a_x, a_y) / sum_p max(a_x, a_y)   (0 when both alphas are all 0)
  cost(x, y)      = (rgb_l1(x, y) + 1 - alpha_iou(x, y)) / 2,    sim(x, y) = 1 - cost(x, y)
Protocol for one sample (`edit_levels`):
  1. top-layer grouping, each side alone (`top_layer_groups`): among the remaining layers, every layer whose hard
     mask (alpha > 0) overlaps no later remaining layer is "on top"; those form one group, which is removed, and
     so on; the groups, back to front, are composited (in index order) into one layer each. Layers that touch
     nothing (fully transparent ones included) join the front-most group.
  2. alignment (`dtw_path`): dynamic time warping of the predicted groups P against the reference groups R with
     cost C[i, j] = cost(P_i, R_j); the path runs from (0, 0) to (n-1, m-1), every pair on it is scored.
  3. scores at edit level k: the means over the path's pairs of cost(P_i, R_j), rgb_l1(P_i, R_j) and
     alpha_iou(P_i, R_j).
  4. edits (`_best_merge`), at most max_edits, re-aligning after each: a merge of adjacent layers t, t+1 on the
     predicted or on the reference side. A side with <= 2 layers cannot be merged. On a side X with path-matched
     layers Y (G_t = the layers of Y matched to X_t, S(x, G) = sum_{g in G} sim(x, g), computed as sim(x_side,
     y_side), so on the reference side rgb_l1 is weighted by the predicted layer's alpha), with M = merge(X_t,
     X_{t+1}) and X_{t+2} when it exists:
       before = S(X_t, G_t) + S(X_{t+1}, G_{t+1})
       after  = max(S(M, G_t) + S(M, G_{t+1}), S(M, G_t) + S(X_{t+2}, G_t), S(M, G_t) + S(X_{t+2}, G_{t+1}))
       gain_t = after - before, kept when > 0; the side's best is its largest gain (the lowest t on ties).
     The predicted side's best is applied when its gain is strictly larger, else the reference side's; the loop
     stops early when neither side has a merge with a positive gain, so a sample has 1 to max_edits + 1 levels.
Aggregation over samples (`aggregate`, LayerD's tools/evaluate.py, which skips samples with fewer than 2 layer
files on either side): for each level k up to the most levels any sample has, a sample without level k counts
with its last level; avg_edits is the mean over samples of min(edits used, k).
"""

from functools import reduce

import numpy as np
from PIL import Image


def top_layer_groups(alpha: np.ndarray) -> list:
    """alpha (N, H, W) uint8 -> groups of layer indices, back to front (step 1 of the module docstring)."""
    hard = (alpha > 0).reshape(len(alpha), -1)  # (N, H*W)
    overlaps = (hard[:, None] & hard[None]).any(-1) if len(alpha) else np.zeros((0, 0), bool)  # (N, N)
    remaining, groups = list(range(len(alpha))), []
    while remaining:
        on_top = [t for k, t in enumerate(remaining) if not any(overlaps[t, u] for u in remaining[k + 1 :])]
        groups.append(on_top)
        remaining = [t for t in remaining if t not in on_top]
    return groups[::-1]


def dtw_path(C: np.ndarray) -> list:
    """Dynamic time warping over a cost matrix C (n, m): the accumulated cost D[i, j] = C[i, j] + min(D[i-1, j],
    D[i, j-1], D[i-1, j-1]) (first row and column: running sums), then the path back from (n-1, m-1), preferring the
    diagonal, then (i-1, j), then (i, j-1) on ties; returned from (0, 0)."""
    n, m = C.shape
    D = np.zeros((n, m))
    D[0, 0] = C[0, 0]
    for i in range(1, n):
        D[i, 0] = D[i - 1, 0] + C[i, 0]
    for j in range(1, m):
        D[0, j] = D[0, j - 1] + C[0, j]
    for i in range(1, n):
        for j in range(1, m):
            D[i, j] = C[i, j] + min(D[i - 1, j], D[i, j - 1], D[i - 1, j - 1])
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        if i == 0:
            j -= 1
        elif j == 0:
            i -= 1
        elif D[i - 1, j - 1] <= D[i - 1, j] and D[i - 1, j - 1] <= D[i, j - 1]:
            i, j = i - 1, j - 1
        elif D[i - 1, j] <= D[i, j - 1]:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    return path[::-1]


def _scorer():
    """Memoised per-sample primitives on PIL images (keyed by object; the caches keep every image alive, so an id is
    never reused within a sample): merge(lower, upper) and metrics(x, y) -> (cost, rgb_l1, alpha_iou)."""
    floats, pairs, merges = {}, {}, {}

    def as_float(img):
        if id(img) not in floats:  # contiguous colour and alpha: half the time of strided views, the same values
            u = np.asarray(img, dtype=np.uint8)  # (H, W, 4)
            rgb, alpha = u[..., :3].astype(float) / 255, u[..., 3].astype(float) / 255
            floats[id(img)] = (img, rgb, alpha, alpha > 0, (alpha > 0).sum())
        return floats[id(img)][1:]

    def metrics(x, y):
        key = (id(x), id(y))
        if key not in pairs:
            (rgb_x, a_x, _, _), (rgb_y, a_y, mask_y, n_y) = as_float(x), as_float(y)
            rgb = (np.abs(rgb_x - rgb_y).mean(-1) * mask_y).sum() / (n_y + 1e-8)
            union = np.maximum(a_x, a_y).sum()
            iou = np.minimum(a_x, a_y).sum() / union if union > 0 else 0.0
            pairs[key] = ((rgb + (1 - iou)) / 2, rgb, iou, x, y)
        return pairs[key][:3]

    def merge(lower, upper):
        key = (id(lower), id(upper))
        if key not in merges:
            merges[key] = (Image.alpha_composite(lower, upper), lower, upper)
        return merges[key][0]

    return metrics, merge


def _best_merge(side: list, other: list, path: list, metrics, merge):
    """(gain, t) of the best merge of side[t], side[t+1] against `other` (path pairs (side index, other index)), or
    None: step 4 of the module docstring."""
    if len(side) <= 2:
        return None

    def S(x, group):
        return sum(1 - metrics(x, g)[0] for g in group)

    best = None
    for t in range(len(side) - 1):
        merged = merge(side[t], side[t + 1])
        g0 = [other[b] for a, b in path if a == t]
        g1 = [other[b] for a, b in path if a == t + 1]
        before = S(side[t], g0) + S(side[t + 1], g1)
        m0 = S(merged, g0)
        after = [S(merged, g1) + m0]
        if t + 2 < len(side):
            after += [S(side[t + 2], g0) + m0, S(side[t + 2], g1) + m0]
        gain = max(after) - before
        if max(after) > before and (best is None or gain > best[0]):
            best = (gain, t)
    return best


def edit_levels(pred: list, ref: list, max_edits: int = 5) -> list:
    """pred, ref: lists of (H, W, 4) uint8 RGBA arrays (or RGBA PIL images), back to front, all one size ->
    [{"edits": k, "cost", "rgb_l1", "alpha_iou"} for k = 0 .. edits used] (the module docstring's protocol)."""
    metrics, merge = _scorer()

    def grouped(layers):
        images = [
            x if isinstance(x, Image.Image) else Image.fromarray(np.asarray(x, np.uint8), "RGBA") for x in layers
        ]
        alpha = np.stack([np.asarray(im)[..., 3] for im in images])  # (N, H, W)
        return [reduce(Image.alpha_composite, [images[i] for i in g]) for g in top_layer_groups(alpha)]

    P, R = grouped(pred), grouped(ref)
    levels = []
    for k in range(max_edits + 1):
        path = dtw_path(np.array([[metrics(p, r)[0] for r in R] for p in P]))
        scores = np.array([metrics(P[i], R[j]) for i, j in path])  # (len(path), 3): cost, rgb_l1, alpha_iou
        levels.append(
            {
                "edits": k,
                **{
                    name: float(np.mean(scores[:, c].tolist()))
                    for c, name in enumerate(("cost", "rgb_l1", "alpha_iou"))
                },
            }
        )
        if k == max_edits:
            break
        on_pred = _best_merge(P, R, path, metrics, merge)
        on_ref = _best_merge(R, P, [(j, i) for i, j in path], metrics, merge)
        if on_pred is None and on_ref is None:
            break
        side, (_, t) = (
            (P, on_pred) if on_ref is None or (on_pred is not None and on_pred[0] > on_ref[0]) else (R, on_ref)
        )
        side[t : t + 2] = [merge(side[t], side[t + 1])]
    return levels


def aggregate(samples: list) -> list:
    """LayerD's aggregate of per-sample level lists (each from `edit_levels`): one dict per level k = 0 .. (most
    levels of any sample) - 1 with max_edits = k, avg_edits, count (samples that have level k), and avg_<score>
    = mean over all samples, a sample without level k taking its last level."""
    out = []
    for k in range(max((len(s) for s in samples), default=0)):
        have, rest = [s for s in samples if k < len(s)], [s for s in samples if k >= len(s)]
        row = {"max_edits": k, "avg_edits": None, "count": len(have)}  # avg_edits: the mean of "edits" below
        for key in have[0][k]:
            row[f"avg_{key}"] = float(np.mean([s[k][key] for s in have] + [s[-1][key] for s in rest]))
        out.append(row)
    return out
