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

The file reads top to bottom: config; the formulas (`advantages`, `nft_loss`, `nft_objective`); the LoRA
adapters; the E²PO group of a prompt; the per-sample seeds that make 1 and 8 GPUs see the same samples; the
run folder and checkpoints; the stages of an epoch (`rollouts`: E²PO change 1, `score`, `train`: E²PO
change 2, `evaluate`); and `main()`, which is the README's diagram: settings -> models -> per epoch
{sample with the old policy, reward, advantages, train theta, old <- theta, log} -> checkpoints.
"""
import contextlib
import json
import math
import os
import shutil
import sys
import time
from types import SimpleNamespace

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
# also log to Weights & Biases (pip install wandb): the scalars of log.jsonl, each epoch's reward histogram
# and each evaluation's grid; WANDB_MODE=offline writes it under out_dir/wandb with no account or network
wandb_log = False
wandb_project = "e2po"
wandb_run_name = None  # None: out_dir's name
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, dict, type(None)))]

# The settings a resumed run may change: the optimizer's step sizes, how long it runs, how it evaluates and
# saves, and how the work is laid out on the machine. Every other setting (the model, the prompts, the reward,
# K, G, the LoRA's rank and alpha, the sampler, the resolution, the objective, the seed, ...) defines what the
# checkpoint was trained to do: a resume that changes one stops and names it (check_resume).
RESUME_HONOURED = ("lr", "weight_decay", "grad_clip", "epochs", "ckpt_every", "eval_every", "eval_prompts",
                   "eval_G", "eval_steps", "eval_solver", "sample_batch", "train_batch", "grad_checkpointing",
                   "device", "dtype", "amp", "text_offload", "wandb_log", "wandb_project", "wandb_run_name",
                   "perturbations", "out_dir", "resume", "overwrite")

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


def group_advantages(rewards, group_ids, global_std=True):
    """Rewards [N] -> the group-normalised advantages A [N] that both objectives take:
        A = (R - mean_group(R)) / (std(R) + 1e-4)   std over all N (global_std) or within the group; ddof 0
    (Flow-GRPO's PerPromptStatTracker gives the same, a group being a prompt's samples)."""
    R = rewards.float()
    gid, mean, group_std = group_moments(R, group_ids)
    std = R.std(unbiased=False) if global_std else group_std[gid]
    return (R - mean[gid]) / (std + 1e-4)


def optimality(A, clip=5.0):
    """DiffusionNFT's optimality probability r in [0, 1] of an advantage:
        r = clip(clip(A, -clip, clip) / (2 * clip) + 0.5, 0, 1)     (= A/10 + 0.5 for clip = 5)"""
    return (A.clamp(-clip, clip) / (2 * clip) + 0.5).clamp(0, 1)


def advantages(rewards, group_ids, global_std=True, clip=5.0):
    """Rewards [N] -> optimality probabilities r in [0, 1]: optimality(group_advantages(...), clip)."""
    return optimality(group_advantages(rewards, group_ids, global_std), clip)


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


# --------------------------------------------------- the formulas of Flow-GRPO's objective (objective="grpo")
def grpo_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max):
    """Flow-GRPO's PPO-clip policy loss (scalar), as its training step computes it:
        rho = exp(log_prob - old_log_prob)          A = clip(advantages, -adv_clip_max, adv_clip_max)
        loss = mean over samples of max(-A * rho, -A * clip(rho, 1 - clip_range, 1 + clip_range))
    log_prob: sample.sde_step's of the stored transition under theta (carries the gradient); old_log_prob:
    the sampling weights' (data). A sample with A = 0 adds exactly 0."""
    A = advantages.clamp(-adv_clip_max, adv_clip_max)
    rho = torch.exp(log_prob - old_log_prob.detach())
    return torch.maximum(-A * rho, -A * rho.clamp(1 - clip_range, 1 + clip_range)).mean()


def grpo_kl(mean, mean_ref, s_t):
    """Flow-GRPO's KL term per sample [B], between the SDE step of theta and of the frozen base:
        kl = mean over all but the batch dimension of (mean - mean_ref)^2 / (2 s_t^2)
    s_t as sample.sde_step returns it (the Gaussians' own variance is s_t^2 |dt|: this is their KL times
    1/|dt|, as Flow-GRPO writes it)."""
    return ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.dim()))) / (2 * s_t.reshape(-1) ** 2)


def grpo_weights(A, step_of, opt_steps):
    """Flow-GRPO trains only on the samples whose advantage is not 0 (a group whose rewards tie gives all its
    samples A = 0). Per sample keep = [A != 0]; per optimizer step scale = its samples / its kept samples, so
    that the step's loss, a mean over its samples, is the mean over the kept ones. step_of: each sample's
    step (all the epoch's samples). Returns (keep [N] float, scale [opt_steps] list, kept samples in all)."""
    keep = (A != 0).float()
    per_step = lambda w: torch.zeros(opt_steps).index_add_(0, step_of.cpu(), w.cpu())
    kept = per_step(keep)
    return keep, (per_step(torch.ones_like(keep)) / kept.clamp(min=1)).tolist(), int(kept.sum().item())


def ratio_stats(log_prob, old_log_prob, clip_range):
    """Per sample [B]: whether the ratio was clipped, |rho - 1| > clip_range (Flow-GRPO's clipfrac), its
    approx_kl 0.5 * (log_prob - old_log_prob)^2, and (rho - 1)^2 (the ratio's spread about 1)."""
    d = (log_prob - old_log_prob).detach()
    return (torch.exp(d) - 1).abs().gt(clip_range).float(), 0.5 * d ** 2, torch.expm1(d) ** 2


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


# ---------------------------------------------------- reproducibility: 1 GPU and 8 GPUs see the same samples
# Every random draw of sample j of an epoch (its noise, its training times, their eps) comes from its own
# generator seeded by sample_seed(seed, epoch, j, STREAM), the prompts of an epoch and its optimizer steps
# from (seed, epoch) alone: which GPU holds a sample changes nothing, and a resumed run replays exactly.
STREAM_NOISE, STREAM_TIMES, STREAM_EPS, STREAM_STEPS = 0, 1, 2, 3
EVAL_EPOCH = 10 ** 9  # the "epoch" of the fixed evaluation noises: no training epoch reaches it
GRID_PROMPTS, GRID_NOISES = 8, 4  # the evaluation grid: these held-out prompts x noises


def sample_seed(*parts):
    """A 63-bit seed from (seed, epoch, index, stream, ...) by FNV-1a-style mixing."""
    FNV_OFFSET, FNV_PRIME = 1469598103934665603, 1099511628211
    h = FNV_OFFSET
    for p in parts:
        h = ((h ^ int(p)) * FNV_PRIME) % (1 << 63)
    return h


def draw_prompts(epoch, n_prompts):
    """The epoch's prompt indices, one per group: without replacement when the file holds enough."""
    g = torch.Generator().manual_seed(sample_seed(seed, epoch))
    return (torch.randperm(n_prompts, generator=g)[:prompts_per_epoch] if prompts_per_epoch <= n_prompts
            else torch.randint(n_prompts, (prompts_per_epoch,), generator=g)).tolist()


def training_draws(epoch, jb, sigmas, shape, n_t, dev):
    """The training times of samples jb (the first n_t entries of a per-sample permutation of the sampler's
    grid) and the eps of each, drawn on the CPU and sent to the device in one copy each:
    t [B, n_t], eps [B, n_t, C, H, W]."""
    gen = lambda *k: torch.Generator().manual_seed(sample_seed(seed, epoch, *k))
    perms = torch.stack([torch.randperm(steps, generator=gen(j, STREAM_TIMES)) for j in jb])[:, :n_t]
    eps = torch.stack([torch.stack([torch.randn(shape, generator=gen(j, STREAM_EPS, ti))
                                    for ti in range(n_t)]) for j in jb])
    return S.to_device(sigmas[perms], dev), S.to_device(eps, dev)


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


def step_assignment(N, opt_steps, seed, epoch):
    """Which optimizer step trains each of the epoch's N samples, and in what order: a function of the
    global sample list alone, so the same samples share a step on 1 or 8 GPUs. Every block of
    `opt_steps` consecutive samples sends one member to each step (a random one, keyed by seed and
    epoch), so every rank's contiguous slice holds the same number of samples per step; within a step
    samples are visited in a random order. Returns (step [N], rank_key [N]): sort by rank_key."""
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, STREAM_STEPS))
    step = torch.argsort(torch.rand(N // opt_steps, opt_steps, generator=g), dim=1).reshape(-1)
    return step, torch.rand(N, generator=g)



# ----------------------------------------------------------------------------- distributed helpers
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


def run_inputs():
    """{what: path} of this run's inputs on disk: a new run never removes one of them."""
    import glob
    pert = (perturbations if os.path.exists(perturbations)
            else next(iter(sorted(glob.glob(S.shard_glob(perturbations)))), None))
    found = {"the prompt file": prompts, "the held-out prompt file": eval_prompts, "the model": model,
             "the perturbation file": pert}
    found.update({f"the {name} reward's {k}": v for name, o in reward_opts.items()
                  for k, v in dict(o).items()})
    return {k: v for k, v in found.items()
            if isinstance(v, str) and v and os.path.exists(os.path.expanduser(v))}


def check_run_folder(out, cfg, prompt_list):
    """What this run would do to out_dir, refused before anything loads or is written: start over a run
    without --resume or --overwrite, resume without a checkpoint or with settings that change what it means,
    both at once, or remove one of its own inputs. Returns the settings a resume changes (RESUME_HONOURED)."""
    if resume and overwrite:
        raise SystemExit("--resume=True continues the run in out_dir and --overwrite=True replaces it: "
                         "pass one of them")
    found = complete_checkpoint(out)
    log = os.path.join(out, "log.jsonl")
    # a log with lines, or a checkpoint (a run that stopped before its first line left nothing to keep)
    holds_run = found is not None or (os.path.isfile(log) and os.path.getsize(log) > 0)
    if resume and found is None:
        raise SystemExit(f"--resume=True: no checkpoint in {out} (a run saves one every ckpt_every epochs)")
    if holds_run and not resume and not overwrite:
        raise SystemExit(f"{out} holds a run (log.jsonl or a checkpoint): pass --resume=True to continue it, "
                         "--overwrite=True to replace it, or another --out_dir")
    if resume:  # the log read now (its broken lines named before anything loads), the honoured changes
        log_records(log, say=lambda note: None)  # trim_log says it, once
        return check_resume(found, cfg, prompt_list)
    # a new run removes an earlier run's checkpoint, evaluation grids and log (start_run)
    S.check_keeps_inputs([*checkpoint_dirs(out), *(os.path.join(out, f) for f in ("evals", "log.jsonl"))],
                         run_inputs(), "--overwrite=True" if holds_run else "a new run in this out_dir")
    return []


def check_resume(ck, cfg, prompt_list):
    """A resume continues what checkpoint `ck` was trained to do: every setting outside RESUME_HONOURED must
    be the checkpoint's (the model and the prompts compared by what they are, not by how they are spelled),
    and the run must have epochs left. One sentence naming each setting that differs and both values."""
    try:
        with open(os.path.join(ck, "config.json"), encoding="utf-8") as f:
            saved = json.load(f)
        st = torch.load(os.path.join(ck, "state.pt"), map_location="cpu", weights_only=False)
        done = st["epoch"] + 1
    except Exception as err:
        raise SystemExit(f"checkpoint {ck} cannot be read ({type(err).__name__}: {str(err)[:200]}): it is "
                         "damaged; restore it from a copy, or start a new run in another --out_dir")
    norm = lambda v: json.loads(json.dumps(v, default=str))  # tuples as lists, as config.json holds them
    differ = []
    for k, v in cfg.items():
        if k in RESUME_HONOURED or k not in saved:
            continue
        if k == "model":
            same = S.same_model(v, saved[k])
        elif k == "prompts" and "prompts_sha256" in st:
            same = st["prompts_sha256"] == S.prompts_hash(prompt_list)
        else:
            same = norm(v) == saved[k]
        if not same:
            differ.append(f"{k}={v!r} (the checkpoint's: {saved[k]!r})")
    if differ:
        verb = "differs" if len(differ) == 1 else "differ"
        raise SystemExit(f"--resume=True: {', '.join(differ)} {verb} from the settings checkpoint {ck} was "
                         "trained with, which define what it was trained to do: resume with the checkpoint's "
                         "values, or start a new run in another --out_dir")
    if done >= epochs:
        raise SystemExit(f"--resume=True: the checkpoint in {ck} has done {done} epochs of "
                         f"--epochs={epochs}: pass --epochs above {done} to train on")
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in cfg.items() if k in RESUME_HONOURED and k in saved
            and norm(v) != saved[k] and k not in ("resume", "overwrite", "out_dir")]


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
        raise SystemExit(f"checkpoint {ck} cannot be read ({type(err).__name__}: {str(err)[:200]}): it is "
                         "damaged; restore it from a copy, or start a new run in another --out_dir")
    return st


def log_records(path, say=print):
    """The records of a run's log.jsonl, each named by its line when it is broken or has no epoch; a last
    line cut short by a kill is left out, with a note to `say` (it belongs to an epoch after the last
    checkpoint)."""
    if not os.path.isfile(path):
        return []
    rows = S.read_jsonl(path, "two runs wrote this out_dir at once, or it was edited: fix or delete that "
                        "line, then resume", torn_tail=True, say=say)
    for n, r in rows:
        if not isinstance(r, dict) or not isinstance(r.get("epoch"), int):
            raise SystemExit(f"{path} line {n} has no integer 'epoch': fix or delete that line, then resume")
    return [r for _, r in rows]


def trim_log(path, last_epoch):
    """On resume, drop the log lines of epochs after the checkpoint (they are replayed), atomically."""
    if os.path.isfile(path):
        S.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in log_records(path)
                                          if r["epoch"] <= last_epoch))


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


def start_run(run, cfg):
    """The run folder: resumed from its last complete checkpoint (--resume=True: the adapters, the optimizer
    and the RNG state; the log trimmed to that epoch) or started anew (--overwrite=True removes an earlier
    run's checkpoint now that this one is ready). Returns (optimizer steps done, first epoch, log file)."""
    log_path = os.path.join(out_dir, "log.jsonl")
    step, start_epoch = 0, 0
    if resume:
        ck = checkpoint_dirs(out_dir)[0]
        if run.master:
            restore_checkpoint(out_dir)
        if run.world > 1:
            dist.barrier()
        st = load_checkpoint(ck, run.transformer, run.opt)
        for group in run.opt.param_groups:  # the settings this run is given, not the saved ones
            group.update(lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
        torch.set_rng_state(st["rng"])
        step, start_epoch = st["step"], st["epoch"] + 1
        if run.master:
            trim_log(log_path, st["epoch"])
        run.log(f"resumed from {ck}: epoch {start_epoch}, step {step}")
    if not run.master:
        return step, start_epoch, None
    os.makedirs(out_dir, exist_ok=True)
    if not resume:  # the earlier run's checkpoint and evaluation grids
        for d in (*checkpoint_dirs(out_dir), os.path.join(out_dir, "evals")):
            shutil.rmtree(d, ignore_errors=True)
    S.write_json_atomic(os.path.join(out_dir, "config.json"), cfg)
    return step, start_epoch, open(log_path, "a" if resume else "w")


def checkpoint(run, epoch, step, probe, cfg):
    """Save a checkpoint that can resume: every adapter finite and giving finite outputs on one training
    input (`probe`: a step that diverged can leave finite but enormous weights), and the same adapters on
    every rank (the guard against ranks silently training different models)."""
    if any_rank(not adapters_finite(run.transformer, *probe), run.world, run.dev):
        raise SystemExit(f"the weights after epoch {epoch} (step {step}) give non-finite outputs: training "
                         f"diverged (try a lower --lr); not saved, {last_good(out_dir)}")
    if not same_on_all_ranks([p for a in ADAPTERS for p in adapter_params(run.transformer, a)], run.world):
        raise SystemExit(f"the LoRA adapters differ between ranks at epoch {epoch}: a bug; not saved")
    if run.master:
        # the prompts' hash: a resume compares what they are, wherever the file has moved (check_resume)
        state = {"step": step, "epoch": epoch, "prompts_sha256": S.prompts_hash(run.prompt_list)}
        save_checkpoint(out_dir, run.transformer, run.opt, state, cfg)


# ----------------------------------------------------------------------------- the stages of an epoch
def rollouts(run, epoch, js, c_orig, c_opt):
    """The epoch's samples js drawn with the old policy by the deterministic ODE: x0 latents (fp32). Each
    starts from its own seeded noise (shared_noise: the K conditions of a group's noise g from one x_1, a
    paired design)."""
    use_adapter(run.transformer, "old")
    noise_ids = [(j // (K * G)) * K * G + j % G if shared_noise else j for j in js]
    noise = S.image_noise([sample_seed(seed, epoch, j, STREAM_NOISE) for j in noise_ids], run.shape, run.dev)
    x0 = []
    for a in tqdm(range(0, len(js), sample_batch), desc=f"epoch {epoch} sample", disable=not S.bars(run.rank),
                  leave=False):
        b = slice(a, a + sample_batch)
        orig_b, opt_b = tuple(c[b] for c in c_orig), tuple(c[b] for c in c_opt)
        # ---- E²PO change 1, the noise-aware schedule: S.sample draws sample i on
        #      C_i(t) = gamma(sigma_t) * C^opt_i + (1 - gamma(sigma_t)) * C^orig_i   (S.mix_condition)
        # at every step, so the perturbation shapes the layout while sigma > 1 - rho and is gone before
        # details are drawn; k = 0 rows mix C^orig with itself, exactly. use_schedule=False: the static
        # C^opt_i at every step, the paper's ablation.
        cond = (orig_b, opt_b) if use_schedule else (opt_b, None)
        with run.autocast():
            x0.append(S.sample(run.transformer, run.sigmas, noise[b], *cond, rho=rho, guidance=guidance,
                               solver=solver))
    use_adapter(run.transformer, "default")
    return torch.cat(x0).float()


def score(run, epoch, x0, idx):
    """The rewards of all the epoch's samples [N], gathered over ranks, and the mean of each reward of a
    weighted sum. Scored in chunks of sample_batch, so that a sample's reward does not depend on how many
    samples its GPU holds."""
    R, parts = [], {}
    for a in range(0, len(idx), sample_batch):
        sel = idx[a:a + sample_batch]
        total, per = run.reward_fn(S.decode(run.vae, x0[a:a + sample_batch]),
                                   [run.prompt_list[i] for i in sel], [run.metadata[i] for i in sel])
        R.append(total.float().to(run.dev))
        for n, v in per.items():
            parts.setdefault(n, []).append(v.float().to(run.dev))
    R = all_gather_cat(torch.cat(R), run.world)
    if not torch.isfinite(R).all():  # R is the same on every rank: all stop here
        raise SystemExit(f"non-finite reward at epoch {epoch}; {last_good(out_dir)}")
    return R, ({f"reward_{n}": all_gather_cat(torch.cat(v), run.world).mean().item()
                for n, v in parts.items()} if len(parts) > 1 else {})


def train(run, epoch, step, js, x0, r, c_orig, c_opt):
    """The epoch's optimizer steps on the samples js (x0, r). Each sample is trained at its own training times
    (`training_draws`), re-noised with a fresh eps; which samples share a step is keyed by the global sample
    list (`step_assignment`). Returns (steps done, the mean loss terms, the mean gradient norm, one training
    input for the checkpoint's check)."""
    step_of, key = step_assignment(len(js) * run.world, opt_steps_per_epoch, seed, epoch)
    step_of, key = step_of[js.start:js.stop], key[js.start:js.stop]
    sums, grad_norms, n_t = torch.zeros(3, device=run.dev), [], run.n_train_t
    run.transformer.train()
    for s in range(opt_steps_per_epoch):
        mine = [i for i in torch.argsort(key).tolist() if step_of[i] == s]  # local indices, in step order
        micro = [mine[a:a + train_batch] for a in range(0, len(mine), train_batch)]
        for m, chunk in enumerate(tqdm(micro, desc=f"epoch {epoch} train {s}", disable=not S.bars(run.rank),
                                       leave=False)):
            b = S.to_device(torch.tensor(chunk), run.dev)
            x0_b, r_b, orig_b, opt_b = x0[b], r[b], tuple(q[b] for q in c_orig), tuple(q[b] for q in c_opt)
            t_all, eps_all = training_draws(epoch, [js[i] for i in chunk], run.sigmas, run.shape, n_t,
                                            run.dev)
            for ti in range(n_t):
                t, eps = t_all[:, ti].contiguous(), eps_all[:, ti]
                x_t = (1 - t.view(-1, 1, 1, 1)) * x0_b + t.view(-1, 1, 1, 1) * eps
                # ---- E²PO change 2, reference-anchored training: every sample is trained on C^orig, whatever
                # condition sampled it (use_anchor=False: on that condition at this t, the ablation)
                c = (orig_b if use_anchor else S.mix_condition(opt_b, orig_b, t, rho) if use_schedule
                     else opt_b)
                # gradients accumulate over the step's micro-batches and times; DDP averages them over ranks
                # in the step's last backward only (no_sync before it)
                last = m == len(micro) - 1 and ti == n_t - 1
                with run.autocast(), (contextlib.nullcontext() if run.world == 1 or last
                                      else run.theta_model.no_sync()):
                    v_old, v_ref, v_theta = policy_velocities(
                        run.transformer, x_t, t, c, with_ref=kl_beta > 0, theta_model=run.theta_model)
                    loss, nft, kl = nft_objective(v_theta, v_old, v_ref, x_t, x0_b, t, r_b, beta, adv_clip,
                                                  kl_beta)
                    # each sample weighs 1/len(mine) in its rank's step (the same count on every rank);
                    # averaged over ranks, this is DiffusionNFT's mean over the step's samples and times
                    (loss.sum() / (len(mine) * n_t)).backward()
                sums += torch.stack([v.detach().sum() for v in (loss, nft, kl)]) / (len(js) * n_t)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, grad_clip)
        if not torch.isfinite(grad_norm):  # the gradients are averaged over ranks: every rank sees it
            raise SystemExit(f"non-finite loss or gradient at epoch {epoch}, step {step + 1}; "
                             f"{last_good(out_dir)}")
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        step += 1
        grad_norms.append(grad_norm.item())
        blend_adapter(run.transformer, "ema", "default", ema_decay(step, ema_max))  # for eval and checkpoints
    run.transformer.eval()
    if run.world > 1:
        dist.all_reduce(sums)
        sums /= run.world
    return (step, dict(zip(("loss", "nft", "kl"), sums.tolist())), sum(grad_norms) / len(grad_norms),
            (x_t[:1], t[:1], tuple(q[:1] for q in c)))


@torch.no_grad()
def evaluate(run, prompt_list, metadata, step):
    """Mean reward of held-out prompts sampled with the EMA adapter from fixed noises (C^orig only), eval_G
    noises a prompt, sample_batch images a forward; the prompts are spread over ranks. Rank 0 also writes
    OUT/evals/step_<step>.png: the first GRID_PROMPTS prompts x GRID_NOISES noises, each image captioned
    with its reward, the same noises at every evaluation, so a user can watch the images change. Returns
    (mean reward, the grid's path on rank 0, else None)."""
    use_adapter(run.transformer, "ema")
    shown = {(i, g) for i in range(min(GRID_PROMPTS, len(prompt_list)))
             for g in range(min(GRID_NOISES, eval_G))}
    pictures = []
    mine = list(range(run.rank, len(prompt_list), run.world))
    todo = [(i, g) for i in mine for g in range(eval_G)]
    with S.text_on(run.text, run.dev, offload=text_offload):  # every condition first: the encoders move once
        conds = {i: S.encode(run.text, [prompt_list[i]]) for i in mine}
    scores = torch.zeros(len(prompt_list) * eval_G, device=run.dev)
    for a in range(0, len(todo), sample_batch):
        chunk = todo[a:a + sample_batch]
        idx = [i for i, _ in chunk]
        c = tuple(torch.cat([conds[i][n] for i in idx]) for n in range(2))
        noise = S.image_noise([sample_seed(seed, EVAL_EPOCH, i, g) for i, g in chunk], run.shape, run.dev)
        with run.autocast():
            x0 = S.sample(run.transformer, run.eval_sigmas, noise, c, guidance=guidance, solver=eval_solver)
        images = S.decode(run.vae, x0)
        R = run.reward_fn(images, [prompt_list[i] for i in idx], [metadata[i] for i in idx])[0].float()
        scores[torch.tensor([i * eval_G + g for i, g in chunk], device=run.dev)] = R.to(run.dev)
        pictures += [(i, g, (im.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8"), r)
                     for (i, g), im, r in zip(chunk, images, R.tolist()) if (i, g) in shown]
    if run.world > 1:
        dist.all_reduce(scores)
        every = [None] * run.world
        dist.all_gather_object(every, pictures)  # a few small images, to rank 0's grid
        pictures = [p for part in every for p in part]
    use_adapter(run.transformer, "default")
    path = None
    if run.master and pictures:
        path = os.path.join(out_dir, "evals", f"step_{step:06d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        by_prompt = {}
        for i, g, im, r in sorted(pictures, key=lambda p: p[:2]):
            by_prompt.setdefault(i, []).append((im, f"{r:.3f}"))
        S.captioned_grid([(prompt_list[i], row) for i, row in by_prompt.items()], path)
    return scores.mean().item(), path


def start_tracking(cfg):
    """A Weights & Biases run (rank 0, wandb_log=True) holding the run's config."""
    import wandb
    return wandb.init(project=wandb_project, config=cfg, dir=out_dir,
                      name=wandb_run_name or os.path.basename(os.path.abspath(out_dir)))


def track(tracker, rec, R=None, grid=None):
    """One log.jsonl record to the tracker at its optimizer step: its numbers, the histogram of the epoch's
    rewards and the evaluation grid."""
    if tracker is None:
        return
    import wandb
    logged = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
    if R is not None:
        logged["reward_hist"] = wandb.Histogram(R.cpu().numpy())
    if grid:
        logged["eval_grid"] = wandb.Image(grid)
    tracker.log(logged, step=rec["step"])


def reward_log(run, resume_epoch):
    """OUT/rewards.jsonl, beside log.jsonl: every epoch's rewards, one per sample in the epoch's sample order
    (sample j is noise j % G of condition (j // G) % K of group j // (K G), whose prompt is prompts[group]),
    so that group statistics at any n can be recomputed from the logs. Trimmed like log.jsonl on resume."""
    if not run.master:
        return None
    path = os.path.join(out_dir, "rewards.jsonl")
    if resume:
        trim_log(path, resume_epoch)
    return open(path, "a" if resume else "w")


def first_and_last_grid():
    """OUT/evals/first_vs_last.png: the first and the last evaluation grids side by side."""
    from PIL import Image
    folder = os.path.join(out_dir, "evals")
    grids = sorted(f for f in os.listdir(folder) if f.startswith("step_")) if os.path.isdir(folder) else []
    if len(grids) < 2:
        return
    a, b = (Image.open(os.path.join(folder, f)) for f in (grids[0], grids[-1]))
    both = Image.new("RGB", (a.width + b.width + 16, max(a.height, b.height)), "white")
    both.paste(a, (0, 0))
    both.paste(b, (a.width + 16, 0))
    both.save(os.path.join(folder, "first_vs_last.png"))


# ----------------------------------------------------------------------------- main
def check_settings():
    """Every setting checked before anything is loaded or written; the first bad one stops the run with one
    sentence (what the run would do to out_dir is check_run_folder's). Returns the training prompts and
    metadata and the held-out ones."""
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
    if math.floor(steps * timestep_fraction) < 1:
        raise SystemExit(f"steps={steps} x timestep_fraction={timestep_fraction} leaves no training timestep")
    needs_meta = [n for n in RW.parse_spec(reward) if n in RW.NEEDS_METADATA]  # names checked too
    if needs_meta and not all(m.get("tag") for m in metadata):
        raise SystemExit(f"the {needs_meta[0]} reward needs GenEval metadata (.jsonl with 'tag' and "
                         f"'include'); {prompts} has none: make it with data/geneval/prepare.py (or "
                         "data/shapes/prepare.py)")
    colour = [n for n in needs_meta if n in RW.NEEDS_COLOUR]
    if colour and not all(m["include"][0].get("color") for m in metadata):
        raise SystemExit(f"the {colour[0]} reward needs prompts that ask for a colour; {prompts} has some "
                         "that do not: use data/shapes/train_colors.jsonl")
    if needs_meta and not all(m.get("tag") for m in eval_meta):
        raise SystemExit(f"the {needs_meta[0]} reward needs GenEval metadata in the held-out prompts too; "
                         f"eval_prompts={eval_prompts} has none")
    unknown = [n for n in reward_opts if n not in RW.parse_spec(reward)]
    if unknown:
        raise SystemExit(f"reward_opts names '{unknown[0]}', which is not a reward of this run "
                         f"({', '.join(RW.parse_spec(reward))})")
    # the rest, each as a bound: (the setting, whether its value is allowed, what it must be)
    for name, ok, must in (
            ("epochs", epochs >= 1, "at least 1"),
            ("prompts_per_epoch", prompts_per_epoch >= 1, "at least 1"),
            ("ckpt_every", ckpt_every >= 1, "at least 1"), ("eval_every", eval_every >= 1, "at least 1"),
            ("eval_G", eval_G >= 1, "at least 1"), ("eval_steps", eval_steps >= 1, "at least 1"),
            ("opt_steps_per_epoch", opt_steps_per_epoch >= 1, "at least 1"),
            ("t5_len", t5_len >= 1, "at least 1"),
            ("resolution", resolution >= 16 and resolution % 16 == 0,
             "a positive multiple of 16 (SD3's VAE downsamples 8x, its transformer takes 2x2 patches)"),
            ("timestep_fraction", 0 < timestep_fraction <= 1, "in (0, 1]"),
            ("guidance", guidance == 1.0, "1.0: Phase II samples without CFG, as DiffusionNFT"),
            ("lr", 0 <= lr < math.inf, "finite and >= 0"),
            ("weight_decay", 0 <= weight_decay < math.inf, "finite and >= 0"),
            ("grad_clip", 0 < grad_clip < math.inf, "finite and > 0"),
            ("lora_rank", lora_rank >= 1, "at least 1"),
            ("lora_alpha", 0 < lora_alpha < math.inf, "finite and > 0"),
            ("adv_clip", 0 < adv_clip < math.inf, "finite and > 0"),
            ("kl_beta", 0 <= kl_beta < math.inf, "finite and >= 0"),
            ("old_decay_rate", 0 <= old_decay_rate < math.inf, "finite and >= 0"),
            ("old_decay_max", 0 <= old_decay_max < 1, "in [0, 1)"),
            ("old_decay_flat", old_decay_flat >= 0, ">= 0"),
            ("ema_max", 0 <= ema_max < 1, "in [0, 1)")):
        if not ok:
            raise SystemExit(f"{name}={globals()[name]!r} must be {must}")
    S.pick_device(device, dtype)  # a device this machine lacks, a dtype we do not run
    if K > 1:  # the Phase I file, from its metadata: this model, these prompts, this K
        S.check_perturbations(perturbations, model, prompt_list, K, t5_len)
    if wandb_log:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SystemExit("wandb_log=True needs wandb: pip install wandb (WANDB_MODE=offline needs no "
                             "account)")
    S.check_writable(out_dir, "out_dir")
    return prompt_list, metadata, eval_list, eval_meta


def main(argv=None):
    cfg = configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    prompt_list, metadata, eval_list, eval_meta = check_settings()
    N = prompts_per_epoch * K * G  # samples per epoch over all GPUs
    # WORLD_SIZE is known before the process group starts: a count that does not divide the work stops here
    n_local = samples_per_rank(prompts_per_epoch, K, G, int(os.environ.get("WORLD_SIZE", 1)),
                               opt_steps_per_epoch)
    # the run folder claimed (one writer at a time) and checked for what this run would replace: nothing is
    # loaded, deleted or written before this line
    release, honoured = S.claim(out_dir, lambda: check_run_folder(out_dir, cfg, prompt_list),
                                int(os.environ.get("RANK", 0)))
    S.quiet()
    rank, world, dev, dt = S.setup_distributed(device, dtype)
    run = SimpleNamespace(rank=rank, world=world, dev=dev, master=rank == 0, prompt_list=prompt_list,
                          metadata=metadata, n_train_t=math.floor(steps * timestep_fraction))
    run.log = (lambda *a: print(*a, flush=True)) if run.master else (lambda *a: None)
    run.log(config_summary(cfg))
    run.log(f"epoch = {prompts_per_epoch} prompts x K={K} x G={G} = {N} samples ({n_local} per GPU x "
            f"{world}); {opt_steps_per_epoch} optimizer step(s) of {N // opt_steps_per_epoch} samples, "
            f"micro-batches of {train_batch}, {run.n_train_t} training timesteps each")
    if prompts_per_epoch > len(prompt_list):
        run.log(f"note: prompts_per_epoch={prompts_per_epoch} > {len(prompt_list)} prompts: "
                f"each epoch draws prompts with replacement")
    # reward models in fp32 whatever the run's dtype: small next to SD3.5, and in bf16 PickScore's logit_scale
    # alone moves every score by 1 % and detector scores can cross GenEval's 0.3 / 0.9 thresholds
    run.reward_fn = RW.build_reward(reward, dev, torch.float32, tiny=model in S.TINY_MODELS,
                                    opts=reward_opts)

    # ---- models: frozen SD3, three LoRA adapters on the transformer (theta, old, EMA)
    torch.manual_seed(seed)  # the same adapter init on every rank (and DDP broadcasts rank 0's)
    pipe = S.load_pipeline(model, dev, dt)
    run.text = S.load_text(model, dev, dt, t5_len, pipe=pipe)
    S.note_cut_prompts(run.text, prompt_list + eval_list, run.log)
    pert = S.load_perturbations(perturbations, run.text, prompt_list, K) if K > 1 else None
    if text_offload:  # on the CPU except while they encode (S.text_on)
        run.text["encoders"] = {n: e.to("cpu") for n, e in run.text["encoders"].items()}
    run.transformer, run.vae = pipe.transformer, pipe.vae
    add_adapters(run.transformer, lora_rank, lora_alpha)
    if grad_checkpointing:
        run.transformer.enable_gradient_checkpointing()
    run.params = adapter_params(run.transformer, "default")
    run.opt = torch.optim.AdamW(run.params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    use_amp = dt == torch.bfloat16 if amp is None else amp
    run.autocast = ((lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_amp
                    else contextlib.nullcontext)
    run.shape = S.latent_shape(pipe, resolution)
    run.sigmas = S.sigma_grid(pipe.scheduler, steps)  # shared by sampling and training
    run.eval_sigmas = S.sigma_grid(pipe.scheduler, eval_steps)
    step, start_epoch, logf = start_run(run, cfg)
    if honoured:
        run.log(f"resumed with new settings: {', '.join(honoured)}")
    rlogf = reward_log(run, start_epoch - 1)
    run.theta_model = run.transformer if world == 1 else ddp_theta(run.transformer, dev)
    torch.manual_seed(seed + rank)
    tracker = start_tracking(cfg) if wandb_log and run.master else None
    if eval_list and not resume:  # the held-out reward of the starting model (as DiffusionNFT, at step 0)
        ev, grid = evaluate(run, eval_list, eval_meta, 0)
        rec = {"epoch": -1, "step": 0, "eval_reward": ev}
        run.log(f"before training | eval {rec['eval_reward']:.4f}")
        if run.master:
            logf.write(json.dumps(rec) + "\n")
            track(tracker, rec, grid=grid)

    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        # ---- the epoch's groups: prompts_per_epoch prompts x K conditions x G noises, one list over GPUs
        draw = draw_prompts(epoch, len(prompt_list))
        S.check_finite_rows(pert, draw)  # all the epoch's prompts on every rank: all stop at one check
        js, idx, ks = epoch_samples(prompts_per_epoch, K, G, rank, n_local, draw)
        with S.text_on(run.text, dev, offload=text_offload):
            c_orig, c_opt = group_conditions(run.text, pert, prompt_list, idx, ks)
        # ---- sample with the old policy (E²PO change 1 inside: the condition schedule)
        x0 = rollouts(run, epoch, js, c_orig, c_opt)
        t1 = time.time()
        # ---- reward, gathered over GPUs with each sample's group
        R, parts = score(run, epoch, x0, idx)
        gid = torch.arange(N, device=dev) // (K * G)  # the group (prompt slot) of every sample of the epoch
        # ---- advantages: normalised within groups, r in [0, 1]; this GPU keeps its slice
        r = advantages(R, gid, global_std, adv_clip)[rank * n_local:(rank + 1) * n_local]
        grp_std, collapsed = group_stats(R.cpu(), gid.cpu())
        by_k = condition_stats(R.cpu(), gid.cpu(), (torch.arange(N) // G) % K)  # k = 0 and k > 0 apart
        if shared_noise and K > 1:  # how far a perturbation moves a sample from its noise's k = 0 sample
            d = paired_distance(x0, js, K, G)
            if world > 1:
                dist.all_reduce(d)
            by_k["dist_kp"] = (d[0] / d[1]).item() if d[1] > 0 else None
        t2 = time.time()
        # ---- train theta on C^orig (E²PO change 2 inside), AdamW, EMA
        step, losses, grad_norm, probe = train(run, epoch, step, js, x0, r, c_orig, c_opt)
        # ---- the sampling policy follows theta once per epoch: old <- d*old + (1-d)*theta
        blend_adapter(run.transformer, "old", "default",
                      old_decay(step, old_decay_rate, old_decay_max, old_decay_flat))
        t3 = time.time()

        # ---- log: rank 0 prints one line and appends to log.jsonl
        reward_std = R.std(unbiased=False).item()
        # group_std_rel: the group std in units of the step's std, what the advantages are normalised by
        # (global_std): a group std that falls only as fast as the step's leaves the signal intact
        rec = {"epoch": epoch, "step": step, "reward_mean": R.mean().item(), "reward_std": reward_std,
               "group_std": grp_std, "group_std_rel": grp_std / (reward_std + 1e-4),
               "collapsed_groups": collapsed, **by_k, **parts, **losses, "grad_norm": grad_norm,
               "time_sample": t1 - t0, "time_reward": t2 - t1, "time_train": t3 - t2,
               "img_per_s": N / (t3 - t0)}
        grid = None
        if eval_list and (epoch + 1) % eval_every == 0:
            rec["eval_reward"], grid = evaluate(run, eval_list, eval_meta, step)
        run.log(f"epoch {epoch} step {step} | reward {rec['reward_mean']:.4f} | group std {grp_std:.4f} "
                f"(rel {rec['group_std_rel']:.2f}, collapsed {collapsed:.0%}) | loss {rec['loss']:.4f} "
                f"nft {rec['nft']:.4f} kl {rec['kl']:.2e} | sample {t1 - t0:.1f}s reward {t2 - t1:.1f}s "
                f"train {t3 - t2:.1f}s | {rec['img_per_s']:.2f} img/s"
                + (f" | k=0/k>0 reward {rec['reward_k0']:.3f}/{rec['reward_kp']:.3f} "
                   f"std {rec['group_std_k0']:.3f}/{rec['group_std_kp']:.3f}" if by_k else "")
                + (f" | eval {rec['eval_reward']:.4f}" if "eval_reward" in rec else ""))
        if run.master:
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            rlogf.write(json.dumps({"epoch": epoch, "step": step, "K": K, "G": G, "prompts": draw,
                                    "rewards": R.tolist()}) + "\n")
            rlogf.flush()
            track(tracker, rec, R, grid)
        if (epoch + 1) % ckpt_every == 0 or epoch + 1 == epochs:
            checkpoint(run, epoch, step, probe, cfg)
        if world > 1:
            dist.barrier()
    if run.master:
        logf.close()
        rlogf.close()
        first_and_last_grid()
        if tracker is not None:
            tracker.finish()
        run.log(f"done: LoRA (theta, old, EMA) in {out_dir}/checkpoint/lora, lora_old, lora_ema; "
                f"log in {os.path.join(out_dir, 'log.jsonl')}; evaluation grids in {out_dir}/evals")
    release()


if __name__ == "__main__":
    S.run_main(main)
