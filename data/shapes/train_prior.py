"""
Train the shapes world's prior from scratch on CPU: a text-to-image model of exactly Stable Diffusion
3.5's classes and layout (AutoencoderKL with 16 latent channels and 8x down, SD3Transformer2DModel with
dual attention layers and RMS qk-norm, CLIP-L + CLIP-G + T5 text encoders, FlowMatchEulerDiscreteScheduler),
only tiny, saved as a diffusers folder that every script of this repository loads with --model=PATH.

    python data/shapes/train_prior.py                       # ~65 min, 1 thread -> data/shapes/prior/
    python data/shapes/train_prior.py --eval_only=True      # re-evaluate the saved folder (2 min)
    # the guidance-distilled prior (~12 min, 1 thread): draws without CFG what the prior draws with it
    python data/shapes/train_prior.py --distill_from=data/shapes/prior --out_dir=data/shapes/prior_cfgfree
    # a smoke run of every stage in a minute:
    python data/shapes/train_prior.py --out_dir=out/prior_smoke --n_images=512 --vae_steps=10 --steps=10 \
        --eval_images=4

Stages, top to bottom:
1. data: n_images captioned renders of data/shapes/prepare.py (tags equally likely, then a task of the
   tag, then one of its wordings). The prior sees every task's captions, as SD3.5 saw the web; only
   the RL prompt files (train/test_metadata.jsonl) are split.
2. VAE: AutoencoderKL trained on MSE + vae_kl * KL (per latent element); its scaling and shift factors
   are set from the statistics of the training latents (SD3's convention: z = (x - shift) * scaling).
3. text: word-level tokenizers built offline from the captions' words (every word one token; other
   text falls back to characters, never to <unk>), so a caption is ~12 tokens. CLIP's sequence
   length is its tokenizer's model_max_length (clip_len), T5's is t5_len: the transformer sees
   clip_len + t5_len text tokens instead of SD3's 77 + 256, which is where a small model's compute
   goes. The three encoders are small, randomly initialised and trained jointly with the transformer
   (train_text). Measured against frozen random encoders (same VAE, 4000 steps, 32 held-out images a
   tag, 10 steps): overall strict accuracy 0.12 both; colour prompts 0.41 trained vs 0.31 frozen,
   single objects 0.22 vs 0.34 (differences within the noise of 32 images); frozen runs 20 % faster a
   step (conditions cached). Trained is the default because the E2PO perturbations act on the
   encoders' token embeddings and are judged by their embeddings, which should mean something, as
   SD3.5's pretrained encoders' do.
4. transformer: rectified flow as SD3, x_t = (1 - t) x0 + t eps, target v = eps - x0, timestep t * 1000,
   t = shift(u) with u ~ logit-normal(0, 1) and the scheduler's own shift (what diffusers' SD3 training
   script does), 10 % of captions dropped to "" (an unconditional model for CFG, as SD3). AdamW with
   warm-up and cosine decay; the saved weights are an EMA of the trained ones (text encoders included).
5. save: StableDiffusion3Pipeline(...).save_pretrained(out_dir) in save_dtype, plus shapes_prior.json
   (resolution, t5_len: what configs need) and README.md.
6. evaluate: the held-out prompts (data/shapes/test_metadata.jsonl) sampled as RL rollouts are (sample.py,
   dpm2, 10 steps, no CFG) and as evaluation is (40 steps), judged by the `shapes` reward; per tag strict
   accuracy and mean partial credit, next to the ground-truth renders and their VAE reconstructions
   (the ceiling). Printed and written to out_dir/TRAINING.txt.
With --distill_from=PRIOR, stages 2-4 give way to guidance distillation (distill_guidance): PRIOR's
transformer learns to draw without CFG what it draws with CFG at scale distill_cfg; its VAE and text
encoders are kept. The RL recipe samples without CFG, so this prior's failures are more often choices
(no object drawn at all) than drawing skill, and RL fixes those within minutes (docs/shapes_world.md).

Why threads = 1: on a shared 2-core machine, two OpenMP threads spin-wait whenever another process holds
a core, and a training step became 5-9x slower than with one thread (measured); one thread is also
the considerate choice there. Set --threads=2 on an idle machine.
"""
import json
import math
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import prepare  # noqa: E402  (data/shapes/prepare.py: tasks, wordings, renderer)
import sample  # noqa: E402
from rewards import GENEVAL_TAGS, shapes_world  # noqa: E402

_names_before_config = set(globals())
# -----------------------------------------------------------------------------
# config (python data/shapes/train_prior.py --key=value)
out_dir = os.path.relpath(os.path.join(HERE, "prior"), os.getcwd())
seed = 0
threads = 1  # see the docstring
resolution = 64
n_images = 30000  # pretraining renders (each seen ~5 times by the transformer)
# VAE (1.0 M parameters)
vae_channels = (16, 32, 64, 64)  # 4 blocks: 8x down, as SD3's VAE
vae_steps = 1000
vae_batch = 16  # small batches, more steps: the better use of a CPU minute (measured)
vae_lr = 2e-3
vae_kl = 1e-4  # weight of the KL per latent element, against the per-pixel reconstruction loss on [-1, 1]
vae_loss = "mse"  # "mse" or "l1" (sharper edges)
vae_from = ""  # a prior folder whose vae/ to reuse instead of training one (experiments)
# text encoders
clip_len = 16  # CLIP tokens (the tokenizers' model_max_length); captions need <= 12
t5_len = 16  # T5 tokens; captions need <= 11
train_text = True  # train the three text encoders jointly; False keeps them frozen random (conditions cached)
text_lr = 1e-3
# transformer
width = 128  # heads * head_dim (SD3.5-M: 24 * 64)
heads = 4
layers = 4
dual_layers = 2  # the first `dual_layers` blocks have SD3.5's second (image-only) attention
shift = 3.0  # the scheduler's shift, used in training and sampling (SD3.5's value)
steps = 15000  # 5000 (~15 min) gave held-out strict accuracy 0.13, 15000 gave 0.24 (the committed prior)
batch = 32
lr = 2e-3
lr_min = 2e-4
warmup = 200
ema = 0.998
caption_dropout = 0.1
log_every = 100
# saving and evaluation
# transformer and VAE weights on disk (halves the folder); text encoders stay fp32, see save()
save_dtype = "float16"
test_prompts = os.path.relpath(os.path.join(HERE, "test_metadata.jsonl"), os.getcwd())
eval_images = 64  # at least this many images per tag (prompts of a tag repeated over seeds)
eval_steps = (10, 40)
eval_only = False  # only evaluate the folder at out_dir
# guidance distillation (ours, optional): with distill_from set, nothing is trained from scratch; that
# prior's transformer learns to draw without CFG what it draws with CFG at scale distill_cfg, then it is
# saved and evaluated as above (data/shapes/prior_cfgfree: docs/shapes_world.md)
distill_from = ""
distill_cfg = 3.0
distill_steps = 2000
distill_lr = 2e-4
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if k not in _names_before_config and not k.startswith("_")
               and isinstance(v, (int, float, bool, str, tuple, type(None)))]


def log(msg):
    print(msg, flush=True)


# ----------------------------------------------------------------------------- 1. data
def pretraining_set(n, res, rng):
    """n renders and their captions: a tag uniformly, a task of the tag, one of its wordings, a seed."""
    tasks = prepare.all_tasks()
    by_tag = {t: [m for m in tasks if m["tag"] == t] for t in GENEVAL_TAGS}
    images, captions = np.empty((n, res, res, 3), np.uint8), []
    for i in range(n):
        pool = by_tag[GENEVAL_TAGS[rng.integers(len(GENEVAL_TAGS))]]
        m = pool[rng.integers(len(pool))]
        words = prepare.wordings(m)
        captions.append(words[rng.integers(len(words))])
        images[i] = prepare.render(m, res, seed=int(rng.integers(2 ** 31)))
    return images, captions


def to_tensor(images):
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------- 2. VAE
def build_vae(channels, res):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
                         norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), block_out_channels=channels,
                         use_quant_conv=False, use_post_quant_conv=False, sample_size=res)


def cosine_lr(step, total, peak, floor, warm):
    if step < warm:
        return peak * (step + 1) / warm
    p = (step - warm) / max(total - warm, 1)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def train_vae(images, g):
    vae = build_vae(vae_channels, resolution)
    opt = torch.optim.AdamW(vae.parameters(), lr=vae_lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(vae_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, vae_steps, vae_lr, vae_lr / 10, 50)
        x = to_tensor(images[torch.randint(len(images), (vae_batch,), generator=g).numpy()])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = (mse if vae_loss == "mse" else F.l1_loss(rec, x)) + vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == vae_steps - 1:
            log(f"vae step {step:5d}  mse {mse.item():.4f}  kl/elem {kl.item():.2f}  "
                f"{(step + 1) / (time.time() - t0):.2f} steps/s")
    vae.eval().requires_grad_(False)
    return vae, time.time() - t0


@torch.no_grad()
def encode_latents(vae, images, bs=256):
    """Posterior means, unscaled [N, 16, h, w]."""
    return torch.cat([vae.encode(to_tensor(images[i:i + bs])).latent_dist.mode()
                      for i in range(0, len(images), bs)])


@torch.no_grad()
def reconstruct(vae, images, bs=256):
    """uint8 renders -> float [N, 3, H, W] in [0, 1] through encode (mode) and decode."""
    out = []
    for i in range(0, len(images), bs):
        z = vae.encode(to_tensor(images[i:i + bs])).latent_dist.mode()
        out.append((vae.decode(z).sample / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


# ----------------------------------------------------------------------------- 3. text
def caption_words():
    return sorted({w for m in prepare.all_tasks() for c in prepare.wordings(m) for w in c.split()})


def word_clip_tokenizer(words, length, pad_token="<|endoftext|>"):
    """A real CLIPTokenizer (byte-level BPE) whose merges build each word of `words` into one token.
    The vocabulary is the byte alphabet, the same with the end-of-word mark, the words' prefixes, the
    words, then BOS and EOS as the two highest ids (as in real CLIP: the encoders' legacy argmax pooling,
    eos_token_id=2 in their config, finds EOS). Longer words' merges come first, so a shorter word's
    merge never fires inside a longer word (checked). model_max_length = `length` is CLIP's sequence
    length (sample.tokenize and diffusers' encode_prompt pad to it). CLIP-G pads with '!' (id 0), as SD3."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    merges = []
    for w in sorted(words, key=lambda w: (-len(w), w)):
        cur = w[0] if len(w) > 1 else w + "</w>"
        for k, ch in enumerate(w[1:], start=2):
            piece = ch + "</w>" if k == len(w) else ch
            if (cur, piece) not in merges:
                merges.append((cur, piece))
            cur += piece
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=length)
    bad = [w for w in words if len(tok.tokenize(w)) != 1]
    if bad:
        raise RuntimeError(f"the word-level CLIP tokenizer splits {bad}")
    return tok


def word_t5_tokenizer(words):
    """A real T5Tokenizer (unigram) with a whole-word piece per word (score -1, beating any split into
    the single-character pieces that cover other text); <pad>=0, </s>=1, <unk>=2 as in T5."""
    from transformers import T5Tokenizer
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'\"-:;()#&/"
    pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
              + [("\u2581" + w, -1.0) for w in words])
    seen = {p for p, _ in pieces}
    pieces += [(p, s) for p, s in [(c, -3.0) for c in alphabet] + [("\u2581" + c, -2.5) for c in alphabet]
               if p not in seen]
    tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    bad = [w for w in words if len(tok.tokenize(w)) != 1]
    if bad:
        raise RuntimeError(f"the word-level T5 tokenizer splits {bad}")
    return tok


def build_text(words):
    """(tokenizers, encoders): CLIP-L (hidden 32), CLIP-G (hidden 48), T5 (d_model 96 >= 32 + 48, so the
    CLIP features zero-pad into T5's width as SD3's 2048 into 4096)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    tok_l, tok_g = word_clip_tokenizer(words, clip_len), word_clip_tokenizer(words, clip_len, pad_token="!")
    tok_t5 = word_t5_tokenizer(words)
    clip = dict(vocab_size=len(tok_l), max_position_embeddings=clip_len, num_hidden_layers=2,
                num_attention_heads=2, hidden_act="gelu", bos_token_id=tok_l.bos_token_id,
                eos_token_id=2)  # 2: legacy argmax pooling
    enc_l = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=32, intermediate_size=64, projection_dim=32, **clip))
    enc_g = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=48, intermediate_size=96, projection_dim=48, **clip))
    # no dropout (T5's default is 0.1): frozen encoders must give training and sampling the same condition
    enc_t5 = T5EncoderModel(T5Config(vocab_size=len(tok_t5), d_model=96, d_kv=16, d_ff=128, num_layers=2,
                                     num_heads=2, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                     dropout_rate=0.0))
    return (tok_l, tok_g, tok_t5), (enc_l, enc_g, enc_t5)


# ----------------------------------------------------------------------------- 4. transformer
def build_transformer(res):
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(
        sample_size=res // 8, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
        attention_head_dim=width // heads, num_attention_heads=heads, joint_attention_dim=96,
        caption_projection_dim=width, pooled_projection_dim=32 + 48, pos_embed_max_size=max(16, res // 16),
        dual_attention_layers=tuple(range(dual_layers)), qk_norm="rms_norm")


def noised(x0, g):
    """(t, eps, x_t) of rectified flow: x_t = (1 - t) x0 + t eps, t = shift(u), u ~ logit-normal(0, 1)
    (the scheduler's shift, as SD3's training draws its sigmas)."""
    t = torch.sigmoid(torch.randn(len(x0), generator=g))
    t = shift * t / (1 + (shift - 1) * t)
    eps = torch.randn(x0.shape, generator=g)
    tt = t.view(-1, 1, 1, 1)
    return t, eps, (1 - tt) * x0 + tt * eps


def frozen_conditions(text, captions):
    """For frozen encoders: every distinct caption (and "", the unconditional one) encoded once; returns
    a lookup from a list of those captions to their condition batch."""
    uniq = sorted(set(captions)) + [""]
    with torch.no_grad():
        cache = sample.encode(text, uniq)
    where = {c: i for i, c in enumerate(uniq)}

    def lookup(caps):
        j = torch.tensor([where[c] for c in caps])
        return cache[0][j], cache[1][j]
    return lookup


def step_and_average(opt, params, shadow, loss, step):
    """One clipped AdamW step, then the EMA shadow <- d * shadow + (1 - d) * params,
    d = min(ema, (1 + step) / (10 + step)). Returns the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(shadow, [p.detach() for p in params], 1 - min(ema, (1 + step) / (10 + step)))
    return loss.item()


@torch.no_grad()
def keep_average(params, shadow):
    """The trained weights become their EMA (what is saved)."""
    torch._foreach_copy_(params, shadow)


def train_transformer(transformer, text, latents, captions, g):
    """Rectified flow on (latents, captions); returns the EMA copies of the trained modules' weights."""
    mods = [transformer] + (list(text["encoders"].values()) if train_text else [])
    for e in text["encoders"].values():
        e.eval().requires_grad_(False)
    for m in mods:
        m.train().requires_grad_(True)
    groups = [{"params": list(transformer.parameters()), "peak": lr}]
    if train_text:
        groups.append({"params": [p for e in text["encoders"].values() for p in e.parameters()],
                       "peak": text_lr})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    params = [p for m in mods for p in m.parameters()]
    shadow = [p.detach().clone() for p in params]
    if not train_text:  # frozen encoders: every caption's condition once
        cached = frozen_conditions(text, captions)
    n, t0, hist = len(latents), time.time(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, group["peak"], group["peak"] * lr_min / lr, warmup)
        idx = torch.randint(n, (batch,), generator=g)
        caps = [captions[i] for i in idx.tolist()]
        drop = torch.rand(batch, generator=g) < caption_dropout
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        if train_text:
            cond = sample.encode(text, caps)
        else:
            cond = cached(caps)
        x0 = latents[idx]
        t, eps, x_t = noised(x0, g)
        loss = F.mse_loss(sample.velocity(transformer, x_t, t, cond), eps - x0)
        hist.append(step_and_average(opt, params, shadow, loss, step))
        if step % log_every == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {np.mean(hist[-log_every:]):.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{(step + 1) / (time.time() - t0):.2f} steps/s")
    keep_average(params, shadow)
    for m in mods:
        m.eval().requires_grad_(False)
    return time.time() - t0, hist


def distill_guidance(transformer, text, latents, captions, g):
    """Guidance distillation: the transformer regresses its conditional velocity onto a frozen copy's CFG
    velocity v_u + distill_cfg * (v_c - v_u) at the pretraining set's x_t (t drawn as in training);
    AdamW at distill_lr, EMA as training; the encoders stay frozen (conditions cached). A CFG-free
    sampler then draws what CFG drew: the RL recipe samples without CFG, as DiffusionNFT does."""
    import copy
    teacher = copy.deepcopy(transformer).eval().requires_grad_(False)
    cached = frozen_conditions(text, captions)
    transformer.train().requires_grad_(True)
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=distill_lr, weight_decay=0.0)
    shadow = [p.detach().clone() for p in params]
    t0, hist = time.time(), []
    for step in range(distill_steps):
        idx = torch.randint(len(latents), (batch,), generator=g)
        c, u = cached([captions[i] for i in idx.tolist()]), cached([""] * batch)
        t, _, x_t = noised(latents[idx], g)
        with torch.no_grad():
            v_c, v_u = sample.velocity(teacher, x_t, t, c), sample.velocity(teacher, x_t, t, u)
        loss = F.mse_loss(sample.velocity(transformer, x_t, t, c), v_u + distill_cfg * (v_c - v_u))
        hist.append(step_and_average(opt, params, shadow, loss, step))
        if step % log_every == 0 or step == distill_steps - 1:
            log(f"distill {step:5d}  loss {np.mean(hist[-log_every:]):.4f}  "
                f"{(step + 1) / (time.time() - t0):.2f} steps/s")
    keep_average(params, shadow)
    transformer.eval().requires_grad_(False)
    return time.time() - t0, hist


# ----------------------------------------------------------------------------- 5. save
def prior_readme(folder, info):
    """The README.md saved in a prior folder: what it is, how to load and sample it."""
    where = folder.rstrip("/")
    how = (f"guidance-distilled (CFG scale {info['distill_cfg']}) from `{info['distilled_from']}`"
           if "distilled_from" in info else "trained from scratch")
    return (
        "# The shapes world's prior\n\n"
        f"A tiny SD3-shaped text-to-image model (StableDiffusion3Pipeline classes), {how} on CPU by\n"
        "`python data/shapes/train_prior.py` on renders of `data/shapes/prepare.py`. Load it with\n"
        f"`--model={where}` or `StableDiffusion3Pipeline.from_pretrained(\"{where}\")`.\n\n"
        f"Sample at resolution={info['resolution']} with t5_len={info['t5_len']} "
        f"(CLIP: {info['clip_len']} tokens, the\n"
        "tokenizers' model_max_length); both values are in shapes_prior.json. "
        "Score with the `shapes` reward\n"
        "(data/shapes/world.py), on the prompt files data/shapes/{train,test}_metadata.jsonl:\n\n"
        f"    python sample.py --model={where} --resolution={info['resolution']} "
        f"--t5_len={info['t5_len']} \\\n"
        "        --prompts=data/shapes/test_metadata.jsonl --out_dir=out/shapes/samples\n\n"
        "The transformer and VAE weights are stored in fp16 (they load as fp32, or in the dtype asked), "
        "the text\n"
        "encoders in fp32. TRAINING.txt holds the settings, figures and held-out accuracy of this copy, and\n"
        "samples.png a row of held-out samples per GenEval tag.\n")


def save(pipe, folder, info):
    """save_pretrained into folder + '.tmp', then swap it in: never a half-written prior. The transformer
    and VAE are stored in save_dtype (diffusers loads them as fp32 unless asked otherwise); the text
    encoders (0.2 M parameters) stay fp32, because transformers loads a checkpoint in its stored dtype by
    default, and fp16 text encoders next to an fp32 transformer break a plain
    StableDiffusion3Pipeline.from_pretrained(folder)."""
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for m in (pipe.transformer, pipe.vae):
        m.to(getattr(torch, save_dtype))
    pipe.save_pretrained(tmp)
    for m in (pipe.transformer, pipe.vae):
        m.to(torch.float32)
    sample.write_json_atomic(os.path.join(tmp, "shapes_prior.json"), info)
    sample.write_text_atomic(os.path.join(tmp, "README.md"), prior_readme(folder, info))
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)


# ----------------------------------------------------------------------------- 6. evaluate
def eval_plan(metadata, per_tag, seed0=1000):
    """(prompt index, seed) pairs: each tag's prompts repeated over seeds until the tag has >= per_tag
    images."""
    plan = []
    for tag in GENEVAL_TAGS:
        idx = [i for i, m in enumerate(metadata) if m["tag"] == tag]
        reps = math.ceil(per_tag / len(idx)) if idx else 0
        plan += [(i, seed0 + r) for r in range(reps) for i in idx]
    return plan


def summarise(results, metadata):
    """{tag: (n, strict accuracy, mean partial credit)} and the GenEval-style overall (mean over tags)."""
    rows = {}
    for tag in GENEVAL_TAGS:
        rs = [r for r in results if r["tag"] == tag]
        if rs:
            rows[tag] = (len(rs), float(np.mean([r["correct"] for r in rs])),
                         float(np.mean([r["score"] for r in rs])))
    rows["overall"] = (sum(v[0] for v in rows.values()), float(np.mean([v[1] for v in rows.values()])),
                       float(np.mean([v[2] for v in rows.values()])))
    return rows


@torch.no_grad()
def evaluate(folder, dtype=torch.float32, steps_list=None):
    """Held-out accuracy of the saved prior (as loaded by the RL scripts) and of the ground truth / VAE
    reconstructions of the same (prompt, seed) pairs. Returns {column: summarise(...)}."""
    steps_list = steps_list or eval_steps
    prompts, metadata = sample.read_prompts(test_prompts)
    pipe = sample.load_pipeline(folder, "cpu", dtype)
    text = sample.load_text(folder, "cpu", dtype, t5_len, pipe=pipe)
    judge = shapes_world().shapes()
    plan = eval_plan(metadata, eval_images)
    metas = [metadata[i] for i, _ in plan]
    cols = {}
    if dtype == torch.float32:
        gt = np.stack([prepare.render(metadata[i], resolution, seed=s) for i, s in plan])
        cols["ground truth"] = summarise(
            judge.evaluate(torch.from_numpy(gt).permute(0, 3, 1, 2).float() / 255, metas), metas)
        cols["VAE recon"] = summarise(judge.evaluate(reconstruct(pipe.vae, gt), metas), metas)
    cond = sample.encode(text, [prompts[i] for i, _ in plan])
    noise = sample.image_noise([s * 1000 + i for i, s in plan], sample.latent_shape(pipe, resolution), "cpu")
    for n in steps_list:
        x0 = sample.sample(pipe.transformer, sample.sigma_grid(pipe.scheduler, n), noise, cond, solver="dpm2",
                           batch_size=64)
        images = sample.decode(pipe.vae, x0)
        name = f"prior {n} steps" + ("" if dtype == torch.float32 else f" ({str(dtype).split('.')[-1]})")
        cols[name] = summarise(judge.evaluate(images, metas), metas)
        cols[name]["_images"] = images
    return cols


def table(cols):
    names = [c for c in cols]
    lines = ["strict accuracy / mean partial credit, per tag (n images)",
             f"{'tag':<14} {'n':>4}  " + "  ".join(f"{c:>18}" for c in names)]
    for tag in list(GENEVAL_TAGS) + ["overall"]:
        if tag not in cols[names[0]]:
            continue
        n = cols[names[0]][tag][0]
        lines.append(f"{tag:<14} {n:>4}  "
                     + "  ".join(f"{cols[c][tag][1]:>9.2f} / {cols[c][tag][2]:<5.2f} " for c in names))
    return "\n".join(lines)


def write_report(lines, cols):
    """TRAINING.txt in out_dir: `lines`, then the held-out table of evaluate()'s columns; printed too."""
    report = "\n".join(lines + [
        "", f"held-out prompts ({test_prompts}), sampled with sample.sample (dpm2, no CFG), "
        f"judged by the shapes reward:",
        table({k: {t: v for t, v in c.items() if t != '_images'} for k, c in cols.items()}), ""])
    log("\n" + report)
    sample.write_text_atomic(os.path.join(out_dir, "TRAINING.txt"), report)


def machine():
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} thread(s)"


# ----------------------------------------------------------------------------- main
def main(argv=None):
    from configurator import configure
    cfg = configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(threads)
    sample.quiet()
    if resolution < 64 or resolution % 16:
        raise SystemExit(f"resolution {resolution} must be at least 64 and a multiple of 16 "
                         f"(8x VAE, patch 2)")
    if not os.path.isfile(test_prompts):
        raise SystemExit(f"test prompts '{test_prompts}' not found: run python data/shapes/prepare.py first")
    if vae_from and not os.path.isdir(os.path.join(vae_from, "vae")):
        raise SystemExit(f"--vae_from={vae_from} holds no vae/ folder: "
                         f"pass a prior folder written by this script")
    if distill_from and not os.path.isfile(os.path.join(distill_from, "model_index.json")):
        raise SystemExit(f"--distill_from={distill_from} holds no saved prior (model_index.json): "
                         f"pass a prior folder written by this script")
    if distill_from and os.path.abspath(distill_from) == os.path.abspath(out_dir):
        raise SystemExit(f"--distill_from and --out_dir are the same folder '{out_dir}': the distilled prior "
                         f"would replace its teacher; pass another --out_dir")
    if eval_only:
        if not os.path.isfile(os.path.join(out_dir, "model_index.json")):
            raise SystemExit(f"--eval_only: '{out_dir}' holds no saved prior (model_index.json): "
                             f"train one first")
        log(table({k: v for k, v in evaluate(out_dir).items()}))
        return
    T0 = time.time()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    times = {}

    t = time.time()
    images, captions = pretraining_set(n_images, resolution, rng)
    test_images, _ = pretraining_set(512, resolution, np.random.default_rng(seed + 1))
    times["data"] = time.time() - t
    log(f"data: {n_images} renders, {len(set(captions))} distinct captions, {times['data']:.0f} s")
    if distill_from:
        return distill_prior(cfg, images, captions, g, times, T0)

    if vae_from:
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(os.path.join(vae_from, "vae"),
                                            dtype=torch.float32).eval().requires_grad_(False)
        times["vae"] = 0.0
        log(f"vae: reused from {vae_from}")
    else:
        vae, times["vae"] = train_vae(images, g)
    with torch.no_grad():
        rec = reconstruct(vae, test_images)
        vae_mse = F.mse_loss(rec * 2 - 1, to_tensor(test_images)).item()
    t = time.time()
    raw = encode_latents(vae, images)
    mean, std = raw.mean().item(), raw.std().item()
    vae.register_to_config(shift_factor=mean, scaling_factor=1 / std)
    latents = (raw - mean) / std
    times["encode"] = time.time() - t
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params, test MSE {vae_mse:.4f} "
        f"on [-1, 1] (512 held-out renders), latent mean {mean:.3f} std {std:.3f} -> shift_factor, "
        f"scaling_factor; {times['vae'] / 60:.1f} min")

    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    torch.manual_seed(seed + 1)
    words = caption_words()
    (tok_l, tok_g, tok_t5), (enc_l, enc_g, enc_t5) = build_text(words)
    text = {"model": out_dir, "t5_len": t5_len,
            "tokenizers": dict(zip(sample.ENCODERS, (tok_l, tok_g, tok_t5))),
            "encoders": dict(zip(sample.ENCODERS, (enc_l, enc_g, enc_t5)))}
    ntok = max(len(tok_l(c).input_ids) for c in set(captions))
    torch.manual_seed(seed + 2)
    transformer = build_transformer(resolution)
    n_tr = sum(p.numel() for p in transformer.parameters()) / 1e6
    n_tx = sum(p.numel() for e in (enc_l, enc_g, enc_t5) for p in e.parameters()) / 1e6
    log(f"text: {len(words)} words, captions <= {ntok} CLIP tokens (clip_len {clip_len}, t5_len {t5_len}), "
        f"encoders {n_tx:.2f} M params ({'trained' if train_text else 'frozen'}); "
        f"transformer {n_tr:.2f} M params")
    times["transformer"], hist = train_transformer(transformer, text, latents, captions, g)
    log(f"transformer: {steps} steps in {times['transformer'] / 60:.1f} min "
        f"({steps / times['transformer']:.2f} steps/s)")

    pipe = StableDiffusion3Pipeline(transformer=transformer,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
                                    text_encoder=enc_l, tokenizer=tok_l,
                                    text_encoder_2=enc_g, tokenizer_2=tok_g,
                                    text_encoder_3=enc_t5, tokenizer_3=tok_t5)
    info = {"resolution": resolution, "t5_len": t5_len, "clip_len": clip_len, "shift": shift,
            "train_text": train_text, "vae_test_mse": vae_mse, "seed": seed}
    save(pipe, out_dir, info)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs)
    log(f"saved {out_dir}/ ({size / 1e6:.1f} MB, {save_dtype})")

    t = time.time()
    cols = evaluate(out_dir)
    bf16 = evaluate(out_dir, torch.bfloat16, steps_list=eval_steps[:1])
    times["evaluate"] = time.time() - t
    first = f"prior {eval_steps[0]} steps"
    # one row per tag: its first 8 held-out images at eval_steps[0] steps
    _, metadata = sample.read_prompts(test_prompts)
    tags = [metadata[i]["tag"] for i, _ in eval_plan(metadata, eval_images)]
    rows = [j for tag in GENEVAL_TAGS for j in [k for k, t in enumerate(tags) if t == tag][:8]]
    sample.to_pil(sample.grid(cols[first]["_images"][rows], 8)).save(os.path.join(out_dir, "samples.png"))
    agree = float((cols[first]["_images"] - bf16[first + " (bfloat16)"]["_images"]).abs().mean())
    cols.update({k: v for k, v in bf16.items()})
    wall = time.time() - T0
    write_report([
        f"shapes prior, trained {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} "
        f"by data/shapes/train_prior.py",
        f"machine: {machine()}",
        f"wall time {wall / 60:.1f} min: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()),
        f"config: {json.dumps(cfg)}",
        "",
        f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M params, "
        f"{f'reused from {vae_from}' if vae_from else f'{vae_steps} steps x {vae_batch}'}, test MSE "
        f"{vae_mse:.4f} on [-1, 1]; shift_factor {mean:.4f}, scaling_factor {1 / std:.4f}",
        f"text encoders: {n_tx:.2f} M params, {'trained jointly' if train_text else 'frozen random'}; "
        f"{len(words)} caption words, one token each; captions <= {ntok} CLIP tokens; clip_len {clip_len}, "
        f"t5_len {t5_len}",
        f"transformer: {n_tr:.2f} M params (width {width}, {heads} heads, {layers} layers, "
        f"dual attention in the first {dual_layers}, rms qk-norm), {steps} steps x {batch} "
        f"in {times['transformer'] / 60:.1f} min ({steps / times['transformer']:.2f} steps/s), "
        f"final loss {np.mean(hist[-200:]):.4f}, EMA {ema}",
        f"folder: {size / 1e6:.1f} MB ({save_dtype}); loaded in bf16, images differ from fp32 ones "
        f"by {agree:.4f} (mean |difference| in [0, 1], {eval_steps[0]} steps)",
    ], cols)


def distill_prior(cfg, images, captions, g, times, T0):
    """The guidance-distillation run: distill_from's pipeline, its transformer distilled on the
    pretraining set's latents, saved to out_dir and evaluated like a trained prior."""
    pipe = sample.load_pipeline(distill_from, "cpu", torch.float32)
    text = sample.load_text(distill_from, "cpu", torch.float32, t5_len, pipe=pipe)
    for e in text["encoders"].values():
        e.eval().requires_grad_(False)
    t = time.time()
    with torch.no_grad():
        raw = encode_latents(pipe.vae, images)
    latents = (raw - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    times["encode"] = time.time() - t
    times["distill"], hist = distill_guidance(pipe.transformer, text, latents, captions, g)
    with open(os.path.join(distill_from, "shapes_prior.json")) as f:
        info = dict(json.load(f), distilled_from=distill_from, distill_cfg=distill_cfg)
    save(pipe, out_dir, info)
    t = time.time()
    cols = evaluate(out_dir)
    times["evaluate"] = time.time() - t
    first = f"prior {eval_steps[0]} steps"
    sample.to_pil(sample.grid(cols[first]["_images"][:64], 8)).save(os.path.join(out_dir, "samples.png"))
    write_report([
        f"shapes prior, guidance-distilled {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} "
        f"by data/shapes/train_prior.py from {distill_from}",
        f"machine: {machine()}",
        f"wall time {(time.time() - T0) / 60:.1f} min: "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()),
        f"config: {json.dumps(cfg)}",
        "",
        f"transformer: {distill_steps} steps x {batch} regressing on the teacher's CFG velocity at scale "
        f"{distill_cfg}, lr {distill_lr}, final loss {np.mean(hist[-200:]):.4f}, EMA {ema}; VAE and text "
        f"encoders unchanged",
    ], cols)


if __name__ == "__main__":
    main()
