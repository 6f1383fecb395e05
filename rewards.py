"""
Rewards: every reward is `fn(images, prompts, metadata) -> scores [B]` (float32, on the images'
device), images a float tensor [B, 3, H, W] in [0, 1], prompts a list of B strings, metadata a list
of B dicts (GenEval clauses for GenEval prompts, empty dicts otherwise). Each is built once by name:

    fn = REWARDS["pickscore"](device="cuda", dtype=torch.bfloat16)          # hub ids / paths as opts
    reward = build_reward({"pickscore": 1.0, "clipscore": 0.5}, device, dtype)
    total, per_name = reward(images, prompts, metadata)                     # total = sum w * score

name                   | model (defaults; every id overridable)                      | raw score, typical
-----------------------|-------------------------------------------------------------|------------------------
jpeg_incompressibility | none: JPEG file size at quality 95, in kB                   | ~30-150 at 512 px
jpeg_compressibility   | none: minus that size                                       | ~-150..-30
pickscore              | yuvalkirstain/PickScore_v1 + laion ViT-H-14 processor       | logit_scale*cos, ~20-23
clipscore              | openai/clip-vit-large-patch14                               | cosine, ~0.2-0.4
aesthetic              | CLIP ViT-L/14 + LAION aesthetic MLP head (a .pth file)      | ~4-7 (of 10)
hpsv2                  | open_clip ViT-H-14 + HPS v2.1 (pip install open_clip_torch) | cosine, ~0.25-0.35
imagereward            | ImageReward-v1.0 (pip install image-reward)                 | z-scored, ~-2..2
geneval                | Mask2Former Swin-S COCO instance + CLIP ViT-L/14 colour     | partial credit, <= 1
shapes, colour_share…  | none: the shapes world's rewards (data/shapes/world.py)     | see its docstrings

Scores are reported raw, as the papers' tables do. Training does not need them rescaled: the
advantage normalises each group by its std, so a constant factor only matters when several rewards
are summed (Flow-GRPO's and DiffusionNFT's scorers divide PickScore by 26, bringing it near [0, 1];
pickscore(scale=1/26) does the same).

Every model id also accepts "tiny": a seeded random-weight model of the same class, built offline,
for tests and --model=tiny runs (build_reward(..., tiny=True) does that for every reward). Model
loading failures stop with one sentence naming what to download or pip install, at build time, and
at once when a hub id is not cached and the hub cannot be reached (_from_pretrained). GenEval's
partial credit is the public reward server's (negative with many extra objects) unless credit="fixed".
The GenEval rule engine (`geneval_rules`) is pure Python, separate from the detector.
"""
import functools
import importlib.util
import io
import math
import os
import sys

import torch
import torch.nn.functional as F

# GenEval's 80 object names, in COCO's contiguous class order (the order of a COCO detector's labels;
# a few differ from COCO's own names: "computer mouse", "tv remote", "computer keyboard").
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
GENEVAL_POSITIONS = ("left of", "right of", "above", "below")
GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# GenEval's evaluation settings (djghosh13/geneval, evaluation/evaluate_images.py)
THRESHOLD = 0.3  # detection confidence to count an object
COUNTING_THRESHOLD = 0.9  # stricter for the counting tag
MAX_OBJECTS = 16  # per class, most confident first
POSITION_THRESHOLD = 0.1  # margin, as a fraction of the two boxes' summed sizes
COLOR_TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}",
                   "a photo of a {color} object")
CROP_BACKGROUND = "#999999"  # masked-out pixels of a colour crop


# ----------------------------------------------------------------------------- shared helpers
def _uint8_images(images):
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3], rounded as a saved PNG would be."""
    return ((images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
            .permute(0, 2, 3, 1).cpu().numpy())


def _to_pil(images):
    """[B, 3, H, W] in [0, 1] -> B PIL images, quantised to uint8 as a saved PNG would be, so scores
    match what the official scorers give on image files."""
    from PIL import Image
    return [Image.fromarray(a) for a in _uint8_images(images)]


_HUB_PROBED = {}  # endpoint -> why it cannot be used ("" = it answered); probed once per process


def hub_unreachable(timeout=5.0):
    """Why the Hugging Face hub cannot be used now, or "" when it can: HF_HUB_OFFLINE is set, or its
    endpoint gives no HTTP answer (any status counts as an answer) to one HEAD request within `timeout`
    seconds. The request runs in a daemon thread that we wait on for at most timeout + 1 s, so a hanging
    DNS lookup cannot hold the caller either. It goes through huggingface_hub's own HTTP session, which
    honours the same proxies and HF_ENDPOINT as a download would. Probed once per process."""
    import threading
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    if endpoint not in _HUB_PROBED:
        answer = []

        def probe():
            try:
                from huggingface_hub.utils import get_session
                get_session().head(endpoint, timeout=timeout)
                answer.append("")
            except Exception as err:  # DNS failure, refused connection, timeout, proxy error, ...
                answer.append(f"{endpoint} cannot be reached ({type(err).__name__})")
        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(timeout + 1)
        _HUB_PROBED[endpoint] = answer[0] if answer else f"{endpoint} did not answer within {timeout:g} s"
    return _HUB_PROBED[endpoint]


def _looks_like_path(name):
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


# transformers 5 resizes images with torchvision where it is installed and with PIL otherwise, and the two
# differ in their last bits (antialiasing, rounding): every image processor here is PIL's, so that scores on
# a GPU machine (torchvision installed) are the scores of a CPU machine without it
IMAGE_BACKEND = "pil"


def _from_pretrained(cls, name, what, hint="", **kw):
    """cls.from_pretrained(name, **kw) that stops with one sentence instead of a traceback, and fails fast
    offline: a local folder, else the local hub cache (local_files_only, no network), else the hub, but
    only if hub_unreachable() finds it answering. Without that check an unreachable hub costs ~50 s of
    huggingface_hub's retries before the error. `hint` is appended to the sentence (another way out)."""
    path = os.path.expanduser(name)
    if os.path.isdir(path) or _looks_like_path(name):
        try:
            return cls.from_pretrained(path, **kw)
        except (OSError, ValueError) as err:  # no such folder, or files missing in it
            raise SystemExit(f"could not load the {what} from the local folder '{name}' "
                             f"({type(err).__name__}: missing or incomplete): pass a folder saved with "
                             f"save_pretrained, or a hub id that you download on a machine with internet "
                             f"(hf download ID){hint}")
    try:
        return cls.from_pretrained(name, local_files_only=True, **kw)  # cached: no network at all
    except (OSError, ValueError):
        pass  # not (completely) in the local cache: the hub it is
    why = hub_unreachable()
    if why:
        raise SystemExit(f"could not load the {what} '{name}': it is not in the local Hugging Face cache "
                         f"and {why}; download it on a machine with internet (hf download {name}) and copy "
                         f"the cache (~/.cache/huggingface), or pass a local folder{hint}")
    try:
        return cls.from_pretrained(name, **kw)
    except (OSError, ValueError) as err:  # no such repo, gated, missing files, network error mid-way
        raise SystemExit(f"could not load the {what} '{name}' ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}): check the hub id, or download it on a machine "
                         f"with internet (hf download {name}) or pass a local folder{hint}")


def opts_hint(reward, key, value):
    """A reward option as phase2_align.py's command line takes it:
    --reward_opts="{'hpsv2': {'checkpoint': 'PATH'}}" (the config key is a dict, so it must be a Python
    literal; eval_diversity.py takes GenEval's as --geneval_opts)."""
    return f'--reward_opts="{ {reward: {key: value}}!r}"'


def _need(module, pip_name, what):
    """Import an optional package at build time, or stop with what to pip install."""
    import importlib
    try:
        return importlib.import_module(module)
    except Exception as err:  # ImportError, or a broken install failing inside its own import
        raise SystemExit(f"the {what} reward needs the optional package '{module}': pip install {pip_name} "
                         f"(import failed with {type(err).__name__}: {err})")


def _features(out):
    """transformers 5 returns a ModelOutput from get_*_features (projected embedding in pooler_output);
    4.x a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def _clip_embed(model, proc, pils=None, texts=None):
    """L2-normalised CLIP image and/or text embeddings (fp32) of a CLIPModel."""
    dev, dt = model.device, model.dtype
    img = txt = None
    if pils is not None:
        pix = proc(images=pils, return_tensors="pt")["pixel_values"].to(dev, dt)
        img = F.normalize(_features(model.get_image_features(pixel_values=pix)).float(), dim=-1)
    if texts is not None:
        tok = proc(text=list(texts), padding=True, truncation=True, max_length=77,
                   return_tensors="pt").to(dev)
        txt = F.normalize(_features(model.get_text_features(input_ids=tok["input_ids"],
                                                            attention_mask=tok["attention_mask"])).float(),
                          dim=-1)
    return img, txt


def load_clip(name, device="cpu", dtype=torch.float32, processor=None):
    """(CLIPModel, CLIPProcessor) from a hub id or local folder, or "tiny"; frozen, on `device`.
    `processor` loads the processor from another repo (PickScore ships no processor of its own)."""
    if name == "tiny":
        import tiny
        model, proc = tiny.clip()
    else:
        from transformers import CLIPModel, CLIPProcessor
        model = _from_pretrained(CLIPModel, name, "CLIP model", dtype=dtype)
        proc = _from_pretrained(CLIPProcessor, processor or name, "CLIP processor", backend=IMAGE_BACKEND)
    return model.to(device, dtype).requires_grad_(False).eval(), proc


# ----------------------------------------------------------------------------- rewards without weights
def jpeg_incompressibility(device="cpu", dtype=torch.float32):
    """JPEG size at quality 95 in kB (1 kB = 1000 bytes): a proxy for detail and noise."""
    def fn(images, prompts=None, metadata=None):
        sizes = []
        for im in _to_pil(images):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=95)
            sizes.append(buf.tell() / 1000)
        return torch.tensor(sizes, dtype=torch.float32, device=images.device)
    return fn


def jpeg_compressibility(device="cpu", dtype=torch.float32):
    """Minus the JPEG size in kB: higher for flat, simple images (Flow-GRPO further divides by 500)."""
    size = jpeg_incompressibility()
    return lambda images, prompts=None, metadata=None: -size(images)


# ----------------------------------------------------------------------------- CLIP-family rewards
def pickscore(device="cpu", dtype=torch.float32, model="yuvalkirstain/PickScore_v1",
              processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", scale=1.0):
    """PickScore: logit_scale * cos(image, prompt) of the PickScore_v1 CLIP (a fine-tuned laion ViT-H-14,
    whose preprocessing it uses). Raw values ~20-23, as reported; DiffusionNFT trains on score/26 (scale)."""
    clip, proc = load_clip(model, device, dtype, processor=processor)
    logit_scale = clip.logit_scale.exp().float().item()

    @torch.no_grad()
    def fn(images, prompts, metadata=None):
        img, txt = _clip_embed(clip, proc, _to_pil(images), prompts)
        return (scale * logit_scale * (img * txt).sum(-1)).to(images.device)
    return fn


def clipscore(device="cpu", dtype=torch.float32, model="openai/clip-vit-large-patch14"):
    """CLIP ViT-L/14 cosine between image and prompt (Hessel et al.'s CLIPScore reports 2.5*max(cos, 0);
    many tables report 100*cos; we return cos itself)."""
    clip, proc = load_clip(model, device, dtype)

    @torch.no_grad()
    def fn(images, prompts, metadata=None):
        img, txt = _clip_embed(clip, proc, _to_pil(images), prompts)
        return (img * txt).sum(-1).to(images.device)
    return fn


def aesthetic_head(dim=768):
    """The LAION improved-aesthetic-predictor MLP (no activations between the linears, as released):
    state-dict keys layers.{0,2,4,6,7}.{weight,bias}, the format of sac+logos+ava1-l14-linearMSE.pth."""
    head = torch.nn.Module()
    head.layers = torch.nn.Sequential(
        torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    return head


AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac%2Blogos%2Bava1-l14-linearMSE.pth")


def aesthetic(device="cpu", dtype=torch.float32, clip="openai/clip-vit-large-patch14",
              head="sac+logos+ava1-l14-linearMSE.pth"):
    """LAION aesthetic score: the MLP head on the L2-normalised CLIP ViT-L/14 image embedding.
    `head` is a path to the released state dict, or "tiny" (random head of the same layout)."""
    model, proc = load_clip(clip, device, dtype)
    if head == "tiny":
        torch.manual_seed(0)
    mlp = aesthetic_head(model.config.projection_dim)
    if head != "tiny":
        if not os.path.isfile(os.path.expanduser(head)):
            raise SystemExit(f"aesthetic head weights '{head}' not found: download "
                             f"sac+logos+ava1-l14-linearMSE.pth from {AESTHETIC_URL} and pass its path, "
                             f"e.g. {opts_hint('aesthetic', 'head', 'PATH')}")
        mlp.load_state_dict(torch.load(os.path.expanduser(head), map_location="cpu", weights_only=True))
    mlp = mlp.to(device, torch.float32).requires_grad_(False).eval()  # tiny MLP: keep fp32

    @torch.no_grad()
    def fn(images, prompts=None, metadata=None):
        img, _ = _clip_embed(model, proc, _to_pil(images))
        return mlp.layers(img).squeeze(-1).to(images.device)
    fn.head = mlp
    return fn


# ----------------------------------------------------------------------------- rewards from optional packages
HPS_REPO, HPS_FILE = "xswu/HPSv2", "HPS_v2.1_compressed.pt"


def _hps_fn(model, preprocess, tokenizer, device):
    """The HPS scoring step on any open_clip-style model: cosine of the normalised image and text features.
    Kept apart from loading so a stand-in model can exercise it."""
    @torch.no_grad()
    def fn(images, prompts, metadata=None):
        dt = next(model.parameters()).dtype
        pix = torch.stack([preprocess(im) for im in _to_pil(images)]).to(device, dt)
        img = F.normalize(model.encode_image(pix).float(), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(list(prompts)).to(device)).float(), dim=-1)
        return (img * txt).sum(-1).to(images.device)
    return fn


def hpsv2(device="cpu", dtype=torch.float32, checkpoint=HPS_REPO):
    """HPSv2.1: open_clip ViT-H-14 with the HPS v2.1 weights; score = cosine(image, prompt), ~0.25-0.35.
    `checkpoint` is the hub repo holding HPS_v2.1_compressed.pt, a local .pt file, or "tiny".
    We use open_clip_torch rather than the `hpsv2` package (whose code is a fork of open_clip): same
    architecture, weights and preprocessing, but the hpsv2 1.2.0 wheel on PyPI lacks the BPE vocabulary
    its tokenizer opens at import, and pins pytest==7.2.0."""
    open_clip = _need("open_clip", "open_clip_torch", "hpsv2")
    if checkpoint == "tiny":
        import tiny
        model, preprocess = tiny.open_clip_model(open_clip)
    else:
        # pretrained=None: the laion weights would be overwritten by the HPS checkpoint anyway;
        # "longest": resize the longer side and pad, HPS's own evaluation transform
        model, _, preprocess = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None,
                                                                     image_resize_mode="longest")
        path = os.path.expanduser(checkpoint)
        if not os.path.isfile(path):
            from huggingface_hub import hf_hub_download
            fix = (f"download {HPS_FILE} on a machine with internet (hf download {HPS_REPO} {HPS_FILE}) and "
                   f"pass its path, e.g. {opts_hint('hpsv2', 'checkpoint', 'PATH')}")
            try:
                path = hf_hub_download(checkpoint, HPS_FILE, local_files_only=True)  # cached: no network
            except Exception:
                why = hub_unreachable()  # fail fast offline rather than after the hub client's retries
                if why:
                    raise SystemExit(f"could not get the HPS v2.1 checkpoint: it is not in the local "
                                     f"Hugging Face cache and {why}; {fix}")
                try:
                    path = hf_hub_download(checkpoint, HPS_FILE)
                except Exception as err:
                    raise SystemExit(f"could not get the HPS v2.1 checkpoint ({type(err).__name__}): {fix}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            # older checkpoints pickle extra training state; this one comes from a known hub repo
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt.get("state_dict", ckpt))
    model = model.to(device, dtype).requires_grad_(False).eval()
    return _hps_fn(model, preprocess, open_clip.get_tokenizer("ViT-H-14"), device)


def _imagereward_fn(model, device):
    """ImageReward's `score()` batched: BLIP text encoder cross-attending to the image, CLS feature ->
    MLP -> (r - mean) / std. Kept apart from loading so a stand-in model can exercise it."""
    @torch.no_grad()
    def fn(images, prompts, metadata=None):
        blip = model.blip
        dt = next(model.parameters()).dtype
        tok = blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                             return_tensors="pt").to(device)
        pix = torch.stack([model.preprocess(im) for im in _to_pil(images)]).to(device, dt)
        emb = blip.visual_encoder(pix)
        att = torch.ones(emb.shape[:-1], dtype=torch.long, device=device)
        h = blip.text_encoder(tok.input_ids, attention_mask=tok.attention_mask, encoder_hidden_states=emb,
                              encoder_attention_mask=att, return_dict=True).last_hidden_state[:, 0, :]
        r = model.mlp(h.to(dt)).float().squeeze(-1)
        return ((r - model.mean) / model.std).to(images.device)
    return fn


def imagereward(device="cpu", dtype=torch.float32, model="ImageReward-v1.0"):
    """ImageReward v1.0 (THUDM/ImageReward on the hub), from the `image-reward` package.
    `model` is a name its loader knows or a local ImageReward.pt. No tiny model: its BLIP is fixed at
    ViT-L."""
    RM = _need("ImageReward", "image-reward", "imagereward")
    if model == "tiny":
        raise SystemExit("the imagereward reward has no tiny model (its BLIP backbone is fixed at ViT-L): "
                         "leave it out of --model=tiny runs")
    try:
        net = RM.load(model, device=device)
    except Exception as err:  # its loader downloads the checkpoint, med_config.json and bert-base-uncased
        raise SystemExit(f"could not load ImageReward '{model}' ({type(err).__name__}): run once on a "
                         f"machine with internet (hf download THUDM/ImageReward) or pass the file, e.g. "
                         f"{opts_hint('imagereward', 'model', '/path/to/ImageReward.pt')}")
    net = net.to(device, dtype).requires_grad_(False).eval()
    return _imagereward_fn(net, device)


# ----------------------------------------------------------------------------- GenEval: rules
def relative_position(box_a, box_b):
    """The set of relations of A to B among left of / right of / above / below (image y grows down).
    On each axis the centre offset is shrunk by POSITION_THRESHOLD of the two boxes' summed sizes (a
    margin: centres closer than it are in no relation on that axis); what remains must exceed half the
    offset's length, i.e. point within 60 degrees of the axis. Diagonal placements give two relations."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box_a[:4], box_b[:4]
    off = ((ax0 + ax1) / 2 - (bx0 + bx1) / 2, (ay0 + ay1) / 2 - (by0 + by1) / 2)
    size = (abs(ax1 - ax0) + abs(bx1 - bx0), abs(ay1 - ay0) + abs(by1 - by0))
    rev = [max(abs(o) - POSITION_THRESHOLD * s, 0.0) * (1 if o > 0 else -1 if o < 0 else 0)
           for o, s in zip(off, size)]
    if all(abs(r) < 1e-3 for r in rev):
        return set()
    norm = (off[0] ** 2 + off[1] ** 2) ** 0.5
    dx, dy = rev[0] / norm, rev[1] / norm
    return {rel for rel, hit in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5),
                                 ("below", dy > 0.5)) if hit}


def _kept_objects(detections, tag):
    """GenEval's filter: above the (counting) threshold, most confident first, at most MAX_OBJECTS a class."""
    thr = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    objs = {}
    for cls, dets in detections.items():
        kept = sorted((d for d in dets if d[1] > thr), key=lambda d: -d[1])[:MAX_OBJECTS]
        if kept:
            objs[cls] = kept
    return objs


def _benchmark(objs, metadata):
    """GenEval's correctness: include clauses ANDed (the `count` most confident objects of the class must
    exist, have the colour, and stand in the relation to every object of the target clause), exclude
    clauses ORed (that many objects or more fail). Returns (correct, reasons)."""
    reasons, groups = [], []
    for req in metadata.get("include", []):
        cls, n = req["class"], req["count"]
        top = objs.get(cls, [])[:n]
        ok = len(top) >= n
        if not ok:
            reasons.append(f"expected {n} {cls}, found {len(top)}")
        if ok and "color" in req:
            got = [d[2] for d in top]
            if got.count(req["color"]) < n:
                ok = False
                reasons.append(f"expected {n} {req['color']} {cls}, found colours {got}")
        if ok and "position" in req:
            rel, target = req["position"]
            if groups[target] is None:
                ok = False
                reasons.append(f"no target for {cls} to be {rel}")
            for a in top if ok else []:
                for b in groups[target]:
                    rels = relative_position(a[0], b[0])
                    if rel not in rels:
                        ok = False
                        found = " and ".join(sorted(rels)) or "no relation"
                        reasons.append(f"expected {cls} {rel} target, found {found}")
                        break
                if not ok:
                    break
        groups.append(top if ok else None)
    correct = not reasons
    for req in metadata.get("exclude", []):
        found = len(objs.get(req["class"], []))
        if found >= req["count"]:
            correct = False
            reasons.append(f"expected fewer than {req['count']} {req['class']}, found {found}")
    return correct, reasons


# The training score's two formulas (geneval_rules / the geneval reward: credit=...):
#   "server": the public GenEval reward server's, term by term (yifan123/reward-server,
#             reward_server/gen_eval.py, evaluate_reward; the same function is flow_grpo/gen_eval.py in
#             NVlabs/DiffusionNFT). Flow-GRPO and DiffusionNFT train on it, and so did the paper: the default.
#   "fixed":  the same with its two quirks repaired (see _partial_credit).
GENEVAL_CREDITS = ("server", "fixed")


def _partial_credit(objs, metadata, credit="server"):
    """The partial-credit training score: the mean of the terms that the include clauses add (exclude
    clauses add none). A clause asking n objects of a class, `found` the kept objects of that class:

        count term     1 - |n - found| / n               (wants exactly n; below 0 past 2n objects)
        if found != n  one 0 when the clause asks a colour or a position (nothing else is checked)
        if found == n  colour term  k / n, k of the n objects having the colour;
                       position, only if the colour (when asked) matched: 0 when the target clause did not
                       match, else 1 when every object stands in the relation to every target object,
                       and 0 *and* 1 when one does not (the public loop appends 0, breaks, then appends 1)

    That is credit="server", the public reward server's formula, which Flow-GRPO, DiffusionNFT and the
    paper train with: the default, so that results reproduce. Its two quirks: many extra objects make
    the score negative ("a dog" with 3 dogs: 1 - 2/1 = -1), and a failed position check still adds a 1
    ("a dog left of a cat" with the dog on the right: (1 + 1 + 0 + 1) / 4 = 0.75, as much as a missing
    colour leaves). credit="fixed" clips the count term at 0 and scores a failed position check by a
    single 0 (those two: 0 and (1 + 1 + 0) / 3 = 2/3); it also gives colour and position a term each
    whenever a clause asks both (0 each when the count is off, position 0 when the colour is off), which
    only matters for clauses that ask both: GenEval's own prompts never do."""
    if credit not in GENEVAL_CREDITS:
        raise ValueError(f"unknown GenEval credit '{credit}': use one of {', '.join(GENEVAL_CREDITS)}")
    server = credit == "server"
    terms, groups = [], []
    for req in metadata.get("include", []):
        n, found = req["count"], objs.get(req["class"], [])
        count = 1.0 - abs(n - len(found)) / n
        terms.append(count if server else max(0.0, count))
        matched = len(found) == n
        asks = ("color" in req) + ("position" in req)
        if not matched:
            terms += [0.0] * (min(asks, 1) if server else asks)
        else:
            if "color" in req:
                k = sum(d[2] == req["color"] for d in found)
                terms.append(k / n)
                matched = k == n
            if "position" in req and (matched or not server):  # the server skips it after a colour miss
                rel, target = req["position"]
                ok = matched and groups[target] is not None and all(
                    rel in relative_position(a[0], b[0]) for a in found for b in groups[target])
                if ok:
                    terms.append(1.0)
                elif server and groups[target] is not None:
                    terms += [0.0, 1.0]  # the public quirk, kept so the default reproduces the paper's reward
                else:
                    terms.append(0.0)
                matched = ok
        groups.append(found if matched else None)
    return sum(terms) / len(terms) if terms else 0.0


def geneval_rules(detections, metadata, credit="server"):
    """GenEval's rules on one image, separate from any model.

    detections: {class_name: [(box, score, colour), ...]}, box = (x0, y0, x1, y1) in pixels, score the
        detector confidence, colour one of GENEVAL_COLORS or None (None never matches a colour clause).
        Unfiltered: the thresholds (0.3, 0.9 for counting), the order by confidence and the 16-per-class
        cap are applied here.
    metadata: {"tag", "include": [{"class", "count", "color"?, "position"?: [relation, clause_index]}],
        "exclude"?: [{"class", "count"}], "prompt"?}, as GenEval's evaluation_metadata.jsonl.
    credit: the training score's formula, "server" (default: the public reward server's, which the
        paper trained with; at most 1, negative with many extra objects) or "fixed" (in [0, 1]); see
        _partial_credit.
    Returns (correct, score, reason): the benchmark's strict verdict, the partial-credit training score,
    and the benchmark's failure reasons ("" when correct)."""
    objs = _kept_objects(detections, metadata.get("tag"))
    correct, reasons = _benchmark(objs, metadata)
    return correct, _partial_credit(objs, metadata, credit), "; ".join(reasons)


def geneval_task(metadata):
    """A hashable key of what a GenEval prompt asks, independent of its wording: (tag, include clauses,
    exclude clauses). Clauses without a position are compared as a set ("a cat and a dog" is the task
    of "a dog and a cat"); position clauses keep their order, which their target index refers to.
    Train and test prompt sets are made disjoint by this key, not by prompt text ("two sheep" is
    GenEval's "two sheeps")."""
    def clause(c):
        return (c["class"], int(c["count"]), c.get("color"),
                tuple(c["position"]) if "position" in c else None)
    inc = [clause(c) for c in metadata.get("include", [])]
    if not any(c[3] for c in inc):
        inc.sort(key=repr)
    exc = sorted((clause(c) for c in metadata.get("exclude", [])), key=repr)
    return metadata.get("tag"), tuple(inc), tuple(exc)


# GenEval's 553 official prompts (djghosh13/geneval, prompts/evaluation_metadata.jsonl, MIT licence),
# shipped byte for byte: source, commit and licence in data/geneval/README.md. Evaluation samples them;
# data/geneval/prepare.py keeps their tasks out of the training prompts.
GENEVAL_BENCHMARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "geneval",
                                 "evaluation_metadata.jsonl")
GENEVAL_BENCHMARK_SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"


def geneval_benchmark(path=GENEVAL_BENCHMARK):
    """GenEval's official prompt metadata (553 dicts, in the file's order), once the file's sha256 is
    checked against the pinned one: an edited copy would make "GenEval" numbers incomparable to the
    published ones and could let benchmark tasks into training."""
    import hashlib
    import json
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        raise SystemExit(f"GenEval's official prompt file {path} is missing: restore it with "
                         f"git checkout -- data/geneval/evaluation_metadata.jsonl")
    digest = hashlib.sha256(data).hexdigest()
    if digest != GENEVAL_BENCHMARK_SHA256:
        raise SystemExit(f"{path} is not GenEval's official prompt file (sha256 {digest[:16]}..., expected "
                         f"{GENEVAL_BENCHMARK_SHA256[:16]}...): restore it with git checkout -- "
                         f"data/geneval/evaluation_metadata.jsonl")
    return [json.loads(ln) for ln in data.decode("utf-8").splitlines() if ln.strip()]


# ----------------------------------------------------------------------------- GenEval: models
def _instances(outputs, pixel_mask, sizes, max_per_image=100, floor=THRESHOLD):
    """Mask2Former outputs -> per image a list of {"label", "score", "box", "mask"} with score > floor,
    most confident first. As mmdetection's Mask2Former instance head (what GenEval ran): the top
    `max_per_image` (query, class) pairs by class probability, masks upsampled to the padded input, cropped
    to the valid area, resized to the image, thresholded at 0.5; score = class prob * mean mask prob inside
    the mask; box = the mask's extent (x1, y1 exclusive). Empty masks are dropped."""
    probs = outputs.class_queries_logits.float().softmax(-1)[..., :-1]  # [B, Q, C]; last = no object
    logits = outputs.masks_queries_logits.float()  # [B, Q, h/4, w/4]
    ph, pw = pixel_mask.shape[-2:]
    valid = pixel_mask.bool().cpu()  # each image's unpadded extent, read once
    result = []
    for i, (H, W) in enumerate(sizes):
        C = probs.shape[-1]
        score, idx = probs[i].flatten().topk(min(max_per_image, probs[i].numel()))
        query, label = idx // C, idx % C
        vh, vw = int(valid[i].any(1).sum()), int(valid[i].any(0).sum())
        m = F.interpolate(logits[i, query][None], size=(ph, pw), mode="bilinear", align_corners=False)[0]
        m = F.interpolate(m[None, :, :vh, :vw], size=(H, W), mode="bilinear",
                          align_corners=False)[0].sigmoid()
        binary = m > 0.5
        area = binary.flatten(1).sum(1)
        score = score * (m * binary).flatten(1).sum(1) / (area + 1e-6)
        # the objects above the floor with a non-empty mask, most confident first, copied to the host in one
        # go per image (not several device syncs per object)
        order = torch.argsort(score, descending=True)
        keep = order[(score[order] > floor) & (area[order] > 0)]
        dets = []
        for s, lab, mask in zip(score[keep].tolist(), label[keep].tolist(), binary[keep].cpu()):
            ys, xs = mask.any(1).nonzero(), mask.any(0).nonzero()
            box = (float(xs[0]), float(ys[0]), float(xs[-1]) + 1, float(ys[-1]) + 1)
            dets.append({"label": lab, "score": s, "box": box, "mask": mask.numpy()})
        result.append(dets)
    return result


def masked_crop(pil, box, mask):
    """The object alone for colour naming: its mask's pixels over grey (#999999), cropped to its box."""
    from PIL import Image
    grey = Image.new("RGB", pil.size, CROP_BACKGROUND)
    return (Image.composite(pil, grey, Image.fromarray(mask.astype("uint8") * 255))
            .crop(tuple(int(v) for v in box)))


def geneval(device="cpu", dtype=torch.float32, detector="facebook/mask2former-swin-small-coco-instance",
            clip="openai/clip-vit-large-patch14", detector_size=800, batch_size=16, strict=False,
            credit="server"):
    """GenEval on transformers, without mmdetection: Mask2Former (Swin-S, COCO instance: the architecture
    GenEval's mmdet checkpoint uses; pass facebook/mask2former-swin-large-coco-instance for a stronger one)
    finds the objects, CLIP ViT-L/14 names the colour of each masked crop over grey (#999999) zero-shot,
    and `geneval_rules` judges. Images go to the detector at shorter side `detector_size` (mmdet's test
    scale 800, longer side <= 1333). The reward is the partial-credit score, or 0/1 correctness if `strict`;
    `credit` picks its formula: "server" (default, the public reward server's, which DiffusionNFT and the
    paper train with) or "fixed" (its two quirks repaired; see _partial_credit), e.g.
    --reward_opts="{'geneval': {'credit': 'fixed'}}". Extra attributes:
    .evaluate(images, metadata) -> [{"tag", "correct", "score", "reason"}] and
    .detect(images, class_names=None) -> per image [{"class", "box" (xyxy pixels), "score"}].
    The detector's labels are read in COCO order as GENEVAL_CLASSES (80 labels required)."""
    if credit not in GENEVAL_CREDITS:  # checked before any model loads
        raise SystemExit(f"unknown geneval credit '{credit}': use 'server' (the public reward server's "
                         f"formula, the default) or 'fixed', e.g. {opts_hint('geneval', 'credit', 'fixed')}")
    if detector == "tiny":
        import tiny
        det_model, det_proc = tiny.mask2former()
    else:
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation
        det_model = _from_pretrained(Mask2FormerForUniversalSegmentation, detector, "Mask2Former detector",
                                     dtype=dtype)
        det_proc = _from_pretrained(AutoImageProcessor, detector, "Mask2Former image processor",
                                    size={"shortest_edge": detector_size, "longest_edge": 1333},
                                    backend=IMAGE_BACKEND)
    if det_model.config.num_labels != len(GENEVAL_CLASSES):
        raise SystemExit(
            f"detector '{detector}' has {det_model.config.num_labels} labels, GenEval needs a COCO instance "
            f"model with 80: pass one, e.g. "
            f"{opts_hint('geneval', 'detector', 'facebook/mask2former-swin-small-coco-instance')}")
    det_model = det_model.to(device, dtype).requires_grad_(False).eval()
    clip_model, clip_proc = load_clip(clip, device, dtype)
    color_text = {}  # class -> [10, D] zero-shot colour classifier, built on first use

    @torch.no_grad()
    def detect_raw(pils, floor=THRESHOLD):
        out = []
        for s in range(0, len(pils), batch_size):
            chunk = pils[s:s + batch_size]
            inp = det_proc(images=chunk, return_tensors="pt")
            o = det_model(pixel_values=inp["pixel_values"].to(device, dtype),
                          pixel_mask=inp["pixel_mask"].to(device))
            out += _instances(o, inp["pixel_mask"].to(device), [im.size[::-1] for im in chunk], floor=floor)
        for dets in out:
            for d in dets:
                d["class"] = GENEVAL_CLASSES[d["label"]]
        return out

    @torch.no_grad()
    def classify_colors(crops, classes):
        """Zero-shot colour of each crop: the colour whose averaged template embedding is nearest."""
        if not crops:
            return []
        for cls in set(classes) - set(color_text):
            texts = [t.format(color=c, cls=cls) for c in GENEVAL_COLORS for t in COLOR_TEMPLATES]
            _, txt = _clip_embed(clip_model, clip_proc, texts=texts)
            color_text[cls] = F.normalize(txt.view(len(GENEVAL_COLORS), len(COLOR_TEMPLATES), -1).mean(1),
                                          dim=-1)
        img, _ = _clip_embed(clip_model, clip_proc, pils=crops)
        return [GENEVAL_COLORS[int((color_text[cls] @ e).argmax())] for e, cls in zip(img, classes)]

    def evaluate(images, metadata):
        pils = _to_pil(images)
        metadata = list(metadata)
        if len(metadata) != len(pils) or any(not m.get("include") for m in metadata):
            raise SystemExit("the geneval reward needs GenEval metadata for every image: use a .jsonl prompt "
                             "file with 'tag' and 'include' fields (data/geneval/prepare.py writes one)")
        per_image, crops, crop_classes, owners = [], [], [], []
        for pil, dets, meta in zip(pils, detect_raw(pils), metadata):
            # the rules filter again; filtering here only spares classifying colours nobody reads
            thr = COUNTING_THRESHOLD if meta.get("tag") == "counting" else THRESHOLD
            want_color = {req["class"] for req in meta["include"] if "color" in req}
            objs = {}
            for d in dets:  # most confident first
                kept = objs.setdefault(d["class"], [])
                if d["score"] <= thr or len(kept) >= MAX_OBJECTS:
                    continue
                kept.append([d["box"], d["score"], None])
                if d["class"] in want_color:
                    crops.append(masked_crop(pil, d["box"], d["mask"]))
                    crop_classes.append(d["class"])
                    owners.append(kept[-1])
            per_image.append(objs)
        for entry, color in zip(owners, classify_colors(crops, crop_classes)):
            entry[2] = color
        results = []
        for objs, meta in zip(per_image, metadata):
            correct, score, reason = geneval_rules({c: [tuple(e) for e in v] for c, v in objs.items()},
                                                   meta, credit)
            results.append({"tag": meta.get("tag"), "correct": correct, "score": score, "reason": reason})
        return results

    def detect(images, class_names=None, threshold=THRESHOLD):
        keep = None if class_names is None else set(class_names)
        return [[{"class": d["class"], "box": list(d["box"]), "score": d["score"]} for d in dets
                 if (keep is None or d["class"] in keep) and d["score"] > threshold]
                for dets in detect_raw(_to_pil(images), floor=min(threshold, THRESHOLD))]

    def fn(images, prompts=None, metadata=None):
        res = evaluate(images, metadata if metadata is not None else [{}] * len(images))
        vals = [float(r["correct"]) if strict else r["score"] for r in res]
        return torch.tensor(vals, dtype=torch.float32, device=images.device)

    fn.evaluate, fn.detect, fn.classify_colors = evaluate, detect, classify_colors
    fn.detector, fn.clip = (det_model, det_proc), (clip_model, clip_proc)
    return fn


# ----------------------------------------------------------------------------- registry
# The shapes world's rewards live beside the world, in data/shapes/world.py (its detector, `shapes`,
# `colour_share`, ...); they are registered here by name like the others and their module is loaded on first
# use, so this file holds the paper's rewards and stays the one to copy.
SHAPES_WORLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shapes", "world.py")
SHAPES_WORLD_REWARDS = ("shapes", "colour_share", "tint", "colour_amount", "layout")


def shapes_world():
    """The shapes world's module (data/shapes/world.py), loaded once by its path as `shapes_world`."""
    if "shapes_world" not in sys.modules:
        spec = importlib.util.spec_from_file_location("shapes_world", SHAPES_WORLD)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["shapes_world"] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules["shapes_world"]
            raise
    return sys.modules["shapes_world"]


def _shapes_world_reward(name):
    def build(device="cpu", dtype=torch.float32, **kw):
        return getattr(shapes_world(), name)(device=device, dtype=dtype, **kw)
    build.__name__ = build.__qualname__ = name
    return build


REWARDS = {
    "jpeg_compressibility": jpeg_compressibility,
    "jpeg_incompressibility": jpeg_incompressibility,
    "pickscore": pickscore,
    "clipscore": clipscore,
    "aesthetic": aesthetic,
    "hpsv2": hpsv2,
    "imagereward": imagereward,
    "geneval": geneval,
    **{name: _shapes_world_reward(name) for name in SHAPES_WORLD_REWARDS},
}
# the rewards that read GenEval-style metadata ('tag', 'include'): a prompt file without it is refused first
NEEDS_METADATA = ("geneval", *SHAPES_WORLD_REWARDS)
NEEDS_COLOUR = ("colour_share", "tint", "colour_amount")  # ... and a colour in every prompt's first clause
# what build_reward(tiny=True) passes: every model id of a reward set to "tiny"
TINY_OPTS = {
    "pickscore": dict(model="tiny"),
    "clipscore": dict(model="tiny"),
    "aesthetic": dict(clip="tiny", head="tiny"),
    "hpsv2": dict(checkpoint="tiny"),
    "imagereward": dict(model="tiny"),
    "geneval": dict(detector="tiny", clip="tiny"),
}


def parse_spec(spec):
    """{name: weight}, a single name, or "name:weight,name:weight" (for Python callers; phase2_align.py's
    command line takes the dict, as a Python literal: --reward="{'pickscore': 1.0, 'clipscore': 0.5}").
    Every error names that command-line form, the one the configurator accepts for a dict key."""
    example = "--reward=\"{'pickscore': 1.0, 'clipscore': 0.5}\""
    if isinstance(spec, str):
        out = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, w = part.partition(":")
            try:
                out[name.strip()] = float(w) if w else 1.0
            except ValueError:
                raise SystemExit(f"reward weight '{w}' of '{name}' is not a number: write e.g. {example}")
        spec = out
    if not spec:
        raise SystemExit(f"no reward given: pass one or more of {', '.join(REWARDS)} with a weight, "
                         f"e.g. {example}")
    for name, w in spec.items():
        if name not in REWARDS:
            raise SystemExit(f"unknown reward '{name}': the known rewards are {', '.join(REWARDS)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise SystemExit(f"the weight of reward '{name}' must be a number, got {w!r}: "
                             f"write e.g. {example}")
        if not math.isfinite(w):
            raise SystemExit(f"the weight of reward '{name}' must be finite, got {w!r}")
    # a weight of 0 beside others logs a reward without training on it; all 0 would tie every group
    if not any(spec.values()):
        raise SystemExit(f"every reward weight is 0 ({', '.join(spec)}): every group's rewards would tie and "
                         "the run would learn nothing; give at least one a non-zero weight")
    return {name: float(w) for name, w in spec.items()}


def build_reward(spec, device="cpu", dtype=torch.float32, tiny=False, opts=None):
    """Build every reward of `spec` once (names checked first, so a typo fails before any model loads).
    `opts` = {name: {opt: value}} passes model ids / paths; `tiny` swaps every model for a tiny random
    one. Returns fn(images, prompts, metadata) -> (total [B], {name: scores [B]}), total = sum w * score;
    fn.fns holds the single rewards (e.g. fn.fns["geneval"].evaluate)."""
    spec = parse_spec(spec)
    fns = {}
    for name in spec:
        kw = dict((opts or {}).get(name, {}))
        if tiny:
            kw.update(TINY_OPTS.get(name, {}))
        fns[name] = REWARDS[name](device=device, dtype=dtype, **kw)

    def reward(images, prompts, metadata=None):
        metadata = metadata if metadata is not None else [{} for _ in range(len(images))]
        scores = {name: f(images, prompts, metadata) for name, f in fns.items()}
        total = sum(spec[name] * s for name, s in scores.items())
        return total, scores
    reward.fns, reward.weights = fns, spec
    return reward
