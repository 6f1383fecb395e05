"""
What a Phase II run (phase2_align.py) costs, on a random-weight transformer of the real shape: model FLOPs
and MFU, sampling (ours vs diffusers' pipeline), VAE decoding, the whole training step (with and without
gradient checkpointing), an epoch of E²PO vs K=1 at equal N, Flow-GRPO's objective (objective="grpo": its
SDE sampling and training step with CFG), peak memory, the resident weights of a real run, and seconds per
epoch per GPU for the paper's budgets and the Flow-GRPO configs. Prints figures; asserts nothing.

    python bench.py                    # SD3.5-Medium shape, bf16 on a CUDA GPU, 512 px
    python bench.py --shape=tiny       # the tiny model on CPU: every section in seconds
    python bench.py --peak_tflops=989 --gpus=8 --sample_batch=32
    python bench.py --count_activations=True   # no GPU: only the exact figures and the activations of
                                               # Phase I and II at SD3.5-M's shape (~2.5 min, 15 GB of RAM)
"""
import contextlib
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

import phase2_align as P2
import sample as S

# -----------------------------------------------------------------------------
shape = "sd35m"  # "sd35m" (the default; meant for a GPU) or "tiny"
resolution = 0  # 0 = the shape's: 512 (sd35m) or 64 (tiny, as config/tiny_cpu.py)
t5_len = 0  # 0 = the shape's: 128 or 32
lora_rank = 0  # 0 = the shape's: 32 (DiffusionNFT) or 4
sample_batch = 16
train_batch = 8
steps = 10
timestep_fraction = 0.99
solver = "dpm2"
rho = 0.4
epoch_prompts = 2  # the E²PO vs K=1 epoch: epoch_prompts prompts x N samples each
epoch_N = 16  # samples per prompt: G=4 x K=4 against G=16 x K=1
grpo_guidance = 4.5  # the CFG scale of the GRPO section (Flow-GRPO's recipes)
gpus = 8  # world size of the per-epoch estimates from measured costs
assumed_mfu = 0.35  # the utilisation behind the per-epoch estimates from FLOPs, before any GPU measurement
peak_tflops = 0.0  # 0 = look the device up in PEAK_TFLOPS
repeats = 3
device = "auto"
# on a CPU at the SD3.5-M shape, count what Phase I's encoders and one training forward of the transformer
# (built in bf16) keep for their backward, then stop (about 2.5 minutes, 15 GB of RAM); on a GPU it is always
# counted, the transformer's also for the tiny shape
count_activations = False
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))]

SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
             attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
             caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
             dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# SD3.5-Large: the same classes, 38 blocks of 38 heads, no dual-attention blocks
SD35L = dict(SD35M, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
             pos_embed_max_size=192, dual_attention_layers=())
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=2,
               block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
CLIP_L = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              projection_dim=768)
CLIP_G = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
              projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
# dense bf16 tensor TFLOP/s from the vendor datasheets (dense, no sparsity); first match of all substrings
# wins. An H100 SXM calls itself "NVIDIA H100 80GB HBM3"; the H100 NVL and anything else unlisted are
# "unknown".
PEAK_TFLOPS = [(("H100", "PCIe"), 756), (("H100", "SXM"), 989), (("H100", "HBM3"), 989), (("H200",), 989),
               (("A100",), 312), (("L40S",), 362), (("A10G",), 125), (("RTX 4090",), 165)]
BUDGETS = ("config/geneval_g4k12.py", "config/efficient_g2k4.py", "config/pickscore_g8k3.py",
           "config/geneval_nft_g24.py", "config/geneval_flowgrpo_g24.py", "config/geneval_grpo_g4k12.py",
           "config/pickscore_grpo_g8k3.py")
LARGE = "config/geneval_large_g4k12.py"


def transformer_flops(config, n_image_tokens, n_text_tokens, lora_rank=0, train=False):
    """Matmul FLOPs per sample of one SD3 transformer call (a multiply-add = 2), from its config: forward, or
    with train=True forward + backward of the LoRA step (base frozen, LoRA on P2.LORA_TARGETS trained).
    With d = heads * head_dim, Li/Lt image/text tokens, L = Li + Lt, a linear i->o on n tokens costs 2*n*i*o:
      per block (image and text streams have their own weights): q,k,v,out on Li and on Lt, ff d->4d->d on
        both; the last block is context_pre_only (no to_add_out, no ff_context); joint attention 4*L^2*d
        (QK^T and PV); a dual-attention block (config.dual_attention_layers) adds an image-only attn2:
        q,k,v,out on Li and 4*Li^2*d; adaLN modulation d->6d (9d dual; text 6d, 2d in the last block)
        per sample
      outside: patch embed 2*Li*p^2*C_in*d, context_embedder Lt*joint_dim->d, time/pooled-text MLPs and
        norm_out per sample, proj_out Li*d->p^2*C_out
      LoRA rank r on a linear: 2*n*r*(i+o) more.
    Backward, counted as the work autograd does with frozen base weights (not the 3x-forward convention of
    full fine-tuning, "6N", which would add weight gradients nobody computes): 1x forward for the input
    gradient of every base linear whose input needs one, 2x for attention matmuls (both operands), LoRA
    2*n*r*(i+o) for its weight gradients + 2*n*r*o (+ 2*n*r*i for the input) for its activation gradients.
    Nothing upstream of the first LoRA needs a gradient: patch embed, context_embedder, the conditioning MLPs
    and modulation, and block 0's base q,k,v (and its whole attn2, which has no LoRA) have no backward.
    Gradient checkpointing re-runs the forward; that is hardware work, not model FLOPs, and not counted.
    Not counted either (nor by torch's FlopCounterMode): elementwise work - norms, GELU, softmax, adaLN
    scale/shift/gate, residuals - ~100 FLOPs per token and channel against ~24*d of matmuls:
    <1 % at d = 1536."""
    c = config if hasattr(config, "num_layers") else SimpleNamespace(**config)
    d, p, Li, Lt, r = (c.num_attention_heads * c.attention_head_dim, c.patch_size,
                       n_image_tokens, n_text_tokens, lora_rank)
    tot = [0, 0]  # forward, backward

    def lin(n, i, o, grad_in=True, lora=False):
        tot[0] += 2 * n * i * o + (2 * n * r * (i + o) if lora else 0)
        tot[1] += ((2 * n * i * o if grad_in else 0)
                   + (2 * n * r * (i + 2 * o + (i if grad_in else 0)) if lora else 0))

    def attn(L, grad=True):
        tot[0] += 4 * L * L * d
        tot[1] += 8 * L * L * d if grad else 0
    lin(Li, p * p * c.in_channels, d, False)
    lin(Lt, c.joint_attention_dim, c.caption_projection_dim, False)
    # time, text MLPs, norm_out
    for i, o in ((256, d), (d, d), (c.pooled_projection_dim, d), (d, d), (d, 2 * d)):
        lin(1, i, o, False)
    for b in range(c.num_layers):
        first, last, dual = b == 0, b == c.num_layers - 1, b in tuple(c.dual_attention_layers)
        lin(1, d, (9 if dual else 6) * d, False)
        lin(1, d, (2 if last else 6) * d, False)
        for n in [Li] * 3 + [Lt] * 3:  # to_q/k/v, add_q/k/v_proj
            lin(n, d, d, not first, lora=r > 0)
        attn(Li + Lt, grad=r > 0)
        for n in [Li] + ([] if last else [Lt]):  # to_out.0, to_add_out; ff, ff_context
            lin(n, d, d, lora=r > 0)
            lin(n, d, 4 * d)
            lin(n, 4 * d, d)
        if dual:
            for _ in range(4):
                lin(Li, d, d, not first)
            attn(Li, grad=not first)
    lin(Li, d, p * p * c.out_channels)
    return tot[0] + tot[1] if train else tot[0]


def lookup_peak(name, override=0.0):
    """Dense bf16 peak TFLOP/s of a device name, the override when given; None when unknown (MFU n/a)."""
    if override:
        return float(override)
    return next((float(v) for keys, v in PEAK_TFLOPS if all(k.lower() in name.lower() for k in keys)), None)


def meta_param_counts(rank, transformer=None):
    """Exact parameter counts of what a real SD3.5-M run (or another transformer config: SD35L) holds, from
    models built on the meta device (no memory, no download): {name: count}, LoRA's per adapter of the
    given rank, and the transformer's buffer (pos_embed; the encoders' only buffer, CLIP's 77 position ids,
    is 1.2 KB and left out)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    count = lambda m: sum(p.numel() for p in m.parameters())  # tied tensors (T5's shared embedding) once
    clip = dict(vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):
        tr = SD3Transformer2DModel(**(transformer or SD35M))
        # and its one buffer, the positional embedding table (pos_embed_max_size^2 x d), cast with the weights
        out = {"transformer": count(tr), "pos_embed": sum(b.numel() for b in tr.buffers())}
        P2.add_adapters(tr, rank, 2 * rank)
        out["lora"] = sum(p.numel() for p in P2.adapter_params(tr, "default"))
        out["clip_l"] = count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, **clip)))
        out["clip_g"] = count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **clip)))
        out["t5"] = count(T5EncoderModel(T5Config(**T5_XXL)))
        out["vae"] = count(AutoencoderKL(**SD3_VAE))
    return out


def weight_table(n, model="SD3.5-M"):
    """(row, GiB) of a real run's resident tensors: frozen weights and the transformer's positional table in
    bf16, the VAE in fp32 (load_pipeline keeps it so), LoRA adapters, gradients and AdamW's two moments in
    fp32."""
    rows = [(f"{name} ({'fp32' if b == 4 else 'bf16'})", n[key] * copies * b / 2 ** 30)
            for name, key, copies, b in (
                (f"{model} transformer", "transformer", 1, 2),
                ("its pos_embed buffer", "pos_embed", 1, 2), ("CLIP-L text encoder", "clip_l", 1, 2),
                ("CLIP-G text encoder", "clip_g", 1, 2), ("T5-XXL text encoder", "t5", 1, 2),
                ("VAE, as load_pipeline", "vae", 1, 4), ("LoRA theta, old, EMA", "lora", 3, 4),
                ("theta's gradients", "lora", 1, 4), ("AdamW's two moments of theta", "lora", 2, 4))]
    total, text = sum(g for _, g in rows), sum(g for name, g in rows if "text" in name)
    return rows + [("total", total), ("total with --text_offload=True (encoders on the CPU)", total - text)]


def saved_activation_bytes(fn, params=()):
    """Bytes that autograd keeps for the backward while fn() runs a forward: the storage of every
    tensor saved for backward, each storage once, the storages of `params` (resident anyway) left out.
    A count, not an allocator reading: the same ops save the same tensors on any device, so a CPU gives
    the figure a GPU holds (attention included: the fused SDPA kernels of CPU and GPU both keep q, k, v,
    the output and the log-sum-exp, never the attention matrix). What gradient checkpointing keeps (each
    block's inputs) is held outside autograd's saved tensors, so count runs without it."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()  # its output, and the graph with it, is dropped here
    return sum(seen.values())


@contextlib.contextmanager
def built_in(dev, dtype):
    """Modules built inside are created on `dev` in `dtype` (no float32 copy first: SD3.5-M's transformer
    takes 8.4 GiB in fp32, T5-XXL 18 GiB)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            yield
    finally:
        torch.set_default_dtype(default)


def transformer_activation_bytes(config, dev, res=512, t5_tokens=128, rank=32, depth=None):
    """Bytes a sample that theta's training forward keeps for its backward without checkpointing, in a
    transformer of `config` (bf16, LoRA r=rank in fp32, under bf16 autocast), as training_activations counts
    SD3.5-M's: counted on a batch of two and halved, on copies of one and two blocks, extrapolated as
    n1 + (depth - 1) * (n2 - n1) (tested against a full count), so no 8 B-parameter SD3.5-Large is built:
    for configs whose blocks are all alike (SD3.5-L; not SD3.5-M, whose first 13 are dual-attention).
    `depth` counts that depth in full instead."""
    from diffusers import SD3Transformer2DModel
    dev = torch.device(dev)
    lat, Lt = (config["in_channels"], res // 8, res // 8), S.CLIP_LEN + t5_tokens

    def count(layers):
        cfg = dict(config, num_layers=layers,
                   dual_attention_layers=tuple(i for i in config["dual_attention_layers"] if i < layers))
        with built_in(dev, torch.bfloat16):
            tr = SD3Transformer2DModel(**cfg)
        tr.requires_grad_(False)
        P2.add_adapters(tr, rank, 2 * rank)
        tr.train()
        c = (torch.randn(2, Lt, cfg["joint_attention_dim"], device=dev, dtype=torch.bfloat16),
             torch.randn(2, cfg["pooled_projection_dim"], device=dev, dtype=torch.bfloat16))
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            return saved_activation_bytes(lambda: P2.policy_velocities(
                tr, torch.randn(2, *lat, device=dev), torch.full((2,), 0.5, device=dev), c, with_ref=False),
                tr.parameters()) / 2
    if depth is not None:
        return count(depth)
    n1, n2 = count(1), count(2)
    return n1 + (config["num_layers"] - 1) * (n2 - n1)


def text_encoder(name, depth, dev, seqs, t5_tokens=128):
    """SD3.5-M's text encoder `name` (CLIP_L, CLIP_G or T5_XXL) cut to `depth` blocks, random weights built in
    bf16 on `dev`, frozen; with `seqs` sequences of random token ids, every token content, as `tokenize`
    gives them. Returns (encoder, tokens)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    with built_in(dev, torch.bfloat16):
        if name == "t5":
            enc, L = T5EncoderModel(T5Config(**dict(T5_XXL, num_layers=depth))), t5_tokens
        else:
            cfg = dict(CLIP_L if name == "clip_l" else CLIP_G, num_hidden_layers=depth)
            enc = CLIPTextModelWithProjection(CLIPTextConfig(**cfg, vocab_size=49408,
                                                             max_position_embeddings=S.CLIP_LEN))
            L = S.CLIP_LEN
    enc.eval().requires_grad_(False)
    return enc, {name: (torch.randint(1000, (seqs, L), device=dev),
                        torch.ones(seqs, L, dtype=torch.bool, device=dev))}


def at_full_depth(count, name, layers=None):
    """count(depth) at encoder `name`'s full depth: from copies of one and two blocks, n1 + (depth - 1) *
    (n2 - n1) (the blocks after the first are alike: tested), so that no full T5-XXL (9 GiB) is built; or
    counted at layers[name] blocks in full (the tests)."""
    if layers and name in layers:
        return count(layers[name])
    depth = (T5_XXL["num_layers"] if name == "t5"
             else (CLIP_L if name == "clip_l" else CLIP_G)["num_hidden_layers"])
    n1, n2 = count(1), count(2)
    return n1 + (depth - 1) * (n2 - n1)


def encoder_activation_bytes(dev, seqs=2, t5_tokens=128, layers=None):
    """{encoder: bytes a sequence} that Phase I keeps for its backward in each of SD3.5-M's text encoders:
    random weights of the real shapes (CLIP_L, CLIP_G, T5_XXL) in bf16 on `dev`, run through
    sample.run_encoders with a delta on every token, as Phase I runs them. Counted on `seqs` sequences and
    divided (T5 keeps its position bias once for the batch: a share of it, under 1 %, is counted with each
    sequence), on copies of one and two blocks (at_full_depth; `layers` = {encoder: depth} counts those depths
    in full instead)."""
    def count(name, depth):
        enc, tokens = text_encoder(name, depth, dev, seqs, t5_tokens)
        deltas = {name: torch.zeros(*tokens[name][0].shape, S.token_embedding(enc).embedding_dim, device=dev,
                                    requires_grad=True)}
        return saved_activation_bytes(lambda: S.run_encoders({"encoders": {name: enc}}, None, deltas, (name,),
                                                             tokens), enc.parameters()) / seqs
    return {name: at_full_depth(lambda depth: count(name, depth), name, layers) for name in S.ENCODERS}


def generator_activation_bytes(dev, t5_tokens=128, rank=16, hidden=256, layers=None):
    """{encoder: (bytes a variant, bytes a pair of variants, bytes a prompt)} that one step of the amortized
    generator's training (phase1_perturb.train_generator: generator_loss, then its backward) keeps for the
    backward, at SD3.5-M's encoder shapes: each encoder (random weights, bf16) with a generator of that
    encoder alone (fp32, `rank` basis directions a token, `hidden` wide), on two prompts, every token
    content. A step of P prompts at K keeps P * ((K - 1) * a variant + (K - 1)(K - 2) / 2 * a pair + a prompt)
    summed over the encoders (L_div's pairwise cosines keep their products): counted at K = 2, 3 and 4, on
    copies of one and two blocks (at_full_depth; `layers` as there)."""
    import phase1_perturb as P1
    prompts = ["a photo of a cat", "two dogs"]  # only their rotations depend on the text

    def count(name, depth, K):
        enc, tokens = text_encoder(name, depth, dev, len(prompts), t5_tokens)
        table = S.token_embedding(enc).weight
        width = enc.config.d_model if name == "t5" else enc.config.hidden_size
        gen = S.PerturbationGenerator({name: (table.shape[1], width, table.float().std().item())}, rank,
                                      hidden).to(dev)
        loss = lambda: P1.generator_loss(gen, {"encoders": {name: enc}}, prompts, K, 0.85, 0.025, 1.0, 0,
                                         tokens)
        return saved_activation_bytes(loss, [*enc.parameters(), *gen.parameters()]) / len(prompts)
    out = {}
    for name in S.ENCODERS:
        f = {K: at_full_depth(lambda depth: count(name, depth, K), name, layers) for K in (2, 3, 4)}
        pair = f[4] - 2 * f[3] + f[2]
        variant = f[3] - f[2] - pair
        out[name] = (variant, pair, f[2] - variant)
    return out


def generator_step_bytes(per, P, K):
    """A generator step's saved bytes for P prompts at K, from generator_activation_bytes' figures."""
    return P * sum((K - 1) * a + (K - 1) * (K - 2) / 2 * c + b for a, c, b in per.values())


def generator_parameters(rank=16, hidden=256):
    """The amortized generator's parameter count at SD3.5-M's encoder widths (built on the meta device)."""
    widths = {"clip_l": CLIP_L["hidden_size"], "clip_g": CLIP_G["hidden_size"], "t5": T5_XXL["d_model"]}
    with torch.device("meta"):
        gen = S.PerturbationGenerator({n: (w, w, 1.0) for n, w in widths.items()}, rank, hidden)
    return sum(p.numel() for p in gen.parameters())


def read_budget(path):
    """The Phase II settings of a config file (path relative to this folder), exec'd over phase2_align's
    defaults."""
    base = getattr(P2, "_config_defaults", None) or {k: getattr(P2, k) for k in P2.config_keys}
    ns = {}
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), path), encoding="utf-8") as f:
        exec(f.read(), ns)
    keys = ("K", "G", "prompts_per_epoch", "sample_batch", "train_batch", "steps", "timestep_fraction",
            "opt_steps_per_epoch", "resolution", "objective", "guidance", "kl_beta", "rho", "use_schedule",
            "use_anchor", "grpo_old_logprob")
    return {k: ns.get(k, base[k]) for k in keys}


def grpo_forwards(b):
    """Under objective="grpo", per sample: (transformer calls a sampler step makes, the sampler steps at which
    a perturbed sample is also scored under C^orig, what a training step's call costs in calls): CFG doubles
    every call; grpo_old_logprob="orig" with K > 1 adds a call at each step whose condition is not C^orig
    (gamma > 0 on SD3.5's shift-3 grid; every step with use_schedule=False); theta's training call is followed
    by the frozen base's when kl_beta > 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    cfg = 2 if b["guidance"] > 1 else 1
    grid = S.sigma_grid(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), b["steps"])
    mixed = (sum(S.gamma(float(s), b["rho"]) > 0 for s in grid[:-1]) if b["use_schedule"] else b["steps"])
    scored = mixed if b["K"] > 1 and b["use_anchor"] and b["grpo_old_logprob"] == "orig" else 0
    return cfg, scored, b["kl_beta"] > 0


def epoch_flops(b, f_fwd, f_ref, f_train):
    """Model FLOPs of one epoch of budget b over all GPUs: every sample is sampled in `steps` forwards with
    LoRA (the old adapter) and trained at floor(steps * timestep_fraction) times, each v_old (with LoRA),
    v_ref (the base: DiffusionNFT's KL term) and theta's forward and backward. objective="grpo": `steps` SDE
    forwards and the C^orig scoring ones (grpo_forwards), then at each of the n_t trained steps theta's
    forward and backward and the base's forward (its KL term), every call doubled by CFG. Decoding, rewards
    and text encoding are left out (a few % of it)."""
    n_t = math.floor(b["steps"] * b["timestep_fraction"])
    if b["objective"] == "grpo":
        cfg, scored, ref = grpo_forwards(b)
        per = cfg * ((b["steps"] + scored) * f_fwd + n_t * (f_train + ref * f_ref))
        return b["prompts_per_epoch"] * b["K"] * b["G"] * per
    return b["prompts_per_epoch"] * b["K"] * b["G"] * (b["steps"] * f_fwd + n_t * (f_fwd + f_ref + f_train))


def epoch_cost(b, world, cost):
    """Samples per GPU and estimated seconds per epoch per GPU of budget b, from per-sample costs (seconds per
    sample of one sampler step, of decoding, of one training timestep) and seconds per optimizer step.
    objective="grpo" takes its own: "grpo_sample" a sampler step with CFG (C^orig scoring steps counted as
    more of them, grpo_forwards), "grpo_train" a trained step. Rewards are excluded: they depend on the
    reward model, not on this code."""
    per_gpu = math.ceil(b["prompts_per_epoch"] * b["K"] * b["G"] / world)
    n_t = math.floor(b["steps"] * b["timestep_fraction"])
    grpo = b["objective"] == "grpo"
    steps = b["steps"] + (grpo_forwards(b)[1] if grpo else 0)
    parts = dict(sample=per_gpu * steps * cost["grpo_sample" if grpo else "sample"],
                 decode=per_gpu * cost["decode"],
                 train=per_gpu * n_t * cost["grpo_train" if grpo else "train"]
                 + b["opt_steps_per_epoch"] * cost["tail"])
    return per_gpu, parts, sum(parts.values())


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns, dev, n):
    """Median seconds of each function of the dict `fns`, called in turn A,B,A,B,... n times after one warm-up
    each (interleaved, so that a machine's drift hits all alike). The warm-up also gives each one's peak CUDA
    memory in GiB (None on CPU; "OOM" if it did not fit, and then it is not timed)."""
    cuda, peaks, times = dev.type == "cuda", {}, {}
    for k, fn in fns.items():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            fn()
            sync(dev)
        except torch.cuda.OutOfMemoryError:
            peaks[k] = "OOM"
            continue
        peaks[k], times[k] = (torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None), []
    for _ in range(n):
        for k in times:
            sync(dev)
            t = time.perf_counter()
            fns[k]()
            sync(dev)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, peaks


# ----------------------------------------------------------------------------- the measurements
def exact_figures(m):
    """What needs no compute, so it prints on any machine: model FLOPs per sample, the resident weights of a
    real SD3.5-M run (parameter counts on the meta device) and, at SD3.5-M's shape, per-epoch FLOPs and
    estimated times."""
    print(f"\n== model FLOPs per sample ({m.Li} image + {m.Lt} text tokens; matmuls only, see "
          f"transformer_flops)")
    print(f"forward with LoRA {m.f_fwd / 1e9:.4g} GFLOP, without {m.f_ref / 1e9:.4g}; "
          f"LoRA training fwd+bwd {m.f_train / 1e9:.4g} = {m.f_train / m.f_fwd:.2f}x forward "
          f"(frozen base; the 3x-forward convention would say {3 * m.f_fwd / 1e9:.4g})")
    n = meta_param_counts(lora_rank or 32)
    print(f"\n== resident weights of a real SD3.5-M run "
          f"(exact: parameter counts on the meta device; LoRA r={lora_rank or 32})")
    print(f"parameters: transformer {n['transformer']:,}, CLIP-L {n['clip_l']:,}, CLIP-G {n['clip_g']:,}, "
          f"T5-XXL {n['t5']:,}, VAE {n['vae']:,}, LoRA {n['lora']:,} per adapter")
    m.weights = weight_table(n)
    for name, g in m.weights:
        print(f"  {name:<56} {g:7.2f} GiB")
    print("  (reward models and activations come on top; "
          "the peaks below hold the transformer, its LoRA and the VAE)")
    if m.is_tiny:
        return
    nl = meta_param_counts(lora_rank or 32, SD35L)
    m.weights_large = weight_table(nl, "SD3.5-L")
    print(f"\n== SD3.5-Large (exact, the same way): transformer {nl['transformer']:,} parameters "
          f"({m.weights_large[0][1]:.2f} GiB in bf16), LoRA {nl['lora']:,} per adapter; every resident "
          f"weight {m.weights_large[-2][1]:.1f} GiB, {m.weights_large[-1][1]:.1f} GiB with "
          f"--text_offload=True")
    print(f"\n== per GPU per epoch from FLOPs, before any measurement: at an assumed MFU of "
          f"{assumed_mfu:.0%} of an H100 SXM's dense bf16 peak (989 TFLOP/s); the same micro-batches on any "
          f"GPU count, so the memory a GPU needs does not change with the count")
    print(f"  {'config':<31} {'PFLOP/epoch':>11} " + " ".join(f"{f'{w} GPU s':>9}" for w in (1, 2, 4, 8)))
    for path in BUDGETS:
        fl = epoch_flops(read_budget(path), m.f_fwd, m.f_ref, m.f_train)
        print(f"  {path:<31} {fl / 1e15:>11.1f} "
              + " ".join(f"{fl / w / (assumed_mfu * 989e12):>9.0f}" for w in (1, 2, 4, 8)))


def large_activations(m):
    """What SD3.5-Large's training forward keeps for its backward (transformer_activation_bytes) at its
    config's resolution (1024 px, its native one) and micro-batch, and with its resident weights: the memory
    a GPU needs, as training_activations prints SD3.5-M's; and at 512 px, the SD3.5-M recipe's resolution."""
    b = read_budget(LARGE)
    total, offload = m.weights_large[-2][1], m.weights_large[-1][1]
    print(f"\n== activations of SD3.5-Large's training forward without checkpointing (counted on one and two "
          f"blocks, extrapolated to 38), with every resident weight ({total:.1f} GiB; {offload:.1f} GiB with "
          "--text_offload=True):")
    for res, tb in sorted({(b["resolution"], b["train_batch"]), (512, 8)}, reverse=True):
        act = transformer_activation_bytes(SD35L, m.dev, res, m.tlen, m.rank) / 2 ** 30
        Li = (res // 8 // SD35L["patch_size"]) ** 2
        fl = epoch_flops(b, *(transformer_flops(SD35L, Li, m.Lt, r, train=t) for r, t in
                              ((m.rank, False), (0, False), (m.rank, True))))
        print(f"  {res} px: {act:.2f} GiB a sample, {act * tb:.1f} GiB a micro-batch of {tb}: "
              f"{total + act * tb:.1f} GiB ({offload + act * tb:.1f} GiB with --text_offload=True); an epoch "
              f"of {LARGE} {fl / 1e15:.0f} PFLOP, {fl / 8 / (assumed_mfu * 989e12):.0f} s on 8 GPUs at "
              f"{assumed_mfu:.0%} MFU" + (" (its setting)" if res == b["resolution"] else ""))


def phase1_activations(m):
    """What Phase I's backward through the three frozen encoders keeps: batch_prompts x (K-1) sequences
    (counted before the transformer is built: on a CPU, T5-XXL and SD3.5-M side by side crowd the RAM)."""
    import phase1_perturb as P1
    enc = encoder_activation_bytes(m.dev, t5_tokens=m.tlen)
    K1 = read_budget("config/geneval_g4k12.py")["K"]
    seqs = P1.batch_prompts * (K1 - 1)
    held = sum(enc.values()) * seqs / 2 ** 30
    text_weights = sum(g for name, g in m.weights if "text encoder" in name)
    print("\n== activations of Phase I (counted, bf16): a sequence keeps "
          + ", ".join(f"{k} {v / 2 ** 20:.0f} MiB" for k, v in enc.items())
          + f"; batch_prompts={P1.batch_prompts} at K={K1} ({seqs} sequences): {held:.1f} GiB, "
          f"{held + text_weights:.1f} GiB with the encoders' weights")


def generator_activations(m):
    """What a step of the amortized generator's training keeps for its backward at SD3.5-M's encoders
    (generator_activation_bytes), at phase1_perturb's gen_batch and the largest K a step draws (K = 12 for
    the GenEval budget), with the encoders' weights and the generator's own (fp32 weights, gradients, Adam's
    two moments): the memory its training needs."""
    import phase1_perturb as P1
    per = generator_activation_bytes(m.dev, t5_tokens=m.tlen, rank=P1.gen_rank, hidden=P1.gen_hidden)
    K1 = read_budget("config/geneval_g4k12.py")["K"]
    step = lambda P: generator_step_bytes(per, P, K1) / 2 ** 30
    own = generator_parameters(P1.gen_rank, P1.gen_hidden) * 4 * 4 / 2 ** 30
    text_weights = sum(g for name, g in m.weights if "text encoder" in name)
    print(f"\n== the amortized generator's training (phase1_perturb.py --amortize=True; counted, bf16 "
          "encoders): "
          "a variant keeps " + ", ".join(f"{k} {a / 2 ** 20:.0f} MiB" for k, (a, _, _) in per.items())
          + ", a prompt's generator pass " + ", ".join(f"{k} {b / 2 ** 20:.1f} MiB"
                                                       for k, (_, _, b) in per.items())
          + f"; its {generator_parameters(P1.gen_rank, P1.gen_hidden) / 1e6:.1f} M parameters with gradients "
          f"and Adam {own:.2f} GiB")
    for P in sorted({P1.gen_batch, 2 * P1.gen_batch}):
        print(f"  gen_batch={P} at K={K1}: {step(P):.1f} GiB, {step(P) + text_weights + own:.1f} GiB with "
              f"the encoders' weights" + (" (the default)" if P == P1.gen_batch else ""))


def build_models(m):
    """The timed models, as phase2_align runs them on CUDA: the transformer in bf16 (fp32 for the tiny shape
    on a CPU) with the three fp32 LoRA adapters, under bf16 autocast; the VAE in fp32; AdamW on theta."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    if not m.is_tiny:
        with built_in(m.dev, m.dtype):
            m.tr = SD3Transformer2DModel(**SD35M)
        with torch.device(m.dev):
            m.vae = AutoencoderKL(**SD3_VAE)
        m.sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    with S.diffusers_notes_off():  # .to(dtype) warns about fp32-only modules these models lack
        m.tr.to(m.dev, m.dtype).requires_grad_(False).eval()
        m.vae.to(m.dev, torch.float32).requires_grad_(False).eval()
    P2.add_adapters(m.tr, m.rank, 2 * m.rank)
    m.params = P2.adapter_params(m.tr, "default")
    m.opt = torch.optim.AdamW(m.params, lr=3e-4, weight_decay=1e-4)
    m.autocast = ((lambda: torch.autocast(m.dev.type, dtype=torch.bfloat16)) if m.dtype == torch.bfloat16
                  else (lambda: torch.autocast(m.dev.type, enabled=False)))
    m.sigmas, m.n_t = S.sigma_grid(m.sched, steps), math.floor(steps * timestep_fraction)
    m.lat = (m.cfg.in_channels, m.res // 8, m.res // 8)
    m.cond = lambda B: (torch.randn(B, m.Lt, m.cfg.joint_attention_dim, device=m.dev, dtype=m.dtype),
                        torch.randn(B, m.cfg.pooled_projection_dim, device=m.dev, dtype=m.dtype))
    m.base_mem = torch.cuda.memory_allocated() / 2 ** 30 if m.cuda else None


def training_activations(m):
    """What theta's forward of a training timestep keeps for its backward without gradient checkpointing
    (v_old and v_ref run without grad and keep nothing), counted on a batch of two and halved: from two
    samples on the count is linear in the batch (test_bench; a batch of one shares a few storages that
    larger batches do not), so a micro-batch holds train_batch times a sample's."""
    P2.use_adapter(m.tr, "default")
    m.tr.disable_gradient_checkpointing()
    m.tr.train()
    with m.autocast():
        act = saved_activation_bytes(lambda: P2.policy_velocities(m.tr, torch.randn(2, *m.lat, device=m.dev),
                                                                  torch.full((2,), 0.5, device=m.dev),
                                                                  m.cond(2)), m.tr.parameters()) / 2 ** 31
        # objective="grpo": theta's call with CFG (two sequences a sample) and the SDE step's log-prob,
        # counted on one sample (a batch of one shares a few storages: an upper bound by those). Not on a
        # CPU at SD3.5-M's shape: a second count there takes the process past 19 GiB of RAM (the first one's
        # freed memory is not reused); twice DiffusionNFT's figure stands in, what the count gave there on
        # 2026-12-06 (4.144 against 2 x 2.072 GiB)
        x, c = torch.randn(1, *m.lat, device=m.dev), m.cond(1)
        grpo = (saved_activation_bytes(lambda: S.sde_step(
            x, S.guided_velocity(m.tr, x, 0.5, c, grpo_guidance, m.cond(1)).float(), 0.5, 0.4, prev=x)[1],
            m.tr.parameters()) / 2 ** 30 if m.cuda or m.is_tiny else 2 * act)
    m.tr.eval()
    total, offload = m.weights[-2][1], m.weights[-1][1]
    size = lambda g: f"{g:.2f} GiB" if g >= 0.1 else f"{g * 1024:.2f} MiB"
    print(f"\n== activations of a training forward without gradient checkpointing (counted, {m.dtype}): "
          f"{size(act)} a sample, {size(act * train_batch)} a micro-batch of {train_batch}; "
          f"objective=grpo with CFG: {size(grpo)} a sample, {size(grpo * train_batch)} a micro-batch")
    if not m.is_tiny:
        print(f"  + the resident weights above: {total + act * train_batch:.1f} GiB "
              f"({offload + act * train_batch:.1f} GiB with --text_offload=True); grpo with CFG "
              f"{total + grpo * train_batch:.1f} GiB ({offload + grpo * train_batch:.1f} GiB); before the "
              f"backward's transients and the reward models")


def sampling(m):
    """Ours against diffusers' pipeline on the same transformer (old adapter), same steps, no CFG. The
    pipeline has no text encoders: given prompt_embeds, only its transformer loop runs, which is what the
    ratio compares. It steps with its Euler scheduler, ours with `solver`: the same forwards."""
    from diffusers import StableDiffusion3Pipeline
    x, cs = torch.randn(sample_batch, *m.lat, device=m.dev), m.cond(sample_batch)
    pipe_d = StableDiffusion3Pipeline(transformer=m.tr, scheduler=m.sched, vae=m.vae,
                                      text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None,
                                      text_encoder_3=None, tokenizer_3=None)
    pipe_d.set_progress_bar_config(disable=True)
    P2.use_adapter(m.tr, "old")
    ours = lambda: S.sample(m.tr, m.sigmas, x, cs, solver=solver)
    theirs = lambda: pipe_d(prompt_embeds=cs[0], pooled_prompt_embeds=cs[1], guidance_scale=1.0,
                            num_inference_steps=steps, latents=x.to(m.dtype), height=m.res, width=m.res,
                            output_type="latent").images
    with m.autocast():
        m.ts, mem = interleaved({"ours": ours, "diffusers": theirs}, m.dev, repeats)
        m.x0 = ours().float()
    print(f"\n== sampling: batch {sample_batch} x {steps} steps, median of {repeats} interleaved "
          f"(resident before: {m.gib(m.base_mem)})")
    for k in mem:
        s = (f"{m.ts[k]:.3f} s = {sample_batch / m.ts[k]:.1f} img/s, "
             f"{m.rate(steps * sample_batch * m.f_fwd, m.ts[k])}, " if k in m.ts else "")
        print(f"  {k:<10} {s}peak {m.gib(mem[k])}")
    if len(m.ts) == 2:
        print(f"  ours / diffusers = {m.ts['ours'] / m.ts['diffusers']:.3f}")


def decoding(m):
    """The VAE decode of one sampled batch (phase2 decodes chunks of sample_batch for the reward)."""
    td, dmem = interleaved({"decode": lambda: S.decode(m.vae, m.x0)}, m.dev, repeats)
    m.td = td.get("decode", float("nan"))
    print(f"\n== VAE decode: batch {sample_batch} at {m.res} px: {m.td:.3f} s = {sample_batch / m.td:.1f} "
          f"img/s, peak {m.gib(dmem['decode'])}")


def train_micro(m, x0_b, c_b, r_b):
    """One training micro-batch as phase2_align runs it: n_t timesteps of (v_old, v_ref, v_theta, the NFT
    objective, backward)."""
    perms = torch.stack([torch.randperm(steps) for _ in range(len(x0_b))])[:, :m.n_t]
    for ti in range(m.n_t):
        t = m.sigmas[perms[:, ti]].to(m.dev)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0_b + t.view(-1, 1, 1, 1) * torch.randn_like(x0_b)
        with m.autocast():
            v_old, v_ref, v_theta = P2.policy_velocities(m.tr, x_t, t, c_b)
            loss = P2.nft_objective(v_theta, v_old, v_ref, x_t, x0_b, t, r_b)[0]
            (loss.sum() / (len(x0_b) * m.n_t)).backward()


def train_tail(m):
    """Once per optimizer step: clip, AdamW, the EMA blend."""
    torch.nn.utils.clip_grad_norm_(m.params, 1.0)
    m.opt.step()
    m.opt.zero_grad(set_to_none=True)
    P2.blend_adapter(m.tr, "ema", "default", P2.ema_decay(1))


def training(m):
    """A training micro-batch with and without gradient checkpointing, timed interleaved, with its peak
    memory; the optimizer tail timed apart."""
    P2.use_adapter(m.tr, "default")
    xb, cb, rb, tails = (m.x0[:train_batch], tuple(c[:train_batch] for c in m.cond(sample_batch)),
                         torch.rand(train_batch, device=m.dev), [])

    def step(ckpt):
        m.tr.enable_gradient_checkpointing() if ckpt else m.tr.disable_gradient_checkpointing()
        m.tr.train()
        train_micro(m, xb, cb, rb)
        sync(m.dev)
        t0 = time.perf_counter()
        train_tail(m)
        sync(m.dev)
        tails.append(time.perf_counter() - t0)
        m.tr.eval()
    tt, tmem = interleaved({"checkpointing on": lambda: step(True),
                            "checkpointing off": lambda: step(False)}, m.dev, repeats)
    m.tail = statistics.median(tails) if tails else float("nan")
    print(f"\n== training step: micro-batch {train_batch} x {m.n_t} timesteps x (3 forwards + backward), "
          f"then clip, AdamW, EMA")
    for k in tmem:
        s = (f"{tt[k]:.3f} s = {train_batch * m.n_t / tt[k]:.1f} sample-timesteps/s, "
             f"{m.rate(m.n_t * train_batch * (m.f_fwd + m.f_ref + m.f_train), tt[k])}, " if k in tt else "")
        print(f"  {k:<18} {s}peak {m.gib(tmem[k])}")
    print(f"  of which the optimizer tail (clip + AdamW + EMA blend, once per optimizer step): "
          f"{m.tail * 1e3:.1f} ms")
    # phase2's default is without checkpointing; where that did not fit, the estimates below use it on
    m.t_micro = tt.get("checkpointing off", tt.get("checkpointing on", float("nan"))) - m.tail
    m.ckpt_used = "checkpointing off" not in tt


def e2po_epoch(m):
    """An epoch of E²PO (K=4) against K=1 at equal N samples per prompt, as phase2's loop: sampling with the
    schedule's condition mixing (C^opt faked by random rows for k >= 1), training on C^orig, one optimizer
    step, old <- d*old + (1-d)*theta; no decode and no reward. Without gradient checkpointing, phase2's
    default (with it where the training step did not fit without)."""
    m.tr.enable_gradient_checkpointing() if m.ckpt_used else m.tr.disable_gradient_checkpointing()

    def inputs(K, G):
        _, idx, ks = P2.epoch_samples(epoch_prompts, K, G, 0, epoch_prompts * K * G,
                                      list(range(epoch_prompts)))
        c_orig = tuple(c[idx] for c in m.cond(epoch_prompts))
        pert = torch.tensor(ks, device=m.dev) > 0
        c_opt = tuple(torch.where(pert.view(-1, *[1] * (o.dim() - 1)), f, o)
                      for f, o in zip(m.cond(len(idx)), c_orig))
        r = P2.advantages(torch.rand(len(idx), device=m.dev),  # random rewards
                          torch.arange(len(idx), device=m.dev) // (K * G))
        return torch.randn(len(idx), *m.lat, device=m.dev), c_orig, c_opt, r

    def epoch(noise, c_orig, c_opt, r):
        P2.use_adapter(m.tr, "old")
        out = []
        for a in range(0, len(noise), sample_batch):
            b = slice(a, a + sample_batch)
            with m.autocast():
                out.append(S.sample(m.tr, m.sigmas, noise[b], tuple(c[b] for c in c_orig),
                                    tuple(c[b] for c in c_opt), rho, solver=solver))
        x0_e = torch.cat(out).float()
        P2.use_adapter(m.tr, "default")
        m.tr.train()
        for a in range(0, len(noise), train_batch):
            b = slice(a, a + train_batch)
            train_micro(m, x0_e[b], tuple(c[b] for c in c_orig), r[b])
        train_tail(m)
        m.tr.eval()
        P2.blend_adapter(m.tr, "old", "default", P2.old_decay(1))
    runs = {f"E²PO G={epoch_N // 4} K=4": inputs(4, epoch_N // 4), f"K=1 G={epoch_N}": inputs(1, epoch_N)}
    te, _ = interleaved({k: (lambda v=v: epoch(*v)) for k, v in runs.items()}, m.dev, repeats)
    print(f"\n== epoch at equal N: {epoch_prompts} prompts x {epoch_N} samples, "
          f"sampling + training (no decode, no reward)")
    for k in te:
        print(f"  {k:<14} {te[k]:.3f} s")
    if len(te) == 2:
        a, b = te.values()
        print(f"  ratio = {a / b:.3f} (the same code path per sample: ~1 expected)")


def grpo_micro(m, states, old_log_prob, A, c, c_neg):
    """One training micro-batch of objective="grpo" as phase2_align.grpo_terms runs it: at each of the n_t
    trained steps of the stored paths, the frozen base's SDE step (no grad), theta's log-prob of the stored
    transition, grpo_loss + 0.04 * grpo_kl (Flow-GRPO's GenEval beta), backward; CFG at grpo_guidance."""
    for ti in range(m.n_t):
        s, s_next = float(m.sigmas[ti]), float(m.sigmas[ti + 1])
        x = states[:, ti]
        step = lambda model: S.sde_step(x, S.guided_velocity(model, x, s, c, grpo_guidance, c_neg).float(), s,
                                        s_next, prev=states[:, ti + 1])
        with m.autocast():
            with torch.no_grad():
                P2.use_adapter(m.tr, None)
                mean_ref = step(m.tr)[2]
                P2.use_adapter(m.tr, "default")
            _, lp, mean, s_t = step(m.tr)
            loss = (P2.grpo_loss(lp, old_log_prob[:, ti], A, 1e-4, 5.0)
                    + 0.04 * P2.grpo_kl(mean, mean_ref, s_t).mean())
            (loss / m.n_t).backward()


def grpo(m):
    """Flow-GRPO's objective (objective="grpo") with CFG at grpo_guidance: a batch of SDE sampling
    (sample.sde_sample, its states and log-probs kept; the old adapter) and a training micro-batch
    (grpo_micro, gradients then dropped), timed interleaved, with their peak memory; training with
    gradient checkpointing where the DiffusionNFT step needed it. Its per-sample costs feed the per-epoch
    estimates of the GRPO configs."""
    m.tr.enable_gradient_checkpointing() if m.ckpt_used else m.tr.disable_gradient_checkpointing()
    x, cs, c_neg = torch.randn(sample_batch, *m.lat, device=m.dev), m.cond(sample_batch), m.cond(1)
    gens = [[torch.Generator().manual_seed(i * sample_batch + n) for n in range(sample_batch)]
            for i in range(steps)]

    def draw():
        P2.use_adapter(m.tr, "old")
        with m.autocast():
            out = S.sde_sample(m.tr, m.sigmas, x, cs, guidance=grpo_guidance, c_neg=c_neg, generators=gens)
        P2.use_adapter(m.tr, "default")
        return out
    states, lp, _ = draw()
    b = slice(0, train_batch)
    A = torch.randn(train_batch, device=m.dev)

    def train_step():
        m.tr.train()
        grpo_micro(m, states[b], lp[b], A, tuple(c[b] for c in cs), c_neg)
        m.opt.zero_grad(set_to_none=True)
        m.tr.eval()
    t, mem = interleaved({"sampling": draw, "training": train_step}, m.dev, repeats)
    m.t_grpo_sample = t.get("sampling", float("nan")) / (sample_batch * steps)
    m.t_grpo_train = t.get("training", float("nan")) / (train_batch * m.n_t)
    print(f"\n== objective=grpo (Flow-GRPO's) with CFG {grpo_guidance}: SDE sampling, batch {sample_batch} x "
          f"{steps} steps (2 calls a step), and a training micro-batch {train_batch} x {m.n_t} steps (the "
          f"base's call and theta's forward + backward, each on 2 sequences a sample), median of {repeats}")
    for k, calls in (("sampling", 2 * steps * sample_batch * m.f_fwd),
                     ("training", 2 * m.n_t * train_batch * (m.f_ref + m.f_train))):
        print(f"  {k:<10} " + (f"{t[k]:.3f} s, {m.rate(calls, t[k])}, " if k in t else "")
              + f"peak {m.gib(mem[k])}")


def per_gpu_epochs(m):
    """Seconds per GPU per epoch for the paper's budgets, from the per-sample costs measured above."""
    cost = dict(sample=m.ts.get("ours", float("nan")) / (sample_batch * steps), decode=m.td / sample_batch,
                train=m.t_micro / (train_batch * m.n_t), tail=m.tail, grpo_sample=m.t_grpo_sample,
                grpo_train=m.t_grpo_train)
    print(f"\n== per GPU per epoch on {gpus} GPUs: {'the tiny model' if m.is_tiny else 'SD3.5-M'}'s "
          f"per-sample costs above (training {'with' if m.ckpt_used else 'without'} checkpointing; the grpo "
          f"configs from the objective=grpo section, with CFG); rewards excluded")
    print(f"  {'config':<31} {'G':>3} {'K':>3} {'prompts':>7} {'samples/GPU':>11} "
          f"{'sample s':>9} {'decode s':>9} {'train s':>9} {'total s':>9}")
    for path in BUDGETS:
        bud = read_budget(path)
        per_gpu, parts, total = epoch_cost(bud, gpus, cost)
        # per-sample costs then approximate
        other = (bud["sample_batch"], bud["train_batch"]) != (sample_batch, train_batch)
        print(f"  {path:<31} {bud['G']:>3} {bud['K']:>3} {bud['prompts_per_epoch']:>7} {per_gpu:>11} "
              f"{parts['sample']:>9.1f} {parts['decode']:>9.1f} {parts['train']:>9.1f} {total:>9.1f}"
              + (f"  (its batches {bud['sample_batch']}/{bud['train_batch']} differ from the measured ones)"
                 if other else ""))


def main(argv=None):
    from configurator import configure
    configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    S.quiet()  # before diffusers' pipeline module imports transformers' image processors
    dev, dtype = S.pick_device(device)
    m = SimpleNamespace(dev=dev, cuda=dev.type == "cuda", is_tiny=shape == "tiny")
    # SD3.5-M runs in bf16 (under bf16 autocast, LoRA in fp32) on any device
    m.dtype = dtype if m.is_tiny else torch.bfloat16
    m.res, m.tlen, m.rank = (resolution or (64 if m.is_tiny else 512), t5_len or (32 if m.is_tiny else 128),
                             lora_rank or (4 if m.is_tiny else 32))
    peak = (lookup_peak(torch.cuda.get_device_name(dev) if m.cuda else "cpu", peak_tflops)
            if m.cuda or peak_tflops else None)
    m.gib = lambda g: "n/a (CPU)" if g is None else g if isinstance(g, str) else f"{g:.1f} GiB"
    m.rate = lambda fl, s: (f"{fl / s / 1e12:.3g} TFLOP/s, MFU "
                            + (f"{fl / s / 1e12 / peak:.1%}" if peak else "n/a"))
    print(f"== bench: shape={shape}, {m.res} px, T5 {m.tlen} tokens, LoRA r={m.rank}, {dev} {m.dtype}, peak "
          + (f"{peak:.0f} TFLOP/s (dense bf16, vendor datasheet)" if peak
             else "n/a (CPU or unknown device; --peak_tflops=)"))
    torch.manual_seed(0)
    if m.is_tiny:
        import tiny
        pipe = tiny.pipeline(0)
        m.tr, m.vae, m.sched = pipe.transformer, pipe.vae, pipe.scheduler
    m.cfg = m.tr.config if m.is_tiny else SimpleNamespace(**SD35M)
    m.Li, m.Lt = (m.res // 8 // m.cfg.patch_size) ** 2, S.CLIP_LEN + m.tlen
    m.f_fwd, m.f_ref, m.f_train = (transformer_flops(m.cfg, m.Li, m.Lt, m.rank),
                                   transformer_flops(m.cfg, m.Li, m.Lt, 0),
                                   transformer_flops(m.cfg, m.Li, m.Lt, m.rank, train=True))
    exact_figures(m)
    count_only = not m.cuda and not m.is_tiny and count_activations
    if not m.is_tiny and (m.cuda or count_only):
        phase1_activations(m)
        generator_activations(m)
        large_activations(m)
    if not m.cuda and not m.is_tiny and device == "auto" and not count_only:
        print("\nno GPU: the SD3.5-M timings would take hours on a CPU; "
              "run `python bench.py --shape=tiny` (or --device=cpu to insist), or "
              "`python bench.py --count_activations=True` to count Phase I's and II's activations here")
        return
    build_models(m)
    training_activations(m)
    if count_only:
        return
    sampling(m)
    decoding(m)
    training(m)
    e2po_epoch(m)
    grpo(m)
    per_gpu_epochs(m)


if __name__ == "__main__":
    main()
