"""
What only a GPU can show, checked by one command that writes one report: gpu_check.json, gpu_check.md and
the sections' logs in one gpu_check_logs.tar.gz, in $OUT when that is set (the GPU machine's tool brings
back only what is written there, and at most 8 files), else in out/gpu_check; the runs the sections make
stay in out/gpu_check/work. Asserts nothing: every figure goes into the report, every failure too.

    python gpu_check.py                                              # a CUDA GPU: ~7 min on one H200 (est.)
    OMP_NUM_THREADS=1 python gpu_check.py --device=cpu --quick=True  # the plumbing on a CPU, a minute or two

The sections run in this order, each in its own try/except (a failure is recorded with its traceback and the
next section runs), each timed, and the report is rewritten after each one, so a run cut short still leaves
what it measured. Each gets at most what is left of `time_budget`; one that would start after it is skipped.

(a) theta under DDP on one rank (NCCL; gloo on a CPU), the tiny model in bf16 under bf16 autocast: v_theta,
    v_old and v_ref bit for bit equal at init (lora_B = 0); after one AdamW step, the gradients of
    nft_objective's backward: theta's in fp32, finite and nonzero on lora_A and lora_B, none on the "old" and
    "ema" adapters or the base; gradient checkpointing on vs off; text_offload's CPU copies pinned. Then the
    host syncs of Phase II (torch.cuda.set_sync_debug_mode("warn"), by source line), in-process runs of one
    and of two epochs: their difference is what one epoch costs
(b) bench.py at SD3.5-M's shape (random weights, bf16): its whole output, parsed for nothing, Flow-GRPO's
    objective included (an SDE sampling batch and a training micro-batch with CFG, the parts of a GRPO epoch,
    and the GRPO configs' seconds an epoch from them) (--quick=True or a CPU: bench.py --shape=tiny
    --repeats=1)
(c) the tiny model end to end under torchrun (as many processes as GPUs, at most 2; 2 gloo processes on a
    CPU): Phase I; Phase II with text_offload and gradient checkpointing, uninterrupted; the same run
    SIGKILLed once its epoch-1 checkpoint is complete and resumed; their logs compared epoch by epoch
    (loss, reward_mean, grad_norm) and their LoRAs; sample.py with the resumed run's EMA LoRA
(d) the reward backbones at real size with random weights (CLIP ViT-L/14, PickScore's ViT-H/14, Mask2Former
    Swin-S; --quick=True: the tiny ones): forward time in fp32 and in bf16 weights, and how far bf16 moves
    what the rewards read; which image-processor class rewards.py loads and which a plain
    AutoImageProcessor loads from the same folder
(e) determinism in bf16 with adapters: one training micro-step twice on the same inputs (gradients bit for
    bit?), a forward of 16 samples against the same as two batches of 8; the tiny transformer, and on a GPU
    (not with --quick=True) one of SD3.5-M's shape
"""
import contextlib
import copy
import datetime
import json
import linecache
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import traceback
import warnings

import torch
import torch.nn.functional as F

import bench
import phase1_perturb as P1
import phase2_align as P2
import rewards as RW
import sample as S
import tiny
from configurator import configure

# -----------------------------------------------------------------------------
device = "auto"  # "auto" = cuda if available, else cpu
quick = False  # tiny shapes only: bench --shape=tiny, tiny reward models, no SD3.5-M determinism check
out = "out/gpu_check"  # the report's folder (the environment variable OUT wins when set) and its runs'
# seconds for the whole run (a GPU is lent for ~8 minutes): each section gets at most what is left of it, and
# one that would start later is skipped. Estimated on one H200: (a) 25 s, (b) 270-330 s (its E²PO vs K=1
# epochs at SD3.5-M's shape are most of it; its GRPO section about 20 s, from its FLOPs at 35 % MFU),
# (c) 100 s, (d) 30 s, (e) 25 s
time_budget = 480
section_timeout = 60  # each in-process section, (a), (d), (e): past it the section stops with an error
bench_timeout = 330  # (b); on timeout bench.py is killed and its output so far kept
bench_args = ""  # more arguments for bench.py, e.g. "--repeats=1" (about half of (b)'s time at SD3.5-M)
e2e_timeout = 120  # (c), all its torchrun launches together
phase1_iters = 20  # Phase I iterations in (a) and (c): the file only has to exist for Phase II
reward_batch = 16  # images per reward-model forward in (d), as rewards.geneval's batch_size
detector_size = 800  # Mask2Former's input side at real size (rewards.geneval: shorter side 800)
repeats = 3  # timed forwards after one warm-up; the median is reported
seed = 0
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))]

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = "config/tiny_cpu.py"  # every tiny run starts from it (run from the repository's root)
TINY_T5 = 32  # its t5_len
# the reward backbones at real size (random weights): what rewards.py loads from the hub
CLIP_VIT_L = dict(  # openai/clip-vit-large-patch14 (clipscore, aesthetic, GenEval's colour classifier)
    vision_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       patch_size=14, image_size=224),
    text_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    projection_dim=768)
PICKSCORE_VIT_H = dict(  # yuvalkirstain/PickScore_v1, a fine-tuned laion ViT-H/14 (gelu, not quick_gelu)
    vision_config=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                       patch_size=14, image_size=224, hidden_act="gelu"),
    text_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     hidden_act="gelu"),
    projection_dim=1024)
SWIN_S = dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24],  # mask2former-swin-small-coco
              out_features=["stage1", "stage2", "stage3", "stage4"])
# trained CLIPs sit at the clamp, logit_scale = ln 100: PickScore's score is 100 * cos, and bf16's rounding
# of it is part of what (d) measures (a random init would have ln(1/0.07))
LOGIT_SCALE = math.log(100)


# ----------------------------------------------------------------------------- small helpers
def pick(name):
    """The device; a CUDA one with its index (DDP's device_ids and NCCL's device_id need it)."""
    dev = S.pick_device(name)[0]
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def autocast_on(dev):
    return lambda: torch.autocast(dev.type, dtype=torch.bfloat16)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compare(a, b):
    """Whether two tensors (or two lists of tensors) are equal bit for bit, and their largest difference."""
    a, b = ([x] if torch.is_tensor(x) else list(x) for x in (a, b))
    if len(a) != len(b) or any((x is None) != (y is None) or x is not None and x.shape != y.shape
                               for x, y in zip(a, b)):
        raise ValueError("compare: the two sides differ in number, presence or shape of tensors")
    pairs = [(x, y) for x, y in zip(a, b) if x is not None]  # a gradient missing on both sides agrees
    return {"bitwise": all(torch.equal(x, y) for x, y in pairs),
            "max_abs_diff": max((float((x.float() - y.float()).abs().max()) for x, y in pairs), default=0.0)}


def said(c):
    """A compare() result in a few words."""
    return "bit for bit" if c["bitwise"] else f"max |diff| {c['max_abs_diff']:.3g}"


def gib(n_bytes):
    return round(n_bytes / 2 ** 30, 2)


def lora_named(tr, name):
    """(name, tensor) of one adapter's LoRA tensors, in phase2_align.adapter_params' order."""
    return [(n, p) for n, p in tr.named_parameters() if f".{name}." in n and "lora_" in n]


def tiny_pipeline(dev):
    """The tiny pipeline in bf16 on dev (diffusers' note on casting a model with .to() silenced, as in
    bench.py)."""
    with S.diffusers_notes_off():
        return S.load_pipeline("tiny", dev, torch.bfloat16)


def tiny_prompts(n):
    prompt_list = S.read_prompts("data/tiny_prompts.txt")[0]
    return [prompt_list[i % len(prompt_list)] for i in range(n)]


def random_cond(config, n_text, n, dev, g):
    """A random condition (prompt_embeds [n, n_text, joint_dim], pooled [n, pooled_dim]) in bf16, as the
    text encoders would give it on a GPU, for shapes whose encoders are not built."""
    pe = torch.randn(n, n_text, config.joint_attention_dim, generator=g)
    pooled = torch.randn(n, config.pooled_projection_dim, generator=g)
    return pe.to(dev, torch.bfloat16), pooled.to(dev, torch.bfloat16)


def training_inputs(shape, cond, dev, seed_):
    """One training micro-batch as phase2_align builds it: x0, x_t = (1 - t) x0 + t eps, advantages r in
    [0, 1], on condition `cond` (its rows are the batch); drawn on the CPU from seed_."""
    n = cond[0].shape[0]
    g = torch.Generator().manual_seed(seed_)
    x0, eps = torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)
    t, r = torch.rand(n, generator=g) * 0.9 + 0.05, torch.rand(n, generator=g)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    return {"x0": x0.to(dev), "x_t": x_t.to(dev), "t": t.to(dev), "r": r.to(dev), "c": cond}


def micro_step(tr, batch, autocast, theta_model=None):
    """One training micro-step as phase2_align takes it: v_old, v_ref, v_theta (through theta_model, the DDP
    wrapper, when given), the NFT objective, backward. theta's gradients are cleared first and left in
    place after. Returns (v_old, v_ref, v_theta, {name: a copy of theta's gradient or None})."""
    named = lora_named(tr, "default")
    for _, p in named:
        p.grad = None
    tr.train()
    with autocast():
        v_old, v_ref, v_theta = P2.policy_velocities(tr, batch["x_t"], batch["t"], batch["c"],
                                                     theta_model=theta_model)
        loss = P2.nft_objective(v_theta, v_old, v_ref, batch["x_t"], batch["x0"], batch["t"], batch["r"])[0]
        loss.mean().backward()
    tr.eval()
    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in named}
    return v_old.detach(), v_ref.detach(), v_theta.detach(), grads


def randomise_lora_b(tr, name, std, seed_):
    """lora_B of one adapter to N(0, std^2) (it starts at 0): the LoRA path then changes the output."""
    g = torch.Generator().manual_seed(seed_)
    with torch.no_grad():
        for n, p in lora_named(tr, name):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@contextlib.contextmanager
def output_to(path):
    """The block's stdout and stderr into a file: an in-process stage's prints would bury the summaries."""
    with open(path, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        yield


@contextlib.contextmanager
def time_limit(seconds):
    """TimeoutError in the main thread once `seconds` have passed (checked between Python bytecodes: a
    kernel or a collective that hangs inside C is not interrupted)."""
    def expire(signum, frame):
        raise TimeoutError(f"stopped after its {seconds:.0f} s limit")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def child_env(dev):
    """The environment of every subprocess: nothing may download (no hub on the GPU machine), output
    unbuffered (a killed process keeps what it printed), one thread per process on a CPU."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if dev.type == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def descendants(pid):
    """Every process under pid, read from /proc. torchrun starts each worker in a session of its own, so a
    signal to torchrun's process group would leave the workers running."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", encoding="utf-8", errors="replace") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_tree(p):
    """SIGKILL a Popen and everything under it, all found first (a killed parent's orphans are re-parented
    and could no longer be found), then reap it."""
    for pid in [p.pid] + descendants(p.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    p.wait()


def run_logged(cmd, log_path, timeout, dev):
    """cmd in the repository's root, stdout and stderr into log_path; past `timeout` seconds it and
    everything it started are killed. Returns (returncode, None when killed; its output; seconds)."""
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as f:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=child_env(dev),
                             start_new_session=True)
        try:
            rc = p.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # past the limit, or this script interrupted: its sessions would not get our Ctrl-C
            if p.poll() is None:
                kill_tree(p)
    with open(log_path, encoding="utf-8", errors="replace") as f:
        return rc, f.read(), time.time() - t0


def torchrun(script, args, n):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", script, *args]


def tail(text, n=1500):
    return text[-n:].strip()


# ----------------------------------------------------------------------------- (a) theta under DDP
def check_ddp(dev, where, figs, limit):
    """theta's training step through the DDP wrapper on a one-rank process group, then the host syncs of
    Phase II's loop."""
    import torch.distributed as dist
    work = where["work"]
    autocast = autocast_on(dev)
    figs["backend"] = "nccl" if dev.type == "cuda" else "gloo"
    own = not dist.is_initialized()
    if own:  # launched by torchrun: its variables say where the group meets; otherwise a free local port
        meet = "env://" if "RANK" in os.environ else f"tcp://127.0.0.1:{free_port()}"
        dist.init_process_group(figs["backend"], init_method=meet, rank=0, world_size=1,
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    kept = []
    try:
        pipe = tiny_pipeline(dev)
        tr = pipe.transformer
        text = S.load_text("tiny", dev, torch.bfloat16, TINY_T5, pipe=pipe)
        torch.manual_seed(seed)
        P2.add_adapters(tr, 4, 8)
        with warnings_kept(kept):  # e.g. torch's own notes on DDP's arguments: into the report
            ddp = P2.ddp_theta(tr, dev)
        batch = training_inputs(S.latent_shape(pipe, 64), S.encode(text, tiny_prompts(4)), dev, seed)

        # at init lora_B = 0: every adapter is the base model, so the three velocities must agree exactly
        # (v_theta through DDP with grad, the others without: different code paths, the same arithmetic?)
        v_old, v_ref, v_theta, grads = micro_step(tr, batch, autocast, ddp)
        figs["init: v_theta vs v_old"] = compare(v_theta, v_old)
        figs["init: v_theta vs v_ref"] = compare(v_theta, v_ref)
        figs["init: lora_A gradients all zero (lora_B = 0)"] = all(
            bool((g == 0).all()) for n, g in grads.items() if "lora_A" in n and g is not None)
        # one AdamW step, as training's first: lora_B leaves 0, and gradients reach lora_A too
        opt = torch.optim.AdamW(P2.adapter_params(tr, "default"), lr=3e-4, weight_decay=1e-4)
        opt.step()
        opt.zero_grad(set_to_none=True)
        grads = micro_step(tr, batch, autocast, ddp)[3]
        theta = list(grads.values())
        figs["theta gradients"] = {
            "tensors": len(theta), "all present": all(g is not None for g in theta),
            "all fp32": all(g is not None and g.dtype == torch.float32 for g in theta),
            "all finite": all(g is not None and bool(torch.isfinite(g).all()) for g in theta),
            "lora_A nonzero": any(g is not None and bool((g != 0).any()) for n, g in grads.items()
                                  if "lora_A" in n),
            "lora_B nonzero": any(g is not None and bool((g != 0).any()) for n, g in grads.items()
                                  if "lora_B" in n)}
        figs["old and ema adapters: grad is None"] = all(
            p.grad is None for a in ("old", "ema") for p in P2.adapter_params(tr, a))
        figs["base weights: grad is None"] = all(p.grad is None for n, p in tr.named_parameters()
                                                 if "lora_" not in n)
        # checkpointing re-runs theta's forward in the backward: the same gradients, bit for bit?
        tr.enable_gradient_checkpointing()
        try:
            grads_ckpt = micro_step(tr, batch, autocast, ddp)[3]
        finally:
            tr.disable_gradient_checkpointing()
        figs["gradient checkpointing on vs off"] = compare(list(grads_ckpt.values()), theta)
        del ddp, opt
    finally:
        if own and dist.is_initialized():
            dist.destroy_process_group()
        figs["warnings while wrapping theta in DDP"] = tally(kept)
    figs["text_offload"] = check_text_offload(dev)
    figs["host syncs"] = host_syncs(dev, work, where["logs"])
    g = figs["theta gradients"]
    grads_ok = all(g[k] for k in ("all present", "all fp32", "all finite", "lora_A nonzero",
                                  "lora_B nonzero"))
    syncs = figs["host syncs"].get("per epoch", "n/a (CPU)")
    return (f"init v_theta=v_old {said(figs['init: v_theta vs v_old'])}, =v_ref "
            f"{said(figs['init: v_theta vs v_ref'])}; theta grads fp32/finite/nonzero {grads_ok}; old/ema "
            f"grads None {figs['old and ema adapters: grad is None']}; checkpointing on/off "
            f"{said(figs['gradient checkpointing on vs off'])}; host syncs an epoch {syncs}"
            + (f" at {figs['host syncs']['lines per epoch']} lines" if dev.type == "cuda" else ""))


def check_text_offload(dev):
    """sample.text_on(offload=True): the encoders' CPU copies pinned on a GPU (so that the copy in does not
    stall the host), the encoders back on the CPU after the block, the same condition as without offload."""
    text = S.load_text("tiny", dev, torch.bfloat16, TINY_T5)
    prompts = tiny_prompts(2)
    ref = S.encode(text, prompts)
    with S.text_on(text, dev, offload=True):
        got = S.encode(text, prompts)
    copies = [cpu for _, cpu in text["cpu_copies"]]
    return {"CPU copies pinned": all(c.is_pinned() for c in copies) if dev.type == "cuda" else "n/a (CPU)",
            "encoders on the CPU after the block": all(p.device.type == "cpu"
                                                       for e in text["encoders"].values()
                                                       for p in e.parameters()),
            "condition vs without offload": compare(list(got), list(ref))}


@contextlib.contextmanager
def warnings_kept(into):
    """Every warning of the block kept in `into` instead of printed: its message, where it was raised and
    the innermost frame of this repository's code on the stack at that moment (a sync raised inside torch,
    e.g. in clip_grad_norm_, is listed at the line of ours that called it). Like catch_warnings(record=True)
    with the filter "always", but with the stack looked at while it is still there."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")

        def keep(message, category, filename, lineno, file=None, line=None):
            f = sys._getframe(1)
            while f is not None and not (f.f_code.co_filename.startswith(REPO + os.sep)
                                         and os.sep + ".venv" + os.sep not in f.f_code.co_filename):
                f = f.f_back
            into.append({"message": str(message), "category": category.__name__,
                         "raised_at": (filename, lineno),
                         "ours": (f.f_code.co_filename, f.f_lineno) if f is not None else (filename, lineno)})
        warnings.showwarning = keep
        yield into


@contextlib.contextmanager
def sync_debug(dev):
    """CUDA's sync debug mode "warn": every operation that makes the host wait for the GPU warns."""
    if dev.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def is_sync(w):
    return "synchroniz" in w["message"]


def tally(kept):
    """Kept warnings, each distinct one once: how often, and the line of ours where it came from."""
    rows = {}
    for w in kept:
        key = (w["category"], w["message"][:200])
        row = rows.setdefault(key, {"warning": f"{key[0]}: {key[1]}", "count": 0,
                                    "at": f"{os.path.basename(w['ours'][0])}:{w['ours'][1]}"})
        row["count"] += 1
    return list(rows.values())


def host_syncs(dev, work, logs):
    """The synchronizing calls of phase2_align.main on the tiny model (K=4: the E²PO path) in one and in
    two epochs, by the line of ours that made them; the difference of the two runs is one epoch's (the
    loading, the start and the one checkpoint of each run cancel out)."""
    pert = os.path.join(work, "a_perturbations.safetensors")
    with output_to(os.path.join(logs, "a_phase1.txt")):
        P1.main([TINY, f"--device={dev.type}", f"--perturbations={pert}", f"--iters={phase1_iters}"])
    kept, seconds = {}, {}
    for n in (1, 2):
        kept[n], t0 = [], time.time()
        with (output_to(os.path.join(logs, f"a_phase2_{n}_epochs.txt")), warnings_kept(kept[n]),
              sync_debug(dev)):
            P2.main([TINY, f"--device={dev.type}", f"--perturbations={pert}", "--eval_prompts=None",
                     f"--out_dir={os.path.join(work, f'a_phase2_{n}_epochs')}", f"--epochs={n}",
                     "--overwrite=True"])
        seconds[f"{n}-epoch run s"] = round(time.time() - t0, 1)
    others = tally([w for w in kept[2] if not is_sync(w)])
    if dev.type != "cuda":
        return {"syncs": "n/a (CPU: no CUDA sync debug mode)", **seconds,
                "other warnings of the 2-epoch run": others}
    counts = {}
    for n in (1, 2):
        for w in filter(is_sync, kept[n]):
            row = counts.setdefault(w["ours"], {1: 0, 2: 0, "raised at": set()})
            row[n] += 1
            row["raised at"].add(f"{os.path.basename(w['raised_at'][0])}:{w['raised_at'][1]}")
    rows = [{"where": f"{os.path.basename(f)}:{ln}", "per epoch": c[2] - c[1], "1-epoch run": c[1],
             "2-epoch run": c[2], "raised at": ", ".join(sorted(c["raised at"])[:3]),
             "source": linecache.getline(f, ln).strip()[:100]} for (f, ln), c in counts.items()]
    rows.sort(key=lambda r: (-r["per epoch"], -r["2-epoch run"]))
    return {"per epoch": sum(r["per epoch"] for r in rows),
            "lines per epoch": sum(r["per epoch"] > 0 for r in rows),
            "in the 1-epoch run": sum(r["1-epoch run"] for r in rows), **seconds, "by line": rows,
            "other warnings of the 2-epoch run": others}


# ----------------------------------------------------------------------------- (b) bench.py
def check_bench(dev, where, figs, limit):
    """bench.py as a subprocess; its output is the figure (it prints timings, peaks, MFU, counts)."""
    cmd = [sys.executable, "bench.py", f"--device={dev.type}"]
    if quick or dev.type != "cuda":
        cmd += ["--shape=tiny", "--repeats=1"]
    cmd += bench_args.split()
    figs["command"] = "python " + " ".join(cmd[1:])
    rc, text, secs = run_logged(cmd, os.path.join(where["logs"], "bench.txt"), limit, dev)
    figs.update({"returncode": rc, "timed out": rc is None, "seconds": round(secs, 1), "output": text})
    if rc != 0:
        raise RuntimeError("bench.py " + (f"ran past {limit:.0f} s (its output so far is kept)" if rc is None
                                          else f"failed with returncode {rc}: {tail(text, 600)}"))
    return f"`{figs['command']}`: {len(text.splitlines())} lines of output (in the report)"


# ----------------------------------------------------------------------------- (c) torchrun end to end
def check_torchrun(dev, where, figs, limit):
    """Phase I, Phase II uninterrupted, killed and resumed, and sample.py, each under torchrun."""
    work, logs = where["work"], where["logs"]
    deadline = time.time() + limit
    n = max(1, min(torch.cuda.device_count(), 2)) if dev.type == "cuda" else 2
    figs.update({"processes": n, "backend": "nccl" if dev.type == "cuda" else "gloo", "launches": []})

    def launch(name, script, args):
        rc, text, secs = run_logged(torchrun(script, args, n), os.path.join(logs, f"c_{name}.txt"),
                                    deadline - time.time(), dev)
        figs["launches"].append({"what": name, "returncode": rc, "seconds": round(secs, 1)})
        if rc != 0:
            raise RuntimeError(f"{script} ({name}) " + ("ran out of the section's time" if rc is None
                                                        else f"failed with returncode {rc}: {tail(text)}"))
    base = [TINY, f"--device={dev.type}"]
    pert = os.path.join(work, "c_perturbations.safetensors")
    launch("phase1", "phase1_perturb.py", base + [f"--perturbations={pert}", f"--iters={phase1_iters}"])
    run = base + [f"--perturbations={pert}", "--text_offload=True", "--grad_checkpointing=True", "--epochs=4",
                  "--ckpt_every=2", "--eval_prompts=None", "--overwrite=True"]
    full, cut = os.path.join(work, "c_full"), os.path.join(work, "c_cut")
    launch("phase2_full", "phase2_align.py", run + [f"--out_dir={full}"])
    shutil.rmtree(cut, ignore_errors=True)  # an old checkpoint there would be taken for the new one
    figs["kill"] = kill_after_checkpoint(torchrun("phase2_align.py", run + [f"--out_dir={cut}"], n), cut,
                                         os.path.join(logs, "c_phase2_killed.txt"), deadline, dev)
    figs["launches"].append({"what": "phase2_killed", "returncode": "SIGKILL",
                             "seconds": figs["kill"]["killed after s"]})
    launch("phase2_resumed", "phase2_align.py", run + [f"--out_dir={cut}", "--resume=True"])
    figs["epochs: uninterrupted vs killed and resumed"], same = compare_logs(full, cut)
    figs["LoRA: uninterrupted vs killed and resumed"] = compare_loras(full, cut)
    samples = os.path.join(work, "c_samples")
    launch("sample", "sample.py", base + [f"--perturbations={pert}", f"--out_dir={samples}",
                                          f"--lora={os.path.join(cut, 'checkpoint', 'lora_ema')}"])
    index = os.path.join(samples, "index.jsonl")
    listed = 0
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            listed = sum(1 for ln in f if ln.strip())
    pngs = [p for p in os.listdir(samples) if p.endswith(".png") and not p.endswith("_grid.png")]
    figs["sample.py"] = {"index.jsonl exists": os.path.isfile(index), "images in index.jsonl": listed,
                         "image files": len(pngs)}
    lora = figs["LoRA: uninterrupted vs killed and resumed"]
    return (f"{n} x {figs['backend']}; killed with epochs {figs['kill']['epochs in the log when killed']} "
            f"logged, resumed: logs {'identical' if same else 'differ (see the table)'}, LoRA "
            + ", ".join(f"{k} {said(v)}" for k, v in lora.items())
            + f"; sample.py wrote {len(pngs)} images, index.jsonl {os.path.isfile(index)}")


def kill_after_checkpoint(cmd, run_dir, log_path, deadline, dev):
    """Start the run, and SIGKILL it with every process under it as soon as its first checkpoint is
    complete (state.pt is written last, and the folder renamed into place after it)."""
    state = os.path.join(run_dir, "checkpoint", "state.pt")
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as f:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=child_env(dev),
                             start_new_session=True)
        try:
            while p.poll() is None and not os.path.exists(state) and time.time() < deadline:
                time.sleep(0.02)
            ended = p.poll()
        finally:
            kill_tree(p)
    secs = round(time.time() - t0, 1)
    if ended is not None:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            raise RuntimeError(f"the run to kill ended by itself (returncode {ended}) before its first "
                               f"checkpoint was seen: {tail(f.read())}")
    if not os.path.exists(state):
        raise TimeoutError("the run to kill wrote no checkpoint within the section's time")
    st = torch.load(state, map_location="cpu", weights_only=False)
    return {"killed after s": secs, "epochs in the log when killed": [r["epoch"] for r in read_log(run_dir)],
            "checkpoint epoch": st["epoch"], "checkpoint step": st["step"]}


def read_log(run_dir):
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def compare_logs(a_dir, b_dir, keys=("loss", "reward_mean", "grad_norm")):
    """Per epoch of run a, its keys and how far run b's differ; and whether every one is identical."""
    a, b = read_log(a_dir), {r["epoch"]: r for r in read_log(b_dir)}
    rows, same = [], len(b) == len(a) and len(read_log(b_dir)) == len(b)  # no epoch logged twice
    for r in a:
        row = {"epoch": r["epoch"]}
        for k in keys:
            row[k] = r[k]
            other = b.get(r["epoch"], {}).get(k)
            row[f"{k} diff"] = None if other is None else other - r[k]
            same &= other == r[k]
        rows.append(row)
    return rows, same


def compare_loras(a_dir, b_dir):
    from safetensors.torch import load_file
    out = {}
    for sub in P2.CKPT_DIRS.values():
        A, B = (load_file(os.path.join(d, "checkpoint", sub, "pytorch_lora_weights.safetensors"))
                for d in (a_dir, b_dir))
        out[sub] = compare([A[k] for k in sorted(A)], [B[k] for k in sorted(A)])
    return out


# ----------------------------------------------------------------------------- (d) reward backbones
def reward_backbones(dev, small):
    """(name, fp32 model on dev, what its reward reads, its input side): random weights, seeded."""
    from transformers import (CLIPConfig, CLIPModel, Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                              SwinConfig)
    if small:
        torch.manual_seed(seed)
        clip = tiny.clip(seed)[0]
        with torch.no_grad():
            clip.logit_scale.fill_(LOGIT_SCALE)
        yield "CLIP (tiny)", clip.to(dev), "clip", clip.config.vision_config.image_size
        yield "PickScore (tiny CLIP)", clip.to(dev), "pickscore", clip.config.vision_config.image_size
        del clip
        yield "Mask2Former (tiny)", tiny.mask2former(seed)[0].to(dev), "mask2former", 64
        return
    for name, cfg, kind in (("CLIP ViT-L/14", CLIP_VIT_L, "clip"), ("PickScore ViT-H/14", PICKSCORE_VIT_H,
                                                                     "pickscore")):
        torch.manual_seed(seed)
        with bench.built_in(dev, torch.float32):  # built on the device: no CPU init of a billion weights
            model = CLIPModel(CLIPConfig(**cfg, logit_scale_init_value=LOGIT_SCALE))
        yield name, model, kind, cfg["vision_config"]["image_size"]
        del model
    torch.manual_seed(seed)
    with bench.built_in(dev, torch.float32):
        model = Mask2FormerForUniversalSegmentation(
            Mask2FormerConfig(backbone_config=SwinConfig(**SWIN_S), num_labels=len(RW.GENEVAL_CLASSES)))
    yield "Mask2Former Swin-S", model, "mask2former", detector_size


def reward_inputs(model, kind, side, dev):
    """A batch of reward_batch random images (and, for CLIP, random token ids: BOS, content, EOS)."""
    g = torch.Generator().manual_seed(seed)
    pix = torch.randn(reward_batch, 3, side, side, generator=g).to(dev)
    if kind == "mask2former":
        return {"pixel_values": pix, "pixel_mask": torch.ones(reward_batch, side, side, dtype=torch.long,
                                                                device=dev)}
    tc = model.config.text_config
    length = min(77, tc.max_position_embeddings)
    ids = torch.randint(0, min(tc.bos_token_id, tc.eos_token_id), (reward_batch, length), generator=g)
    ids[:, 0], ids[:, -1] = tc.bos_token_id, tc.eos_token_id
    return {"pixel_values": pix, "input_ids": ids.to(dev)}


def reward_read(model, kind, inp):
    """What the reward reads off the model, in fp32: CLIP's image-text cosine (all pairs), PickScore's
    logit_scale * cosine (logit_scale.exp() as rewards.pickscore takes it), Mask2Former's class
    probabilities (and the mask probabilities its GenEval score multiplies in)."""
    with torch.no_grad():
        if kind == "mask2former":
            o = model(pixel_values=inp["pixel_values"].to(model.dtype), pixel_mask=inp["pixel_mask"])
            return {"class probabilities": o.class_queries_logits.float().softmax(-1),
                    "mask probabilities": o.masks_queries_logits.float().sigmoid()}
        img = F.normalize(RW._features(model.get_image_features(
            pixel_values=inp["pixel_values"].to(model.dtype))).float(), dim=-1)
        txt = F.normalize(RW._features(model.get_text_features(input_ids=inp["input_ids"])).float(), dim=-1)
        cos = img @ txt.T
        if kind == "pickscore":
            return {"logit_scale * cosine": model.logit_scale.exp().float() * cos}
        return {"cosine": cos}


def check_rewards(dev, where, figs, limit):
    """Forward time in fp32 and bf16 weights and bf16's effect on what the rewards read; processor classes."""
    work = where["work"]
    cuda = dev.type == "cuda"
    figs["images"] = reward_batch
    rows = figs["forward, median of repeats (random weights)"] = []  # filled as it goes: a failure keeps them
    diffs = figs["bf16 weights against fp32"] = []
    for name, model, kind, side in reward_backbones(dev, quick):
        model.requires_grad_(False).eval()
        half = copy.deepcopy(model).to(torch.bfloat16)
        inp = reward_inputs(model, kind, side, dev)
        times, peaks = bench.interleaved({"fp32": lambda: reward_read(model, kind, inp),
                                          "bf16": lambda: reward_read(half, kind, inp)}, dev, repeats)
        ref, low = reward_read(model, kind, inp), reward_read(half, kind, inp)
        row = {"model": name, "parameters (M)": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
               "input": f"{reward_batch} x 3 x {side} x {side}",
               "fp32 s": times.get("fp32"), "bf16 s": times.get("bf16"),
               "bf16 speed-up": (times["fp32"] / times["bf16"]) if len(times) == 2 else None}
        if cuda:
            row.update({"fp32 peak GiB": peaks["fp32"], "bf16 peak GiB": peaks["bf16"]})
        rows.append(row)
        diffs += [{"model": name, "what the reward reads": k,
                   "fp32 range": f"[{float(ref[k].min()):.4g}, {float(ref[k].max()):.4g}]",
                   "max abs bf16 - fp32": float((low[k] - ref[k]).abs().max())} for k in ref]
        del model, half, ref, low
        if cuda:
            torch.cuda.empty_cache()
    if quick:  # the real sizes, at least built: parameter counts on the meta device
        figs["real sizes, not run (--quick=True)"] = real_size_counts()
    figs["image processors"] = processor_classes(dev, work)
    p = figs["image processors"]
    return ("; ".join(f"{r['model']} bf16 speed-up {r['bf16 speed-up'] or float('nan'):.2f}, max diff "
                      + ", ".join(f"{d['max abs bf16 - fp32']:.2g}" for d in diffs
                                  if d["model"] == r["model"])
                      for r in rows)
            + f"; processors ours {p['CLIP: rewards.load_clip']}/{p['Mask2Former: rewards.geneval']}, plain "
              f"{p['CLIP: AutoImageProcessor']}/{p['Mask2Former: AutoImageProcessor']}")


def real_size_counts():
    """Parameters of the three real-size backbones built on the meta device (no memory, no compute): their
    configs at least build here."""
    from transformers import (CLIPConfig, CLIPModel, Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                              SwinConfig)
    count = lambda m: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
    with torch.device("meta"):
        return {"CLIP ViT-L/14 (M)": count(CLIPModel(CLIPConfig(**CLIP_VIT_L))),
                "PickScore ViT-H/14 (M)": count(CLIPModel(CLIPConfig(**PICKSCORE_VIT_H))),
                "Mask2Former Swin-S (M)": count(Mask2FormerForUniversalSegmentation(
                    Mask2FormerConfig(backbone_config=SwinConfig(**SWIN_S), num_labels=80)))}


def processor_classes(dev, work):
    """Which image-processor class rewards.py gets from a saved folder (its loaders pass backend="pil") and
    which a plain AutoImageProcessor.from_pretrained gets (transformers 5: torchvision's where it is
    installed), and how far apart their pixel values are on one image."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, CLIPImageProcessor, CLIPProcessor, Mask2FormerImageProcessor
    clip_dir, det_dir = os.path.join(work, "d_clip"), os.path.join(work, "d_mask2former")
    model, proc = tiny.clip(seed)
    model.save_pretrained(clip_dir)
    side = model.config.vision_config.image_size
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": side},
                                                     crop_size={"height": side, "width": side}),
                  tokenizer=proc.tokenizer).save_pretrained(clip_dir)
    det_size = {"shortest_edge": 64, "longest_edge": 128}
    tiny.mask2former(seed)[0].save_pretrained(det_dir)
    Mask2FormerImageProcessor(size=det_size).save_pretrained(det_dir)
    ours_clip = RW.load_clip(clip_dir, dev)[1].image_processor
    # rewards.geneval loads its detector's processor at shorter side detector_size: the plain one the same way
    ours_det = RW.geneval(dev, detector=det_dir, clip=clip_dir, detector_size=64).detector[1]
    plain_clip = AutoImageProcessor.from_pretrained(clip_dir)
    plain_det = AutoImageProcessor.from_pretrained(det_dir, size={"shortest_edge": 64, "longest_edge": 1333})
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (75, 90, 3), dtype=np.uint8))

    def gap(p, q):  # the largest difference of two processors' pixel values for one image
        a, b = (r(images=[img], return_tensors="pt")["pixel_values"].float() for r in (p, q))
        return (float((a - b).abs().max()) if a.shape == b.shape
                else f"shapes differ: {list(a.shape)}, {list(b.shape)}")
    return {"CLIP: rewards.load_clip": type(ours_clip).__name__,
            "CLIP: AutoImageProcessor": type(plain_clip).__name__,
            "CLIP: pixel values, max abs ours-plain": gap(ours_clip, plain_clip),
            "Mask2Former: rewards.geneval": type(ours_det).__name__,
            "Mask2Former: AutoImageProcessor": type(plain_det).__name__,
            "Mask2Former: pixel values, max abs ours-plain": gap(ours_det, plain_det)}


# ----------------------------------------------------------------------------- (e) determinism
def determinism(tr, shape, n_text, dev, n=16):
    """On transformer `tr` (bf16, adapters added): theta's lora_B made nonzero, one training micro-step of
    n/2 samples twice on the same inputs, and a forward of n samples against the same n as two halves."""
    autocast = autocast_on(dev)
    randomise_lora_b(tr, "default", 1e-3, seed)
    g = torch.Generator().manual_seed(seed)
    cond = random_cond(tr.config, n_text, n, dev, g)
    batch = training_inputs(shape, tuple(c[:n // 2] for c in cond), dev, seed)
    first, second = (micro_step(tr, batch, autocast)[3] for _ in range(2))
    x, t = torch.randn(n, *shape, generator=g).to(dev), (torch.rand(n, generator=g) * 0.9 + 0.05).to(dev)
    with torch.no_grad(), autocast():
        whole = S.velocity(tr, x, t, cond)
        halves = torch.cat([S.velocity(tr, x[s], t[s], tuple(c[s] for c in cond))
                            for s in (slice(0, n // 2), slice(n // 2, n))])
    for p in P2.adapter_params(tr, "default"):
        p.grad = None
    return {f"micro-step of {n // 2} twice: theta gradients": compare(list(first.values()),
                                                                      list(second.values())),
            f"forward of {n} vs 2 x {n // 2}: v": compare(whole, halves),
            "max |v|": float(whole.float().abs().max())}


def check_determinism(dev, where, figs, limit):
    """The same inputs through the same weights twice, and one batch against its halves, in bf16."""
    pipe = tiny_pipeline(dev)
    tr = pipe.transformer
    torch.manual_seed(seed)
    P2.add_adapters(tr, 4, 8)
    figs["tiny transformer"] = determinism(tr, S.latent_shape(pipe, 64), S.CLIP_LEN + TINY_T5, dev)
    del pipe, tr
    if dev.type == "cuda" and not quick:
        from diffusers import SD3Transformer2DModel
        torch.manual_seed(seed)
        with bench.built_in(dev, torch.bfloat16):
            tr = SD3Transformer2DModel(**bench.SD35M)
        tr.requires_grad_(False).eval()
        P2.add_adapters(tr, 32, 64)
        figs["SD3.5-M shape (512 px, LoRA r=32)"] = determinism(tr, (16, 64, 64), S.CLIP_LEN + 128, dev)
        del tr
        torch.cuda.empty_cache()
    else:
        figs["SD3.5-M shape"] = "skipped (" + ("--quick=True" if quick else "no GPU") + ")"
    return "; ".join(f"{k}: " + ", ".join(f"{kk.split(':')[0]} {said(v)}" for kk, v in d.items()
                                          if isinstance(v, dict))
                     for k, d in figs.items() if isinstance(d, dict))


# ----------------------------------------------------------------------------- the report
def environment(dev):
    import diffusers
    import peft
    import transformers
    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": " ".join(["python", *sys.argv]), "host": platform.node(),
           "python": platform.python_version(),
           "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "device": str(dev),
           "cpu cores": os.cpu_count()}
    try:
        import torchvision
        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = "not installed"
    if dev.type == "cuda":
        prop = torch.cuda.get_device_properties(dev)
        env.update({"device name": prop.name, "GPU memory GiB": gib(prop.total_memory),
                    "GPUs": torch.cuda.device_count(), "CUDA": torch.version.cuda,
                    "cuDNN": torch.backends.cudnn.version(),
                    # fp32 matmuls (the reward models run in fp32) in TF32 or not: torch's default is not
                    "TF32 matmul allowed": torch.backends.cuda.matmul.allow_tf32,
                    "NCCL": ".".join(map(str, torch.cuda.nccl.version()))})
    else:
        env["device name"] = platform.processor() or platform.machine()
    return env


def md_value(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict) and set(v) == {"bitwise", "max_abs_diff"}:
        return said(v)
    return str(v)


def md_lines(figs, depth=0):
    """A section's figures as markdown: lists of records as tables, long text as code blocks."""
    lines, pad = [], "  " * depth
    for k, v in figs.items():
        if isinstance(v, str) and "\n" in v:
            lines += [f"{pad}- {k}:", "", "```", v.rstrip(), "```", ""]
        elif isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            cols = list(dict.fromkeys(c for r in v for c in r))
            lines += ["", f"{k}:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(md_value(r.get(c, "")).replace("|", "\\|") for c in cols) + " |"
                      for r in v]
            lines.append("")
        elif isinstance(v, dict) and set(v) != {"bitwise", "max_abs_diff"}:
            lines.append(f"{pad}- {k}:")
            lines += md_lines(v, depth + 1)
        else:
            lines.append(f"{pad}- {k}: {md_value(v)}")
    return lines


def write_report(report, out_dir):
    with open(os.path.join(out_dir, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    lines = ["# gpu_check", ""] + [f"- {k}: {v}" for k, v in report["environment"].items()] + [""]
    for key, s in report["sections"].items():
        lines += [f"## ({key}) {s['title']}: {s['status']}, {s['seconds']:.1f} s", ""]
        if s.get("summary"):
            lines += [s["summary"], ""]
        if s.get("error"):
            lines += ["```", s["error"].rstrip(), "```", ""]
        lines += md_lines(s.get("figures", {})) + [""]
    with open(os.path.join(out_dir, "gpu_check.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def failed_at(err):
    """Where an exception came from: the frames of this repository's code, then the innermost frame."""
    frames = traceback.extract_tb(err.__traceback__)
    ours = [f for f in frames if f.filename.startswith(REPO + os.sep)
            and os.sep + ".venv" + os.sep not in f.filename]
    if frames and (not ours or ours[-1] is not frames[-1]):
        ours.append(frames[-1])
    return "".join(f"  at {os.path.relpath(f.filename, REPO)}:{f.lineno} in {f.name}: {f.line}\n"
                   for f in ours)


def run_section(report, key, title, fn, dev, where, limit, in_process, save):
    """One section, in its own try/except and timed; its record goes into the report, saved before (a run
    killed inside it leaves "running") and after. An in-process section is stopped by an alarm at its
    limit; a subprocess one kills its own processes."""
    rec = report["sections"][key] = {"title": title, "status": "running", "limit s": round(limit),
                                     "seconds": 0.0, "figures": {}}
    save()
    t0 = time.time()
    cuda = dev.type == "cuda" and in_process
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        with time_limit(limit) if in_process else contextlib.nullcontext():
            rec["summary"] = fn(dev, where, rec["figures"], limit)
        rec["status"] = "ok"
    except (Exception, SystemExit) as err:  # the repository's scripts stop with SystemExit and a sentence
        rec["status"] = "error"
        rec["error"] = f"{type(err).__name__}: {err}\n" + failed_at(err)
    rec["seconds"] = time.time() - t0
    if cuda:
        rec["figures"]["peak GPU memory GiB"] = gib(torch.cuda.max_memory_allocated())
        torch.cuda.empty_cache()
    first = (rec.get("summary") or rec.get("error", "")).splitlines()
    print(f"({key}) {title}: {rec['status']} in {rec['seconds']:.1f} s | {first[0] if first else ''}",
          flush=True)
    save()


def main(argv=None):
    cfg = configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download: there is no hub on the GPU machine
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise SystemExit("run gpu_check.py as one process: it starts torchrun itself where it needs ranks")
    # the report in $OUT (three files), the sections' runs and logs always under `out`: the device tool
    # brings back at most 8 files from $OUT, and the runs write dozens
    out_dir, scratch = os.path.abspath(os.environ.get("OUT") or out), os.path.abspath(out)
    os.chdir(REPO)  # the tiny config and its prompt file are named relative to the repository
    work, logs = os.path.join(scratch, "work"), os.path.join(scratch, "logs")
    for d in (work, logs):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    os.makedirs(out_dir, exist_ok=True)
    S.quiet()
    dev = pick(device)
    t_start = time.time()
    report = {"environment": environment(dev), "config": cfg, "sections": {}}
    print(f"gpu_check on {report['environment']['device name']} ({dev}), torch {torch.__version__}; "
          f"report in {out_dir}", flush=True)
    small_bench = quick or dev.type != "cuda"
    sections = (("a", "theta under DDP on one rank, host syncs of Phase II", check_ddp, section_timeout,
                 True),
                ("b", "bench.py" + (" --shape=tiny" if small_bench else " at SD3.5-M's shape"),
                 check_bench, bench_timeout, False),
                ("c", "the tiny model end to end under torchrun, killed and resumed", check_torchrun,
                 e2e_timeout, False),
                ("d", "reward backbones " + ("(tiny)" if quick else "at real size") + ", random weights",
                 check_rewards, section_timeout, True),
                ("e", "determinism in bf16", check_determinism, section_timeout, True))
    def save():
        report["total s"] = round(time.time() - t_start, 1)
        write_report(report, out_dir)
        with tarfile.open(os.path.join(out_dir, "gpu_check_logs.tar.gz"), "w:gz") as tar:
            tar.add(logs, arcname="logs")
    for key, title, fn, limit, in_process in sections:
        left = time_budget - (time.time() - t_start)
        if left < 10:
            report["sections"][key] = {"title": title, "status": "skipped", "seconds": 0.0,
                                       "summary": f"the time budget ({time_budget} s) is spent"}
            print(f"({key}) {title}: skipped, the time budget ({time_budget} s) is spent", flush=True)
        else:
            run_section(report, key, title, fn, dev, {"work": work, "logs": logs}, min(limit, left),
                        in_process, save)
    save()
    print(f"done in {report['total s']:.0f} s: gpu_check.md, gpu_check.json and gpu_check_logs.tar.gz in "
          f"{out_dir}", flush=True)


if __name__ == "__main__":
    main()
