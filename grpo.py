"""Flow-GRPO's objective, term by term: group-relative advantages, the clipped policy loss, the KL penalty.

Pure torch (no diffusers). Equations from Flow-GRPO (Liu et al., arXiv:2505.05470), section "GRPO on flow
matching": the group-normalised advantage and the clipped objective with the KL term; the per-step Gaussian
log-probs come from rollout.py. gaussian_mean_kl, the KL's per-sample term, is also the whole objective of
distill.py (DiffusionOPD). The objective is maximised; each function returns a loss to minimise (loss = -objective).

    python -c "import grpo, torch; print(grpo.group_advantages(torch.tensor([1., 2., 3., 6., 5., 5., 5., 5.]), 4))"
"""

import torch


def group_advantages(rewards, group_size, global_std=False, eps=1e-4, adv_clip_max=5.0):
    """Group-relative advantages (Flow-GRPO's group-normalised advantage).

        A_i = clip((r_i - mean_g(r)) / (std + eps), -adv_clip_max, adv_clip_max)

    Consecutive blocks of `group_size` rewards form a group g (the G candidates of one image). mean_g is the
    group mean; std is the population std (ddof 0, as upstream's np.std) of the group, or, when global_std
    (upstream's Qwen-Image recipe), of all B rewards of the optimizer step: a group whose rewards barely
    differ then gets small advantages instead of +-1. A group of equal rewards gives zeros, never NaN.
    rewards: (B,) with B a multiple of group_size. Returns float32 (B,).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)}: need (B,) with B a multiple of group_size={group_size}"
        )
    groups = rewards.view(-1, group_size)  # (num_groups, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    std = rewards.std(unbiased=False) if global_std else groups.std(dim=1, unbiased=False, keepdim=True)
    return (centred / (std + eps)).clamp(-adv_clip_max, adv_clip_max).view(-1)


def policy_loss(log_prob, old_log_prob, advantages, clip_range):
    """The clipped surrogate (PPO/GRPO), for one trained timestep (Flow-GRPO's objective without the KL):

        ratio = exp(log_prob - old_log_prob)
        loss  = MEAN over the batch of max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range))

    log_prob, old_log_prob, advantages: (B,). At ratio 1 the loss is -mean(A); where the clip binds the
    gradient is zero. Returns (loss, stats) with stats 0-dim tensors computed without gradients (read them with
    float(); they stay tensors so that memory.py can run this on shape-only 'meta' tensors):
        diag/ratio_mean = mean(ratio); diag/clipfrac = mean(|ratio - 1| > clip_range);
        diag/approx_kl  = 0.5 * mean((log_prob - old_log_prob)^2)
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "diag/ratio_mean": ratio.mean(),
            "diag/clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "diag/approx_kl": 0.5 * (log_ratio**2).mean(),
        }
    return loss, stats


def gaussian_mean_kl(student_mean, teacher_mean, var):
    """Per-sample KL between two Gaussian reverse steps of equal variance: the policy's and the reference's
    (kl_loss), or a student's and a teacher's (DiffusionOPD's closed-form per-step KL, distill.py). For equal
    variances it is plain mean matching:

        KL(N(mu_s, var) || N(mu_k, var)) = (mu_s - mu_k)^2 / (2 var)       per element
        kl_b = MEAN over all non-batch dims of the per-element KL           (a mean, like rollout's log_prob)
        var  = std_dev_t^2 * |dt|   (sde_type "sde": Flow-GRPO's step std_dev_t * sqrt(-dt), exact, |dt| kept)
        var  = std_dev_t^2          (sde_type "cps": there std_dev_t is already the step's std)

    student_mean, teacher_mean: (B, ...); var: broadcastable, e.g. (B, 1, 1). Returns (B,).
    """
    per_element = (student_mean - teacher_mean) ** 2 / (2 * var)
    return per_element.mean(dim=tuple(range(1, per_element.ndim)))


def kl_loss(prev_mean, ref_prev_mean, std_dev_t, dt=None):
    """KL between the policy's and the reference's Gaussian reverse steps (same variance, different means).

    The exact per-element KL of N(mu, s^2) and N(mu_ref, s^2) is (mu - mu_ref)^2 / (2 s^2), with the step's
    variance s^2 = std_dev_t^2 * |dt|. Upstream Flow-GRPO divides by 2 std_dev_t^2 instead (drops |dt|), and so
    do we by default, so beta keeps upstream's meaning; pass dt to get the exact KL (= upstream / |dt|).

        kl = MEAN over the batch of MEAN over all non-batch dims of (prev_mean - ref_prev_mean)^2 / (2 var)
        var = std_dev_t^2            (dt None, upstream)      or      std_dev_t^2 * |dt|   (exact)

    prev_mean, ref_prev_mean: (B, ...); std_dev_t: broadcastable, e.g. (B, 1, 1). Returns a scalar.
    """
    var = std_dev_t**2 if dt is None else std_dev_t**2 * torch.as_tensor(dt).abs()
    return gaussian_mean_kl(prev_mean, ref_prev_mean, var).mean()
