"""Round 3d: is objective=grpo's gradient the gradient of the expected reward? On the shapes prior, with a
smooth reward R(x0) = mean(w * x0) (w fixed), compare Flow-GRPO's score-function gradient, taken by
phase2_align.grpo_terms on the SDE paths sample.sde_sample drew (all 10 steps, theta = old, A = R - leave-one-
out mean), with the pathwise gradient of the same paths (the SDE replayed with its eps fixed, autograd through
every step). Both estimate grad E[R]; their projections on the pathwise direction should agree (ratio 1).
Run from the repository root (docs/flow_grpo.md, pilot round 3d; chunk size and count as arguments):

    python docs/flow_grpo/round3/estimator.py 64 48
"""
import math
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import phase2_align as P2  # noqa: E402
import sample as S  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(2)
S.quiet()
model, B, M = "data/shapes/prior_cfgfree", int(sys.argv[1]), int(sys.argv[2])
pipe = S.load_pipeline(model, "cpu", torch.float32)
text = S.load_text(model, "cpu", torch.float32, 16, pipe=pipe)
tr = pipe.transformer
P2.add_adapters(tr, 16, 32)
P2.use_adapter(tr, "default")
params = P2.adapter_params(tr, "default")
shape = S.latent_shape(pipe, 64)
sigmas = S.sigma_grid(pipe.scheduler, 10)
prompts, _ = S.read_prompts("data/shapes/train_easy.jsonl")
w = torch.randn(shape, generator=torch.Generator().manual_seed(123))
D = math.prod(shape)
reward = lambda x0: (x0 * w).flatten(1).mean(1)  # R(x0) = mean(w * x0), per path
# grpo_terms reads the objective's settings from phase2_align's globals: plain policy gradient, no KL
P2.guidance, P2.noise_level, P2.kl_beta, P2.clip_range, P2.adv_clip = 1.0, 0.7, 0.0, 1e-4, 1e9
run = SimpleNamespace(sigmas=sigmas, transformer=tr, theta_model=tr, c_neg=None)
T = len(sigmas) - 1


def flat_grad():
    g = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params])
    for p in params:
        p.grad = None
    return g


g_sf, g_pw = [], []
t0 = time.time()
for m in range(M):
    ids = [m * B + b for b in range(B)]
    c = S.encode(text, [prompts[i % len(prompts)] for i in ids])
    noise = S.image_noise([10 ** 6 + i for i in ids], shape, "cpu")
    gens = [[torch.Generator().manual_seed(10 ** 8 + 100 * i + t) for i in ids] for t in range(T)]
    tr.eval()
    states, old_lp, _ = S.sde_sample(tr, sigmas, noise, c, generators=gens)
    R = reward(states[:, -1])
    A = (R - (R.sum() - R) / (B - 1))  # leave-one-out baseline: an unbiased score-function estimate
    # score function, by the training code: -grad of sum_t grpo_loss = sum_b A_b sum_t grad log p
    # (Flow-GRPO's log p is a mean over the D latent elements: times D)
    for t in range(T):
        loss = P2.grpo_terms(run, states[:, t], states[:, t + 1], t, old_lp[:, t], A, torch.ones(B), 1.0,
                             c)[0]
        loss.backward()
    g_sf.append(-flat_grad() * D / B)
    # pathwise: replay the same paths with their eps fixed, gradient through every step (eps is recovered from
    # the stored states, so the replay's distance to them measures rounding only)
    x = noise.float()
    for t in range(T):
        s, s_next = float(sigmas[t]), float(sigmas[t + 1])
        v = S.guided_velocity(tr, x, s, c, 1.0, None).float()
        _, _, mean, s_t = S.sde_step(x, v, s, s_next, 0.7, prev=states[:, t + 1])
        std = s_t * math.sqrt(s - s_next)
        eps = ((states[:, t + 1] - mean) / std).detach()
        x = mean + std * eps
    err = (x.detach() - states[:, -1]).abs().max().item()
    reward(x).mean().backward()
    g_pw.append(flat_grad())
    print(f"chunk {m}: replay max |x - stored| {err:.1e}, |g_sf| {g_sf[-1].norm():.3e}, "
          f"|g_pw| {g_pw[-1].norm():.3e}, {time.time() - t0:.0f}s", flush=True)

g_sf, g_pw = torch.stack(g_sf), torch.stack(g_pw)
u = g_pw.mean(0) / g_pw.mean(0).norm()
a, b = g_sf @ u, g_pw @ u  # each chunk's projection on the pathwise direction
se = lambda z: (z.std(unbiased=True) / math.sqrt(len(z))).item()
print(f"{M} chunks x {B} paths; projection on the pathwise direction: "
      f"score function {a.mean():.4e} +- {se(a):.1e}, "
      f"pathwise {b.mean():.4e} +- {se(b):.1e}; ratio {a.mean() / b.mean():.3f} +- {se(a) / b.mean():.3f}")
cos = torch.nn.functional.cosine_similarity(g_sf.mean(0), g_pw.mean(0), dim=0)
print(f"cosine of the two mean gradients {cos:.3f} "
      f"(|g_sf| {g_sf.mean(0).norm():.3e}, |g_pw| {g_pw.mean(0).norm():.3e})")
