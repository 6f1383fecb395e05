"""
Tests of Flow-GRPO's objective (phase2_align.py --objective=grpo), all on CPU with the tiny model:
    python -m pytest -q test_grpo.py
The SDE step and the loss are pinned to values worked by hand and to independent few-line implementations
written from Flow-GRPO's published formulas (Liu et al. 2025, arXiv 2505.05470); the runs end to end check
the switch: the ratio is 1 where theta is the sampling policy, 1 and 2 processes agree, a resume is exact.
"""
import math

import numpy as np
import pytest
import torch

import phase2_align
import sample
import tiny


# ----------------------------------------------------------------------------------- the SDE step (sample.py)
def reference_step(x, v, sigma, sigma_next, a, prev):
    """Flow-GRPO's step as its paper and code write it, in float64: (mean, step std, log-prob per sample)."""
    x, v, prev = x.double(), v.double(), prev.double()
    s_t = a * math.sqrt(sigma / (1 - (sigma_next if sigma == 1 else sigma)))
    dt = sigma_next - sigma
    mean = x * (1 + s_t ** 2 / (2 * sigma) * dt) + v * (1 + s_t ** 2 * (1 - sigma) / (2 * sigma)) * dt
    std = s_t * math.sqrt(-dt)
    lp = torch.distributions.Normal(mean, std).log_prob(prev)
    return mean, std, lp.flatten(1).mean(1)


def test_sde_step_by_hand():
    one = lambda v: torch.full((1, 1, 1, 1), v)
    # x = 1, v = 0.5, sigma 0.5 -> 0.25, a = 0.7: s_t = 0.7, dt = -0.25, step std 0.35
    # mean = 1 * (1 - 0.49 / 1 * 0.25) + 0.5 * (1 + 0.49 * 0.5 / 1) * -0.25 = 0.8775 - 0.155625
    prev, lp, mean, s_t = sample.sde_step(one(1.0), one(0.5), 0.5, 0.25, 0.7, prev=one(0.8))
    assert mean.item() == pytest.approx(0.721875, rel=1e-6) and s_t.item() == pytest.approx(0.7, rel=1e-6)
    by_hand = -(0.8 - 0.721875) ** 2 / (2 * 0.35 ** 2) - math.log(0.35) - 0.5 * math.log(2 * math.pi)
    assert lp.item() == pytest.approx(by_hand, rel=1e-6) and prev.item() == pytest.approx(0.8)
    # sigma = 1: 1 - sigma would be 0; the grid's second sigma, this step's sigma_next (0.8), stands in:
    # s_t = 0.7 sqrt(1 / 0.2), step std = s_t sqrt(0.2) = 0.7, mean = 1 - 2.45 / 2 * 0.2 + 0.5 * -0.2 = 0.655
    _, lp, mean, s_t = sample.sde_step(one(1.0), one(0.5), 1.0, 0.8, 0.7, prev=one(0.655))
    assert s_t.item() == pytest.approx(0.7 * math.sqrt(5), rel=1e-6) and mean.item() == pytest.approx(0.655)
    assert lp.item() == pytest.approx(-math.log(0.7) - 0.5 * math.log(2 * math.pi), rel=1e-5)


@pytest.mark.parametrize("sigma, sigma_next", [(1.0, 0.96), (0.7, 0.5), (0.2, 0.0)])
def test_sde_step_against_a_float64_reference(sigma, sigma_next):
    """Random states of SD3's latent shape, the first, a middle and the last step of a grid: the mean and the
    log-prob (a mean over C, H, W per sample) of a given transition, against reference_step."""
    g = torch.Generator().manual_seed(0)
    x, v, prev = (torch.randn(3, 16, 4, 4, generator=g) for _ in range(3))
    _, lp, mean, s_t = sample.sde_step(x, v, sigma, sigma_next, 0.7, prev=prev)
    m_ref, std_ref, lp_ref = reference_step(x, v, sigma, sigma_next, 0.7, prev)
    assert lp.shape == (3,) and torch.allclose(mean.double(), m_ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(lp.double(), lp_ref, rtol=1e-5, atol=1e-5)
    assert (s_t * math.sqrt(sigma - sigma_next)).item() == pytest.approx(std_ref, rel=1e-6)


def test_sde_step_draws_each_sample_from_its_own_generator():
    """A list of generators draws sample n's eps from generator n alone: prev = mean + step std * eps_n, the
    same eps whatever the other samples are; one generator draws the batch's eps at once."""
    x, v = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    gens = lambda *s: [torch.Generator().manual_seed(k) for k in s]
    prev, lp, mean, s_t = sample.sde_step(x, v, 0.6, 0.4, 0.7, generator=gens(11, 12))
    eps = torch.randn(4, 3, 3, generator=torch.Generator().manual_seed(12))
    assert torch.allclose(prev[1], mean[1] + s_t * math.sqrt(0.2) * eps, atol=1e-6)
    other = sample.sde_step(x, v, 0.6, 0.4, 0.7, generator=gens(99, 12))[0]
    assert torch.equal(other[1], prev[1]) and not torch.equal(other[0], prev[0])
    whole = sample.sde_step(x, v, 0.6, 0.4, 0.7, generator=torch.Generator().manual_seed(5))[0]
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(whole, mean + s_t * math.sqrt(0.2) * eps, atol=1e-6)
    # the log-prob of a drawn step: -eps^2 / 2 - log(step std) - log sqrt(2 pi), averaged
    assert torch.allclose(lp, reference_step(x, v, 0.6, 0.4, 0.7, prev)[2].float(), atol=1e-5)


def test_sde_step_gradient_flows_from_v_only():
    """d log_prob / d v = mean over elements of (prev - mean) / std^2 * (1 + s_t^2 (1 - sigma) / (2 sigma))
    * dt; prev is data (no gradient into it)."""
    x, prev = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 2, 2, requires_grad=True)
    v = torch.randn(1, 2, 2, 2, requires_grad=True)
    _, lp, mean, s_t = sample.sde_step(x, v, 0.5, 0.3, 0.7, prev=prev)
    lp.sum().backward()
    std2 = s_t.item() ** 2 * 0.2
    expect = (prev - mean).detach() / std2 * (1 + s_t.item() ** 2 * 0.5 / 1.0) * -0.2 / 8
    assert prev.grad is None and torch.allclose(v.grad, expect, atol=1e-6)


class PooledFlow(torch.nn.Module):
    """v = w * (the first pooled feature), everywhere: a transformer whose CFG arithmetic is visible."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False):
        return (self.w * pooled_projections[:, :1, None, None].expand_as(hidden_states),)


def test_guided_velocity_holds_the_unconditional_branch_constant():
    """v = v_u + g (v_c - v_u) with v_u on the negative condition; the gradient flows through v_c alone
    (Flow-GRPO's training step detaches v_u): dv/dw = g * c."""
    model, x = PooledFlow(), torch.zeros(2, 1, 1, 1)
    cond, neg = (torch.zeros(2, 3, 2), torch.tensor([[2.0, 0.0], [3.0, 0.0]])), (torch.zeros(1, 3, 2),
                                                                                 torch.ones(1, 2))
    v = sample.guided_velocity(model, x, 0.5, cond, 4.0, neg)
    assert torch.allclose(v.flatten(), torch.tensor([1 + 4 * 1.0, 1 + 4 * 2.0]))
    v.sum().backward()
    assert model.w.grad.item() == pytest.approx(4 * (2 + 3))
    assert torch.equal(sample.guided_velocity(model, x, 0.5, cond), model(x, None, *cond)[0])  # g = 1


# ------------------------------------------------------------------- the loss and its parts (phase2_align.py)
def test_grpo_loss_by_hand():
    """A = (2, -1, 10 -> 5 clipped), rho = (1.5, 0.5, 1), c = 0.2:
    max(-3, -2.4) = -2.4; max(0.5, 0.8) = 0.8; max(-5, -5) = -5; mean -2.2. The first two sit outside the
    clip on the side where it binds: no gradient; the third has d/d log_prob = -A rho / 3 = -5/3."""
    lp = torch.log(torch.tensor([1.5, 0.5, 1.0], dtype=torch.float64)).requires_grad_()
    loss = phase2_align.grpo_loss(lp, torch.zeros(3, dtype=torch.float64),
                                  torch.tensor([2.0, -1.0, 10.0], dtype=torch.float64), 0.2, 5.0)
    assert loss.item() == pytest.approx(-2.2)
    loss.backward()
    assert torch.allclose(lp.grad, torch.tensor([0.0, 0.0, -5 / 3], dtype=torch.float64))
    # inside the clip, the ratio's gradient: d/d lp of -A rho / n with rho = e^0.1, A = 1
    lp2 = torch.tensor([0.1], requires_grad=True)
    phase2_align.grpo_loss(lp2, torch.zeros(1), torch.ones(1), 0.2, 5.0).backward()
    assert lp2.grad.item() == pytest.approx(-math.exp(0.1), rel=1e-6)
    # a sample with A = 0 adds exactly 0, whatever its ratio
    assert phase2_align.grpo_loss(torch.tensor([3.0]), torch.zeros(1), torch.zeros(1), 1e-4, 5.0).item() == 0


def test_grpo_kl_and_ratio_stats_by_hand():
    """kl = mean over C, H, W of (mean - mean_ref)^2 / (2 s_t^2): differences (1, 3) at s_t = 0.5 give
    (1 + 9) / 2 / 0.5 = 10. clip_frac = [|rho - 1| > c], approx_kl = (log rho)^2 / 2, spread (rho - 1)^2."""
    mean = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]])
    kl = phase2_align.grpo_kl(mean, torch.zeros_like(mean), torch.tensor([0.5, 1.0]).view(2, 1, 1, 1))
    assert torch.allclose(kl, torch.tensor([10.0, 0.0]))
    lp, old = torch.tensor([math.log(1.5), 0.0, math.log(1.00005)]), torch.zeros(3)
    clipped, approx_kl, dev2 = phase2_align.ratio_stats(lp, old, 1e-4)
    assert clipped.tolist() == [1.0, 0.0, 0.0]
    assert torch.allclose(approx_kl, lp ** 2 / 2) and torch.allclose(dev2, torch.tensor([0.25, 0, 2.5e-9]))


def stat_tracker(prompts, rewards, global_std):
    """Flow-GRPO's PerPromptStatTracker (type 'grpo') as its code computes it, in numpy float64: per prompt
    (R - the prompt's mean) / (std + 1e-4), std the prompt's or all rewards' (np.std, ddof 0)."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    out = np.zeros_like(rewards)
    for p in np.unique(prompts):
        sel = prompts == p
        std = np.std(rewards) if global_std else np.std(rewards[sel])
        out[sel] = (rewards[sel] - rewards[sel].mean()) / (std + 1e-4)
    return out


@pytest.mark.parametrize("global_std", [True, False])
def test_group_advantages_are_flow_grpo_stat_trackers(global_std):
    """Groups as prompts, in any order; a group whose rewards tie gets A = 0 exactly; DiffusionNFT's r is
    optimality(A): advantages() gives the same values as before the split (clip, then A / 10 + 0.5)."""
    g = torch.Generator().manual_seed(0)
    R = torch.rand(24, generator=g)
    R[16:20] = 0.75  # prompt "c": a tie
    gid = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1] * 2 + [3] * 4 + [4] * 4)
    A = phase2_align.group_advantages(R, gid, global_std)
    ref = stat_tracker(["abcdefgh"[i] for i in gid.tolist()], R.tolist(), global_std)
    assert np.allclose(A.numpy(), ref, atol=1e-5) and bool((A[16:20] == 0).all())
    r = phase2_align.advantages(R, gid, global_std)
    assert torch.equal(r, phase2_align.optimality(A))
    assert torch.equal(r, (A.clamp(-5, 5) / 10 + 0.5).clamp(0, 1))


def test_grpo_weights_by_hand():
    """6 samples, 2 optimizer steps; samples 1 and 4 have A = 0. Step 0 holds samples 0, 1, 2 (2 kept), step 1
    samples 3, 4, 5 (2 kept): keep = (1, 0, 1, 1, 0, 1), scale = 3 / 2 each; a step with nothing kept has
    scale = its samples (its loss is 0 anyway)."""
    A = torch.tensor([0.5, 0.0, -1.0, 2.0, 0.0, 1.0])
    keep, scale, kept = phase2_align.grpo_weights(A, torch.tensor([0, 0, 0, 1, 1, 1]), 2)
    assert keep.tolist() == [1, 0, 1, 1, 0, 1] and scale == [1.5, 1.5] and kept == 4
    keep, scale, kept = phase2_align.grpo_weights(A, torch.tensor([0, 1, 1, 0, 1, 1]), 2)
    assert scale == [1.0, 2.0] and kept == 4  # step 0: samples 0, 3 (both kept); step 1: 2 of 4
    assert phase2_align.grpo_weights(torch.zeros(4), torch.tensor([0, 1, 0, 1]), 2)[1:] == ([2.0, 2.0], 0)


# ------------------------------------------------------------------------ the SDE sampler (sample.sde_sample)
@pytest.fixture(scope="module")
def pipe():
    return tiny.pipeline(0)


def _sde_inputs(pipe, n, seed=0):
    text = sample.load_text("tiny", t5_len=16, pipe=pipe)
    c = sample.encode(text, ["a photo of a red cat"] * n)
    sigmas = sample.sigma_grid(pipe.scheduler, 4)
    gens = lambda seeds: [[torch.Generator().manual_seed(s * 100 + i) for s in seeds] for i in range(4)]
    noise = sample.image_noise([seed + k for k in range(n)], (16, 8, 8), "cpu")
    return text, c, sigmas, gens, noise


def test_sde_sample_keeps_the_path_and_its_log_probs(pipe):
    """states[:, 0] is the noise and states[:, -1] x0; each stored log-prob is the step's log-prob of the
    stored transition, recomputed from the stored states (bit for bit: the same forwards); the same seeds
    give the same paths, and a sample's path does not depend on the samples beside it."""
    text, c, sigmas, gens, noise = _sde_inputs(pipe, 3)
    tr = pipe.transformer
    states, lp, scored = sample.sde_sample(tr, sigmas, noise, c, generators=gens([0, 1, 2]))
    assert states.shape == (3, 5, 16, 8, 8) and lp.shape == (3, 4) and scored is None
    assert torch.equal(states[:, 0], noise)
    for i in range(4):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        with torch.no_grad():
            v = sample.velocity(tr, states[:, i], s, c).float()
        again = sample.sde_step(states[:, i], v, s, s_next, 0.7, prev=states[:, i + 1])[1]
        assert torch.equal(again, lp[:, i])
    again = sample.sde_sample(tr, sigmas, noise, c, generators=gens([0, 1, 2]))
    assert torch.equal(again[0], states) and torch.equal(again[1], lp)
    other = sample.sde_sample(tr, sigmas, torch.stack([noise[0], noise[0] + 1, noise[2]]), c,
                              generators=gens([0, 7, 2]))
    assert torch.equal(other[0][0], states[0]) and torch.equal(other[0][2], states[2])
    assert not torch.equal(other[0][1], states[1])


def test_sde_sample_scores_each_path_under_c_orig_where_its_condition_differs(pipe):
    """With E²PO's schedule (rho = 0.3 on a 4-step grid: the first two steps perturbed), c_score = C^orig
    gives the log-prob of the same transitions under C^orig: other than the sampling one while gamma > 0,
    the same once the schedule has faded the perturbation out; a C^opt equal to C^orig changes nothing."""
    text, c, sigmas, gens, noise = _sde_inputs(pipe, 2)
    c_opt = (c[0] + 0.5 * torch.randn_like(c[0]), c[1])
    assert [sample.gamma(float(s), 0.3) > 0 for s in sigmas[:4]] == [True, True, False, False]
    states, lp, scored = sample.sde_sample(pipe.transformer, sigmas, noise, c, c_opt, rho=0.3,
                                           generators=gens([0, 1]), c_score=c)
    assert not torch.equal(scored[:, :2], lp[:, :2]) and torch.equal(scored[:, 2:], lp[:, 2:])
    plain = sample.sde_sample(pipe.transformer, sigmas, noise, c, c, rho=0.3, generators=gens([0, 1]),
                              c_score=c)
    assert torch.equal(plain[2], plain[1])
