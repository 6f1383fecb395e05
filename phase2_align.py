"""
Phase II of E²PO: DiffusionNFT on SD3.5 with the two E²PO changes (arXiv 2605.15803): each prompt's group
is G noises x K conditions (C^orig plus K-1 Phase I perturbations, faded out by the gamma schedule),
and every sample is trained with C^orig as its condition (reference-anchored batching).

    # the shapes world on CPU, 30 steps in about three minutes: the held-out reward rises
    python phase1_perturb.py config/shapes_quick.py && python phase2_align.py config/shapes_quick.py
    # the tiny random model, CPU, the plumbing in under a minute
    python phase1_perturb.py config/tiny_cpu.py && python phase2_align.py config/tiny_cpu.py
    # SD3.5-M, 8 GPUs
    torchrun --nproc_per_node=8 phase1_perturb.py config/geneval_g4k12.py
    torchrun --nproc_per_node=8 phase2_align.py config/geneval_g4k12.py
    # the DiffusionNFT baseline (48 prompts x G=24 = the same 1152 samples an epoch; K=1, no Phase I)
    torchrun --nproc_per_node=8 phase2_align.py config/geneval_nft_g24.py

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
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import rewards as RW
import sample as S
from configurator import config_summary, configure

# -----------------------------------------------------------------------------
# config (the DiffusionNFT numbers are its public code's; the E²PO ones are ours:
# README "Choices where the paper is silent")
model = "stabilityai/stable-diffusion-3.5-medium"
prompts = "data/geneval/train_metadata.jsonl"
# held-out prompts sampled with the EMA weights before training and every eval_every epochs
eval_prompts = None
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
# optimizer steps per epoch, each accumulating an equal share of the micro-batches (DiffusionNFT: 1)
opt_steps_per_epoch = 1
# train on the first floor(steps * 0.99) entries of a per-sample permutation of the grid
timestep_fraction = 0.99
beta = 1.0  # implicit-policy strength (0.1 for multi-reward)
adv_clip = 5.0
global_std = True  # normalise by the std of all rewards of the step (False: per group)
kl_beta = 1e-4  # beta_KL on mean (v_theta - v_ref)^2
lr = 3e-4
weight_decay = 1e-4
grad_clip = 1.0
lora_rank = 32
lora_alpha = 64
# old <- d*old + (1-d)*theta, d = min(rate * (step - flat), max), 0 before `flat` steps
old_decay_rate = 0.001
# DiffusionNFT's type 1 (GenEval, PickScore); its type 2 is flat 75, rate 0.0075, max 0.999
old_decay_max = 0.5
old_decay_flat = 0
ema_max = 0.9  # EMA decay min((1+s)/(10+s), ema_max)
# off: a micro-batch of 8 at 512 px keeps 16.6 GiB of activations for the backward on SD3.5-M (counted by
# bench.py), ~32 GiB with every weight resident: it fits an 80 GB GPU, and checkpointing would cost a fourth
# forward per training timestep. Turn it on for GPUs under ~48 GB (or lower train_batch).
grad_checkpointing = False
ckpt_every = 10  # epochs
eval_every = 10  # epochs
eval_G = 1  # noises per eval prompt
eval_steps = 40  # sampler steps of the evaluation (DiffusionNFT evaluates at 40 ...
eval_solver = "euler"  # ... with its deterministic first-order "flow" step, i.e. Euler)
shared_noise = False  # True: the K conditions of a group's noise g start from one x_1 (a paired design)
resume = False  # continue the run in out_dir from its checkpoint
overwrite = False  # replace a run that out_dir already holds (without resume or overwrite, the run refuses)
seed = 0
device = "auto"
# frozen transformer and text encoders: "auto" = bf16 on CUDA, fp32 on CPU; or float32 / bfloat16
dtype = "auto"
# the transformer under bf16 autocast (LoRA weights and the VAE stay fp32 regardless): None = wherever the
# frozen weights are bf16 (CUDA's default; a CPU with --dtype=bfloat16 runs the same path); True with
# --dtype=float32 is DiffusionNFT's fp32 weights with half-precision compute (every weight re-cast at every
# forward: slower)
amp = None
text_offload = False  # keep the text encoders on the CPU except while they encode (frees ~11 GB on SD3.5-M)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, dict, type(None)))]

LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
ADAPTERS = ("default", "old", "ema")  # theta (trained), the sampling policy, the evaluation copy
CKPT_DIRS = dict(zip(ADAPTERS, ("lora", "lora_old", "lora_ema")))  # their folders in a checkpoint


# ------------------------------------------------ the formulas (DiffusionNFT's objective, as its public code)
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


def nft_objective(v_theta, v_old, v_ref, x_t, x0, t, r, beta=1.0, adv_clip=5.0, kl_beta=1e-4):
    """DiffusionNFT's whole objective per sample [B], as its training step computes it:
        loss = nft_loss(v_theta, v_old, x_t, x0, t, r, beta) * adv_clip / beta
               + kl_beta * mean_CHW (v_theta - v_ref)^2
    averaged over the samples and training times of an optimizer step. Returns (loss, the nft term, the
    kl term before kl_beta), each [B]; v_ref=None (kl_beta = 0) drops the KL term."""
    nft = nft_loss(v_theta, v_old, x_t, x0, t, r, beta) * (adv_clip / beta)
    kl = (((v_theta - v_ref) ** 2).mean(dim=tuple(range(1, v_theta.dim()))) if v_ref is not None
          else torch.zeros_like(nft))
    return nft + kl_beta * kl, nft, kl


def group_stats(rewards, group_ids):
    """Mean over groups of the within-group reward std (ddof 0) - the signal whose collapse E²PO fights -
    and the fraction of groups whose std is below 1e-3."""
    std = group_moments(rewards.double(), group_ids)[2]
    return std.mean().item(), (std < 1e-3).float().mean().item()


def condition_stats(rewards, group_ids, k):
    """Where a group's variance comes from: the mean reward and the mean within-group std (ddof 0) of the
    samples drawn on C^orig (k = 0, keys *_k0) and of those drawn on a perturbation (k > 0, keys *_kp),
    each kind taken apart within every group. {} when there is no perturbed sample (K = 1)."""
    if not bool((k > 0).any()):
        return {}
    out = {}
    for name, sel in (("k0", k == 0), ("kp", k > 0)):
        R = rewards[sel].double()
        out[f"reward_{name}"] = R.mean().item()
        out[f"group_std_{name}"] = group_moments(R, group_ids[sel])[2].mean().item()
    return out


def paired_distance(x0, js, K, G):
    """With shared noise, how far each perturbed sample lands from the C^orig sample of its noise: the sum
    over pairs of mean |x0_k - x0_0| (latent elements) and the number of pairs, over the pairs whose two
    samples this rank holds (a group may span ranks). js: the global indices of the rows of x0."""
    rows = {j: n for n, j in enumerate(js)}
    pairs = [(n, rows[j - ((j // G) % K) * G]) for n, j in enumerate(js)
             if (j // G) % K > 0 and j - ((j // G) % K) * G in rows]
    if not pairs:
        return torch.zeros(2, dtype=torch.float64, device=x0.device)
    a, b = (torch.tensor(c, device=x0.device) for c in zip(*pairs))
    d = (x0[a] - x0[b]).abs().flatten(1).mean(1).double()
    return torch.stack([d.sum(), torch.tensor(float(len(pairs)), dtype=torch.float64, device=x0.device)])


def old_decay(step, rate=0.001, cap=0.5, flat=0):
    """d of the old-policy update old <- d * old + (1 - d) * theta after `step` optimizer steps:
        d = 0 while step < flat, else min(rate * (step - flat), cap)   (DiffusionNFT's decay types 1 and 2)"""
    return 0.0 if step < flat else min(rate * (step - flat), cap)


def ema_decay(step, cap=0.9):
    """e of the evaluation EMA, EMA <- e * EMA + (1 - e) * theta:  e = min((1 + step) / (10 + step), cap)"""
    return min((1 + step) / (10 + step), cap)


# ----------------------------------------------------------------------- LoRA adapters on the SD3 transformer
def add_adapters(transformer, rank, alpha):
    """Three LoRA adapters with one config (DiffusionNFT's: r 32, alpha 64, gaussian init): "default"
    (theta) is trained, "old" samples, "ema" evaluates. All start as copies of theta; lora_B = 0 at init,
    so all equal the base model."""
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


def lora_layers(transformer):
    """The transformer's LoRA layers, found once and kept on it: walking every module on each switch, as
    the model-level set_adapter does, cost ~30 ms a switch on SD3.5-M's 24 blocks (~6 ms this way)."""
    if "_lora_layers" not in transformer.__dict__:
        from peft.tuners.tuners_utils import BaseTunerLayer
        transformer.__dict__["_lora_layers"] = [m for m in transformer.modules()
                                                if isinstance(m, BaseTunerLayer)]
    return transformer.__dict__["_lora_layers"]


def use_adapter(transformer, name):
    """Run the transformer with adapter `name`, or with none (name=None: the base model, for v_ref). peft
    also makes the active adapter the only trainable one, so theta is trainable only while "default"
    is active: the other adapters and the base model are only ever run under no_grad, and every switch
    away is followed by use_adapter(transformer, "default") before a forward that needs gradients."""
    for m in lora_layers(transformer):
        if name is None:
            m.enable_adapters(False)
        else:
            if m.disable_adapters:
                m.enable_adapters(True)
            m.set_adapter(name)


def adapter_state(transformer, name):
    from peft.utils import get_peft_model_state_dict
    return {k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(transformer, adapter_name=name).items()}


def save_lora(transformer, name, path):
    """diffusers format: StableDiffusion3Pipeline.load_lora_weights(path) loads it in plain diffusers."""
    from diffusers import StableDiffusion3Pipeline
    # the adapter's LoraConfig travels as metadata: without it diffusers assumes lora_alpha = r
    # (scale 1, not alpha/r)
    StableDiffusion3Pipeline.save_lora_weights(
        path, transformer_lora_layers=adapter_state(transformer, name),
        transformer_lora_adapter_metadata=transformer.peft_config[name].to_dict())


def load_lora_into(transformer, name, path):
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file
    sd = load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    res = set_peft_model_state_dict(transformer, sd, adapter_name=name)
    if getattr(res, "unexpected_keys", None):
        raise SystemExit(f"LoRA in {path} does not match this model "
                         f"(unexpected keys like {res.unexpected_keys[0]})")


def ddp_theta(transformer, dev):
    """theta's DistributedDataParallel wrapper: its backward averages theta's gradients over ranks, and it
    starts every rank from rank 0's LoRA weights (all three adapters). The frozen base is left out of that
    start-up broadcast (every rank loaded it from the same files: 2.2 B parameters on SD3.5-M), and so are
    the buffers, which DDP would otherwise also re-send at every forward (SD3's pos_embed, 453 MB in bf16,
    never changes). peft's adapter switches go to the wrapped module directly."""
    frozen = ([n for n, _ in transformer.named_parameters() if "lora_" not in n]
              + [n for n, _ in transformer.named_buffers()])
    DDP._set_params_and_buffers_to_ignore_for_model(transformer, frozen)
    return DDP(transformer, device_ids=[dev.index] if dev.type == "cuda" else None)


def policy_velocities(transformer, x_t, t, c, with_ref=True, theta_model=None):
    """The three forwards of one training step on the same (x_t, t, condition): v_old (old adapter) and
    v_ref (adapters off: the base model, only when with_ref) without grad, then v_theta with grad,
    through `theta_model` when given (the DDP wrapper of `transformer`, whose backward averages theta's
    gradients over ranks). v_theta comes last: with gradient checkpointing the backward re-runs its
    forward, and it must find the trained adapter still active."""
    with torch.no_grad():
        use_adapter(transformer, "old")
        v_old = S.velocity(transformer, x_t, t, c).float()
        v_ref = None
        if with_ref:
            use_adapter(transformer, None)
            v_ref = S.velocity(transformer, x_t, t, c).float()
        use_adapter(transformer, "default")
    return v_old, v_ref, S.velocity(theta_model or transformer, x_t, t, c).float()


# ----------------------------------------------------------------------------- the E²PO group of each prompt
def epoch_samples(n_prompts, K, G, rank, n_local, draw):
    """This rank's share of the epoch's samples: one flat list of n_prompts * K * G samples, the same on
    every rank, in which sample j is noise g of condition k of the s-th prompt drawn this epoch:

        j = (s * K + k) * G + g        k = 0: C^orig;  k = 1 .. K-1: the Phase I perturbations of the prompt

    A group (one prompt: its K conditions x G noises) is K * G consecutive samples; rank r holds the
    contiguous slice j in [r * n_local, (r + 1) * n_local), so a group may span ranks (its rewards are
    gathered before normalisation). `draw` is the epoch's prompt indices, one per slot s.
    Returns (js, prompt index, k) of this rank's samples."""
    js = range(rank * n_local, (rank + 1) * n_local)
    return js, [draw[j // (K * G)] for j in js], [(j // G) % K for j in js]


def group_conditions(text, pert, prompt_list, idx, ks):
    """(C^orig, C^opt) per sample, each (prompt_embeds, pooled): the original condition of prompt idx[n],
    and the condition sample n is drawn from, C^orig for k = 0 and Phase I's perturbation k - 1 of the
    prompt for k >= 1. Each prompt is encoded on its own, so a prompt's condition is bit for bit the
    same whichever prompts share its GPU (1 and 8 GPUs sample the same images)."""
    uniq = sorted(set(idx))
    row = {i: n for n, i in enumerate(uniq)}
    orig = [torch.cat(c) for c in zip(*(S.encode(text, [prompt_list[i]]) for i in uniq))]
    c_orig = tuple(c[[row[i] for i in idx]] for c in orig)
    if pert is None or not any(ks):
        return c_orig, c_orig
    km1 = pert["K"] - 1  # perturbed_conditions gives K-1 rows per prompt
    opt = [torch.cat(c) for c in zip(*(S.perturbed_conditions(text, pert, prompt_list, [i]) for i in uniq))]
    c_opt = tuple(torch.stack([o[n] if k == 0 else p[row[i] * km1 + k - 1]
                               for n, (i, k) in enumerate(zip(idx, ks))])
                  for o, p in zip(c_orig, opt))
    return c_orig, c_opt


# ----------------------------------------------------------------------------- small helpers
# sample_seed(seed, epoch, j, STREAM) keys every random draw of sample j; the streams keep them apart
STREAM_NOISE, STREAM_TIMES, STREAM_EPS, STREAM_STEPS = 0, 1, 2, 3
EVAL_EPOCH = 10 ** 9  # the "epoch" of the fixed evaluation noises: no training epoch reaches it


def samples_per_rank(n_prompts, K, G, world, opt_steps):
    """An epoch's n_prompts * K * G samples are one flat list cut into `world` equal slices (a group may
    span ranks), and each slice gives every optimizer step the same number of samples (see
    `step_assignment`): N must be a multiple of world * opt_steps. Micro-batches then take train_batch
    samples at a time, the last of a step fewer, so any GPU count that divides the work runs the same
    samples and optimizer steps. On failure the message names a prompts_per_epoch that works."""
    N = n_prompts * K * G
    unit = world * opt_steps  # N must be a multiple of this
    if N % unit == 0:
        return N // world
    per_prompt = unit // math.gcd(K * G, unit)  # prompts_per_epoch must be a multiple of this
    raise SystemExit(f"prompts_per_epoch*K*G = {n_prompts}*{K}*{G} = {N} samples do not split over {world} "
                     f"GPUs x opt_steps_per_epoch={opt_steps} optimizer steps: use prompts_per_epoch="
                     f"{per_prompt * max(1, round(n_prompts / per_prompt))} (any multiple of {per_prompt})")


def sample_seed(*parts):
    """A 63-bit seed from (seed, epoch, index, stream, ...) by FNV-1a-style mixing: each sample's
    randomness is its own, so it does not depend on how samples are split over ranks, and a resumed run
    replays it exactly."""
    FNV_OFFSET, FNV_PRIME = 1469598103934665603, 1099511628211
    h = FNV_OFFSET
    for p in parts:
        h = ((h ^ int(p)) * FNV_PRIME) % (1 << 63)
    return h


def step_assignment(N, opt_steps, seed, epoch):
    """Which optimizer step trains each of the epoch's N samples, and in what order: a function of the
    global sample list alone, so the same samples share a step on 1 or 8 GPUs. Every block of
    `opt_steps` consecutive samples sends one member to each step (a random one, keyed by seed and
    epoch), so every rank's contiguous slice holds the same number of samples per step; within a step
    samples are visited in a random order. Returns (step [N], rank_key [N]): sort by rank_key."""
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, STREAM_STEPS))
    step = torch.argsort(torch.rand(N // opt_steps, opt_steps, generator=g), dim=1).reshape(-1)
    return step, torch.rand(N, generator=g)


def any_rank(flag, world, device):
    """True on every rank if `flag` is True on any rank (one tiny all-reduce): ranks decide to stop
    together."""
    if world == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_cat(x, world):
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def same_on_all_ranks(tensors, world):
    """Whether every rank holds bit-identical tensors (a float64 fingerprint per rank, all-gathered).
    Ranks that start from one set of adapters and apply the same DDP-averaged gradients stay identical;
    checked before every checkpoint, as a guard against ranks silently training different models."""
    if world == 1:
        return True
    w = torch.arange(1, sum(t.numel() for t in tensors) + 1, dtype=torch.float64, device=tensors[0].device)
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    fp = torch.stack([flat.sum(), (flat * w.sin()).sum()]).reshape(1, 2)
    every = all_gather_cat(fp, world)
    return bool((every == every[0]).all())


# ----------------------------------------------------------------------------- checkpoints and the run folder
# save_checkpoint writes `checkpoint.tmp`, moves `checkpoint` to `checkpoint.old`, moves the temp folder
# into place and removes `.old`; state.pt is written last, so a folder that holds it is complete.
def checkpoint_dirs(out):
    ck = os.path.join(out, "checkpoint")
    return ck, ck + ".tmp", ck + ".old"


def complete_checkpoint(out):
    """The folder of the last complete checkpoint in run folder `out`, wherever a kill inside
    save_checkpoint left it: the checkpoint, else a finished temp folder (killed before its rename),
    else `.old` (killed between the two renames). None if there is none."""
    for d in checkpoint_dirs(out):
        if os.path.isfile(os.path.join(d, "state.pt")):
            return d
    return None


def save_checkpoint(out, transformer, opt, state, cfg):
    """Written to a temp folder, then swapped in: a kill at any point leaves a complete checkpoint that
    `complete_checkpoint` finds."""
    ck, tmp, old = checkpoint_dirs(out)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, sub in CKPT_DIRS.items():
        save_lora(transformer, name, os.path.join(tmp, sub))
    S.write_json_atomic(os.path.join(tmp, "config.json"), cfg)
    torch.save({"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), **state},
               os.path.join(tmp, "state.pt"))
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(ck):
        os.replace(ck, old)
    os.replace(tmp, ck)
    shutil.rmtree(old, ignore_errors=True)


def check_run_folder(out, resume, overwrite):
    """Refuse, before anything is loaded or written, to start over a run without --resume or
    --overwrite, to resume without a checkpoint, or to write where we cannot."""
    found = complete_checkpoint(out)
    holds_run = found is not None or os.path.isfile(os.path.join(out, "log.jsonl"))
    if resume and found is None:
        raise SystemExit(f"--resume=True: no checkpoint in {out} (a run saves one every ckpt_every epochs)")
    if holds_run and not resume and not overwrite:
        raise SystemExit(f"{out} holds a run (log.jsonl or a checkpoint): pass --resume=True to continue it, "
                         "--overwrite=True to replace it, or another --out_dir")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):  # the nearest existing ancestor must be a writable folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise SystemExit(f"cannot write to out_dir {out}: {parent} is not a writable folder")


def restore_checkpoint(out):
    """Put the last complete checkpoint back in place if a kill left it as `.tmp` or `.old`, load its
    three adapters and the optimizer state; returns its folder."""
    ck = checkpoint_dirs(out)[0]
    found = complete_checkpoint(out)
    if found != ck:  # a kill inside save_checkpoint: move the complete copy into place (rank 0 only)
        shutil.rmtree(ck, ignore_errors=True)
        os.replace(found, ck)
    return ck


def load_checkpoint(ck, transformer, opt):
    try:
        for name, sub in CKPT_DIRS.items():
            load_lora_into(transformer, name, os.path.join(ck, sub))
        # load_state_dict moves it
        st = torch.load(os.path.join(ck, "state.pt"), map_location="cpu", weights_only=False)
        opt.load_state_dict(st["optimizer"])
    except SystemExit:
        raise
    except Exception as err:
        raise SystemExit(f"checkpoint {ck} cannot be read ({type(err).__name__}: {str(err)[:200]}): "
                         "it is damaged; restore it or start a new run with --overwrite=True")
    return st


def trim_log(path, last_epoch):
    """On resume, drop the log lines of epochs after the checkpoint (they are replayed), atomically."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["epoch"] <= last_epoch]
    S.write_text_atomic(path, "".join(keep))


def adapters_finite(transformer, x_t, t, c):
    """Whether every adapter's weights are finite and give a finite velocity on one training input: a
    step that diverged (e.g. a huge lr) can leave finite but enormous weights, which only a forward
    reveals. Checked before each checkpoint, so that a saved checkpoint is one that can resume."""
    ok = True
    with torch.no_grad():
        for name in ADAPTERS:
            ok &= all(bool(torch.isfinite(p).all()) for p in adapter_params(transformer, name))
            use_adapter(transformer, name)
            ok &= bool(torch.isfinite(S.velocity(transformer, x_t, t, c)).all())
    use_adapter(transformer, "default")
    return ok


def last_good(out):
    found = complete_checkpoint(out)
    return f"the last good checkpoint is {found}" if found else "no checkpoint was written"


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(transformer, vae, text, sigmas, prompt_list, metadata, reward_fn, shape, dev, autocast, rank,
             world, seed, G=1, batch=16, solver="euler", guidance=1.0, offload_text=False):
    """Mean reward of held-out prompts sampled with the EMA adapter from fixed noises (C^orig only),
    G noises per prompt, `batch` images per forward; the prompts are spread over ranks."""
    use_adapter(transformer, "ema")
    mine = list(range(rank, len(prompt_list), world))
    todo = [(i, g) for i in mine for g in range(G)]
    with S.text_on(text, dev, offload=offload_text):  # every condition first: the encoders move once
        conds = {i: S.encode(text, [prompt_list[i]]) for i in mine}
    scores = torch.zeros(len(prompt_list) * G, device=dev)
    for a in range(0, len(todo), batch):
        chunk = todo[a:a + batch]
        idx = [i for i, _ in chunk]
        c = tuple(torch.cat([conds[i][n] for i in idx]) for n in range(2))
        noise = S.image_noise([sample_seed(seed, EVAL_EPOCH, i, g) for i, g in chunk], shape, dev)
        with autocast():
            x0 = S.sample(transformer, sigmas, noise, c, None, guidance=guidance, solver=solver)
        R = reward_fn(S.decode(vae, x0), [prompt_list[i] for i in idx], [metadata[i] for i in idx])[0].float()
        scores[torch.tensor([i * G + g for i, g in chunk], device=dev)] = R.to(dev)
    if world > 1:
        dist.all_reduce(scores)
    use_adapter(transformer, "default")
    return scores.mean().item()


# ----------------------------------------------------------------------------- main
def main(argv=None):
    cfg = configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    # ---- check every setting before anything is loaded or written
    prompt_list, metadata = S.read_prompts(prompts)
    eval_list, eval_meta = S.read_prompts(eval_prompts) if eval_prompts else ([], [])
    if K < 1 or G < 1:
        raise SystemExit(f"K={K}, G={G}: both must be at least 1")
    S.check_rho(rho)
    if not beta > 0 or solver not in ("euler", "dpm2") or eval_solver not in ("euler", "dpm2"):
        raise SystemExit(f"beta={beta} must be > 0 and solver={solver!r}, eval_solver={eval_solver!r} "
                         f"one of 'euler', 'dpm2'")
    if amp not in (None, True, False):
        raise SystemExit(f"amp={amp!r} must be True, False or None (on wherever the frozen weights are bf16)")
    if train_batch < 1 or sample_batch < 1:
        raise SystemExit(f"train_batch={train_batch} and sample_batch={sample_batch} must be at least 1")
    n_train_t = math.floor(steps * timestep_fraction)
    if n_train_t < 1:
        raise SystemExit(f"steps={steps} x timestep_fraction={timestep_fraction} leaves no training timestep")
    world_env = int(os.environ.get("WORLD_SIZE", 1))  # known before the process group starts
    N = prompts_per_epoch * K * G  # samples per epoch over all ranks
    n_local = samples_per_rank(prompts_per_epoch, K, G, world_env, opt_steps_per_epoch)
    # unknown reward names stop here
    needs_meta = [n for n in RW.parse_spec(reward) if n in ("geneval", "shapes", "colour_share")]
    if needs_meta and not all(m.get("tag") for m in metadata):
        raise SystemExit(f"the {needs_meta[0]} reward needs GenEval metadata "
                         f"(.jsonl with 'tag' and 'include'); {prompts} has none: "
                         "make it with data/geneval/prepare.py (or data/shapes/prepare.py)")
    if "colour_share" in needs_meta and not all(any(c.get("color") for c in m["include"]) for m in metadata):
        raise SystemExit(f"the colour_share reward needs prompts that ask for a colour; {prompts} has some "
                         "that do not: use data/shapes/train_colors.jsonl")
    check_run_folder(out_dir, resume, overwrite)
    S.quiet()
    rank, world, dev, dt = S.setup_distributed(device, dtype)
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    log(config_summary(cfg))
    n_step = N // opt_steps_per_epoch  # samples per optimizer step, over all ranks
    log(f"epoch = {prompts_per_epoch} prompts x K={K} x G={G} = {N} samples ({n_local} per rank x {world}); "
        f"{opt_steps_per_epoch} optimizer step(s) of {n_step} samples, micro-batches of {train_batch}, "
        f"{n_train_t} training timesteps each")
    if prompts_per_epoch > len(prompt_list):
        log(f"note: prompts_per_epoch={prompts_per_epoch} > {len(prompt_list)} prompts: "
            f"each epoch draws prompts with replacement")
    # reward models in fp32 whatever the run's dtype: they are small next to SD3.5, and in bf16 PickScore's
    # logit_scale alone moves every score by 1 % and detector scores can cross GenEval's 0.3 / 0.9
    # thresholds, so a logged reward would differ from eval_diversity.py's (fp32) on the same image
    reward_fn = RW.build_reward(reward, dev, torch.float32, tiny=model == "tiny", opts=reward_opts)

    # ---- models: frozen SD3, three LoRA adapters on the transformer
    torch.manual_seed(seed)  # the same adapter init on every rank (and DDP broadcasts rank 0's below)
    pipe = S.load_pipeline(model, dev, dt)
    text = S.load_text(model, dev, dt, t5_len, pipe=pipe)
    pert = S.load_perturbations(perturbations, text, prompt_list, K) if K > 1 else None
    # where the text encoders are while they encode
    encoding = lambda: S.text_on(text, dev, offload=text_offload)
    if text_offload:
        text["encoders"] = {n: e.to("cpu") for n, e in text["encoders"].items()}
    transformer, vae = pipe.transformer, pipe.vae
    add_adapters(transformer, lora_rank, lora_alpha)
    if grad_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = adapter_params(transformer, "default")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    use_amp = dt == torch.bfloat16 if amp is None else amp
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    shape = S.latent_shape(pipe, resolution)
    sigmas = S.sigma_grid(pipe.scheduler, steps)  # shared by sampling and training
    eval_sigmas = S.sigma_grid(pipe.scheduler, eval_steps)
    log_path = os.path.join(out_dir, "log.jsonl")
    step, start_epoch = 0, 0
    if resume:
        ck = checkpoint_dirs(out_dir)[0]
        if master:
            restore_checkpoint(out_dir)
        if world > 1:
            dist.barrier()
        st = load_checkpoint(ck, transformer, opt)
        for group in opt.param_groups:  # the resumed run uses the settings it was given, not the saved ones
            group.update(lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
        torch.set_rng_state(st["rng"])
        step, start_epoch = st["step"], st["epoch"] + 1
        if master:
            trim_log(log_path, st["epoch"])
        log(f"resumed from {ck}: epoch {start_epoch}, step {step}")
    theta_model = transformer if world == 1 else ddp_theta(transformer, dev)
    torch.manual_seed(seed + rank)
    if master:
        os.makedirs(out_dir, exist_ok=True)
        # --overwrite=True: the earlier run's checkpoint goes now that the new one is ready to start
        if not resume:
            for d in checkpoint_dirs(out_dir):
                shutil.rmtree(d, ignore_errors=True)
        S.write_json_atomic(os.path.join(out_dir, "config.json"), cfg)
    logf = open(log_path, "a" if resume else "w") if master else None
    run_eval = lambda: evaluate(transformer, vae, text, eval_sigmas, eval_list, eval_meta, reward_fn, shape,
                                dev, autocast, rank, world, seed, G=eval_G, batch=sample_batch,
                                solver=eval_solver, guidance=guidance, offload_text=text_offload)
    # the held-out reward of the starting model (as DiffusionNFT evaluates at step 0)
    if eval_list and not resume:
        rec = {"epoch": -1, "step": 0, "eval_reward": run_eval()}
        log(f"before training | eval {rec['eval_reward']:.4f}")
        if master:
            logf.write(json.dumps(rec) + "\n")

    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        # ---- the epoch's groups: prompts_per_epoch prompts x K conditions x G noises, one flat list
        # over ranks
        g = torch.Generator().manual_seed(sample_seed(seed, epoch))
        draw = (torch.randperm(len(prompt_list), generator=g)[:prompts_per_epoch]
                if prompts_per_epoch <= len(prompt_list)
                else torch.randint(len(prompt_list), (prompts_per_epoch,), generator=g)).tolist()
        js, idx, ks = epoch_samples(prompts_per_epoch, K, G, rank, n_local, draw)
        with encoding():
            c_orig, c_opt = group_conditions(text, pert, prompt_list, idx, ks)

        # ---- E²PO change 1, the noise-aware schedule: variant k is sampled on
        #      C_k(t) = gamma(sigma_t) * C^opt_k + (1 - gamma(sigma_t)) * C^orig,
        # so the perturbation shapes the layout while sigma > 1 - rho and is gone before details are drawn
        # (use_schedule=False: a static C^opt_k, the paper's ablation).
        # k = 0 rows mix C^orig with itself: exact.
        def condition_at(sigma, b):
            opt_b, orig_b = tuple(c[b] for c in c_opt), tuple(c[b] for c in c_orig)
            return S.mix_condition(opt_b, orig_b, sigma, rho) if use_schedule else opt_b

        # ---- sample with the old policy, deterministic ODE (shared_noise: the K conditions of noise g of a
        # group start from one x_1, a paired design; otherwise every sample has its own)
        use_adapter(transformer, "old")
        noise_ids = [(j // (K * G)) * K * G + j % G if shared_noise else j for j in js]
        noise = S.image_noise([sample_seed(seed, epoch, j, STREAM_NOISE) for j in noise_ids], shape, dev)
        x0 = []
        for a in tqdm(range(0, n_local, sample_batch), desc=f"epoch {epoch} sample", disable=not S.bars(rank),
                      leave=False):
            b = slice(a, a + sample_batch)
            with autocast():
                x0.append(S.sample(transformer, sigmas, noise[b],
                                   cond_fn=lambda sigma: condition_at(sigma, b),
                                   guidance=guidance, solver=solver))
        x0 = torch.cat(x0).float()
        use_adapter(transformer, "default")
        t1 = time.time()

        # ---- rewards, gathered with group ids over ranks, normalised within groups. Scored in chunks of
        # sample_batch, so that a sample's reward does not depend on how many samples a rank holds
        R_local, parts = [], {}
        for a in range(0, n_local, sample_batch):
            sel = idx[a:a + sample_batch]
            total, per = reward_fn(S.decode(vae, x0[a:a + sample_batch]), [prompt_list[i] for i in sel],
                                   [metadata[i] for i in sel])
            R_local.append(total.float().to(dev))
            for n_, v_ in per.items():
                parts.setdefault(n_, []).append(v_.float().to(dev))
        R = all_gather_cat(torch.cat(R_local), world)
        parts = ({f"reward_{n}": all_gather_cat(torch.cat(v), world).mean().item()
                  for n, v in parts.items()} if len(parts) > 1 else {})
        gid = torch.arange(N, device=dev) // (K * G)  # the group (prompt slot) of every sample of the epoch
        if not torch.isfinite(R).all():  # R is the same on every rank: all stop here
            raise SystemExit(f"non-finite reward at epoch {epoch}; {last_good(out_dir)}" if master else 1)
        r_all = advantages(R, gid, global_std, adv_clip)
        r = r_all[rank * n_local:(rank + 1) * n_local]
        grp_std, collapsed = group_stats(R.cpu(), gid.cpu())
        # the k = 0 and k > 0 samples apart, and with shared noise how far a perturbation moves a sample
        by_k = condition_stats(R.cpu(), gid.cpu(), (torch.arange(N) // G) % K)
        if shared_noise and K > 1:
            dist_sum = paired_distance(x0, js, K, G)
            if world > 1:
                dist.all_reduce(dist_sum)
            by_k["dist_kp"] = (dist_sum[0] / dist_sum[1]).item() if dist_sum[1] > 0 else None
        t2 = time.time()

        # ---- train each sample at its own permutation of the sampler's time grid (the first n_train_t
        # entries), re-noised with a fresh eps; which samples share an optimizer step is keyed by the
        # global sample list (step_assignment)
        step_of, key = step_assignment(N, opt_steps_per_epoch, seed, epoch)
        step_of, key = step_of[js.start:js.stop], key[js.start:js.stop]
        sums = {k_: torch.zeros((), device=dev) for k_ in ("loss", "nft", "kl")}
        grad_norms = []
        transformer.train()
        for s in range(opt_steps_per_epoch):
            # local indices, in the step's order
            mine = [i for i in torch.argsort(key).tolist() if step_of[i] == s]
            micro = [mine[a:a + train_batch] for a in range(0, len(mine), train_batch)]
            for m, chunk in enumerate(tqdm(micro, desc=f"epoch {epoch} train {s}", disable=not S.bars(rank),
                                           leave=False)):
                jb = [js[i] for i in chunk]
                b = S.to_device(torch.tensor(chunk), dev)
                x0_b, r_b = x0[b], r[b]
                # the micro-batch's training times and their eps, drawn on the CPU from each sample's own
                # seeds and sent to the device in one copy each (not one per training time)
                perms = torch.stack([torch.randperm(steps, generator=torch.Generator().manual_seed(
                                         sample_seed(seed, epoch, j, STREAM_TIMES)))
                                     for j in jb])[:, :n_train_t]
                t_all = S.to_device(sigmas[perms], dev)  # [B, n_train_t]
                eps_all = S.to_device(torch.stack([torch.stack([
                    torch.randn(shape, generator=torch.Generator().manual_seed(
                        sample_seed(seed, epoch, j, STREAM_EPS, ti)))
                    for ti in range(n_train_t)]) for j in jb]), dev)  # [B, n_train_t, C, H, W]
                for ti in range(n_train_t):
                    t, eps = t_all[:, ti].contiguous(), eps_all[:, ti]
                    x_t = (1 - t.view(-1, 1, 1, 1)) * x0_b + t.view(-1, 1, 1, 1) * eps
                    # ---- E²PO change 2, reference-anchored training: every sample is trained on C^orig,
                    # whatever condition sampled it
                    # (use_anchor=False: on that condition at this t, the ablation)
                    c = tuple(q[b] for q in c_orig) if use_anchor else condition_at(t, b)
                    # gradients accumulate over the step's micro-batches and times; DDP averages them over
                    # ranks in the step's last backward only (no_sync before it)
                    last = m == len(micro) - 1 and ti == n_train_t - 1
                    with autocast(), (contextlib.nullcontext() if world == 1 or last
                                      else theta_model.no_sync()):
                        v_old, v_ref, v_theta = policy_velocities(
                            transformer, x_t, t, c, with_ref=kl_beta > 0, theta_model=theta_model)
                        loss, nft, kl = nft_objective(v_theta, v_old, v_ref, x_t, x0_b, t, r_b,
                                                      beta, adv_clip, kl_beta)
                        # each sample weighs 1/len(mine) in its rank's step (the same count on every rank);
                        # averaged over ranks, this is DiffusionNFT's mean over the step's samples and times
                        (loss.sum() / (len(mine) * n_train_t)).backward()
                    for k_, v_ in (("loss", loss), ("nft", nft), ("kl", kl)):
                        sums[k_] += v_.detach().sum() / (n_local * n_train_t)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if not torch.isfinite(grad_norm):  # the gradients are averaged over ranks: every rank sees it
                raise SystemExit(f"non-finite loss or gradient at epoch {epoch}, step {step + 1}; "
                                 f"{last_good(out_dir)}" if master else 1)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            grad_norms.append(grad_norm.item())
            # EMA of theta, for eval and checkpoints
            blend_adapter(transformer, "ema", "default", ema_decay(step, ema_max))
        transformer.eval()
        # ---- the sampling policy follows theta once per epoch: old <- d*old + (1-d)*theta
        blend_adapter(transformer, "old", "default",
                      old_decay(step, old_decay_rate, old_decay_max, old_decay_flat))
        t3 = time.time()

        # ---- log: rank 0 prints one line and appends to log.jsonl
        tot = torch.stack([sums[k_] for k_ in ("loss", "nft", "kl")])
        if world > 1:
            dist.all_reduce(tot)
            tot /= world
        rec = {"epoch": epoch, "step": step,
               "reward_mean": R.mean().item(), "reward_std": R.std(unbiased=False).item(),
               "group_std": grp_std, "collapsed_groups": collapsed, **by_k, **parts,
               **dict(zip(("loss", "nft", "kl"), tot.tolist())),
               "grad_norm": sum(grad_norms) / len(grad_norms),
               "time_sample": t1 - t0, "time_reward": t2 - t1, "time_train": t3 - t2,
               "img_per_s": N / (t3 - t0)}
        if eval_list and (epoch + 1) % eval_every == 0:
            rec["eval_reward"] = run_eval()
        log(f"epoch {epoch} step {step} | reward {rec['reward_mean']:.4f} | group std {grp_std:.4f} "
            f"(collapsed {collapsed:.0%}) | loss {rec['loss']:.4f} nft {rec['nft']:.4f} kl {rec['kl']:.2e} | "
            f"sample {t1 - t0:.1f}s reward {t2 - t1:.1f}s train {t3 - t2:.1f}s | {rec['img_per_s']:.2f} img/s"
            + (f" | k=0/k>0 reward {rec['reward_k0']:.3f}/{rec['reward_kp']:.3f} "
               f"std {rec['group_std_k0']:.3f}/{rec['group_std_kp']:.3f}" if by_k else "")
            + (f" | eval {rec['eval_reward']:.4f}" if "eval_reward" in rec else ""))
        if master:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
        if (epoch + 1) % ckpt_every == 0 or epoch + 1 == epochs:
            # a checkpoint must be one that can resume: every adapter finite and giving finite outputs
            if any_rank(not adapters_finite(transformer, x_t[:1], t[:1], tuple(q[:1] for q in c)),
                        world, dev):
                raise SystemExit(f"the weights after epoch {epoch} (step {step}) give non-finite outputs: "
                                 f"training diverged (try a lower --lr); "
                                 f"not saved, {last_good(out_dir)}" if master else 1)
            if not same_on_all_ranks([p for a in ADAPTERS for p in adapter_params(transformer, a)], world):
                raise SystemExit(f"the LoRA adapters differ between ranks at epoch {epoch}: a bug; not saved"
                                 if master else 1)
            if master:
                save_checkpoint(out_dir, transformer, opt, {"step": step, "epoch": epoch}, cfg)
        if world > 1:
            dist.barrier()
    if master:
        logf.close()
        log(f"done: LoRA (theta, old, EMA) in {out_dir}/checkpoint/lora, lora_old, lora_ema; "
            f"log in {log_path}")


if __name__ == "__main__":
    main()
