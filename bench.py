"""
Benchmark of the two hot loops of phase2_align.py on a random-weight transformer of the real shape:
sampling (the old adapter, 10-step ODE) and one training micro-step (v_old and v_ref without grad,
v_theta with grad and gradient checkpointing, the NFT loss, backward). Prints figures; asserts nothing.

    python bench.py                       # SD3.5-Medium shape, bf16 on CUDA (about 2.5B parameters)
    python bench.py --shape=tiny          # the tiny model, CPU, seconds (checks the script)
    python bench.py --sample_batch=32 --train_batch=16 --resolution=1024
"""
import sys
import time

import torch

import phase2_align as P2
import sample as S

# -----------------------------------------------------------------------------
shape = "sd35m"  # "sd35m" or "tiny"
resolution = 512
sample_batch = 16
train_batch = 8
steps = 10
t5_len = 128
lora_rank = 32
grad_checkpointing = True
repeats = 3
device = "auto"
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))]

SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def timed(fn, dev, n):
    """Median wall time of n calls after one warm-up call."""
    fn()
    times = []
    for _ in range(n):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    from configurator import configure
    configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    dev, dtype = S.pick_device(device)
    torch.manual_seed(0)
    if shape == "tiny":
        tr = S.tiny_pipeline(0).transformer
        res, tlen = 64, 16
    else:
        from diffusers import SD3Transformer2DModel
        with torch.device(dev):
            tr = SD3Transformer2DModel(**SD35M)
        res, tlen = resolution, t5_len
    tr.to(dev, dtype).requires_grad_(False)
    P2.add_adapters(tr, lora_rank, 2 * lora_rank)
    if grad_checkpointing:
        tr.enable_gradient_checkpointing()
    params = P2.adapter_params(tr, "default")
    c, f = tr.config, 8
    lat = (c.in_channels, res // f, res // f)
    cond = lambda B: (torch.randn(B, 77 + tlen, c.joint_attention_dim, device=dev, dtype=dtype),
                      torch.randn(B, c.pooled_projection_dim, device=dev, dtype=dtype))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    sigmas = torch.linspace(1, 0, steps + 1)
    n_base = sum(p.numel() for n, p in tr.named_parameters() if "lora_" not in n)
    print(f"{shape}: {n_base / 1e9:.2f}B parameters + LoRA r={lora_rank} ({sum(p.numel() for p in params) / 1e6:.1f}M trained), "
          f"{res}px, {dev} {dtype}")

    # ---- sampling: sample_batch images, `steps` transformer calls, the old adapter
    x, cs = torch.randn(sample_batch, *lat, device=dev, dtype=dtype), cond(sample_batch)
    P2.use_adapter(tr, "old")

    def rollout():
        with autocast:
            S.sample(tr, sigmas, x, cs)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ts = timed(rollout, dev, repeats)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else float("nan")
    print(f"sampling  : {ts:.3f} s per batch of {sample_batch} x {steps} steps = {sample_batch / ts:.2f} img/s, peak {mem:.1f} GiB")

    # ---- training micro-step: 2 forwards without grad, 1 with, backward through the LoRA
    P2.use_adapter(tr, "default")
    x0, eps, ct = torch.randn(train_batch, *lat, device=dev), torch.randn(train_batch, *lat, device=dev), cond(train_batch)
    t = torch.rand(train_batch, device=dev)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    r = torch.rand(train_batch, device=dev)

    def micro_step():
        with autocast:
            v_old, v_ref, v_theta = P2.policy_velocities(tr, x_t, t, ct)
        loss = P2.nft_loss(v_theta, v_old, x_t, x0, t, r, 1.0).mean() * 5 + 1e-4 * ((v_theta - v_ref) ** 2).mean()
        loss.backward()
        for p in params:
            p.grad = None
    tr.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tt = timed(micro_step, dev, repeats)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else float("nan")
    print(f"training  : {tt:.3f} s per micro-step of {train_batch} samples = {train_batch / tt:.2f} sample-timesteps/s, "
          f"peak {mem:.1f} GiB")
    n_t = int(steps * 0.99)
    print(f"per sample: {steps} sampler calls + {n_t} x 3 training calls; an epoch of N samples costs about "
          f"N x ({ts / sample_batch:.3f} + {n_t} x {tt / train_batch:.3f}) s per GPU")


if __name__ == "__main__":
    main()
