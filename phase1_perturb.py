"""
Phase I of E²PO: learn K-1 token-embedding perturbations per prompt (the paper's Phase I,
arXiv 2605.15803; README, "The method, stage by stage"). The flow model
is not involved and the text encoders stay frozen; only Δ = {δ_k} is optimised, per encoder.

    # the shapes world's prompts, CPU, seconds
    python phase1_perturb.py config/shapes_quick.py
    # tiny model, CPU, seconds
    python phase1_perturb.py config/tiny_cpu.py
    # SD3.5-M on a prompt file, one process per GPU, shards merged on read
    torchrun --nproc_per_node=8 phase1_perturb.py config/geneval_g4k12.py

Writes the perturbation file (safetensors, `{prompt_index}.{encoder}` -> [K-1, L, d], content tokens
only, plus metadata) that sample.py and phase2_align.py read back.
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import sample as S

# -----------------------------------------------------------------------------
# config (defaults are ours, not the paper's: README "Choices where the paper is silent")
model = "stabilityai/stable-diffusion-3.5-medium"  # hub id, local folder, or "tiny"
prompts = "data/tiny_prompts.txt"
perturbations = "out/perturbations.safetensors"  # the output file
K = 12  # conditions per prompt, C^orig included: K-1 perturbations are learned
encoders = ("clip_l", "clip_g", "t5")  # which encoders get a δ; the others see the plain prompt
mu = 0.85  # target cosine to the anchor
eps = 0.05  # dead zone: no anchor penalty while |cos - mu| <= eps (the ring [mu - eps, mu + eps])
# weight of L_div; None = (K - 2) / 2: the same spreading force on each variant for every K (README)
lambda_div = None
# optimise L_anc with eps * (1 - ring_margin), so that variants settle inside the ring, not on its edge
ring_margin = 0.5
sigma_init = 0.1  # δ init std, in units of the encoder's token-embedding-table std
# Adam learning rate of the deltas, same units (its own name: a config file shared with Phase II sets lr)
delta_lr = 0.05
iters = 200
# prompts optimised together (their Δ are independent; batching is for speed). On SD3.5-M a prompt
# backpropagates K-1 sequences through the encoders, 0.73 GiB each (counted by bench.py): at K=12, 4 prompts
# hold 42 GiB with the encoders' weights, 8 would hold 73 GiB
batch_prompts = 4
t5_len = 128
# Phase I for prompts it has never seen (ours, beyond the paper; README "Phase I for prompts it has never
# seen"): train one generator on `prompts` instead of a Delta per prompt; `perturbations` then names the
# generator file, which sample.py and phase2_align.py read in place of a perturbation file, for any prompt
amortize = False
gen_rank = 16  # basis directions per token: the generator serves K up to gen_rank + 1
gen_hidden = 256
gen_iters = 1000
gen_lr = 1e-3
# prompts a step; each step draws its K from 2 .. K and backpropagates gen_batch x (K-1) sequences through the
# encoders: at SD3.5-M's shapes and K=12, 4 prompts hold 41.4 GiB with the encoders' weights, 8 would hold
# 71.9 GiB, at the limit of an 80 GB GPU (counted by bench.py; docs/amortized_phase1.md)
gen_batch = 4
calibrate_steps = 8  # bisection steps that scale each generated variant onto the ring (0: none)
gen_eval_prompts = None  # held-out prompts: the generator measured there against per-prompt Phase I
refine_iters = (0, 10, 25)  # in that measurement, per-prompt Adam steps warm-started from the generator
refine_lr = 0.0125  # their Adam step in delta_lr's units: a quarter of it, not to throw the warm start away
overwrite = False  # replace an earlier Phase I file (or generator) at `perturbations`
seed = 0
device = "auto"
dtype = "auto"  # "auto" = bf16 on CUDA, fp32 on CPU; or float32 / bfloat16
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))]

# prompt i's δ is drawn from a generator seeded seed * SEED_STRIDE + i (its index in the prompt file), so its
# draw does not depend on batching or rank; the stride is a prime above any prompt count, so no two
# (seed, prompt) pairs share a stream
SEED_STRIDE = 1_000_003


def cosines(e, e_anc):
    """e [B, n, D], e_anc [B, D] -> cos(e_k, e_anc) [B, n] and the mean over pairs k<l of
    cos(e_k, e_l) [B]."""
    e, e_anc = F.normalize(e, dim=-1), F.normalize(e_anc, dim=-1)
    n = e.shape[1]
    i, j = torch.triu_indices(n, n, offset=1, device=e.device)
    pairs = (e[:, i] * e[:, j]).sum(-1).mean(-1) if n > 1 else e.new_zeros(e.shape[0])
    return (e * e_anc[:, None]).sum(-1), pairs


def embedding_loss(e, e_anc, mu, eps, lambda_div):
    """L_emb = lambda_div * L_div + L_anc for one prompt (e [n, D], e_anc [D]) or a batch of
    prompts (e [B, n, D], e_anc [B, D]; summed over prompts, so each prompt's gradient is what it
    would be alone). e are the global embeddings of the n perturbed variants.
        L_div = mean_{k<l} cos(e_k, e_l)
        L_anc = sum_k max(|cos(e_k, e_anc) - mu| - eps, 0)"""
    if e.dim() == 2:
        e, e_anc = e[None], e_anc[None]
    cos_anc, L_div = cosines(e, e_anc)
    L_anc = ((cos_anc - mu).abs() - eps).clamp(min=0).sum(-1)
    return (lambda_div * L_div + L_anc).sum()


def learn_perturbations(text, prompt_list, indices, names, K, mu, eps, lambda_div, sigma_init, delta_lr,
                        iters, seed, init=None):
    """Optimise Δ for the prompts `indices` together. Returns ({index: {encoder: [K-1, L, d]}},
    {encoder: stats}). δ_k ~ N(0, (sigma_init * table_std)^2) from a generator seeded by the prompt
    index, so a prompt's perturbations do not depend on the batch or rank it landed in; or `init`
    ({encoder: dense [len(indices) * (K-1), S, d]}, a generator's: a warm start)."""
    sub = [prompt_list[i] for i in indices]
    P, n = len(sub), K - 1
    tokens = S.tokenize(text, sub)
    tokens_rep = {k: tuple(t.repeat_interleave(n, 0) for t in v) for k, v in tokens.items()}
    rep = [p for p in sub for _ in range(n)]
    with torch.no_grad():
        # e_anc = f(E)
        anchor = {k: v[1].float() for k, v in S.run_encoders(text, sub, names=names, tokens=tokens).items()}
    deltas, groups = {}, []
    for name in names:
        enc = text["encoders"][name]
        table = S.token_embedding(enc).weight
        std = table.float().std().item()
        n_tok, d = tokens[name][0].shape[1], table.shape[1]
        if init is not None:
            deltas[name] = init[name].detach().float().clone().to(enc.device).requires_grad_()
        else:
            draws = [torch.randn(n, n_tok, d, generator=torch.Generator().manual_seed(seed * SEED_STRIDE + i))
                     for i in indices]
            deltas[name] = (torch.cat(draws) * sigma_init * std).to(enc.device).requires_grad_()
        # lr in units of the table's std, per encoder
        groups.append({"params": [deltas[name]], "lr": delta_lr * std})
    opt = torch.optim.Adam(groups)
    # cosine decay to 0: with a constant step, Adam keeps circling the ring's edge, where L_div's
    # push and L_anc's hinge balance; decaying the step lets each variant settle there
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / iters)))
    stats = {}
    for it in range(iters + 1):
        out = S.run_encoders(text, rep, deltas, names=names, tokens=tokens_rep)
        e = {name: out[name][1].float().view(P, n, -1) for name in names}
        if it == 0 or it == iters:  # report where we started and where we ended
            with torch.no_grad():
                for name in names:
                    cos_anc, pair = cosines(e[name], anchor[name])
                    stats.setdefault(name, {})["init" if it == 0 else "final"] = (cos_anc.cpu(), pair.cpu())
        if it == iters:
            break
        loss = sum(embedding_loss(e[name], anchor[name], mu, eps, lambda_div) for name in names)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    rows = {}
    for b, i in enumerate(indices):
        rows[i] = {name: deltas[name].detach()[b * n:(b + 1) * n][:, tokens[name][1][b]]
                         .to("cpu", torch.float16) for name in names}
    return rows, stats


def summarize(stats, mu, eps):
    """Per encoder: mean cos to anchor, fraction of variants inside the ring, mean pairwise cos
    (init -> final)."""
    lines = [f"{'encoder':8s} {'cos_anc init':>12s} {'cos_anc final':>13s} {'in ring':>8s} "
             f"{'pairwise init':>13s} {'pairwise final':>14s}"]
    summary = {}
    for name, s in stats.items():
        (a0, p0), (a1, p1) = s["init"], s["final"]
        ring = ((a1 - mu).abs() <= eps).float().mean().item()  # strictly inside
        summary[name] = {"cos_anchor_init": a0.mean().item(), "cos_anchor_final": a1.mean().item(),
                         "in_ring": ring,
                         "pairwise_init": p0.mean().item(), "pairwise_final": p1.mean().item()}
        m = summary[name]
        lines.append(f"{name:8s} {m['cos_anchor_init']:12.4f} {m['cos_anchor_final']:13.4f} {ring:8.1%} "
                     f"{m['pairwise_init']:13.4f} {m['pairwise_final']:14.4f}")
    return summary, "\n".join(lines)


# ---------------------------------------------------- Phase I for new prompts: train the amortized generator
def lambda_for(K, lambda_div):
    """lambda_div as main sets it: (K - 2) / 2 unless given."""
    return (K - 2) / 2 if lambda_div is None else lambda_div


def train_generator(text, prompt_list, names, K_max, mu, eps, lambda_div, rank, hidden, iters, lr, batch,
                    seed):
    """One sample.PerturbationGenerator trained on the prompts with Phase I's own objective, L_emb through the
    frozen encoders (not by regression onto per-prompt Deltas): each step draws `batch` prompts and a K from
    2 .. K_max, so one generator serves every K. Adam with cosine decay, as per-prompt Phase I."""
    dims = {}
    for name in names:
        enc, table = text["encoders"][name], S.token_embedding(text["encoders"][name]).weight
        h = enc.config.d_model if name == "t5" else enc.config.hidden_size
        dims[name] = (table.shape[1], h, table.float().std().item())
    torch.manual_seed(seed)
    gen = S.PerturbationGenerator(dims, rank, hidden).to(text["encoders"][names[0]].device)
    opt = torch.optim.Adam(gen.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / iters)))
    g = torch.Generator().manual_seed(seed)
    for it in range(iters):
        idx = torch.randint(len(prompt_list), (batch,), generator=g).tolist()
        K = int(torch.randint(2, K_max + 1, (1,), generator=g))
        loss = generator_loss(gen, text, [prompt_list[i] for i in idx], K, mu, eps, lambda_for(K, lambda_div),
                              seed)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return gen.eval().requires_grad_(False), dims


def variant_embeddings(text, sub, deltas, names, K, tokens=None):
    """{encoder: (e_k [P, K-1, D], e_anc [P, D])}: the global embeddings of the prompts `sub` under their
    dense deltas (prompt-major, as run_encoders takes them) and, without gradient, of the plain prompts."""
    tokens, n = tokens or S.tokenize(text, sub), K - 1
    with torch.no_grad():
        anchor = S.run_encoders(text, sub, names=names, tokens=tokens)
    tok_rep = {k: tuple(t.repeat_interleave(n, 0) for t in v) for k, v in tokens.items()}
    out = S.run_encoders(text, [p for p in sub for _ in range(n)], deltas, names=names, tokens=tok_rep)
    return {m: (out[m][1].float().view(len(sub), n, -1), anchor[m][1].float()) for m in names}


def generator_loss(gen, text, sub, K, mu, eps, lam, seed, tokens=None):
    """L_emb of the generator's Delta for the prompts `sub`, summed over prompts and encoders."""
    tokens = tokens or S.tokenize(text, sub)
    deltas = S.generator_deltas(gen, text, sub, K, seed, tokens)
    return sum(embedding_loss(e, e_anc, mu, eps, lam)
               for e, e_anc in variant_embeddings(text, sub, deltas, gen.names, K, tokens).values())


def pair_cosines(emb):
    """Per encoder of variant_embeddings' output: the anchor cosine of every variant [P, K-1] and every
    pairwise cosine [P, pairs] (cosines gives only their mean)."""
    stats = {}
    for m, (e, e_anc) in emb.items():
        e = F.normalize(e, dim=-1)
        i, j = torch.triu_indices(e.shape[1], e.shape[1], offset=1)
        anchor_cos = (e * F.normalize(e_anc, dim=-1)[:, None]).sum(-1)
        stats[m] = (anchor_cos.cpu(), (e[:, i] * e[:, j]).sum(-1).cpu())
    return stats


@torch.no_grad()
def delta_stats(text, sub, deltas, names, K):
    """Per encoder: the anchor cosine of every variant [P, K-1] and the pairwise cosines [P, pairs]."""
    return pair_cosines(variant_embeddings(text, sub, deltas, names, K))


def measure_generator(gen, text, prompt_list, names, K, mu, eps, eps_opt, lam, calibrate, refine, seed,
                      iters, batch=4):
    """The generator on prompts it never saw, against per-prompt Phase I (`iters` Adam steps from a random
    init): per method and encoder, the share of variants strictly inside the ring, the mean anchor cosine,
    the mean and the minimum pairwise cosine, L_emb per prompt, and the seconds per prompt; the generator
    alone, then warm-started with each count of `refine` per-prompt steps. In batches of `batch` prompts, as
    Phase I's batch_prompts: a refinement backpropagates batch x (K-1) sequences through the encoders."""
    acc = {}  # label -> seconds, summed L_emb and the cosines of every batch

    def record(label, sub, deltas, seconds):
        with torch.no_grad():  # one pass of the encoders gives the cosines and L_emb
            emb = variant_embeddings(text, sub, deltas, names, K)
        a = acc.setdefault(label, {"seconds": 0.0, "loss": 0.0, "cos": {m: ([], []) for m in names}})
        a["seconds"] += seconds
        a["loss"] += sum(embedding_loss(e, e_anc, mu, eps_opt, lam) for e, e_anc in emb.values()).item()
        for m, (c, p) in pair_cosines(emb).items():
            a["cos"][m][0].append(c)
            a["cos"][m][1].append(p)
    for start in range(0, len(prompt_list), batch):
        idx = list(range(start, min(start + batch, len(prompt_list))))
        sub = [prompt_list[i] for i in idx]
        content = S.tokenize(text, sub)
        dense = lambda r: {m: S.scatter_content([r[i][m].float() for i in idx], content[m][1]) for m in names}
        t0 = time.time()
        gen_d = S.generator_deltas(gen, text, sub, K, seed, calibrate=calibrate)
        t_gen = time.time() - t0
        record("generator" + (" + calibration" if calibrate else ""), sub, gen_d, t_gen)
        for r in (r for r in refine if r > 0):
            t0 = time.time()
            got, _ = learn_perturbations(text, prompt_list, idx, names, K, mu, eps_opt, lam, sigma_init,
                                         refine_lr, r, seed, init=gen_d)
            record(f"generator + {r} refinement steps", sub, dense(got), t_gen + time.time() - t0)
        t0 = time.time()
        got, _ = learn_perturbations(text, prompt_list, idx, names, K, mu, eps_opt, lam, sigma_init, delta_lr,
                                     iters, seed)
        record(f"per-prompt Phase I ({iters} steps)", sub, dense(got), time.time() - t0)
    rows, n = {}, len(prompt_list)
    for label, a in acc.items():
        rows[label] = {"seconds_per_prompt": a["seconds"] / n, "L_emb_per_prompt": a["loss"] / n}
        for m, (cs, ps) in a["cos"].items():
            c, p = torch.cat(cs), torch.cat(ps)
            rows[label][m] = {"in_ring": ((c - mu).abs() <= eps).float().mean().item(),
                              "cos_anchor": c.mean().item(),
                              "pairwise_mean": p.mean().item() if p.numel() else None,
                              "pairwise_min": p.min().item() if p.numel() else None}
    return rows


def write_safetensors(path, tensors, meta):
    """Atomic write: a temp file renamed over `path`, so a crash never leaves a half-written file."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={"e2po": json.dumps(meta)})
    os.replace(tmp, path)


def save_perturbations(path, rows, meta):
    """The Phase I file: `{prompt index}.{encoder}` -> [K-1, L, d], and its metadata."""
    write_safetensors(path, {f"{i}.{name}": t for i, r in rows.items() for name, t in r.items()}, meta)


def main_amortized(cfg, text, prompt_list, eval_list):
    """amortize=True: train the generator, write it (atomically) where a perturbation file would go, then
    measure it on the held-out prompts against per-prompt Phase I and write it again with that table in its
    metadata: a measurement that fails (out of memory) leaves the trained generator on disk."""
    eps_opt = eps * (1 - ring_margin)
    t0 = time.time()
    gen, dims = train_generator(text, prompt_list, encoders, K, mu, eps_opt, lambda_div, gen_rank, gen_hidden,
                                gen_iters, gen_lr, gen_batch, seed)
    train_s = time.time() - t0
    if not all(torch.isfinite(p).all() for p in gen.parameters()):
        raise SystemExit(f"the generator's training diverged (non-finite weights): nothing written; lower "
                         f"gen_lr={gen_lr}")
    calibrate = (mu - eps_opt, calibrate_steps) if calibrate_steps else None
    meta = {"kind": "generator", "model": model, "encoders": list(encoders), "K_max": K, "rank": gen_rank,
            "hidden": gen_hidden, "dims": dims, "mu": mu, "eps": eps, "eps_opt": eps_opt,
            "lambda_div": lambda_div, "t5_len": t5_len, "seed": seed, "calibrate": calibrate,
            "prompts_path": prompts, "prompts_sha256": S.prompts_hash(prompt_list),
            "n_prompts": len(prompt_list), "train_seconds": train_s, "held_out": {}, "config": cfg}
    write_safetensors(perturbations, gen.state_dict(), meta)
    n_params = sum(p.numel() for p in gen.parameters())
    size = os.path.getsize(perturbations) / 1e6
    print(f"phase1 (amortized): a generator of {n_params:,} parameters ({size:.1f} MB) trained on "
          f"{len(prompt_list)} prompts, K up to {K}, in {train_s:.1f}s -> {perturbations}")
    if not eval_list:
        return
    rows = measure_generator(gen, text, eval_list, encoders, K, mu, eps, eps_opt, lambda_for(K, lambda_div),
                             calibrate, refine_iters, seed, iters, batch_prompts)
    write_safetensors(perturbations, gen.state_dict(), dict(meta, held_out=rows))
    floor = (mu - eps_opt) ** 2 - (1 - (mu - eps_opt) ** 2) / (K - 2) if K > 2 else float("nan")
    print(f"{len(eval_list)} held-out prompts ({gen_eval_prompts}), K={K}; the pairwise floor for K-1 "
          f"variants evenly spread at cos {mu - eps_opt:.3f} to the anchor: {floor:.3f}")
    print(f"{'method':<38} {'encoder':<7} {'in ring':>7} {'cos_anc':>7} {'pair mean':>9} {'pair min':>8} "
          f"{'L_emb':>7} {'s/prompt':>8}")
    for label, r in rows.items():
        for m in encoders:
            v = r[m]
            print(f"{label:<38} {m:<7} {v['in_ring']:>7.1%} {v['cos_anchor']:>7.3f} "
                  f"{v['pairwise_mean'] if v['pairwise_mean'] is not None else float('nan'):>9.3f} "
                  f"{v['pairwise_min'] if v['pairwise_min'] is not None else float('nan'):>8.3f} "
                  f"{r['L_emb_per_prompt']:>7.3f} {r['seconds_per_prompt']:>8.3f}")


def check_settings():
    """Every setting checked before anything is loaded or written; the first bad one stops with one sentence
    (what the output would replace is check_output's). Returns the prompts and the held-out prompts."""
    if K < 2:
        raise SystemExit(f"K={K}: Phase I learns K-1 perturbations, so K must be at least 2 "
                         f"(K=1 is plain DiffusionNFT and needs no Phase I)")
    bad = [n for n in encoders if n not in S.ENCODERS]
    if bad or not encoders:
        raise SystemExit(f"encoders={encoders!r}: choose a non-empty subset of {S.ENCODERS}")
    if not 0 <= ring_margin < 1 or not eps >= 0:
        raise SystemExit(f"ring_margin={ring_margin} must lie in [0, 1) and eps={eps} be >= 0")
    if amortize and (K - 1 > gen_rank or gen_iters < 1 or int(os.environ.get("WORLD_SIZE", 1)) > 1):
        raise SystemExit(f"amortize=True trains one generator (gen_iters >= 1) in one process, for K up to "
                         f"gen_rank + 1 = {gen_rank + 1} (K={K}): run it with python, and K <= gen_rank + 1")
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    # the rest, each as a bound: (the setting, whether its value is allowed, what it must be)
    for name, ok, must in (
            ("mu", finite(mu) and 0 < mu < 1, "in (0, 1): the cosine to the prompt the variants aim at"),
            ("eps", finite(eps) and eps < 1, "below 1"),
            ("lambda_div", lambda_div is None or finite(lambda_div) and lambda_div >= 0, "None or >= 0"),
            ("sigma_init", finite(sigma_init) and sigma_init > 0, "finite and > 0"),
            ("delta_lr", finite(delta_lr) and delta_lr > 0, "finite and > 0"),
            ("iters", iters >= 1, "at least 1"), ("batch_prompts", batch_prompts >= 1, "at least 1"),
            ("t5_len", t5_len >= 1, "at least 1"), ("gen_rank", gen_rank >= 1, "at least 1"),
            ("gen_hidden", gen_hidden >= 1, "at least 1"), ("gen_batch", gen_batch >= 1, "at least 1"),
            ("gen_lr", finite(gen_lr) and gen_lr > 0, "finite and > 0"),
            ("calibrate_steps", calibrate_steps >= 0, ">= 0"),
            ("refine_iters", all(isinstance(r, int) and r >= 0 for r in refine_iters), "whole numbers >= 0"),
            ("refine_lr", finite(refine_lr) and refine_lr > 0, "finite and > 0")):
        if not ok:
            raise SystemExit(f"{name}={globals()[name]!r} must be {must}")
    S.pick_device(device, dtype)  # a device this machine lacks, a dtype we do not run
    prompt_list, _ = S.read_prompts(prompts)
    eval_list = S.read_prompts(gen_eval_prompts)[0] if amortize and gen_eval_prompts else []
    S.check_writable(perturbations, "perturbations", kind="file")
    return prompt_list, eval_list


def describe(path):
    """What a Phase I output file holds, in words; None when phase1_perturb.py did not write it (or it is
    damaged)."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as h:
            m = json.loads(h.metadata()["e2po"])
        if m.get("kind") == "generator":
            return (f"a generator (K up to {m['K_max']}) trained on {m['n_prompts']} prompts of "
                    f"{m['prompts_path']}")
        return f"the K={m['K']} perturbations of {m['n_prompts']} prompts of {m['prompts_path']}"
    except Exception:
        return None


def check_output():
    """What this run would replace: the file at `perturbations`, or the shards a torchrun wrote for it. Only
    files phase1_perturb.py wrote, and only with --overwrite=True (as Phase II keeps its run folder)."""
    import glob
    found = ([perturbations] if os.path.isfile(perturbations) else []) + sorted(
        glob.glob(S.shard_glob(perturbations)))
    for f in found:
        what = describe(f)
        if what is None:
            raise SystemExit(f"perturbations={perturbations}: {f} is not a file phase1_perturb.py wrote (or "
                             "it is damaged), and Phase I replaces only its own files: pass another "
                             "--perturbations")
        if not overwrite:
            raise SystemExit(f"{f} holds {what}: pass --overwrite=True to replace it, or another "
                             "--perturbations")


def main(argv=None):
    from configurator import config_summary, configure
    from tqdm import tqdm
    cfg = configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    prompt_list, eval_list = check_settings()
    # the output claimed (one writer at a time) and checked for what it would replace: nothing is loaded,
    # replaced or written before this line
    release, _ = S.claim(perturbations, check_output, int(os.environ.get("RANK", 0)))
    S.quiet()
    rank, world, dev, dt = S.setup_distributed(device, dtype)
    if rank == 0:
        print(config_summary(cfg))
    torch.manual_seed(seed + rank)
    text = S.load_text(model, dev, dt, t5_len, seed=0)
    if rank == 0:
        S.note_cut_prompts(text, prompt_list + eval_list)
    if amortize:
        main_amortized(cfg, text, prompt_list, eval_list)
        return release()
    # L_div is a mean over the (K-1)(K-2)/2 pairs but L_anc a sum over the K-1 variants, so with a fixed
    # lambda_div the spreading force on one variant falls as 2/(K-1): at K = 3 it beats the hinge and the
    # variants leave the ring. lambda_div = (K-2)/2 keeps that force the same for every K (README).
    lam = lambda_for(K, lambda_div)
    # The minimum of L_emb sits on the ring's outer edge (L_div pushes until the hinge stops it), so
    # the hinge is optimised on a narrower ring and the variants settle strictly inside [mu-eps, mu+eps].
    eps_opt = eps * (1 - ring_margin)
    mine = list(range(rank, len(prompt_list), world))  # this rank's shard of the prompts
    # stats: (encoder, "init"/"final") -> [(cos_anc, pairwise) per batch]
    rows, stats, t0 = {}, {}, time.time()
    for s in tqdm(range(0, len(mine), batch_prompts), desc="phase1", disable=not S.bars(rank)):
        idx = mine[s:s + batch_prompts]
        r, st = learn_perturbations(text, prompt_list, idx, encoders, K, mu, eps_opt, lam, sigma_init,
                                    delta_lr, iters, seed)
        rows.update(r)
        for name, v in st.items():
            for when, ap in v.items():
                stats.setdefault((name, when), []).append(ap)
    # a diverged prompt (a NaN or an inf) would be blamed later on Phase II's loss: nothing is written
    bad = sorted(i for i, r in rows.items() if not all(torch.isfinite(t).all() for t in r.values()))
    if world > 1:  # gather the statistics so rank 0 reports all prompts, and every rank sees `bad`
        import torch.distributed as dist
        gathered = [None] * world
        dist.all_gather_object(gathered, (stats, bad))
        stats = {k: [ap for g, _ in gathered for ap in g.get(k, [])]
                 for k in set().union(*(g for g, _ in gathered))}
        bad = sorted(i for _, b in gathered for i in b)
    if bad:
        raise SystemExit(f"Phase I diverged: the perturbations of {len(bad)} prompt(s) (the first: prompt "
                         f"{bad[0]}) are not finite; nothing written: lower delta_lr={delta_lr}")
    all_stats = {name: {when: tuple(torch.cat(x) for x in zip(*stats[name, when]))
                        for when in ("init", "final")}
                 for name in encoders}
    summary, table = summarize(all_stats, mu, eps)
    meta = {"model": model, "encoders": list(encoders), "K": K, "mu": mu, "eps": eps, "lambda_div": lam,
            "eps_opt": eps_opt, "sigma_init": sigma_init, "delta_lr": delta_lr, "iters": iters, "seed": seed,
            "t5_len": t5_len, "prompts_path": prompts, "prompts_sha256": S.prompts_hash(prompt_list),
            "n_prompts": len(prompt_list), "summary": summary, "config": cfg}
    # one file, or one shard per rank under torchrun (read back as a set by sample.load_perturbations)
    mine_file = perturbations if world == 1 else S.shard_name(perturbations, rank, world)
    save_perturbations(mine_file, rows, meta)
    if world > 1:
        dist.barrier()
    if rank == 0:
        import glob  # remove what an earlier run left in the other form: it would shadow or mix with this one
        written = ({perturbations} if world == 1
                   else {S.shard_name(perturbations, r, world) for r in range(world)})
        for f in set(glob.glob(S.shard_glob(perturbations))) | {perturbations}:
            if f not in written and os.path.isfile(f):
                os.remove(f)
        # and the temp files of killed runs (every rank of this one has renamed its own by now)
        for f in (glob.glob(f"{glob.escape(perturbations)}.tmp*")
                  + glob.glob(S.shard_glob(perturbations) + ".tmp*")):
            os.remove(f)
        print(f"phase1: {len(prompt_list)} prompts x {K - 1} perturbations x {len(encoders)} encoders "
              f"in {time.time() - t0:.1f}s "
              f"-> {perturbations}{'' if world == 1 else f' ({world} shards)'}")
        print(table)
        print(f"ring: |cos_anc - {mu}| <= {eps} (optimised at <= {eps_opt:.4g}, lambda_div = {lam:g}); "
              f"pairwise should fall from init")
        for name, m in summary.items():
            if m["in_ring"] < 1:
                print(f"WARNING: {1 - m['in_ring']:.1%} of the {name} variants end outside the ring "
                      f"[{mu - eps:.3f}, {mu + eps:.3f}] (mean cos to anchor {m['cos_anchor_final']:.3f}): "
                      f"raise iters, or lower lambda_div or delta_lr")
    release()


if __name__ == "__main__":
    S.run_main(main)
