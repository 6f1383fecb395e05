"""
Phase II of E²PO: DiffusionNFT on SD3.5 with the two E²PO changes (METHOD.md §3): each prompt's group
is G noises x K conditions (C^orig plus K-1 Phase I perturbations, faded out by the gamma schedule),
and every sample is trained with C^orig as its condition (reference-anchored batching).

    # tiny model, CPU, a few epochs in well under two minutes
    python phase1_perturb.py config/tiny_cpu.py && python phase2_align.py config/tiny_cpu.py
    # SD3.5-M, 8 GPUs
    torchrun --nproc_per_node=8 phase1_perturb.py config/geneval_g4k12.py
    torchrun --nproc_per_node=8 phase2_align.py config/geneval_g4k12.py
    # the DiffusionNFT baseline: K=1, same code path, no perturbation file
    torchrun --nproc_per_node=8 phase2_align.py config/geneval_g4k12.py --K=1 --G=24

The file reads top to bottom: config, the two formulas (`advantages`, `nft_loss`), LoRA helpers,
then `main()`: distributed init -> models -> per epoch {sample with the old policy, score, normalise
within groups, train on C^orig, update old and EMA adapters} -> checkpoints.
"""
import contextlib
import json
import math
import os
import shutil
import sys
import time

import torch

import sample as S

# -----------------------------------------------------------------------------
# config (METHOD.md §3.3 numbers are DiffusionNFT's; the E²PO ones of §5 are ours)
model = "stabilityai/stable-diffusion-3.5-medium"
prompts = "data/geneval/train_metadata.jsonl"
eval_prompts = None  # held-out prompts sampled with the EMA weights every eval_every epochs
perturbations = "out/perturbations.safetensors"  # Phase I file (not needed when K = 1)
out_dir = "out/align"
reward = {"geneval": 1.0}  # name -> weight; summed before normalisation
reward_opts = {}  # name -> {option: value}: model ids / local paths of the reward models (see rewards.py)
K = 12  # conditions per prompt, C^orig included; K = 1 is plain DiffusionNFT
G = 4  # initial noises per condition
rho = 0.4  # gamma schedule width: perturbed conditions act while sigma > 1 - rho
use_anchor = True  # train every sample on C^orig (False: on the condition that sampled it; ablation)
use_schedule = True  # gamma schedule (False: static C^opt, gamma = 1; ablation)
prompts_per_epoch = 48  # groups per epoch over all ranks: prompts_per_epoch * K * G samples
epochs = 1000
steps = 10  # sampler steps; the training times are this grid
solver = "dpm2"  # as DiffusionNFT; "euler" also works (the training times are the grid either way)
guidance = 1.0  # no CFG while sampling, as DiffusionNFT
resolution = 512
t5_len = 128
sample_batch = 16  # images per transformer forward while sampling
train_batch = 8  # samples per training micro-batch
opt_steps_per_epoch = 1  # optimizer steps per epoch, each accumulating an equal share of the micro-batches (DiffusionNFT: 1)
timestep_fraction = 0.99  # train on the first floor(steps * 0.99) entries of a per-sample permutation of the grid
beta = 1.0  # implicit-policy strength (0.1 for multi-reward)
adv_clip = 5.0
global_std = True  # normalise by the std of all rewards of the step (False: per group)
kl_beta = 1e-4  # beta_KL on mean (v_theta - v_ref)^2
lr = 3e-4
weight_decay = 1e-4
grad_clip = 1.0
lora_rank = 32
lora_alpha = 64
old_decay_rate = 0.001  # old <- d*old + (1-d)*theta, d = min(rate * (step - flat), max), 0 before `flat` steps
old_decay_max = 0.5  # DiffusionNFT's type 1 (GenEval, PickScore); its type 2 is flat 75, rate 0.0075, max 0.999
old_decay_flat = 0
ema_max = 0.9  # EMA decay min((1+s)/(10+s), ema_max)
grad_checkpointing = True
ckpt_every = 10  # epochs
eval_every = 10  # epochs
eval_G = 1  # noises per eval prompt
eval_steps = 40  # sampler steps of the evaluation (DiffusionNFT evaluates at 40)
resume = False
seed = 0
device = "auto"
dtype = "auto"  # "auto" = bf16 on CUDA, fp32 on CPU; or float32 / bfloat16
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, dict, type(None)))]

LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
ADAPTERS = ("default", "old", "ema")  # theta (trained), the sampling policy, the evaluation copy
CKPT_DIRS = dict(zip(ADAPTERS, ("lora", "lora_old", "lora_ema")))  # their folders in a checkpoint


# ----------------------------------------------------------------------------- the formulas (METHOD §3.3)
def group_moments(R, group_ids):
    """Each sample's group index, and per group the mean and the population std (ddof 0) of R."""
    _, gid, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    mean = torch.zeros(len(counts), dtype=R.dtype, device=R.device).index_add_(0, gid, R) / counts
    std = (torch.zeros_like(mean).index_add_(0, gid, (R - mean[gid]) ** 2) / counts).sqrt()
    return gid, mean, std


def advantages(rewards, group_ids, global_std=True, clip=5.0):
    """Rewards [N] -> optimality probabilities r in [0, 1].
        A = (R - mean_group(R)) / (std(R) + 1e-4)   std over all N (global_std) or within the group; ddof 0
        A = clip(A, -clip, clip)
        r = clip(A / (2 * clip) + 0.5, 0, 1)         (= A/10 + 0.5 for clip = 5)"""
    R = rewards.float()
    gid, mean, group_std = group_moments(R, group_ids)
    std = R.std(unbiased=False) if global_std else group_std[gid]
    A = ((R - mean[gid]) / (std + 1e-4)).clamp(-clip, clip)
    return (A / (2 * clip) + 0.5).clamp(0, 1)


def nft_loss(v_theta, v_old, x_t, x0, t, r, beta):
    """Per-sample DiffusionNFT loss [B] (before the adv_clip/beta factor and the KL term).
        v+ = beta * v_theta + (1 - beta) * v_old          v- = (1 + beta) * v_old - beta * v_theta
        x0± = x_t - t * v±
        w± = stopgrad(mean_CHW |x0± - x0|).clamp(min 1e-5)
        L± = mean_CHW (x0± - x0)^2 / w±
        loss = r * L+ + (1 - r) * L-
    Only v_theta carries gradient: v_old, x_t, x0 are data."""
    v_old, x_t, x0 = v_old.detach(), x_t.detach(), x0.detach()
    t = t.reshape(-1, *([1] * (x_t.dim() - 1)))
    dims = tuple(range(1, x_t.dim()))
    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta
    losses = []
    for v in (v_pos, v_neg):
        err = (x_t - t * v) - x0
        w = err.abs().mean(dim=dims, keepdim=True).detach().clamp(min=1e-5)
        losses.append((err ** 2 / w).mean(dim=dims))
    L_pos, L_neg = losses
    return r * L_pos + (1 - r) * L_neg


def group_stats(rewards, group_ids):
    """Mean over groups of the within-group reward std (ddof 0) - the signal whose collapse E²PO fights -
    and the fraction of groups whose std is below 1e-3."""
    std = group_moments(rewards.double(), group_ids)[2]
    return std.mean().item(), (std < 1e-3).float().mean().item()


def old_decay(step, rate=0.001, cap=0.5, flat=0):
    return 0.0 if step < flat else min(rate * (step - flat), cap)


def ema_decay(step, cap=0.9):
    return min((1 + step) / (10 + step), cap)


# ----------------------------------------------------------------------------- LoRA adapters on the SD3 transformer
def add_adapters(transformer, rank, alpha):
    """Three LoRA adapters with one config (METHOD §3.3): "default" (theta) is trained, "old" samples,
    "ema" evaluates. All start as copies of theta; lora_B = 0 at init, so all equal the base model."""
    from peft import LoraConfig
    import warnings
    cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in ADAPTERS:
            transformer.add_adapter(cfg, adapter_name=name)
    for n, p in transformer.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()  # adapters in fp32 (the base stays bf16 on CUDA; autocast mixes)
    for name in ADAPTERS[1:]:
        blend_adapter(transformer, name, "default", 0.0)
    use_adapter(transformer, "default")


def adapter_params(transformer, name):
    """The LoRA tensors of one adapter, in a fixed order."""
    return [p for n, p in transformer.named_parameters() if f".{name}." in n and "lora_" in n]


@torch.no_grad()
def blend_adapter(transformer, target, source, d):
    """target <- d * target + (1 - d) * source, parameter by parameter (the old-policy and EMA updates)."""
    for pt, ps in zip(adapter_params(transformer, target), adapter_params(transformer, source)):
        pt.mul_(d).add_(ps, alpha=1 - d)


def use_adapter(transformer, name):
    """Switch the active adapter. peft's set_adapter also makes only that adapter trainable, so we pin
    requires_grad back to theta: the other adapters are only ever run under no_grad."""
    transformer.enable_adapters()
    transformer.set_adapter(name)
    for n, p in transformer.named_parameters():
        if "lora_" in n:
            p.requires_grad_(".default." in n)


def adapter_state(transformer, name):
    from peft.utils import get_peft_model_state_dict
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer, adapter_name=name).items()}


def save_lora(transformer, name, path):
    """diffusers format: StableDiffusion3Pipeline.load_lora_weights(path) loads it in plain diffusers."""
    from diffusers import StableDiffusion3Pipeline
    # the adapter's LoraConfig travels as metadata: without it diffusers assumes lora_alpha = r (scale 1, not alpha/r)
    StableDiffusion3Pipeline.save_lora_weights(path, transformer_lora_layers=adapter_state(transformer, name),
                                               transformer_lora_adapter_metadata=transformer.peft_config[name].to_dict())


def load_lora_into(transformer, name, path):
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    sd = load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    res = set_peft_model_state_dict(transformer, sd, adapter_name=name)
    if getattr(res, "unexpected_keys", None):
        raise SystemExit(f"LoRA in {path} does not match this model (unexpected keys like {res.unexpected_keys[0]})")


def policy_velocities(transformer, x_t, t, c, with_ref=True):
    """The three forwards of one training step on the same (x_t, t, condition): v_old (old adapter) and
    v_ref (adapters off: the base model, only when with_ref) without grad, then v_theta with grad. v_theta
    comes last: with gradient checkpointing the backward re-runs its forward, and it must find the
    trained adapter still active."""
    with torch.no_grad():
        use_adapter(transformer, "old")
        v_old = S.velocity(transformer, x_t, t, c).float()
        v_ref = None
        if with_ref:
            transformer.disable_adapters()
            v_ref = S.velocity(transformer, x_t, t, c).float()
        use_adapter(transformer, "default")
    return v_old, v_ref, S.velocity(transformer, x_t, t, c).float()


# ----------------------------------------------------------------------------- small helpers
def samples_per_rank(n_prompts, K, G, world, train_batch, opt_steps):
    """An epoch's n_prompts * K * G samples are one flat list cut into `world` equal slices (a group may
    span ranks); each slice must cut into micro-batches that share out evenly over the optimizer steps."""
    N = n_prompts * K * G
    if N % world:
        raise SystemExit(f"prompts_per_epoch*K*G = {n_prompts}*{K}*{G} = {N} samples do not split over {world} ranks")
    n_local = N // world
    if n_local % train_batch or (n_local // train_batch) % opt_steps:
        raise SystemExit(f"{n_local} samples per rank must split into train_batch={train_batch} micro-batches "
                         f"whose count divides by opt_steps_per_epoch={opt_steps}")
    return n_local


def sample_seed(*parts):
    """A 63-bit seed from (seed, epoch, index, ...): each sample's randomness is its own, so it does
    not depend on how samples are split over ranks, and a resumed run replays it exactly."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ int(p)) * 1099511628211) % (1 << 63)
    return h


def all_gather_cat(x, world):
    if world == 1:
        return x
    import torch.distributed as dist
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_reduce_mean_(tensors, world):
    """Average gradients over ranks in one flat bucket: the whole of what DDP would do for us here, done
    once per optimizer step (peft toggles requires_grad between adapters, which DDP's reducer dislikes)."""
    if world == 1 or not tensors:
        return
    import torch.distributed as dist
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    for t, f in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(f.view_as(t))


def save_checkpoint(ckpt_dir, transformer, opt, state, cfg):
    """Written to a temp folder, then swapped in: a crash leaves the last good checkpoint whole."""
    tmp, old = ckpt_dir + ".tmp", ckpt_dir + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, sub in CKPT_DIRS.items():
        save_lora(transformer, name, os.path.join(tmp, sub))
    torch.save({"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), **state}, os.path.join(tmp, "state.pt"))
    S.write_json_atomic(os.path.join(tmp, "config.json"), cfg)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(ckpt_dir):
        os.replace(ckpt_dir, old)
    os.replace(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    from configurator import configure
    from tqdm import tqdm
    import rewards as RW
    cfg = configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    # ---- check the settings before anything is loaded or written
    prompt_list, metadata = S.read_prompts(prompts)
    eval_list, eval_meta = S.read_prompts(eval_prompts) if eval_prompts else ([], [])
    if K < 1 or G < 1:
        raise SystemExit(f"K={K}, G={G}: both must be at least 1")
    n_train_t = math.floor(steps * timestep_fraction)
    if n_train_t < 1:
        raise SystemExit(f"steps={steps} x timestep_fraction={timestep_fraction} leaves no training timestep")
    rank, world, dev, dt = S.setup_distributed(device, dtype)
    N = prompts_per_epoch * K * G  # samples per epoch over all ranks
    n_local = samples_per_rank(prompts_per_epoch, K, G, world, train_batch, opt_steps_per_epoch)
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    log(json.dumps(cfg, indent=1))
    reward_fn = RW.build_reward(reward, dev, dt, tiny=model == "tiny", opts=reward_opts)  # unknown names stop here
    if "geneval" in reward_fn.weights and not all(m.get("tag") for m in metadata):
        raise SystemExit(f"the geneval reward needs GenEval metadata (.jsonl with 'tag' and 'include'); {prompts} has none: "
                         "make it with data/geneval/prepare.py")

    # ---- models: frozen SD3, three LoRA adapters on the transformer
    torch.manual_seed(seed + rank)
    pipe = S.load_pipeline(model, dev, dt)
    text = S.load_text(model, dev, dt, t5_len, pipe=pipe)
    pert = S.load_perturbations(perturbations, text, prompt_list, K) if K > 1 else None
    transformer, vae = pipe.transformer, pipe.vae
    add_adapters(transformer, lora_rank, lora_alpha)
    if grad_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = adapter_params(transformer, "default")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    autocast = (lambda: torch.autocast("cuda", dtype=dt)) if dev.type == "cuda" and dt != torch.float32 else contextlib.nullcontext
    shape = S.latent_shape(pipe, resolution)
    sigmas = S.sigma_grid(pipe.scheduler, steps)  # shared by sampling and training
    ckpt_dir = os.path.join(out_dir, "checkpoint")
    step, start_epoch = 0, 0
    if resume:
        if not os.path.isfile(os.path.join(ckpt_dir, "state.pt")):
            raise SystemExit(f"--resume: no checkpoint in {ckpt_dir}")
        for name, sub in CKPT_DIRS.items():
            load_lora_into(transformer, name, os.path.join(ckpt_dir, sub))
        st = torch.load(os.path.join(ckpt_dir, "state.pt"), map_location="cpu", weights_only=False)  # load_state_dict moves it
        opt.load_state_dict(st["optimizer"])
        torch.set_rng_state(st["rng"])
        step, start_epoch = st["step"], st["epoch"] + 1
        log(f"resumed from {ckpt_dir}: epoch {start_epoch}, step {step}")
    if master:
        os.makedirs(out_dir, exist_ok=True)
        S.write_json_atomic(os.path.join(out_dir, "config.json"), cfg)
    logf = open(os.path.join(out_dir, "log.jsonl"), "a" if resume else "w") if master else None

    def conditions(idx, ks):
        """(C^orig, C^sample) per sample of prompts idx with condition indices ks (k = 0 is C^orig)."""
        uniq = sorted(set(idx))
        orig = S.encode(text, [prompt_list[i] for i in uniq])
        row = {i: j for j, i in enumerate(uniq)}
        c_orig = tuple(c[[row[i] for i in idx]] for c in orig)
        if pert is None or all(k == 0 for k in ks):
            return c_orig, c_orig
        opt_c = S.perturbed_conditions(text, pert, prompt_list, uniq)  # K-1 rows per prompt, prompt-major
        c_opt = tuple(torch.stack([o[n] if k == 0 else p[row[i] * (K - 1) + k - 1] for n, (i, k) in enumerate(zip(idx, ks))])
                      for o, p in zip(c_orig, opt_c))
        return c_orig, c_opt

    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        # ---- which samples: the same global list on every rank, this rank keeps its slice
        g = torch.Generator().manual_seed(sample_seed(seed, epoch))
        drawn = (torch.randperm(len(prompt_list), generator=g)[:prompts_per_epoch] if prompts_per_epoch <= len(prompt_list)
                 else torch.randint(len(prompt_list), (prompts_per_epoch,), generator=g)).tolist()
        js = range(rank * n_local, (rank + 1) * n_local)
        slot = [j // (K * G) for j in js]  # group id = prompt slot of this epoch
        idx = [drawn[s] for s in slot]
        ks = [(j // G) % K for j in js]
        c_orig, c_samp = conditions(idx, ks)
        # what the sampler mixes: C^orig -> C^opt_k by gamma; static C^opt_k without the schedule (ablation)
        c_base, c_mix = (c_orig, c_samp) if use_schedule else (c_samp, None)

        # ---- sample with the old policy: G noises x K conditions per prompt, deterministic ODE
        use_adapter(transformer, "old")
        noise = S.image_noise([sample_seed(seed, epoch, j, 0) for j in js], shape, dev)
        x0 = []
        for a in tqdm(range(0, n_local, sample_batch), desc=f"epoch {epoch} sample", disable=not master, leave=False):
            b = slice(a, a + sample_batch)
            with autocast():
                x0.append(S.sample(transformer, sigmas, noise[b], tuple(c[b] for c in c_base),
                                   tuple(c[b] for c in c_mix) if c_mix is not None else None, rho, guidance, None, solver))
        x0 = torch.cat(x0).float()
        use_adapter(transformer, "default")
        t1 = time.time()

        # ---- rewards, gathered with group ids over ranks, normalised within groups
        images = torch.cat([S.decode(vae, x0[a:a + sample_batch]) for a in range(0, n_local, sample_batch)])
        R_local, parts = reward_fn(images, [prompt_list[i] for i in idx], [metadata[i] for i in idx])
        R_local = R_local.float().to(dev)
        parts = {f"reward_{n}": all_gather_cat(v.float().to(dev), world).mean().item() for n, v in parts.items()} if len(parts) > 1 else {}
        R = all_gather_cat(R_local, world)
        gid = torch.arange(N, device=dev) // (K * G)
        if not torch.isfinite(R).all():
            raise SystemExit(f"non-finite reward at epoch {epoch}; the last good checkpoint is {ckpt_dir}")
        r_all = advantages(R, gid, global_std, adv_clip)
        r = r_all[rank * n_local:(rank + 1) * n_local]
        grp_std, collapsed = group_stats(R.cpu(), gid.cpu())
        t2 = time.time()

        # ---- train: every sample on C^orig (use_anchor), at its own permutation of the time grid, in a
        # shuffled order so that each optimizer step sees a mix of groups (randomness keyed by sample j)
        order = torch.randperm(n_local, generator=torch.Generator().manual_seed(sample_seed(seed, epoch, rank, 3)))
        js = [js[o] for o in order]
        x0, r = x0[order.to(dev)], r[order.to(dev)]
        c_orig, c_samp = (tuple(c[order.to(c.device)] for c in cc) for cc in (c_orig, c_samp))
        c_train = c_orig if use_anchor else c_samp
        n_micro = n_local // train_batch
        accum = n_micro // opt_steps_per_epoch
        perms = torch.stack([torch.randperm(steps, generator=torch.Generator().manual_seed(sample_seed(seed, epoch, j, 1)))
                             for j in js])[:, :n_train_t]
        sums = {"loss": 0.0, "nft": 0.0, "kl": 0.0, "grad_norm": 0.0}
        transformer.train()
        for m in tqdm(range(n_micro), desc=f"epoch {epoch} train", disable=not master, leave=False):
            b = slice(m * train_batch, (m + 1) * train_batch)
            x0_b, r_b = x0[b], r[b]
            cond_b = tuple(c[b] for c in c_train)
            for ti in range(n_train_t):
                t = sigmas[perms[b, ti]].to(dev)
                eps = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, epoch, j, 2, ti)))
                                   for j in js[b]]).to(dev)
                x_t = (1 - t.view(-1, 1, 1, 1)) * x0_b + t.view(-1, 1, 1, 1) * eps
                c = cond_b
                if not use_anchor and use_schedule:  # ablation: the condition that sampled it, as mixed at this t
                    c = S.mix_condition(tuple(q[b] for q in c_samp), tuple(q[b] for q in c_orig), t, rho)
                with autocast():
                    v_old, v_ref, v_theta = policy_velocities(transformer, x_t, t, c, with_ref=kl_beta > 0)
                nft = nft_loss(v_theta, v_old, x_t, x0_b, t, r_b, beta).mean() * (adv_clip / beta)
                kl = ((v_theta - v_ref) ** 2).mean() if v_ref is not None else torch.zeros((), device=dev)
                loss = nft + kl_beta * kl
                if not torch.isfinite(loss):
                    raise SystemExit(f"non-finite loss at epoch {epoch}; the last good checkpoint is {ckpt_dir}")
                (loss / (accum * n_train_t)).backward()
                for k_, v_ in (("loss", loss), ("nft", nft), ("kl", kl)):
                    sums[k_] += v_.item() / (n_micro * n_train_t)
            if (m + 1) % accum == 0:  # one optimizer step per `accum` micro-batches
                all_reduce_mean_([p.grad for p in params if p.grad is not None], world)
                sums["grad_norm"] += torch.nn.utils.clip_grad_norm_(params, grad_clip).item() / opt_steps_per_epoch
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                blend_adapter(transformer, "ema", "default", ema_decay(step, ema_max))  # EMA of theta, for eval and checkpoints
        transformer.eval()
        # ---- the sampling policy follows theta once per epoch: old <- d*old + (1-d)*theta
        blend_adapter(transformer, "old", "default", old_decay(step, old_decay_rate, old_decay_max, old_decay_flat))
        t3 = time.time()

        # ---- log: rank 0 prints one line and appends to log.jsonl
        if world > 1:
            import torch.distributed as dist
            tot = torch.tensor([sums[k] for k in ("loss", "nft", "kl")], device=dev)
            dist.all_reduce(tot)
            sums.update(zip(("loss", "nft", "kl"), (tot / world).tolist()))
        rec = {"epoch": epoch, "step": step, "reward_mean": R.mean().item(), "reward_std": R.std(unbiased=False).item(),
               "group_std": grp_std, "collapsed_groups": collapsed, **parts, **sums,
               "time_sample": t1 - t0, "time_reward": t2 - t1, "time_train": t3 - t2, "img_per_s": N / (t3 - t0)}
        if eval_list and (epoch + 1) % eval_every == 0:
            rec["eval_reward"] = evaluate(transformer, vae, text, S.sigma_grid(pipe.scheduler, eval_steps), eval_list, eval_meta,
                                          reward_fn, shape, dev, autocast, rank, world)
        log(f"epoch {epoch} step {step} | reward {rec['reward_mean']:.4f} | group std {grp_std:.4f} "
            f"(collapsed {collapsed:.0%}) | loss {rec['loss']:.4f} nft {rec['nft']:.4f} kl {rec['kl']:.2e} | "
            f"sample {t1 - t0:.1f}s reward {t2 - t1:.1f}s train {t3 - t2:.1f}s | {rec['img_per_s']:.2f} img/s"
            + (f" | eval {rec['eval_reward']:.4f}" if "eval_reward" in rec else ""))
        if master:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            if (epoch + 1) % ckpt_every == 0 or epoch + 1 == epochs:
                save_checkpoint(ckpt_dir, transformer, opt, {"step": step, "epoch": epoch}, cfg)
        if world > 1:
            dist.barrier()
    if master:
        logf.close()
        log(f"done: LoRA (theta, old, EMA) in {ckpt_dir}/lora, lora_old, lora_ema; log in {out_dir}/log.jsonl")
    if world > 1:
        dist.destroy_process_group()


@torch.no_grad()
def evaluate(transformer, vae, text, sigmas, eval_list, eval_meta, reward_fn, shape, dev, autocast, rank, world):
    """Mean reward of the held-out prompts sampled with the EMA adapter from fixed noises (C^orig only)."""
    use_adapter(transformer, "ema")
    mine = list(range(rank, len(eval_list), world))
    scores = torch.zeros(len(eval_list) * eval_G, device=dev)
    for i in mine:
        c = tuple(x.repeat_interleave(eval_G, 0) for x in S.encode(text, [eval_list[i]]))
        noise = S.image_noise([sample_seed(seed, 10 ** 9, i, g) for g in range(eval_G)], shape, dev)
        with autocast():
            x0 = S.sample(transformer, sigmas, noise, c, None, rho, guidance, None, solver)
        scores[i * eval_G:(i + 1) * eval_G] = reward_fn(S.decode(vae, x0), [eval_list[i]] * eval_G, [eval_meta[i]] * eval_G)[0].float()
    if world > 1:
        import torch.distributed as dist
        dist.all_reduce(scores)
    use_adapter(transformer, "default")
    return scores.mean().item()


if __name__ == "__main__":
    main()
