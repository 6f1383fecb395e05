"""
Diversity metrics and the GenEval benchmark summary over a folder written by sample.py (its PNGs and
index.jsonl). The metrics, as this file defines them exactly:

    IDS   identity divergence, as published with DivGenBench (D2-Align, arXiv 2512.24146, supp. C.2): mean
          pairwise cosine of face-identity embeddings over every pair of the whole image set (lower =
          more diverse). IDS_per_prompt: the same within each prompt's images, averaged over prompts
          (a prompt needs two faces to count). ArcFace (insightface) when --face_model is given, else
          CLIP image embeddings; the column says which: IDS[arcface] is not IDS[clip]. ArcFace: the
          largest face of each image; images with no face are counted and listed in the JSON, and left
          out. CLIP embeds whole images and checks no face.
    ASC   artistic style coverage: the Image Retrieval Score ratio (Dombrowski et al., CVPR 2025) of all
          the group's samples against a held-out split of a user's reference folder, on style features
          (CSD checkpoint when --style_model is given, else CLIP image embeddings). See
          image_retrieval_score for exactly what is estimated.
    SDI   spatial dispersion: 1 - mean pairwise layout similarity of a prompt's images, averaged over
          prompts; layout similarity = Hungarian matching of detected boxes on IoU, summed IoU over
          max(|A|, |B|); two empty layouts are equal (1), empty vs non-empty share nothing (0).
    PVS   photographic variance, as published (same source): population std over the whole image set of
          the images' mean HSV saturation + of their mean HSV value + of their grayscale contrast,
          channels in [0, 1]. PVS_per_prompt: the same within each prompt's images, averaged over prompts.
    Vendi / cos   Vendi score and mean pairwise cosine of CLIP image embeddings, per prompt, averaged.
    GenEval       per-tag accuracy and the mean of the six tag accuracies (rewards.py's scorer), when the
                  index's metadata carries GenEval tags (tag accuracy = share of correct images, as
                  GenEval's summary_scores.py counts it).

Every metric is reported for all images, for the original condition (k=0) and, when the folder holds
perturbed conditions, for k>0. One table on stdout, one JSON (default DIR/diversity.json).

    # the tiny model end to end on CPU (random backbones: the numbers mean nothing, the plumbing is real)
    python sample.py --model=tiny --prompts=data/tiny_prompts.txt --out_dir=out/samples --G=2 --resolution=64
    python eval_diversity.py --samples=out/samples --clip_model=tiny --detector_model=tiny
    # SD3.5-M samples with the real backbones (hub ids in the local cache, or local folders)
    python eval_diversity.py --samples=out/samples --face_model=~/.insightface/models/buffalo_l \
        --style_model=checkpoints/csd_vit_l.pth --reference=data/wikiart_subset
    # GenEval: sample the benchmark's own prompts (4 images each, as GenEval), then score the folder
    python sample.py config/geneval_g4k12.py --prompts=data/geneval/evaluation_metadata.jsonl --K=1 --G=4 \
        --out_dir=out/geneval
    python eval_diversity.py --samples=out/geneval --metrics=geneval,sdi --detector=geneval

The metric functions above "feature extractors" are pure numpy/scipy and import without side effects.
"""
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np
import torch

import rewards

# -----------------------------------------------------------------------------
# config (overridden by configurator.py: python eval_diversity.py --key=value)
samples = "out/samples"  # folder written by sample.py: index.jsonl + PNGs
metrics = "ids,asc,sdi,pvs,vendi,geneval"  # comma-separated subset, or "all"
# CLIP for Vendi/cos, the IDS fallback and ASC's default features; "tiny"
clip_model = "openai/clip-vit-large-patch14"
face_model = None  # insightface model-pack folder (e.g. ~/.insightface/models/buffalo_l) -> IDS[arcface]
style_model = None  # CSD checkpoint (.pth from learn2phoenix/CSD) -> ASC[csd]; None -> ASC[clip]
reference = None  # folder of reference images for ASC (with train/ and test/ subfolders, or split below)
reference_test_fraction = 0.2  # held-out share of the reference folder when it has no train/ test/ split
detector = "grounding_dino"  # SDI boxes: "grounding_dino" or "geneval" (rewards.py's GenEval detector)
detector_model = "IDEA-Research/grounding-dino-tiny"  # hub id, local folder or "tiny"
box_threshold = 0.35  # Grounding DINO box score threshold (IDEA's demo default)
text_threshold = 0.25  # Grounding DINO phrase threshold (IDEA's demo default)
# who judges the GenEval metric (and detector="geneval"'s SDI boxes): "geneval" (Mask2Former + CLIP, the
# benchmark's models) or "shapes" (the shapes world's exact pixel detector; docs/shapes_world.md)
geneval_scorer = "geneval"
# options of rewards.REWARDS[geneval_scorer] (dict or JSON string); tiny: {"detector": "tiny", "clip": "tiny"}
geneval_opts = None
# rewards of rewards.py whose mean over the images is reported, by name, comma-separated: the paper's second
# table is "pickscore,aesthetic,imagereward,hpsv2,clipscore" beside IDS
reward_means = ""
reward_opts = {}  # {name: {option: value}}: their model ids or local paths, as phase2_align's reward_opts
device = "auto"
batch_size = 16
seed = 0  # reference split and equal-count subsampling in ASC
out = None  # JSON path; None = DIR/diversity.json
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, dict, type(None)))]

METRICS = ("ids", "asc", "sdi", "pvs", "vendi", "geneval")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ----------------------------------------------------------------------------- metrics on features (pure)
def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mean_pairwise_cosine(feats):
    """Mean of cos(f_i, f_j) over the n(n-1)/2 pairs i<j; nan for fewer than two vectors. IDS is this on
    face embeddings (1 = one identity, 0 = orthogonal identities). With unit vectors u_i,
        sum_{i != j} u_i . u_j = |sum_i u_i|^2 - n,   so   mean = (|sum_i u_i|^2 - n) / (n (n - 1)),
    O(n d) instead of the n x n similarity matrix: the published IDS takes every pair of the whole set."""
    f = _unit(feats)
    n = len(f)
    if n < 2:
        return float("nan")
    total = f.sum(0)
    return float((total @ total - (f * f).sum()) / (n * (n - 1)))  # (f * f).sum() = n, up to zero-norm rows


def vendi_score(feats):
    """exp(entropy of the eigenvalues of K/n), K the cosine kernel: the 'effective number' of distinct
    items, 1 when all are the same, n when all are orthogonal. trace(K/n) = 1, so the eigenvalues are a
    distribution; 0 log 0 = 0 (and eigvalsh's round-off below zero is dropped with the zeros)."""
    f = _unit(feats)
    if len(f) == 0:
        return float("nan")
    lam = np.linalg.eigvalsh(f @ f.T / len(f))
    lam = lam[lam > 1e-12]
    return float(np.exp(-(lam * np.log(lam)).sum()))


def mean_over_prompts(values):
    """Mean of the per-prompt values that are defined (a prompt with < 2 usable images gives nan and
    is left out); returns (mean, number of prompts used)."""
    v = [x for x in values if x is not None and not math.isnan(x)]
    return (float(np.mean(v)) if v else float("nan")), len(v)


# ----------------------------------------------------------------------------- SDI: layout similarity (pure)
def box_iou(a, b):
    """IoU matrix [m, n] of xyxy boxes a [m, 4] and b [n, 4]."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def layout_similarity(boxes_a, boxes_b):
    """Sum of IoU over the one-to-one box matching that maximises it (Hungarian), over max(|A|, |B|).
    Unmatched boxes count as IoU 0, so a missing or extra object lowers the similarity. Empty sets:
    both empty = 1 (the detector sees the same, empty layout), one empty = 0. Class-agnostic."""
    from scipy.optimize import linear_sum_assignment
    a, b = np.asarray(boxes_a, np.float64).reshape(-1, 4), np.asarray(boxes_b, np.float64).reshape(-1, 4)
    if len(a) == 0 and len(b) == 0:
        return 1.0
    if len(a) == 0 or len(b) == 0:
        return 0.0
    iou = box_iou(a, b)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / max(len(a), len(b)))


def spatial_dispersion(boxes_per_image):
    """SDI of one prompt: 1 - mean layout_similarity over the pairs of its images; nan for < 2 images."""
    n = len(boxes_per_image)
    if n < 2:
        return float("nan")
    sims = [layout_similarity(boxes_per_image[i], boxes_per_image[j])
            for i in range(n) for j in range(i + 1, n)]
    return 1.0 - float(np.mean(sims))


# ----------------------------------------------------------------------------- PVS (pure)
def photo_stats(img):
    """(mean HSV saturation, mean HSV value, grayscale contrast) of one image [H, W, 3] in [0, 1].
    V = max(R, G, B), S = (max - min) / max (0 where max = 0), as in the HSV hexcone model; contrast =
    population std over pixels of ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B (PIL's "L")."""
    img = np.asarray(img, np.float64)
    mx, mn = img.max(-1), img.min(-1)
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-12), 0.0)
    gray = img @ np.array([0.299, 0.587, 0.114])
    return float(sat.mean()), float(mx.mean()), float(gray.std())


def photographic_variance(stats):
    """PVS of a set from its photo_stats rows [n, 3]: std(saturation) + std(value) + std(contrast).
    Population std (ddof 0): the set is the whole population being described, and one image gives 0
    instead of nan. nan for an empty set."""
    s = np.asarray(stats, np.float64).reshape(-1, 3)
    return float(s.std(axis=0).sum()) if len(s) else float("nan")


# -------------------------------------------------------------------------- ASC: image retrieval score (pure)
def nearest_reference(train, query, chunk=1024):
    """Index of each query's nearest train feature by cosine (L2 on unit vectors: the same ranking)."""
    t, q = _unit(train), _unit(query)
    if len(q) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.argmax(q[i:i + chunk] @ t.T, axis=1) for i in range(0, len(q), chunk)])


def support_log_likelihood(s, k, n):
    """log P(k distinct items | n uniform draws with replacement from s items), dropping log S(n, k)
    (Stirling number of the second kind), which does not depend on s:
        P(k | s, n) = S(n, k) * s! / (s - k)! / s^n."""
    from scipy.special import gammaln
    s = np.asarray(s, np.float64)
    return gammaln(s + 1) - gammaln(s - k + 1) - n * np.log(s)


def ml_support_size(k, n, n_max):
    """Maximum-likelihood number s of equally likely reference items the queries retrieve from, given
    that n queries hit k distinct nearest neighbours, searched over k <= s <= n_max (the reference size):
    argmax_s support_log_likelihood. Ties (equal up to float round-off) go to the smaller s. When
    k = n >= 2 (no repeats) the likelihood rises with s all the way, so the estimate is the cap n_max:
    n samples cannot tell a support larger than the reference from the reference itself."""
    if n == 0 or k == 0:
        return 0
    if not 1 <= k <= min(n, n_max):
        raise ValueError(f"need 1 <= k <= min(n, n_max), got k={k}, n={n}, n_max={n_max}")
    s = np.arange(k, n_max + 1)
    ll = support_log_likelihood(s, k, n)
    best = ll.max()
    return int(s[np.flatnonzero(ll >= best - 1e-9 * max(1.0, abs(best)))[0]])


def image_retrieval_score(train, test, synth, seed=0):
    """IRS of the synthetic set against the reference's held-out test set, on features [N, D].
    Both query sets are cut to the same size n = min(|test|, |synth|) by a seeded random subset (the
    ML estimate depends on n), each query retrieves its nearest train image, k counts the distinct ones,
    and n_ml = ml_support_size(k, n, N_train). ASC = n_ml(synth) / n_ml(test): the share of the
    coverage that real held-out images reach which the samples also reach."""
    train, test, synth = (np.asarray(x, np.float64) for x in (train, test, synth))
    n, n_train = min(len(test), len(synth)), len(train)
    rng = np.random.default_rng(seed)
    out = {"n_train": n_train, "n": n}
    for name, q in (("test", test), ("synth", synth)):
        if len(q) > n:
            q = q[np.sort(rng.choice(len(q), n, replace=False))]
        k = int(len(np.unique(nearest_reference(train, q)))) if n else 0
        n_ml = ml_support_size(k, n, n_train)
        out[name] = {"k": k, "n_ml": n_ml, "irs_alpha": k / n_train, "irs_inf": n_ml / n_train}
    out["asc"] = out["synth"]["n_ml"] / out["test"]["n_ml"] if out["test"]["n_ml"] else float("nan")
    return out


# ----------------------------------------------------------------------------- GenEval summary (pure)
def geneval_summary(results, prompt_ids):
    """GenEval's summary of per-image results ({"tag", "correct", "score", ...}) as the official
    summary_scores.py counts them: accuracy per tag = share of correct images of that tag; overall = mean
    of the tag accuracies (the six GenEval tags; when some are absent, over those present, and the
    absent ones are listed); also the share of correct images and of prompts with >= 1 correct image."""
    by_tag, by_prompt = defaultdict(list), defaultdict(list)
    for r, p in zip(results, prompt_ids):
        by_tag[r["tag"]].append(bool(r["correct"]))
        by_prompt[p].append(bool(r["correct"]))
    tags = {t: {"accuracy": float(np.mean(v)), "correct": int(sum(v)), "images": len(v)}
            for t, v in by_tag.items()}
    present = [t for t in rewards.GENEVAL_TAGS if t in tags] or list(tags)
    return {"overall": float(np.mean([tags[t]["accuracy"] for t in present])) if present else float("nan"),
            "tags": tags, "missing_tags": [t for t in rewards.GENEVAL_TAGS if t not in tags],
            "image_accuracy": (float(np.mean([bool(r["correct"]) for r in results])) if results
                               else float("nan")),
            "prompt_accuracy": (float(np.mean([any(v) for v in by_prompt.values()])) if by_prompt
                                else float("nan")),
            "mean_score": (float(np.mean([float(r.get("score", r["correct"])) for r in results])) if results
                           else float("nan"))}


# ----------------------------------------------------------------------------- feature extractors (backbones)
# Every backbone runs in float32: metrics should not move with the device's autocast.

def clip_embedder(name, device):
    """CLIP image embeddings (projected, as CLIPModel.get_image_features) of a list of PIL images."""
    from rewards import load_clip
    model, proc = load_clip(name, device, torch.float32)

    @torch.no_grad()
    def embed(images):
        px = proc.image_processor(images, return_tensors="pt").pixel_values.to(device, torch.float32)
        # vision tower + projection spelled out: get_image_features' return type changed in transformers 5
        return model.visual_projection(model.vision_model(pixel_values=px).pooler_output).cpu().numpy()
    return embed


def csd_state_dict_to_hf(sd):
    """CSD checkpoint (an OpenAI-CLIP VisionTransformer `backbone.*` plus the style head
    `last_layer_style` [width, dim]) -> (CLIPVisionConfig kwargs, CLIPVisionModelWithProjection state
    dict). CSD's style feature = normalize(backbone(x) @ last_layer_style), where the backbone ends in
    ln_post of the CLS token: exactly HF's pooler_output, and the head is HF's visual_projection."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v.float() for k, v in sd.items()}
    b = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if "conv1.weight" not in b or "last_layer_style" not in sd:
        raise SystemExit("the --style_model checkpoint has no CSD weights "
                         "(backbone.conv1.weight, last_layer_style): "
                         "pass the checkpoint.pth released with CSD (learn2phoenix/CSD)")
    width, patch = b["conv1.weight"].shape[0], b["conv1.weight"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in b if k.startswith("transformer.resblocks."))
    cfg = dict(hidden_size=width, intermediate_size=b["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
               # OpenAI CLIP: heads = width / 64
               num_hidden_layers=layers, num_attention_heads=max(1, width // 64),
               patch_size=patch, image_size=patch * math.isqrt(b["positional_embedding"].shape[0] - 1),
               projection_dim=sd["last_layer_style"].shape[1], hidden_act="quick_gelu", layer_norm_eps=1e-5)
    v = "vision_model."
    hf = {v + "embeddings.patch_embedding.weight": b["conv1.weight"],
          v + "embeddings.class_embedding": b["class_embedding"],
          v + "embeddings.position_embedding.weight": b["positional_embedding"],
          "visual_projection.weight": sd["last_layer_style"].t().contiguous()}
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            hf[f"{v}{ours}.{p}"] = b[f"{theirs}.{p}"]
    for i in range(layers):
        o, t = f"{v}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):  # nn.MultiheadAttention packs q, k, v in this order
            for name, w in zip(("q_proj", "k_proj", "v_proj"), b[f"{t}attn.in_proj_{p}"].chunk(3)):
                hf[f"{o}self_attn.{name}.{p}"] = w
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                hf[f"{o}{ours}.{p}"] = b[f"{t}{theirs}.{p}"]
    return cfg, hf


def csd_embedder(path, device):
    """CSD style embeddings from its released checkpoint, run as a transformers CLIPVisionModelWithProjection
    (no dependency on OpenAI's `clip` package). Preprocessing as CSD's: bicubic resize, centre crop,
    OpenAI CLIP mean/std, which are CLIPImageProcessor's defaults."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise SystemExit(f"--style_model={path} is not a file: pass the CSD checkpoint (.pth), "
                         f"or leave it unset for CLIP style features")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # CSD's training script pickles its argparse args next to the weights
        print(f"note: {path} holds more than tensors; loading it with pickle since you passed it")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg, sd = csd_state_dict_to_hf(ckpt.get("model_state_dict", ckpt.get("state_dict", ckpt)))
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))
    model.load_state_dict(sd, strict=True)
    model.to(device).eval().requires_grad_(False)
    s = cfg["image_size"]
    proc = CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s})

    @torch.no_grad()
    def embed(images):
        px = proc(images, return_tensors="pt").pixel_values.to(device)
        return model(pixel_values=px).image_embeds.cpu().numpy()
    return embed


def load_face_app(path, device):
    """insightface FaceAnalysis (detector + ArcFace recogniser) from a local model-pack folder. insightface
    downloads a pack whose folder is missing, so we check the folder first and point FaceAnalysis at it
    through a temporary root (it looks for ROOT/models/NAME)."""
    import glob
    import tempfile
    path = os.path.abspath(os.path.expanduser(path))
    if not glob.glob(os.path.join(path, "*.onnx")):
        raise SystemExit(f"--face_model={path} holds no .onnx files: pass an insightface model-pack folder "
                         "(e.g. ~/.insightface/models/buffalo_l), "
                         "or leave it unset for IDS on CLIP embeddings")
    try:
        from insightface.app import FaceAnalysis
    except ImportError:
        raise SystemExit("IDS with --face_model needs insightface: pip install insightface onnxruntime "
                         "(or leave face_model unset for IDS on CLIP embeddings)")
    root = tempfile.mkdtemp(prefix="insightface_")
    os.makedirs(os.path.join(root, "models"))
    os.symlink(path, os.path.join(root, "models", os.path.basename(path)))
    cuda = torch.device(device).type == "cuda"
    app = FaceAnalysis(name=os.path.basename(path), root=root, allowed_modules=["detection", "recognition"],
                       providers=(["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda
                                  else ["CPUExecutionProvider"]))
    app.prepare(ctx_id=0 if cuda else -1, det_size=(640, 640))
    return app


def face_embeddings(app, images):
    """ArcFace embedding of the largest face in each PIL image (the subject of a portrait prompt), or
    None where the detector finds no face: those images are counted, not silently dropped."""
    out = []
    for im in images:
        # insightface takes OpenCV's BGR
        bgr = np.ascontiguousarray(np.asarray(im.convert("RGB"))[:, :, ::-1])
        faces = app.get(bgr)
        if not faces:
            out.append(None)
            continue
        face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        out.append(np.asarray(face.normed_embedding, np.float64))
    return out


def grounding_dino_detector(name, device, box_thr, text_thr):
    """detect(PIL images, text queries) -> per-image xyxy pixel boxes [m, 4]."""
    if name == "tiny":
        import tiny
        model, proc = tiny.grounding_dino()
    else:
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor
        # local folder / cache first; fails fast when the hub is unreachable
        from rewards import _from_pretrained
        hint = " (or --detector=geneval, or --detector_model=tiny to check the plumbing)"
        model = _from_pretrained(GroundingDinoForObjectDetection, name, "Grounding DINO detector", hint)
        proc = _from_pretrained(GroundingDinoProcessor, name, "Grounding DINO processor", hint,
                                backend=rewards.IMAGE_BACKEND)
    model.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def detect(images, queries):
        inputs = proc(images=images, text=queries, padding=True, return_tensors="pt").to(device)
        res = proc.post_process_grounded_object_detection(model(**inputs), inputs.input_ids,
                                                          threshold=box_thr, text_threshold=text_thr,
                                                          target_sizes=[im.size[::-1] for im in images])
        return [r["boxes"].float().cpu().numpy() for r in res]
    return detect


def geneval_classes(row):
    """The object classes a GenEval prompt asks for (its metadata's `include`), in order, or []."""
    inc = (row.get("metadata") or {}).get("include") or []
    return list(dict.fromkeys(o["class"] for o in inc if isinstance(o, dict) and o.get("class")))


def object_names(row):
    """What Grounding DINO looks for in an image: the GenEval classes when present, else the prompt."""
    return geneval_classes(row) or [row["prompt"]]


def grounding_query(names):
    """Grounding DINO's text format: lower-case phrases, each closed by a period."""
    return " ".join(n.strip().lower().rstrip(".") + "." for n in names)


def to_tensor(images):
    """PIL images (one size) -> float [B, 3, H, W] in [0, 1], the rewards' image format."""
    return torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1)
                        for im in images])


def load_rgb(path):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for a damaged or cut file
        raise SystemExit(f"{path} cannot be read as an image ({type(err).__name__}: {err}): it is damaged "
                         "or not an image")


# ----------------------------------------------------------------------------- reading a sample folder
def read_index(folder):
    """The rows of DIR/index.jsonl (see sample.py), every line named when it is broken, and every listed image
    checked to exist and to be what one sample.py run writes: one size, RGB (the metrics compare images as
    such; a greyscale or resized image would move PVS, and the detectors' batches need one size). Image
    headers only: nothing is decoded here."""
    from PIL import Image

    from sample import read_jsonl
    path = os.path.join(folder, "index.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found: --samples must be a folder written by sample.py")
    rows = []
    for n, r in read_jsonl(path, "rerun sample.py into a fresh folder, or fix that line"):
        if not isinstance(r, dict) or not all(k in r for k in ("file", "prompt_index", "k")):
            raise SystemExit(f"{path} line {n} is not a sample.py record (file, prompt_index, k)")
        rows.append(r)
    if not rows:
        raise SystemExit(f"{path} lists no images")
    first = None
    for r in rows:
        f = os.path.join(folder, r["file"])
        if not os.path.isfile(f):
            raise SystemExit(f"{path} lists {r['file']} but the file is missing: "
                             f"rerun sample.py into a fresh folder")
        try:
            with Image.open(f) as im:
                kind = (im.size, im.mode)
        except (OSError, SyntaxError, ValueError) as err:
            raise SystemExit(f"{f} cannot be read as an image ({type(err).__name__}): it is damaged")
        first = first or (r["file"], kind)
        if kind[1] != "RGB" or kind != first[1]:
            raise SystemExit(f"{f} is {kind[0][0]}x{kind[0][1]} {kind[1]}" + (
                f", {first[0]} is {first[1][0][0]}x{first[1][0][1]}" if kind[1] == "RGB" else "")
                + ": the metrics compare the RGB images of one size that one sample.py run writes")
    return rows


def check_report_path(path):
    """Where the report goes: a file, in a writable folder, and not something else this would replace (an
    earlier report of this script is replaced)."""
    from sample import check_writable
    check_writable(path, "out", kind="file")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            ours = isinstance(old, dict) and {"metrics", "groups"} <= set(old)
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise SystemExit(f"out={path} exists and is not a report of eval_diversity.py, which it would "
                             "replace: pass another --out")


def list_images(folder):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs
                  if f.lower().endswith(IMAGE_EXTS))


def reference_split(folder, test_fraction, seed):
    """(train files, test files) of the ASC reference folder: its train/ and test/ subfolders when both
    exist, else a seeded random split with `test_fraction` held out."""
    folder = os.path.expanduser(folder)
    tr, te = os.path.join(folder, "train"), os.path.join(folder, "test")
    if os.path.isdir(tr) and os.path.isdir(te):
        train, test = list_images(tr), list_images(te)
    else:
        files = list_images(folder)
        n_test = int(round(len(files) * test_fraction))
        perm = np.random.default_rng(seed).permutation(len(files))
        test, train = [files[i] for i in sorted(perm[:n_test])], [files[i] for i in sorted(perm[n_test:])]
    if not train or not test:
        raise SystemExit(f"--reference={folder} needs images for both a train and a held-out test split "
                         f"(found {len(train)} and {len(test)}): "
                         f"add images or set reference_test_fraction in (0, 1)")
    return train, test


def embed_files(embed, files, bs, desc):
    from tqdm import tqdm

    from sample import bars
    out = [embed([load_rgb(f) for f in files[i:i + bs]])
           for i in tqdm(range(0, len(files), bs), desc=desc, disable=not bars())]
    return np.concatenate(out)


# ----------------------------------------------------------------------------- CLI
def parse_metrics(spec):
    names = list(METRICS) if spec.strip() == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad:
        raise SystemExit(f"unknown metric(s) {', '.join(bad)}: choose from {', '.join(METRICS)} (or 'all')")
    return names


def group_metrics(idx, rows, feats, ref, face_checked, seed):
    """Every requested metric over the images `idx` (row numbers). IDS and PVS over the whole set, as
    published (and per prompt, averaged over prompts, as ids_per_prompt / pvs_per_prompt); SDI, Vendi
    and cos per prompt, averaged over prompts; ASC and GenEval over the set."""
    by_prompt = defaultdict(list)
    for i in idx:
        by_prompt[rows[i]["prompt_index"]].append(i)
    prompts = list(by_prompt.values())
    res = {"images": len(idx), "prompts": len(prompts)}
    if "ids" in feats:
        emb = feats["ids"]
        no_face = [rows[i]["file"] for i in idx if emb[i] is None]
        faces = [emb[i] for i in idx if emb[i] is not None]
        res["ids"], res["ids_faces"] = mean_pairwise_cosine(faces), len(faces)  # every pair of the set
        res["ids_per_prompt"], res["ids_prompts"] = mean_over_prompts(
            [mean_pairwise_cosine([emb[i] for i in ii if emb[i] is not None]) for ii in prompts])
        # None: CLIP embeds whole images, no face check
        res["ids_no_face"] = len(no_face) if face_checked else None
        res["ids_no_face_files"] = no_face
    if "vendi" in feats:
        f = feats["vendi"]
        res["vendi"], res["vendi_prompts"] = mean_over_prompts(
            [vendi_score(f[ii]) if len(ii) > 1 else float("nan") for ii in prompts])
        res["cos"], _ = mean_over_prompts([mean_pairwise_cosine(f[ii]) for ii in prompts])
    if "sdi" in feats:
        boxes = feats["sdi"]
        res["sdi"], res["sdi_prompts"] = mean_over_prompts(
            [spatial_dispersion([boxes[i] for i in ii]) for ii in prompts])
        # kept: an empty layout is a layout (see layout_similarity)
        res["sdi_no_boxes"] = int(sum(len(boxes[i]) == 0 for i in idx))
        res["sdi_mean_boxes"] = float(np.mean([len(boxes[i]) for i in idx]))
    if "pvs" in feats:
        st = feats["pvs"]
        res["pvs"] = photographic_variance(st[idx])  # over the whole set, as published
        res["pvs_per_prompt"], res["pvs_prompts"] = mean_over_prompts(
            [photographic_variance(st[ii]) if len(ii) > 1 else float("nan") for ii in prompts])
    if "asc" in feats:
        irs = image_retrieval_score(ref["train"], ref["test"], feats["asc"][idx], seed=seed)
        res["asc"], res["asc_detail"] = irs["asc"], irs
    if "geneval" in feats:
        ge = [(feats["geneval"][i], rows[i]["prompt_index"]) for i in idx if feats["geneval"][i] is not None]
        res["geneval"] = geneval_summary([g for g, _ in ge], [p for _, p in ge]) if ge else None
    for key in (k for k in feats if k.startswith("reward_")):  # the reward means
        res[key] = float(np.mean([feats[key][i] for i in idx]))
    return res


def format_table(groups, labels):
    """Groups as rows, metrics as columns; '-' where a value is undefined."""
    cols = [("images", "images", "{:d}"), ("prompts", "prompts", "{:d}")]
    cols += [(k, labels[k], "{:.4f}") for k in ("ids", "ids_per_prompt", "asc", "sdi", "pvs",
                                                "pvs_per_prompt", "vendi", "cos", "geneval") if k in labels]
    cols += [(k, v, "{:.4f}") for k, v in labels.items() if k.startswith("reward_")]
    head = ["group"] + [c[1] for c in cols]
    lines = []
    for name, g in groups.items():
        cells = [name]
        for key, _, fmt in cols:
            v = g.get(key)
            v = v["overall"] if isinstance(v, dict) else v
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
        lines.append(cells)
    w = [max(len(r[i]) for r in [head] + lines) for i in range(len(head))]
    fmt_row = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))
    return "\n".join([fmt_row(head), "  ".join("-" * x for x in w)] + [fmt_row(r) for r in lines])


def _json_safe(x):
    """NaN -> null (strict JSON has no NaN), numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def main(argv=None):
    from configurator import config_summary, configure
    from sample import bars, pick_device, quiet, write_json_atomic
    from tqdm import tqdm
    cfg = configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # every rank would score the whole folder on one GPU
        raise SystemExit("eval_diversity.py runs in one process: start it with python, not torchrun"
                         if int(os.environ.get("RANK", 0)) == 0 else 1)
    # full fp32 matmuls and convolutions on a GPU (PyTorch's default lets cuDNN's convolutions use TF32), so
    # the metrics are the CPU's to float32 rounding
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    quiet()
    print(config_summary(cfg))
    wanted = parse_metrics(metrics)
    for name, ok, must in (("batch_size", batch_size >= 1, "at least 1"),
                           ("box_threshold", 0 <= box_threshold <= 1, "in [0, 1]"),
                           ("text_threshold", 0 <= text_threshold <= 1, "in [0, 1]"),
                           ("reference_test_fraction", 0 < reference_test_fraction < 1, "in (0, 1)")):
        if not ok:
            raise SystemExit(f"{name}={globals()[name]!r} must be {must}")
    rows = read_index(samples)
    dev, _ = pick_device(device)
    out_path = out or os.path.join(samples, "diversity.json")
    check_report_path(out_path)

    # what runs, and each backbone loaded once: every failure stops here, before the long loops
    skipped = {}
    if "asc" in wanted and not reference:
        skipped["asc"] = "no reference folder given (--reference=DIR)"
    if "geneval" in wanted and not any((r.get("metadata") or {}).get("tag") for r in rows):
        skipped["geneval"] = ("the index's metadata carries no GenEval tags "
                              "(sample a GenEval .jsonl prompt file)")
    run = [m for m in wanted if m not in skipped]
    if "sdi" in run and detector not in ("grounding_dino", "geneval"):
        raise SystemExit(f"unknown --detector={detector}: use 'grounding_dino' or 'geneval'")
    if geneval_scorer not in ("geneval", "shapes"):
        raise SystemExit(f"unknown --geneval_scorer={geneval_scorer}: use 'geneval' (the benchmark's "
                         "detector) or 'shapes' (the shapes world's)")
    ref_files = reference_split(reference, reference_test_fraction, seed) if "asc" in run else None
    use_clip = "vendi" in run or ("ids" in run and not face_model) or ("asc" in run and not style_model)
    clip = clip_embedder(clip_model, dev) if use_clip else None
    app = load_face_app(face_model, dev) if "ids" in run and face_model else None
    style = (csd_embedder(style_model, dev) if style_model else clip) if "asc" in run else None
    gd = (grounding_dino_detector(detector_model, dev, box_threshold, text_threshold)
          if "sdi" in run and detector == "grounding_dino" else None)
    # the rewards whose means are reported, each built once (in fp32, as training builds them)
    scored = {n: rewards.REWARDS[n](dev, torch.float32, **dict(reward_opts.get(n, {})))
              for n in rewards.parse_spec(reward_means)} if reward_means else {}
    scorer, opts = None, {}
    if "geneval" in run or ("sdi" in run and detector == "geneval"):
        if geneval_scorer not in getattr(rewards, "REWARDS", {}):
            raise SystemExit(f"this rewards.py has no '{geneval_scorer}' reward: update rewards.py, "
                             "or drop geneval from --metrics (and use --detector=grounding_dino)")
        try:
            opts = json.loads(geneval_opts) if isinstance(geneval_opts, str) else dict(geneval_opts or {})
        except (ValueError, TypeError):
            raise SystemExit(f"--geneval_opts={geneval_opts!r} is not a JSON object: write e.g. "
                             """--geneval_opts='{"detector": "tiny", "clip": "tiny"}'""")
        scorer = rewards.REWARDS[geneval_scorer](dev, torch.float32, **opts)
    backbones = {"ids": f"arcface:{face_model}" if face_model else f"clip:{clip_model}",
                 "asc": f"csd:{style_model}" if style_model else f"clip:{clip_model}",
                 "sdi": (f"grounding_dino:{detector_model}" if detector == "grounding_dino"
                         else f"{geneval_scorer}_detector"),
                 "pvs": "none (HSV and luma statistics of the pixels)", "vendi": f"clip:{clip_model}",
                 "geneval": (f"rewards.REWARDS['{geneval_scorer}']"
                             + (f" {json.dumps(opts, sort_keys=True)}" if opts else ""))}
    backbones = {m: b for m, b in backbones.items() if m in run}

    def geneval_batch(ims, rs):
        keep = [j for j, r in enumerate(rs) if (r.get("metadata") or {}).get("tag")]
        got = (scorer.evaluate(to_tensor([ims[j] for j in keep]), [rs[j]["metadata"] for j in keep])
               if keep else [])
        out_ = [None] * len(rs)  # images without a GenEval tag get no result
        for j, res in zip(keep, got):
            out_[j] = res
        return out_

    def geneval_boxes(ims, rs):
        # .detect takes one class list per call: call it once per distinct list in the batch; images
        # without GenEval classes keep every COCO class (None)
        out_ = [None] * len(rs)
        by_names = defaultdict(list)
        for j, r in enumerate(rs):
            by_names[tuple(geneval_classes(r))].append(j)
        for names, js in by_names.items():
            for j, ds in zip(js, scorer.detect(to_tensor([ims[j] for j in js]), list(names) or None)):
                out_[j] = np.array([d["box"] for d in ds], np.float64).reshape(-1, 4)
        return out_

    # one pass over the samples; the CLIP embedding of a batch serves IDS[clip], Vendi/cos and ASC[clip]
    feats = defaultdict(list)
    for i in tqdm(range(0, len(rows), batch_size), desc="samples", disable=not bars()):
        rs = rows[i:i + batch_size]
        ims = [load_rgb(os.path.join(samples, r["file"])) for r in rs]
        c = clip(ims) if clip is not None else None
        if "ids" in run:
            feats["ids"] += face_embeddings(app, ims) if app is not None else list(c)
        if "vendi" in run:
            feats["vendi"] += list(c)
        if "asc" in run:
            feats["asc"] += list(c if style is clip else style(ims))
        if "sdi" in run:
            feats["sdi"] += (gd(ims, [grounding_query(object_names(r)) for r in rs]) if gd is not None
                             else geneval_boxes(ims, rs))
        if "pvs" in run:
            feats["pvs"] += [photo_stats(np.asarray(im, np.float64) / 255.0) for im in ims]
        if "geneval" in run:
            feats["geneval"] += geneval_batch(ims, rs)
        for n, fn in scored.items():
            feats[f"reward_{n}"] += fn(to_tensor(ims), [r["prompt"] for r in rs],
                                       [r.get("metadata") or {} for r in rs]).float().tolist()
    for m in ("vendi", "asc", "pvs"):
        if m in feats:
            feats[m] = np.asarray(feats[m], np.float64)
    ref = None
    if ref_files is not None:
        ref = {"train": embed_files(style, ref_files[0], batch_size, "reference train"),
               "test": embed_files(style, ref_files[1], batch_size, "reference test")}

    # groups: every image, the original condition (k=0) and the perturbed ones (k>0)
    groups = {"all": list(range(len(rows)))}
    if any(r["k"] > 0 for r in rows):
        groups["k=0"] = [i for i, r in enumerate(rows) if r["k"] == 0]
        groups["k>0"] = [i for i, r in enumerate(rows) if r["k"] > 0]
    results = {name: group_metrics(idx, rows, feats, ref, bool(face_model), seed)
               for name, idx in groups.items() if idx}

    # the column names carry the backbone: IDS[clip] and IDS[arcface] are different numbers
    tag = {"ids": "arcface" if face_model else "clip", "asc": "csd" if style_model else "clip",
           "sdi": "gdino" if detector == "grounding_dino" else "geneval"}
    labels = {m: f"{m.upper()}[{tag[m]}]" for m in ("ids", "asc", "sdi") if m in run}
    labels.update({"ids_per_prompt": f"IDS_per_prompt[{tag['ids']}]"} if "ids" in run else {})
    labels.update({"pvs": "PVS", "pvs_per_prompt": "PVS_per_prompt"} if "pvs" in run else {})
    labels.update({"vendi": "Vendi[clip]", "cos": "cos[clip]"} if "vendi" in run else {})
    labels.update({"geneval": "GenEval"} if "geneval" in run else {})
    labels.update({f"reward_{n}": n for n in scored})
    print(format_table(results, labels))
    for name, g in results.items():
        if g.get("ids_no_face"):
            print(f"{name}: {g['ids_no_face']} of {g['images']} images had no face "
                  f"and are left out of {labels['ids']}")
        if g.get("geneval"):
            tags = "  ".join(f"{t} {v['accuracy']:.3f} ({v['correct']}/{v['images']})"
                             for t, v in g["geneval"]["tags"].items())
            missing = g["geneval"]["missing_tags"]
            print(f"{name}: GenEval {g['geneval']['overall']:.4f} = mean of: {tags}"
                  + (f"  (no {', '.join(missing)})" if missing else ""))
    for m, why in skipped.items():
        print(f"skipped {m}: {why}")
    report = {"samples": samples, "metrics": run, "rewards": list(scored), "skipped": skipped,
              "backbones": backbones,
              "labels": labels, "images": len(rows), "prompts": len({r["prompt_index"] for r in rows}),
              "groups": results, "config": cfg}
    report = _json_safe(report)
    write_json_atomic(out_path, report)
    print(f"wrote {out_path}")
    return report


if __name__ == "__main__":
    main()
