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
                        iters, seed):
    """Optimise Δ for the prompts `indices` together. Returns ({index: {encoder: [K-1, L, d]}},
    {encoder: stats}). δ_k ~ N(0, (sigma_init * table_std)^2) from a generator seeded by the prompt
    index, so a prompt's perturbations do not depend on the batch or rank it landed in."""
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
        init = [torch.randn(n, n_tok, d, generator=torch.Generator().manual_seed(seed * SEED_STRIDE + i))
                for i in indices]
        deltas[name] = (torch.cat(init) * sigma_init * std).to(enc.device).requires_grad_()
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


def save_perturbations(path, rows, meta):
    """Atomic write: a temp file renamed over `path`, so a crash never leaves a half-written file."""
    from safetensors.torch import save_file
    tensors = {f"{i}.{name}": t.contiguous() for i, r in rows.items() for name, t in r.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={"e2po": json.dumps(meta)})
    os.replace(tmp, path)


def main(argv=None):
    from configurator import config_summary, configure
    from tqdm import tqdm
    cfg = configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    if K < 2:
        raise SystemExit(f"K={K}: Phase I learns K-1 perturbations, so K must be at least 2 "
                         f"(K=1 is plain DiffusionNFT and needs no Phase I)")
    bad = [n for n in encoders if n not in S.ENCODERS]
    if bad or not encoders:
        raise SystemExit(f"encoders={encoders!r}: choose a non-empty subset of {S.ENCODERS}")
    if not 0 <= ring_margin < 1 or not eps >= 0:
        raise SystemExit(f"ring_margin={ring_margin} must lie in [0, 1) and eps={eps} be >= 0")
    prompt_list, _ = S.read_prompts(prompts)
    S.quiet()
    rank, world, dev, dt = S.setup_distributed(device, dtype)
    if rank == 0:
        print(config_summary(cfg))
    torch.manual_seed(seed + rank)
    text = S.load_text(model, dev, dt, t5_len, seed=0)
    # L_div is a mean over the (K-1)(K-2)/2 pairs but L_anc a sum over the K-1 variants, so with a fixed
    # lambda_div the spreading force on one variant falls as 2/(K-1): at K = 3 it beats the hinge and the
    # variants leave the ring. lambda_div = (K-2)/2 keeps that force the same for every K (README).
    lam = (K - 2) / 2 if lambda_div is None else lambda_div
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
    if world > 1:  # gather the statistics so rank 0 reports all prompts
        import torch.distributed as dist
        gathered = [None] * world
        dist.all_gather_object(gathered, stats)
        stats = {k: [ap for g in gathered for ap in g.get(k, [])] for k in set().union(*gathered)}
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


if __name__ == "__main__":
    S.run_main(main)
