"""
The model side of E²PO on Stable Diffusion 3.5: loading (hub id, local folder or `tiny`), prompt
encoding with token-embedding perturbations, the noise-aware condition schedule, the flow ODE
sampler, VAE decoding, and a CLI that writes images.

    # the embedded tiny model, CPU, seconds
    python sample.py config/tiny_cpu.py --lora=out/tiny/align/checkpoint/lora_ema --out_dir=out/tiny/samples
    # SD3.5-M with Phase I perturbations and a trained LoRA: K conditions x G noises per prompt
    python sample.py --prompts=prompts.txt --perturbations=out/perturb.safetensors --K=12 --G=4 \
        --lora=out/align/checkpoint/lora_ema --out_dir=out/samples
    # the same on 8 GPUs: prompts shared out over ranks, the same images and one index.jsonl
    torchrun --nproc_per_node=8 sample.py --prompts=prompts.txt ...

Every function above `main()` imports without side effects; phase1_perturb.py, phase2_align.py,
rewards.py and eval_diversity.py import them from here. Formulas: the paper (arXiv 2605.15803)
and the README's table of formulas.
"""
import atexit
import contextlib
import hashlib
import json
import math
import os
import re
import sys

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config (overridden by configurator.py: python sample.py config/x.py --key=value)
model = "stabilityai/stable-diffusion-3.5-medium"  # hub id, local diffusers folder, or "tiny"
prompts = "data/tiny_prompts.txt"  # .txt (one prompt a line) or .jsonl (objects with "prompt")
perturbations = None  # Phase I file; None samples only the original condition (K=1)
K = 1  # conditions per prompt: C^orig plus K-1 perturbed ones
G = 4  # initial noises per condition
rho = 0.4  # gamma schedule: perturb while sigma > 1 - rho
steps = 10
solver = "dpm2"  # "dpm2": DPM-Solver++(2M), the 2nd-order solver DiffusionNFT samples with; or "euler"
guidance = 1.0  # CFG scale; 1.0 = no CFG (the RL setting)
resolution = 512
t5_len = 128  # T5 tokens, as DiffusionNFT
lora = None  # folder with pytorch_lora_weights.safetensors
batch_size = 8  # images per transformer forward, across prompts
seed = 0
out_dir = "out/samples"  # PNGs, a grid per prompt, index.jsonl (eval_diversity.py --samples=DIR reads it)
overwrite = False  # replace the earlier samples out_dir holds (its other files stay)
device = "auto"  # "auto" = cuda if available else cpu
dtype = "auto"  # "auto" = bf16 on CUDA, fp32 on CPU; or float32 / bfloat16
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))]

ENCODERS = ("clip_l", "clip_g", "t5")  # the order of SD3's text encoders 1, 2, 3
TINY_MODELS = ("tiny", "tiny-large")  # tiny.py's random models shaped like SD3.5-Medium and -Large
CLIP_LEN = 77


# ----------------------------------------------------------------------------- prompts
def read_prompts(path):
    """Prompts and per-prompt metadata from a .txt (one a line) or .jsonl (GenEval style) file."""
    if not path or not os.path.isfile(path):
        raise SystemExit(f"prompt file '{path}' not found: pass --prompts=FILE "
                         f"(.txt, one prompt a line, or .jsonl with a 'prompt' field)")
    if path.endswith(".jsonl"):
        metadata = read_jsonl(path, advice="each line must be an object with a 'prompt' field")
        for n, obj in metadata:
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise SystemExit(f"{path} line {n} has no 'prompt' string field")
        metadata = [obj for _, obj in metadata]
        prompt_list = [m["prompt"] for m in metadata]
    else:
        with open(path, encoding="utf-8") as f:
            prompt_list = [ln.strip() for ln in f if ln.strip()]
        metadata = [{} for _ in prompt_list]
    if not prompt_list:
        raise SystemExit(f"prompt file '{path}' holds no prompts")
    return prompt_list, metadata


def prompts_hash(prompt_list):
    return hashlib.sha256("\n".join(prompt_list).encode("utf-8")).hexdigest()


def read_jsonl(path, advice="fix or delete that line", torn_tail=False, say=print):
    """[(line number, record)] of a .jsonl file, blank lines skipped. A line that is not JSON stops with one
    sentence naming the file and the line (two writers on one file interleave their lines; an edit can break
    one). torn_tail=True: an unparsable last line without its newline, a write cut short by a kill, is left
    out with a note instead (a log that a killed run, or a running one, was writing)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            rows.append((n, json.loads(ln)))
        except json.JSONDecodeError as err:
            if torn_tail and n == len(lines):  # no newline after it: the write was cut
                say(f"note: {path} line {n} is incomplete (a write cut short): left out")
                break
            raise SystemExit(f"{path} line {n} is not valid JSON ({err.msg}, column {err.colno}): {advice}")
    return rows


# ----------------------------------------------------------------------------- loading
def pick_device(name="auto", dtype_name="auto"):
    """(device, dtype): CUDA when present, else CPU; "auto" dtype is bf16 on CUDA, fp32 on CPU.
    dtype_name="bfloat16" on CPU runs the GPU's precision path on a laptop (the tests do). A device this
    machine lacks, or a dtype we do not run, stops with one sentence (every script checks its settings with
    it before loading anything)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise SystemExit(f"device={name!r} is not a device: use auto, cpu, cuda or cuda:N")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"device={name!r}: this code runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"device={name!r}, but this machine has no CUDA GPU that torch can use: "
                         "use --device=cpu (or auto)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"device={name!r}: this machine shows {torch.cuda.device_count()} GPU(s)")
    if dtype_name == "auto":
        return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if dtype_name == "float16":  # accepted once, then every autocast op re-cast it to bf16
        raise SystemExit("dtype 'float16' is not supported: T5-XXL overflows in fp16 and training in fp16 "
                         "would need a gradient scaler; use bfloat16 (or float32)")
    if dtype_name not in ("float32", "bfloat16"):
        raise SystemExit(f"dtype '{dtype_name}' is not one of auto, float32, bfloat16")
    return dev, getattr(torch, dtype_name)


def quiet():
    """Silence what the libraries print that tells a run's reader nothing: the loading bars of diffusers and
    transformers, and transformers' note that torchvision is absent (its PIL image processors are the
    ones we use). Every stage's main calls it first; all other warnings stay."""
    import logging

    import diffusers
    import transformers
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)


@contextlib.contextmanager
def diffusers_notes_off():
    """Within the block, diffusers logs errors only (its notes on what a LoRA file or a dtype cast skips)."""
    import diffusers
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers.utils.logging.set_verbosity(level)


def bars(rank=0):
    """Whether this process shows tqdm bars: rank 0, on a terminal (in a log file the bars' carriage
    returns run into the epoch lines)."""
    return rank == 0 and sys.stderr.isatty()


def run_main(main):
    """A script's main, with one message per bad setting under torchrun: every rank stops at the same check,
    rank 0 prints the sentence and the others exit quietly with the same code (1)."""
    try:
        main()
    except SystemExit as err:
        if isinstance(err.code, str) and int(os.environ.get("RANK", 0)) > 0:
            raise SystemExit(1) from None
        raise


def setup_distributed(device_name="auto", dtype_name="auto"):
    """Single process unless launched by torchrun (RANK/WORLD_SIZE set): then one process per GPU with
    nccl, or gloo on CPU. Returns (rank, world_size, device, dtype)."""
    if "RANK" not in os.environ:
        return (0, 1) + pick_device(device_name, dtype_name)
    import torch.distributed as dist
    rank, world, local = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                          int(os.environ.get("LOCAL_RANK", 0)))
    dev, dtype = pick_device(device_name, dtype_name)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise SystemExit(f"LOCAL_RANK {local} has no GPU: this machine shows "
                             f"{torch.cuda.device_count()}; run torchrun with --nproc_per_node at most that")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        # device_id binds the process group to this GPU now: a wrong mapping fails here, not at the
        # first collective
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    # leave the process group cleanly however the script ends (a finished run or a SystemExit)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return rank, world, dev, dtype


def _offline_error(model_id, err):
    if model_id.startswith((os.sep, ".", "~")) and not os.path.isdir(os.path.expanduser(model_id)):
        return SystemExit(f"model folder '{model_id}' does not exist: "
                          f"pass a diffusers folder of SD3.5, a hub id, or --model=tiny")
    return SystemExit(f"could not load '{model_id}' ({type(err).__name__}): "
                      f"download it first on a machine with internet "
                      f"(hf download {model_id}) or pass --model=/path/to/local/folder, or --model=tiny")


def load_pipeline(model_id, device="cpu", dtype=torch.float32, seed=0):
    """The whole StableDiffusion3Pipeline (text encoders, transformer, VAE, scheduler)."""
    if model_id in TINY_MODELS:
        import tiny
        pipe = tiny.pipeline(seed, large=model_id == "tiny-large")
    else:
        from diffusers import StableDiffusion3Pipeline
        try:  # the VAE in fp32: decoding costs little next to the transformer (DiffusionNFT does the same)
            pipe = StableDiffusion3Pipeline.from_pretrained(model_id,
                                                            dtype={"default": dtype, "vae": torch.float32})
        except (OSError, ValueError) as err:
            raise _offline_error(model_id, err)
    pipe.to(device)
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer):
        if m.dtype != dtype:  # the tiny model is built in fp32; bf16 on CUDA
            m.to(dtype=dtype)
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer, pipe.vae):
        m.requires_grad_(False).eval()
    return pipe


def check_lora(path):
    """Before any model loads: `path` is a LoRA folder as phase2_align.py saves it (a checkpoint's lora_ema),
    and its file can be read (a copy cut short stops here, not after SD3 has loaded)."""
    from safetensors import safe_open
    f = os.path.join(path, "pytorch_lora_weights.safetensors") if path else ""
    if not os.path.isfile(f):
        raise SystemExit(f"--lora={path} holds no pytorch_lora_weights.safetensors: pass a checkpoint's "
                         "lora_ema folder (phase2_align.py writes it)")
    try:
        with safe_open(f, framework="pt") as h:
            h.keys()
    except Exception as err:
        raise SystemExit(f"LoRA file {f} cannot be read ({type(err).__name__}: {str(err)[:120]}): it is "
                         "truncated or damaged")


def load_lora(pipe, path, model_id, adapter_name=None):
    """pipe.load_lora_weights(path), with one sentence when the LoRA was made for another model (diffusers
    would log every mismatched tensor, ~85 lines on the tiny model, then raise)."""
    import diffusers
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity(diffusers.utils.logging.CRITICAL)
    try:
        pipe.load_lora_weights(path, adapter_name=adapter_name)
    except Exception as err:
        said = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        fit = [ln for ln in said if "size mismatch" in ln or "not found in the base model" in ln]
        if not fit:
            raise SystemExit(f"LoRA {path} cannot be loaded into {model_id} ({type(err).__name__}: "
                             f"{said[0][:200]})")
        raise SystemExit(f"LoRA {path} does not fit model {model_id} ({fit[0][:200]}): it was trained on "
                         "another model; pass the --model it was trained on")
    finally:
        diffusers.utils.logging.set_verbosity(level)


def load_text(model_id, device="cpu", dtype=torch.float32, t5_len=128, seed=0, pipe=None):
    """What `encode` needs: the three tokenizers and frozen text encoders (from `pipe` if given,
    else loaded alone: Phase I needs no transformer or VAE)."""
    if pipe is not None:
        toks = (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3)
        encs = (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
    elif model_id in TINY_MODELS:
        import tiny
        toks, encs = tiny.text_components(seed)
    else:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel
        try:
            toks = tuple(AutoTokenizer.from_pretrained(model_id, subfolder=s)
                         for s in ("tokenizer", "tokenizer_2", "tokenizer_3"))
            encs = (CLIPTextModelWithProjection.from_pretrained(model_id, subfolder="text_encoder",
                                                                dtype=dtype),
                    CLIPTextModelWithProjection.from_pretrained(model_id, subfolder="text_encoder_2",
                                                                dtype=dtype),
                    T5EncoderModel.from_pretrained(model_id, subfolder="text_encoder_3", dtype=dtype))
        except (OSError, ValueError) as err:
            raise _offline_error(model_id, err)
    for e in encs:
        e.to(device, dtype).requires_grad_(False).eval()
    return {"model": model_id, "t5_len": t5_len, "tokenizers": dict(zip(ENCODERS, toks)),
            "encoders": dict(zip(ENCODERS, encs))}


@contextlib.contextmanager
def text_on(text, device, offload=True):
    """Within the block the text encoders sit on `device`; with offload they are back on the CPU after it,
    so that SD3.5-M's ~11 GB of encoders hold no GPU memory between the moments they encode. The encoders
    are frozen, so going back copies nothing: every tensor keeps its CPU copy (pinned when the device is a
    GPU: the copy in is asynchronous and host memory is not reallocated at each encoding) and gets it back."""
    if not offload:
        yield text
        return
    device = torch.device(device)
    if "cpu_copies" not in text:  # once: (tensor, its CPU data) of every parameter and buffer
        tensors = [t for e in text["encoders"].values() for t in (*e.parameters(), *e.buffers())]
        for t in tensors:
            t.data = t.data.to("cpu")
            if device.type == "cuda":
                t.data = t.data.pin_memory()
        text["cpu_copies"] = [(t, t.data) for t in tensors]
    for t, cpu in text["cpu_copies"]:
        t.data = cpu.to(device, non_blocking=True)
    try:
        yield text
    finally:
        for t, cpu in text["cpu_copies"]:
            t.data = cpu


# ----------------------------------------------------------------------------- encoding with perturbations
def tokenize(text, prompt_list):
    """Per encoder: input_ids [B, S] and the content mask [B, S] (True at the positions δ may touch).
    Content = after BOS, before EOS, inside the attention mask. Found by *position*: CLIP-G pads with
    '!' (id 0), a token that can also sit inside a prompt, so token ids cannot tell content apart."""
    out = {}
    for name, tok in text["tokenizers"].items():
        # CLIP: the tokenizer's own length (77 for SD3), as diffusers' encode_prompt pads to it
        length = text["t5_len"] if name == "t5" else tok.model_max_length
        enc = tok(prompt_list, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        ids, valid = enc.input_ids, enc.attention_mask.bool()
        content = valid.clone()
        content[torch.arange(len(ids)), valid.sum(1) - 1] = False  # the EOS closing every sequence
        if tok.bos_token_id is not None and bool((ids[:, 0] == tok.bos_token_id).all()):
            content[:, 0] = False  # CLIP's BOS; T5 has none
        out[name] = (ids, content)
    return out


def note_cut_prompts(text, prompt_list, say=print):
    """One note when prompts are longer than an encoder reads and are cut at its limit (CLIP's tokenizer
    length, 77 on SD3; T5 at t5_len), as diffusers' pipeline cuts them: the words past it reach no encoder."""
    cut, first = [], None
    for name, tok in text["tokenizers"].items():
        limit = text["t5_len"] if name == "t5" else tok.model_max_length
        long = [p for p, ids in zip(prompt_list, tok(prompt_list, truncation=False, verbose=False).input_ids)
                if len(ids) > limit]
        if long:
            cut.append(f"{len(long)} of {len(prompt_list)} at {name}'s {limit} tokens")
            first = first or long[0]
    if cut:
        say(f"note: prompts longer than an encoder reads are cut, as diffusers' pipeline cuts them: "
            f"{', '.join(cut)} (e.g. '{first[:80]}')")


def token_embedding(enc):
    """The nn.Embedding that the encoder's forward really calls. For CLIP that is get_input_embeddings();
    transformers 5's T5EncoderModel keeps `shared` (what get_input_embeddings() returns) and
    `encoder.embed_tokens` as two modules tying one weight, and only the latter runs."""
    stack = getattr(enc, "encoder", None)
    return (stack.embed_tokens if isinstance(getattr(stack, "embed_tokens", None), torch.nn.Embedding)
            else enc.get_input_embeddings())


def run_encoders(text, prompt_list, deltas=None, names=ENCODERS, tokens=None):
    """Run the chosen encoders with δ added to their token embeddings at content positions.

    deltas: {name: [B, S, d]} dense over token positions (only content positions are used; see
    `scatter_content`). Returns {name: (hidden, global_embedding, content_mask)} where hidden is what
    SD3 consumes (CLIP: hidden_states[-2]; T5: last hidden state) and the global embedding is what
    Phase I's loss compares (CLIP: projected pooled `text_embeds`; T5: mean over content tokens)."""
    deltas = deltas or {}
    tokens = tokens or tokenize(text, prompt_list)
    out = {}
    for name in names:
        enc = text["encoders"][name]
        ids, content = (t.to(enc.device) for t in tokens[name])
        hook = None
        if name in deltas:
            # A hook on the input-embedding module, not inputs_embeds: CLIP's forward rejects
            # inputs_embeds and needs the real input_ids to find EOS for pooling. x + 0 is exact, so
            # δ = 0 gives a bit-identical forward.
            d = deltas[name].to(enc.device) * content.unsqueeze(-1)
            hook = token_embedding(enc).register_forward_hook(
                lambda mod, inp, emb, d=d: emb + d.to(emb.dtype))
        try:
            if name == "t5":
                hidden = enc(ids)[0]
                m = content.unsqueeze(-1).to(hidden.dtype)
                glob = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            else:
                o = enc(ids, output_hidden_states=True)
                hidden, glob = o.hidden_states[-2], o.text_embeds
        finally:
            if hook is not None:
                hook.remove()
        out[name] = (hidden, glob, content)
    return out


def encode(text, prompt_list, deltas=None):
    """SD3 conditioning (prompt_embeds [B, 77+T, D_t5], pooled [B, D_l+D_g]) exactly as diffusers'
    StableDiffusion3Pipeline.encode_prompt builds it, with optional per-encoder δ (see run_encoders)."""
    h = run_encoders(text, prompt_list, deltas)
    (hl, pl, _), (hg, pg, _), (ht5, _, _) = h["clip_l"], h["clip_g"], h["t5"]
    clip = torch.cat([hl, hg.to(hl.dtype)], dim=-1)
    clip = F.pad(clip, (0, ht5.shape[-1] - clip.shape[-1]))  # zero-pad 2048 -> 4096 features
    prompt_embeds = torch.cat([clip.to(ht5.dtype), ht5], dim=-2)
    pooled = torch.cat([pl, pg.to(pl.dtype)], dim=-1)
    return prompt_embeds, pooled


def scatter_content(rows, content):
    """Stored δ rows (a list of [n_b, L_b, d], content tokens only) -> dense [sum n_b, S, d] for
    `run_encoders`, sample-major: row block b is repeated n_b times with content mask content[b]."""
    n = [r.shape[0] for r in rows]
    mask = content.repeat_interleave(torch.tensor(n), dim=0)
    dense = rows[0].new_zeros(mask.shape[0], mask.shape[1], rows[0].shape[-1])
    dense[mask] = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows])
    return dense


# ----------------------------------------------------------------------------- perturbation files
def _shard_stem(path):
    return path[: -len(".safetensors")] if path.endswith(".safetensors") else path


def shard_name(path, rank, world):
    """The file rank r of W writes for perturbation file `path` under torchrun:
    {stem}-{r:05d}-of-{W:05d}.safetensors."""
    return f"{_shard_stem(path)}-{rank:05d}-of-{world:05d}.safetensors"


def shard_glob(path):
    """The glob pattern of every shard_name(path, r, W)."""
    import glob
    return f"{glob.escape(_shard_stem(path))}-*-of-*.safetensors"


def perturbation_files(path):
    """One file, or the per-rank shards (shard_name) that phase1 writes under torchrun."""
    if os.path.isfile(path):
        return [path]
    import glob
    shards = sorted(glob.glob(shard_glob(path)))
    if not shards:
        raise SystemExit(f"perturbation file '{path}' not found: run phase1_perturb.py first")
    return shards


def check_perturbations(path, model, prompt_list, K=None, t5_len=128):
    """A Phase I file (or its torchrun shards, which must agree) or a generator file, checked from its
    metadata alone, so before any model loads: made for this model, these prompts (a generator serves any),
    this K and this T5 length. One sentence for the first mismatch; returns the metadata."""
    from safetensors import safe_open
    if os.path.isfile(path) and _file_kind(path) == "generator":
        with safe_open(path, framework="pt") as h:
            meta = json.loads(h.metadata()["e2po"])
        if not same_model(meta["model"], model):
            raise SystemExit(f"generator {path} was trained on model '{meta['model']}', not '{model}': "
                             "rerun phase1_perturb.py --amortize=True")
        if meta["t5_len"] != t5_len:
            raise SystemExit(f"generator {path} was trained with t5_len={meta['t5_len']}, not {t5_len}")
        if K is not None and not 2 <= K <= meta["K_max"]:
            raise SystemExit(f"generator {path} serves K from 2 to {meta['K_max']}, not K={K}")
        return meta
    meta = None
    for f in perturbation_files(path):
        try:
            with safe_open(f, framework="pt") as h:
                m = json.loads(h.metadata()["e2po"])
        except Exception as err:  # truncated by a crash, or not a Phase I file
            raise SystemExit(f"perturbation file {f} cannot be read ({type(err).__name__}): "
                             "it is truncated or was not written by phase1_perturb.py; "
                             "rerun phase1_perturb.py")
        common = {k: v for k, v in m.items() if k != "summary"}
        if meta is not None and common != meta:
            raise SystemExit(f"perturbation shard {f} was written with other settings than its siblings")
        meta = common
    if not same_model(meta["model"], model):
        raise SystemExit(f"perturbation file {path} was learned on model '{meta['model']}', "
                         f"not '{model}': rerun phase1_perturb.py")
    if meta["prompts_sha256"] != prompts_hash(prompt_list):
        raise SystemExit(f"perturbation file {path} was learned on other prompts "
                         f"({meta['n_prompts']} from {meta['prompts_path']}): "
                         "rerun phase1_perturb.py on this prompt file")
    if K is not None and meta["K"] != K:
        raise SystemExit(f"perturbation file {path} holds K={meta['K']} conditions per prompt, "
                         f"but K={K} was asked: rerun phase1 or set --K={meta['K']}")
    if meta["t5_len"] != t5_len:
        raise SystemExit(f"perturbation file {path} was learned with t5_len={meta['t5_len']}, "
                         f"not {t5_len}")
    return meta


def load_perturbations(path, text, prompt_list, K=None):
    """Open a Phase I file (lazily, memory-mapped) and check it belongs to this model, these prompts
    and these token lengths. Returns a dict: meta, K, and `rows(i)` -> {encoder: [K-1, L, d]}. A generator
    file (phase1_perturb.py --amortize=True) serves any prompts instead: rows(i) computes prompt i's Delta."""
    from safetensors import safe_open
    meta = check_perturbations(path, text["model"], prompt_list, K, text["t5_len"])
    if meta.get("kind") == "generator":
        return load_generator(path, text, prompt_list, K)
    where = {}
    for f in perturbation_files(path):
        h = safe_open(f, framework="pt")
        where.update({key: h for key in h.keys()})
    tokens = tokenize(text, prompt_list)
    for name in meta["encoders"]:
        lengths = tokens[name][1].sum(1).tolist()
        for i, L in enumerate(lengths):
            key = f"{i}.{name}"
            if key not in where:
                raise SystemExit(f"perturbation file {path} has no entry {key}: "
                                 f"a shard is missing or phase1 did not finish")
            shape = where[key].get_slice(key).get_shape()
            if shape[1] != L:
                raise SystemExit(f"perturbation {key} covers {shape[1]} content tokens "
                                 f"but the tokenizer gives {L}: "
                                 "the file was made with another tokenizer; rerun phase1_perturb.py")
    return {"meta": meta, "K": meta["K"], "encoders": meta["encoders"], "path": path,
            "rows": lambda i: {n: where[f"{i}.{n}"].get_tensor(f"{i}.{n}") for n in meta["encoders"]}}


def check_finite_rows(pert, indices):
    """Stop with one sentence if a Phase I file's perturbations of the prompts `indices` hold a NaN or an inf
    (downstream they would look like a diverged loss). Called with the same prompts on every rank, so that
    every rank stops at the same check. A generator's rows are computed from weights checked at load."""
    if pert is None or "generator" in pert:
        return
    for i in indices:
        bad = [n for n, t in pert["rows"](i).items() if not torch.isfinite(t).all()]
        if bad:
            raise SystemExit(f"perturbation file {pert['path']}: the {bad[0]} perturbations of prompt {i} "
                             "hold non-finite values: the file is damaged; rerun phase1_perturb.py")


def _file_kind(path):
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as h:
            return json.loads(h.metadata()["e2po"]).get("kind", "perturbations")
    except Exception:
        return "perturbations"  # load_perturbations says what is wrong with it


def load_generator(path, text, prompt_list, K=None):
    """A generator file as load_perturbations returns a perturbation file: rows(i) -> {encoder: [K-1, L, d]}
    of prompt i, computed (and calibrated onto the ring) when asked, for any prompt list."""
    from safetensors.torch import load_file
    meta = check_perturbations(path, text["model"], prompt_list, K, text["t5_len"])
    K = K or meta["K_max"]
    for name, (d, h, _) in meta["dims"].items():
        table = token_embedding(text["encoders"][name]).weight if name in text["encoders"] else None
        if table is None or table.shape[1] != d:
            raise SystemExit(f"generator {path} was made for a {name} encoder of width {d}, which this model "
                             "does not have: rerun phase1_perturb.py --amortize=True on it")
    gen = PerturbationGenerator({n: tuple(v) for n, v in meta["dims"].items()}, meta["rank"], meta["hidden"])
    state = load_file(path)
    if not all(torch.isfinite(t).all() for t in state.values()):
        raise SystemExit(f"generator {path} holds non-finite weights: rerun phase1_perturb.py "
                         "--amortize=True")
    gen.load_state_dict(state)
    gen.eval().requires_grad_(False)

    @torch.no_grad()
    def rows(i):
        enc = text["encoders"][gen.names[0]]
        gen.to(enc.device)
        tokens = tokenize(text, [prompt_list[i]])
        d = generator_deltas(gen, text, [prompt_list[i]], K, meta["seed"], tokens, meta["calibrate"])
        return {n: d[n][:, tokens[n][1][0].to(d[n].device)].to("cpu", torch.float16) for n in gen.names}
    return {"meta": meta, "K": K, "encoders": list(gen.names), "rows": rows, "generator": gen}


def same_model(a, b):
    """Whether two model ids name the same model: equal strings, or folders that resolve to the same
    place (`/path/model/` and `/path/model`)."""
    if a == b:
        return True
    if os.path.isdir(os.path.expanduser(a)) and os.path.isdir(os.path.expanduser(b)):
        return os.path.samefile(os.path.expanduser(a), os.path.expanduser(b))
    return False


# ------------------------------------------------------- Phase I for new prompts: the amortized generator
class PerturbationGenerator(torch.nn.Module):
    """A prompt's frozen token embeddings -> its K-1 perturbations, for any prompt and any K up to rank + 1
    (ours, beyond the paper: README "Phase I for prompts it has never seen"). Per encoder, an MLP reads
    each content token's embedding and the encoder's hidden state there and writes `rank` directions for
    that token, a basis B [rank, L, d] of the prompt's perturbations; variant k is
        delta_k = std_e * sum_j W_kj B_j,   W = K-1 orthonormal rows of a rank x rank rotation
    seeded by the prompt's text (prompt_rotation). Orthonormal weights keep the variants apart by
    construction (a basis that collapsed to one direction would give one direction at different lengths,
    which L_div penalises), serve any K, and give a prompt the same Delta every time. std_e is the std of
    the encoder's token-embedding table, so the MLPs work in its units."""

    def __init__(self, dims, rank=16, hidden=256):
        """dims: {encoder: (token-embedding width d, hidden-state width h, table std)}."""
        super().__init__()
        self.rank, self.names = rank, tuple(dims)
        self.nets = torch.nn.ModuleDict({n: torch.nn.Sequential(
            torch.nn.Linear(d + h, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
            torch.nn.Linear(hidden, rank * d)) for n, (d, h, _) in dims.items()})
        self.register_buffer("stds", torch.tensor([float(dims[n][2]) for n in self.names]))
        for net in self.nets.values():  # start near Phase I's init: deltas of ~0.1 table std
            torch.nn.init.normal_(net[-1].weight, std=0.1 / hidden ** 0.5)
            torch.nn.init.zeros_(net[-1].bias)

    def forward(self, name, emb, hid, W):
        """emb [P, S, d], hid [P, S, h] (content tokens used, the rest zeroed by the caller's mask), W [P, n,
        rank] -> deltas [P * n, S, d], prompt-major as run_encoders takes them."""
        P, S, d = emb.shape
        basis = self.nets[name](torch.cat([emb, hid.to(emb.dtype)], -1)).view(P, S, self.rank, d)
        std = self.stds[self.names.index(name)]
        return (torch.einsum("pnr,psrd->pnsd", W.to(basis.dtype), basis) * std).reshape(-1, S, d)


def prompt_rotation(prompt, seed, n, rank):
    """n orthonormal rows [n, rank] of a rotation seeded by (seed, the prompt's text): the same prompt always
    combines its basis the same way, whatever file, batch or GPU it comes in."""
    h = int(hashlib.sha256(f"{seed}:{prompt}".encode("utf-8")).hexdigest()[:15], 16)
    q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=torch.Generator().manual_seed(h),
                                       dtype=torch.float64))
    return q[:n].float()


def generator_deltas(gen, text, prompt_list, K, seed, tokens=None, calibrate=None):
    """Dense deltas {encoder: [P * (K-1), S, d]} of the generator for these prompts. With calibrate =
    (target cosine, bisection steps), each variant is then scaled (no backward: batched encoder forwards)
    so that the cosine of its global embedding to the prompt's lands on the target, as Phase I leaves its
    variants inside the ring."""
    n = K - 1
    if not 1 <= n <= gen.rank:
        raise SystemExit(f"K={K}: this generator serves K from 2 to {gen.rank + 1}")
    tokens = tokens or tokenize(text, prompt_list)
    W = torch.stack([prompt_rotation(p, seed, n, gen.rank) for p in prompt_list])
    out = {}
    with torch.no_grad():
        plain = run_encoders(text, prompt_list, names=gen.names, tokens=tokens)
    for name in gen.names:
        enc = text["encoders"][name]
        ids, content = (t.to(enc.device) for t in tokens[name])
        emb, hid = token_embedding(enc)(ids).float(), plain[name][0].float()
        mask = content.unsqueeze(-1).float()
        out[name] = gen(name, emb * mask, hid * mask, W.to(emb.device)) * mask.repeat_interleave(n, 0)
    if calibrate:
        out = calibrate_scales(text, prompt_list, out, tokens, n, *calibrate)
    return out


@torch.no_grad()
def calibrate_scales(text, prompt_list, deltas, tokens, n, target, steps):
    """Scale each variant by a, found by bisection on cos(e_k(a delta_k), e_anc) = target (the cosine
    falls as the perturbation grows), per encoder and variant: the bracket [0, 2] is first doubled (up to 4
    times, for the variants still too close at its top), then `steps` bisection forwards, all batched."""
    rep = [p for p in prompt_list for _ in range(n)]
    tok_rep = {k: tuple(t.repeat_interleave(n, 0) for t in v) for k, v in tokens.items()}
    anchor = run_encoders(text, prompt_list, names=tuple(deltas), tokens=tokens)
    out = {}
    for name, d in deltas.items():
        e_anc = anchor[name][1].float().repeat_interleave(n, 0)
        def cos_at(a):
            e = run_encoders(text, rep, {name: d * a.view(-1, 1, 1)}, names=(name,), tokens=tok_rep)[name][1]
            return F.cosine_similarity(e.float(), e_anc, dim=-1)
        lo, hi = torch.zeros(len(rep), device=d.device), torch.full((len(rep),), 2.0, device=d.device)
        for _ in range(4):  # widen the bracket where even its top is too close
            near = cos_at(hi) >= target
            if not near.any():
                break
            lo, hi = torch.where(near, hi, lo), torch.where(near, 2 * hi, hi)
        for _ in range(steps):
            mid = (lo + hi) / 2
            far = cos_at(mid) < target  # too far: shrink
            hi, lo = torch.where(far, mid, hi), torch.where(far, lo, mid)
        out[name] = d * ((lo + hi) / 2).view(-1, 1, 1)
    return out


def perturbed_conditions(text, pert, prompt_list, indices):
    """C^opt_k for the prompts `indices` of `prompt_list`: (prompt_embeds, pooled), K-1 rows per
    prompt, prompt-major."""
    sub = [prompt_list[i] for i in indices]
    km1 = pert["K"] - 1
    tokens = tokenize(text, sub)
    rows = [pert["rows"](i) for i in indices]
    deltas = {n: scatter_content([r[n].float() for r in rows], tokens[n][1]) for n in pert["encoders"]}
    rep = [p for p in sub for _ in range(km1)]
    return encode(text, rep, deltas)


# --------------------------------------------------------------- the noise-aware schedule (the paper's gamma)
def gamma(sigma, rho):
    """gamma(sigma) = clip((sigma - (1 - rho)) / rho, 0, 1): 1 at pure noise, 0 once sigma <= 1 - rho."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho must lie in (0, 1], got {rho}")
    # written (sigma - 1 + rho) / rho in float64 so that sigma = 1 gives exactly 1 (pure C^opt)
    g = ((torch.as_tensor(sigma, dtype=torch.float64) - 1 + rho) / rho).clamp(0, 1)
    return g.float() if torch.is_tensor(sigma) else float(g)


def check_rho(rho):
    """The config check of rho: one sentence before anything is loaded."""
    if not 0 < rho <= 1:
        raise SystemExit(f"rho={rho} must lie in (0, 1]: the perturbations act while sigma > 1 - rho")


def mix_condition(c_opt, c_orig, sigma, rho):
    """C_k(t) = gamma(sigma_t) * C^opt_k + (1 - gamma(sigma_t)) * C^orig, on prompt_embeds and pooled.
    Computed as torch.lerp(C^orig, C^opt_k, gamma), which returns C^orig bit for bit when C^opt_k = C^orig
    (g*C + (1-g)*C is not C in floating point) and the exact endpoints at gamma = 0 and 1: the k = 0
    samples of a group are sampled exactly as plain sampling would."""
    g = gamma(sigma, rho)
    out = []
    for opt, orig in zip(c_opt, c_orig):
        # a float gamma goes to lerp as a scalar (no tensor made on the GPU at every step); a per-sample one
        # broadcasts over features. In fp32 whatever the conditions' dtype: gamma itself is not rounded to
        # bf16 (0.3 would become 0.30078), only the mixed condition is, once.
        w = (g.to(orig.device, torch.float32).reshape(-1, *([1] * (orig.dim() - 1))).expand(orig.shape)
             if torch.is_tensor(g) else g)
        out.append(torch.lerp(orig.float(), opt.float(), w).to(orig.dtype))
    return tuple(out)


# ----------------------------------------------------------------------------- the flow ODE sampler
def sigma_grid(scheduler, steps):
    """The scheduler's sigmas (steps + 1 values from ~1 to 0, shift applied). The scheduler is
    stateful, so the grid is taken once per rollout and we step with it ourselves."""
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.float().cpu()


def velocity(transformer, x, sigma, cond):
    """v(x_t, t) of the SD3 transformer; x_t = (1 - t) x0 + t eps, v = eps - x0, timestep = t * 1000.
    sigma: a float, or a [B] tensor (training draws a different t per sample). x goes in at the
    transformer's dtype; the timestep stays fp32, as diffusers' pipeline passes it (bf16 would round
    t * 1000 to steps of 4 near 1000)."""
    # torch.full fills on the device (a float sent with torch.as_tensor would be a host-to-device copy at
    # every sampler step); either way t is fp32(sigma) * 1000 computed in fp32
    t = (sigma.to(x.device, torch.float32).expand(x.shape[0]) if torch.is_tensor(sigma)
         else torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)) * 1000
    # the DDP wrapper (theta's forward in training) has no .dtype: its module has
    x = x.to(getattr(getattr(transformer, "module", transformer), "dtype", x.dtype))
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=cond[0], pooled_projections=cond[1],
                       return_dict=False)[0]


def guided_velocity(transformer, x, sigma, cond, guidance=1.0, c_neg=None):
    """velocity(), with classifier-free guidance when guidance > 1, one forward of the batch [negative; cond]:
        v = v_u + w * (v_c - v_u)        v_u on c_neg (the empty prompt), v_c on cond, w = guidance
    v_u is a constant (detached), as in Flow-GRPO's training step: a training forward's gradient flows through
    v_c only. guidance = 1: v = v_c."""
    if not guidance > 1.0:
        return velocity(transformer, x, sigma, cond)
    neg = (c_neg[0].expand_as(cond[0]), c_neg[1].expand_as(cond[1]))
    vu, vc = velocity(transformer, torch.cat([x] * 2), sigma,
                      (torch.cat([neg[0], cond[0]]), torch.cat([neg[1], cond[1]]))).chunk(2)
    vu = vu.detach()
    return vu + guidance * (vc - vu)


@torch.no_grad()
def sample(transformer, sigmas, noise, c_orig, c_opt=None, rho=0.4, guidance=1.0, c_neg=None,
           solver="dpm2", batch_size=None, return_traj=False):
    """Integrate the flow ODE from `noise` (sigma=1) to x0 over `sigmas`.

    c_orig, c_opt: per-sample conditions (prompt_embeds [B, S, D], pooled [B, P]). Sample i is conditioned
    on mix_condition(c_opt[i], c_orig[i], sigma, rho) at each step (E²PO's schedule); c_opt=None (or a row
    equal to c_orig) is the plain original condition. c_neg: the negative/empty condition for CFG
    (guidance > 1).
    solver: "euler", or "dpm2" = DPM-Solver++(2M) in x0 form on alpha=1-t, sigma=t (2nd order, no extra
    forward passes; first order on the first and the last step, the same scheme as DiffusionNFT's).
    Returns x0 latents [B, C, h, w], and with return_traj the list of x at every sigma."""
    if solver not in ("euler", "dpm2"):
        raise ValueError(f"unknown solver '{solver}': use 'euler' or 'dpm2'")
    B = noise.shape[0]
    batch_size = batch_size or B
    x = noise.float()  # the ODE state stays fp32 between steps, whatever the transformer's dtype
    traj, x0_prev = [x], None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        cond = c_orig if c_opt is None else mix_condition(c_opt, c_orig, s, rho)
        v = []
        for j in range(0, B, batch_size):  # chunk the batch to bound memory
            sl = slice(j, j + batch_size)
            v.append(guided_velocity(transformer, x[sl], s, (cond[0][sl], cond[1][sl]), guidance, c_neg))
        v = torch.cat(v).float()
        x0 = x - s * v
        # 1st order on the first step, after sigma=1 (lambda = -inf makes 2M degenerate to 1st order
        # anyway) and into sigma=0 (lambda = +inf), as DPM-Solver's lower_order_final does.
        if solver == "euler" or x0_prev is None or s_next == 0 or float(sigmas[i - 1]) >= 1:
            x = x + (s_next - s) * v  # = s_next * eps_hat + (1 - s_next) * x0_hat (DDIM = DPM-Solver-1)
        else:  # dpm2
            lam = lambda t: math.log((1 - t) / t)
            h, h_prev = lam(s_next) - lam(s), lam(s) - lam(float(sigmas[i - 1]))
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = (s_next / s) * x - (1 - s_next) * math.expm1(-h) * D
        x0_prev = x0
        if return_traj:
            traj.append(x)
    return (x, traj) if return_traj else x


def sde_step(x, v, sigma, sigma_next, noise_level=0.7, prev=None, generator=None):
    """One step of Flow-GRPO's SDE sampler (Liu et al. 2025, arXiv 2505.05470; its sde_type 'sde'), from x at
    sigma down to sigma_next, in fp32, with a = noise_level, dt = sigma_next - sigma < 0:
        s_t  = a * sqrt(sigma / (1 - sigma'))       sigma' = sigma; sigma_next where sigma = 1
        mean = x * (1 + s_t^2 / (2 sigma) * dt) + v * (1 + s_t^2 (1 - sigma) / (2 sigma)) * dt
        prev = mean + s_t * sqrt(-dt) * eps,         eps ~ N(0, I)        (unless prev is given)
        log_prob = mean over all but the batch dimension of log N(prev; mean, (s_t sqrt(-dt))^2)
    At sigma = 1, 1 - sigma is 0: Flow-GRPO puts the grid's second sigma there (sigmas[1]), which is the
    sigma_next of the only step that starts at 1, so a step of a grid gets its value with no argument to pass.
    sigma, sigma_next: floats, or [B] tensors. generator: one torch.Generator for the batch's eps, or a list
    of one per sample (each sample its own stream), drawn on the CPU. Returns (prev, log_prob [B], mean, s_t):
    s_t is the SDE's noise scale, as Flow-GRPO returns it (the step's own std is s_t sqrt(-dt)); only mean and
    log_prob carry v's gradient."""
    x, v = x.float(), v.float()
    col = lambda s: torch.as_tensor(s, dtype=torch.float32, device=x.device).reshape(-1, *[1] * (x.dim() - 1))
    sig, nxt = col(sigma), col(sigma_next)
    dt = nxt - sig
    s_t = torch.sqrt(sig / (1 - torch.where(sig == 1, nxt, sig))) * noise_level
    mean = x * (1 + s_t ** 2 / (2 * sig) * dt) + v * (1 + s_t ** 2 * (1 - sig) / (2 * sig)) * dt
    std = s_t * torch.sqrt(-dt)
    if prev is None:
        eps = (torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator])
               if isinstance(generator, (list, tuple)) else
               torch.randn(x.shape, generator=generator, device=getattr(generator, "device", "cpu")))
        prev = mean + std * eps.to(x.device)
    prev = prev.detach().float()
    log_prob = -((prev - mean) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return prev, log_prob.mean(dim=tuple(range(1, x.dim()))), mean, s_t


@torch.no_grad()
def sde_sample(transformer, sigmas, noise, c_orig, c_opt=None, rho=0.4, guidance=1.0, c_neg=None,
               noise_level=0.7, generators=None, c_score=None):
    """Flow-GRPO's sampler: from `noise` (sigma = 1) down `sigmas` by sde_step, keeping every state and the
    log-prob of every transition. Conditions as in `sample` (E²PO's schedule when c_opt is given, CFG when
    guidance > 1). generators[i]: what sde_step draws step i's eps with. c_score: also the log-prob of each
    transition under that condition (C^orig, which training scores the trajectory on), by a second forward
    at the steps where the sampling condition is not it.
    Returns (states [B, T+1, C, h, w] fp32, x at every sigma: states[:, -1] is x0; log_prob [B, T] under the
    sampling condition; the log_prob [B, T] under c_score, or None)."""
    x, states, lps, scored = noise.float(), [noise.float()], [], []
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        cond = c_orig if c_opt is None else mix_condition(c_opt, c_orig, s, rho)
        v = guided_velocity(transformer, x, s, cond, guidance, c_neg).float()
        x, lp, _, _ = sde_step(x, v, s, s_next, noise_level, generator=generators[i] if generators else None)
        if c_score is not None:
            same = all(torch.equal(a, b) for a, b in zip(cond, c_score))
            scored.append(lp if same else sde_step(
                states[-1], guided_velocity(transformer, states[-1], s, c_score, guidance, c_neg).float(), s,
                s_next, noise_level, prev=x)[1])
        states.append(x)
        lps.append(lp)
    return (torch.stack(states, 1), torch.stack(lps, 1),
            torch.stack(scored, 1) if c_score is not None else None)


@torch.no_grad()
def decode(vae, latents):
    """Latents -> images [B, 3, H, W] float32 in [0, 1]."""
    z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)


def image_noise(seeds, shape, device):
    """Initial noise (fp32), one seeded generator per image, so each image is reproducible from its seed
    alone."""
    return to_device(torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                                  for s in seeds]), device)


def to_device(x, device):
    """A CPU tensor on `device`; to a GPU through pinned memory without blocking (a copy from pageable
    memory makes the host wait for it)."""
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def latent_shape(pipe, resolution):
    f = pipe.vae_scale_factor
    if resolution % (f * pipe.transformer.config.patch_size):
        raise SystemExit(f"resolution {resolution} must be a multiple of "
                         f"{f * pipe.transformer.config.patch_size}")
    return (pipe.transformer.config.in_channels, resolution // f, resolution // f)


def to_pil(img):
    from PIL import Image
    return Image.fromarray((img.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8"))


def grid(images, ncol):
    """[N, 3, H, W] -> one [3, rows*H, ncol*W] image."""
    n, c, h, w = images.shape
    nrow = math.ceil(n / ncol)
    out = images.new_ones(c, nrow * h, ncol * w)
    for i, im in enumerate(images):
        out[:, (i // ncol) * h:(i // ncol + 1) * h, (i % ncol) * w:(i % ncol + 1) * w] = im
    return out


def captioned_grid(rows, path):
    """A PNG of one row per (label, [(image uint8 [H, W, 3], caption), ...]): the label above its row, each
    caption under its image (PIL's default font); images shown at 256 px (128 when smaller than 256)."""
    from PIL import Image, ImageDraw
    side = max(img.shape[0] for _, items in rows for img, _ in items)
    cell, line = (256 if side >= 256 else 128), 14
    ncol = max(len(items) for _, items in rows)
    canvas = Image.new("RGB", (ncol * cell, len(rows) * (cell + 2 * line)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, items) in enumerate(rows):
        y = r * (cell + 2 * line)
        draw.text((2, y + 1), label, fill="black")
        for c, (img, caption) in enumerate(items):
            canvas.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (c * cell, y + line))
            draw.text((c * cell + 2, y + line + cell + 1), caption, fill="black")
    canvas.save(path)


def write_text_atomic(path, s):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(s)
    os.replace(tmp, path)


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


# ------------------------------------------------------------ outputs: checked, claimed, then written
# Every script goes in one order: every setting checked (one sentence for the first bad one); every output
# checked for where it goes (check_writable) and for what it would delete or replace, which never holds an
# input of the same command (check_keeps_inputs); the output claimed by this process (claim: one writer at a
# time); and only then are models loaded and files deleted or written.
def inside(path, folder):
    """Whether `path` is `folder` or lies under it, links and spellings resolved."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def check_writable(path, setting, kind="folder"):
    """That output `path` (given as `setting`) can be written as a `kind`, "folder" or "file": it is not the
    other kind already, not under a file, and the folders it goes in are writable."""
    if not path:
        raise SystemExit(f"{setting} is empty: name the {kind} to write")
    if kind == "file" and os.path.isdir(path):
        raise SystemExit(f"{setting}={path} is a folder: name a file to write")
    if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"{setting}={path} is a file: name a folder to write into")
    here = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(here):  # the nearest existing ancestor: the folders below it will be made
        here = os.path.dirname(here)
    for d in [here] + ([path] if os.path.isdir(path) else []):
        if not os.path.isdir(d) or not os.access(d, os.W_OK | os.X_OK):
            raise SystemExit(f"cannot write {setting}={path}: {d} is not a writable folder")


def check_keeps_inputs(removed, inputs, how, setting="--out_dir"):
    """Refuse when what this command would delete or replace (`removed`, paths) holds one of its own inputs
    (`inputs`, {what it is: path}): `how` names what would do it (e.g. "--overwrite=True"), `setting` the
    output's setting."""
    for r in removed:
        for what, p in inputs.items():
            if p and os.path.exists(str(p)) and inside(str(p), r):
                raise SystemExit(f"{how} would remove {r}, which holds {what} {p} of this same command: "
                                 f"pass another {setting}")


_HELD = {}  # the claims of this process: lock file -> (its open file, the folders claim made for it)


def lock_file(path):
    """Where the claim of output `path` lives: PATH.lock beside it, not inside (export.py and Phase I replace
    their output whole)."""
    return os.path.realpath(path).rstrip(os.sep) + ".lock"


def claim(path, check=None, rank=0):
    """Claim output `path` (a run folder, a samples folder, a Phase I file, an export) for this process: a
    second writer, whatever its script, stops with one sentence naming the first's PID. The claim is an
    advisory lock (flock) on PATH.lock, which the system drops when its process ends, however it ends: a lock
    left by a killed writer is taken over, with a note. release() removes the file: main calls it at its end,
    and it runs at exit (SystemExit included). Under torchrun rank 0 claims for the run; only it writes there.
    `check` (what the output would replace) runs on every rank, on rank 0 under the claim, so that no other
    writer changes the output between the check and the writes. Returns (release(), what check returned)."""
    lock = lock_file(path)
    if rank == 0 and lock not in _HELD:  # held already: an earlier main() of this process (tests run many)
        import fcntl
        import socket
        made, d = [], os.path.dirname(lock)
        while not os.path.exists(d):
            made.append(d)
            d = os.path.dirname(d)
        os.makedirs(os.path.dirname(lock), exist_ok=True)
        while True:
            f = open(lock, "a+", encoding="utf-8")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().split() or ["?"]
                f.close()
                raise SystemExit(f"{path} is being written by process {' on '.join(holder[:2])} (its lock is "
                                 f"{lock}): wait for it to end, or write elsewhere")
            except OSError as err:  # a file system without locks: run, but say what is not guarded
                print(f"note: cannot lock {lock} ({err.strerror}): a second writer would not be stopped")
                break
            if os.path.exists(lock) and os.path.samestat(os.fstat(f.fileno()), os.stat(lock)):
                break  # still the lock file (a writer releasing it may have removed the one we opened)
            f.close()
        f.seek(0)
        before = f.read().split()
        if before and before[0] != str(os.getpid()):
            print(f"note: took over {lock}, left by process {' on '.join(before[:2])}, which has ended "
                  "(killed?)")
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {socket.gethostname()}\n")
        f.flush()
        _HELD[lock] = (f, made)
        atexit.register(release_claim, lock)
    result = None
    if check is not None:
        try:
            result = check()
        except SystemExit:
            release_claim(lock)
            raise
    return (lambda: release_claim(lock)), result


def release_claim(lock):
    """Remove this process's lock file (if it holds it) and the empty folders claim made for it."""
    f, made = _HELD.pop(lock, (None, []))
    if f is None:
        return
    with contextlib.suppress(OSError):
        os.remove(lock)
    f.close()
    for d in made:  # innermost first; a folder something else was written into stays
        try:
            os.rmdir(d)
        except OSError:
            break


# ----------------------------------------------------------------------------- CLI
# what a run writes into out_dir (and eval_diversity.py beside it): what --overwrite=True replaces there
SAMPLE_FILES = re.compile(r"\d{5}_k\d{2}_g\d{2}\.png|\d{5}_grid\.png|index\.jsonl|config\.json"
                          r"|diversity\.json")


def check_settings():
    """Every setting of the CLI checked before anything loads or is written; returns the prompts and their
    metadata."""
    prompt_list, metadata = read_prompts(prompts)
    if K > 1 and not perturbations:
        raise SystemExit(f"K={K} needs --perturbations=FILE from phase1_perturb.py (or K=1)")
    check_rho(rho)
    for name, ok, must in (("K", K >= 1, "at least 1"), ("G", G >= 1, "at least 1"),
                           ("steps", steps >= 1, "at least 1"), ("batch_size", batch_size >= 1, "at least 1"),
                           ("t5_len", t5_len >= 1, "at least 1"),
                           ("solver", solver in ("euler", "dpm2"), "'euler' or 'dpm2'"),
                           ("guidance", 1 <= guidance < math.inf, "finite and >= 1 (1.0: no CFG)"),
                           ("resolution", resolution >= 16 and resolution % 16 == 0,
                            "a positive multiple of 16")):
        if not ok:
            raise SystemExit(f"{name}={globals()[name]!r} must be {must}")
    pick_device(device, dtype)
    if lora:
        check_lora(lora)
    if K > 1:
        check_perturbations(perturbations, model, prompt_list, K, t5_len)
    check_writable(out_dir, "out_dir")
    return prompt_list, metadata


def earlier_samples():
    """The files of earlier samples in out_dir, which this run would replace: only with --overwrite=True,
    never one of its inputs (the folder's other files are left alone)."""
    found = sorted(os.path.join(out_dir, f) for f in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
                   if SAMPLE_FILES.fullmatch(f))
    if found and not overwrite:
        raise SystemExit(f"out_dir={out_dir} holds earlier samples ({len(found)} files: index.jsonl, PNGs, "
                         "grids): pass --overwrite=True to replace them, or another --out_dir")
    check_keeps_inputs(found, {"the prompt file": prompts, "the perturbation file": perturbations,
                               "the LoRA": lora, "the model": model}, "--overwrite=True")
    return found


def main(argv=None):
    from configurator import configure
    from tqdm import tqdm
    cfg = configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    prompt_list, metadata = check_settings()
    # out_dir claimed (one writer at a time) and checked for what this run would replace: nothing is loaded,
    # removed or written before this line
    release, earlier = claim(out_dir, earlier_samples, int(os.environ.get("RANK", 0)))
    quiet()
    rank, world, dev, dt = setup_distributed(device, dtype)
    pipe = load_pipeline(model, dev, dt, seed=0)
    text = load_text(model, dev, dt, t5_len, pipe=pipe)
    pert = load_perturbations(perturbations, text, prompt_list, K) if K > 1 else None  # K=1: C^orig only
    check_finite_rows(pert, range(len(prompt_list)))
    shape = latent_shape(pipe, resolution)
    if lora:
        load_lora(pipe, lora, model)
    if rank == 0:
        note_cut_prompts(text, prompt_list)
        for f in sorted(earlier, key=lambda f: not f.endswith("index.jsonl")):  # the index first: a folder
            os.remove(f)                                                        # without one is unfinished
    if world > 1:  # no rank writes before rank 0 has removed the earlier samples
        import torch.distributed as dist
        dist.barrier()
    c_neg = encode(text, [""]) if guidance > 1.0 else None
    sigmas = sigma_grid(pipe.scheduler, steps)
    os.makedirs(out_dir, exist_ok=True)
    # every image (pi, k, g) of every prompt in one list, cut into batches of batch_size across prompts;
    # rank r samples batches r, r + world, ...: a batch holds the same images on 1 or 8 GPUs, and the
    # last one is padded with copies of its last image, so every forward has one shape. With per-image
    # seeds, the files are then the same whatever the number of GPUs.
    items = [(pi, k, g) for pi in range(len(prompt_list)) for k in range(K) for g in range(G)]
    batches = [items[a:a + batch_size] for a in range(0, len(items), batch_size)]
    index = []
    for chunk in tqdm(batches[rank::world], desc="sample", disable=not bars(rank)):
        conds = {}  # prompt -> (C^orig [1, ...], rows k = 0..K-1 of C^opt or None), each prompt encoded alone
        for pi in sorted({pi for pi, _, _ in chunk}):
            orig = encode(text, [prompt_list[pi]])
            opt = perturbed_conditions(text, pert, prompt_list, [pi]) if pert is not None else None
            conds[pi] = orig, tuple(torch.cat([o, p]) for o, p in zip(orig, opt)) if opt is not None else None
        padded = chunk + chunk[-1:] * (batch_size - len(chunk))
        c_orig = tuple(torch.cat([conds[pi][0][n] for pi, _, _ in padded]) for n in range(2))
        c_opt = (tuple(torch.stack([conds[pi][1][n][k] for pi, k, _ in padded]) for n in range(2))
                 if pert is not None else None)
        seeds = [seed + (pi * K + k) * G + g for pi, k, g in padded]
        x0 = sample(pipe.transformer, sigmas, image_noise(seeds, shape, dev), c_orig, c_opt,
                    rho, guidance, c_neg, solver)
        for (pi, k, g), s_, img in zip(chunk, seeds, decode(pipe.vae, x0)):
            fname = f"{pi:05d}_k{k:02d}_g{g:02d}.png"
            to_pil(img).save(os.path.join(out_dir, fname))
            index.append({"prompt_index": pi, "prompt": prompt_list[pi], "k": k, "g": g, "seed": s_,
                          "file": fname, "metadata": metadata[pi]})
    if world > 1:  # one index for the folder, written by rank 0
        import torch.distributed as dist
        parts = [None] * world
        dist.all_gather_object(parts, index)
        index = [r for p in parts for r in p]
    if rank == 0:
        index.sort(key=lambda r: (r["prompt_index"], r["k"], r["g"]))
        from PIL import Image
        import numpy as np
        # a K x G grid per prompt, from the files (a prompt may span ranks)
        for pi in range(len(prompt_list)):
            ims = [np.asarray(Image.open(os.path.join(out_dir, r["file"])))
                   for r in index[pi * K * G:(pi + 1) * K * G]]
            to_pil(grid(torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 255, G)).save(
                os.path.join(out_dir, f"{pi:05d}_grid.png"))
        write_json_atomic(os.path.join(out_dir, "config.json"), cfg)
        write_text_atomic(os.path.join(out_dir, "index.jsonl"), "".join(json.dumps(r) + "\n" for r in index))
        print(f"wrote {len(index)} images of {len(prompt_list)} prompts to {out_dir}/ (index.jsonl)")
    release()


if __name__ == "__main__":
    run_main(main)
