"""
Tests of eval_diversity.py: every metric pinned to values worked by hand on synthetic inputs, the IRS
maximum-likelihood estimate against brute-force enumeration, the CSD checkpoint conversion against an
OpenAI-layout ViT written here, and the CLI end to end on a folder written by `sample.py --model=tiny`
with tiny random backbones. Self-contained (own imports and fixtures). Run: python -m pytest -q test_eval.py
"""
import argparse
import itertools
import json
import math
import os
import re
from collections import OrderedDict
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

import eval_diversity as ed


# ----------------------------------------------------------------------------- helpers
def save_png(path, rgb, size=32):
    """A constant-colour image, or an [H, W, 3] uint8 array."""
    arr = np.asarray(rgb, np.uint8)
    arr = np.broadcast_to(arr, (size, size, 3)) if arr.ndim == 1 else arr
    Image.fromarray(np.ascontiguousarray(arr)).save(path)


def write_index(folder, rows):
    with open(os.path.join(folder, "index.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# ----------------------------------------------------------------------------- cosine, IDS, Vendi
def test_identical_features_give_ids_1_and_vendi_1():
    # same direction, any length
    f = np.tile([[0.3, -1.2, 2.0, 0.5]], (5, 1)) * np.array([[1], [2], [0.5], [3], [7]])
    assert ed.mean_pairwise_cosine(f) == pytest.approx(1.0, abs=1e-12)
    assert ed.vendi_score(f) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("n", [2, 3, 6])
def test_orthogonal_features_give_ids_0_and_vendi_n(n):
    f = np.eye(8)[:n] * np.arange(1, n + 1)[:, None]
    assert ed.mean_pairwise_cosine(f) == pytest.approx(0.0, abs=1e-12)
    assert ed.vendi_score(f) == pytest.approx(n, rel=1e-9)


def test_cosine_and_vendi_hand_cases():
    # two unit vectors at 60 degrees: cos 0.5; K/2 has eigenvalues 0.75 and 0.25
    f = np.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert ed.mean_pairwise_cosine(f) == pytest.approx(0.5)
    # 1.7548
    assert ed.vendi_score(f) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    # three vectors: e0, e0, e1 -> pair cosines 1, 0, 0 -> mean 1/3
    assert ed.mean_pairwise_cosine([[1, 0], [2, 0], [0, 1]]) == pytest.approx(1 / 3)
    assert math.isnan(ed.mean_pairwise_cosine([[1.0, 2.0]]))  # one image: no pair
    assert ed.mean_over_prompts([0.2, float("nan"), 0.4, None]) == (pytest.approx(0.3), 2)


def test_mean_pairwise_cosine_sum_formula_is_the_pair_loop():
    """The O(n d) form (|sum u|^2 - sum |u|^2) / (n (n - 1)) against the plain loop over i < j, with a
    zero vector among them (its cosines are 0 and its pairs still count)."""
    f = np.random.default_rng(0).normal(size=(7, 5))
    f[3] = 0.0
    u = [x / n if (n := np.linalg.norm(x)) > 0 else x for x in f]
    pairs = [float(u[i] @ u[j]) for i in range(7) for j in range(i + 1, 7)]
    assert ed.mean_pairwise_cosine(f) == pytest.approx(np.mean(pairs), abs=1e-12)


# ----------------------------------------------------------------------------- SDI
def test_layout_similarity_hand_cases():
    A = [[0, 0, 10, 10]]
    assert ed.layout_similarity(A, A) == pytest.approx(1.0)
    # IoU([0,0,10,10], [5,0,15,10]) = 50 / 150 = 1/3; the second box of A is unmatched: (1/3) / max(2, 1)
    two = [[0, 0, 10, 10], [20, 20, 30, 30]]
    assert ed.layout_similarity(two, [[5, 0, 15, 10]]) == pytest.approx(1 / 6)
    assert ed.layout_similarity([[5, 0, 15, 10]], two) == pytest.approx(1 / 6)  # symmetric
    # empty sets: both empty = same (empty) layout, one empty = nothing in common
    assert ed.layout_similarity([], []) == 1.0
    assert ed.layout_similarity(A, []) == 0.0 and ed.layout_similarity(np.zeros((0, 4)), A) == 0.0


def test_layout_similarity_is_the_optimal_matching_not_greedy():
    # full-height strips, so IoU is the 1-D interval IoU: a1=[0,10], a2=[0,3], b1=[0,6], b2=[5,10]
    # IoU(a1,b1)=0.6, IoU(a1,b2)=0.5, IoU(a2,b1)=0.5, IoU(a2,b2)=0. Greedy takes a1-b1 (0.6) and is left
    # with a2-b2 (0): 0.6/2 = 0.3. The optimal matching a1-b2 + a2-b1 gives 1.0/2 = 0.5.
    a = [[0, 0, 10, 1], [0, 0, 3, 1]]
    b = [[0, 0, 6, 1], [5, 0, 10, 1]]
    np.testing.assert_allclose(ed.box_iou(a, b), [[0.6, 0.5], [0.5, 0.0]])
    assert ed.layout_similarity(a, b) == pytest.approx(0.5)


def test_spatial_dispersion_hand_case():
    A, B = [[0, 0, 10, 10], [20, 20, 30, 30]], [[5, 0, 15, 10]]
    # pairs: (A,B) = 1/6, (A,empty) = 0, (B,empty) = 0 -> mean 1/18 -> SDI 17/18
    assert ed.spatial_dispersion([A, B, []]) == pytest.approx(17 / 18)
    assert ed.spatial_dispersion([A, A]) == pytest.approx(0.0)
    assert ed.spatial_dispersion([[], []]) == pytest.approx(0.0)
    assert math.isnan(ed.spatial_dispersion([A]))


# ----------------------------------------------------------------------------- PVS
def test_photo_stats_hand_values_and_pil_hsv():
    px = lambda rgb: np.broadcast_to(np.array(rgb, np.float64), (4, 4, 3))
    assert ed.photo_stats(px([1, 0, 0])) == pytest.approx((1.0, 1.0, 0.0))
    assert ed.photo_stats(px([0, 0, 0])) == pytest.approx((0.0, 0.0, 0.0))  # S defined as 0 at V = 0
    assert ed.photo_stats(px([0.8, 0.4, 0.4])) == pytest.approx((0.5, 0.8, 0.0))
    half = np.zeros((4, 4, 3))
    half[:2] = 1.0  # half white, half black: grey std 0.5
    assert ed.photo_stats(half) == pytest.approx((0.0, 0.5, 0.5))
    # against PIL's own HSV and L conversions (8-bit, so within rounding)
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pil = Image.fromarray(img)
    hsv = np.asarray(pil.convert("HSV"), np.float64) / 255
    s, v, c = ed.photo_stats(img / 255.0)
    assert s == pytest.approx(hsv[..., 1].mean(), abs=2 / 255)
    assert v == pytest.approx(hsv[..., 2].mean(), abs=1e-9)
    assert c == pytest.approx((np.asarray(pil.convert("L"), np.float64) / 255).std(), abs=2 / 255)


def test_photographic_variance_constant_and_hand_case():
    same = [ed.photo_stats(np.full((4, 4, 3), 0.3))] * 5
    assert ed.photographic_variance(same) == pytest.approx(0.0, abs=1e-12)
    red = ed.photo_stats(np.broadcast_to([1.0, 0, 0], (4, 4, 3)))  # (1, 1, 0)
    half = np.zeros((4, 4, 3))
    half[:2] = 1.0  # (0, 0.5, 0.5)
    # population stds: S [1, 0] -> 0.5; V [1, 0.5] -> 0.25; contrast [0, 0.5] -> 0.25
    assert ed.photographic_variance([red, ed.photo_stats(half)]) == pytest.approx(1.0)
    assert ed.photographic_variance([red]) == 0.0  # population std: one image is defined, and 0
    assert math.isnan(ed.photographic_variance([]))


# ----------------------------------------------------------------------------- ASC / IRS
def test_ml_support_size_matches_brute_force_likelihood():
    """P(k distinct | s items, n draws) by enumerating all s^n draw sequences, exactly (fractions);
    the ML s over k..s_max must be ours, the smallest maximiser."""
    s_max = 7
    for n in range(1, 6):
        counts = {}
        for s in range(1, s_max + 1):
            c = [0] * (n + 1)
            for seq in itertools.product(range(s), repeat=n):
                c[len(set(seq))] += 1
            counts[s] = [Fraction(x, s ** n) for x in c]
        for k in range(1, n + 1):
            lik = {s: counts[s][k] for s in range(k, s_max + 1)}
            best = max(lik.values())
            assert ed.ml_support_size(k, n, s_max) == min(s for s, p in lik.items() if p == best), (n, k)
    # no repeat at all: the likelihood rises with s up to the cap
    assert ed.ml_support_size(5, 5, 1000) == 1000
    # one item hit n times: s = 1
    assert ed.ml_support_size(1, 9, 50) == 1
    assert ed.ml_support_size(0, 0, 10) == 0
    with pytest.raises(ValueError):
        ed.ml_support_size(4, 3, 10)


def test_support_log_likelihood_is_the_occupancy_formula():
    # P(k | s, n) = S(n, k) s!/(s-k)! / s^n; S(4, 2) = 7: P(2 | 3, 4) = 7 * 6 / 81
    ll = ed.support_log_likelihood(3, 2, 4)
    assert math.exp(ll) * 7 == pytest.approx(7 * 6 / 81)


def test_image_retrieval_score_hand_case():
    train = np.eye(4)  # four reference images with orthogonal style
    test = np.array([[1.0, 0.1, 0, 0], [0.1, 1.0, 0, 0]])  # held-out: 2 queries hit 2 items -> ML = cap = 4
    synth = np.array([[1.0, 0, 0.1, 0], [1.0, 0.2, 0, 0], [0.9, 0, 0, 0.1]])  # all nearest to item 0
    irs = ed.image_retrieval_score(train, test, synth, seed=0)
    assert irs["n"] == 2 and irs["n_train"] == 4  # synth cut to |test| = 2: equal sample counts
    assert irs["test"] == {"k": 2, "n_ml": 4, "irs_alpha": 0.5, "irs_inf": 1.0}
    assert irs["synth"] == {"k": 1, "n_ml": 1, "irs_alpha": 0.25, "irs_inf": 0.25}
    assert irs["asc"] == pytest.approx(0.25)
    np.testing.assert_array_equal(ed.nearest_reference(train, synth), [0, 0, 0])
    # four synthetic queries on four distinct items, cut to 2 like the test set: any 2 of them are distinct
    irs = ed.image_retrieval_score(train, test, np.eye(4) + 0.05, seed=3)
    assert irs["synth"]["k"] == 2 and irs["synth"]["n_ml"] == 4 and irs["asc"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- GenEval summary
def test_geneval_summary_hand_case():
    res = [{"tag": t, "correct": c, "score": float(c)} for t, c in
           [("single_object", 1), ("single_object", 1), ("two_object", 1), ("two_object", 0),
            ("counting", 0), ("counting", 0), ("colors", 1), ("colors", 1),
            ("position", 0), ("position", 1), ("color_attr", 0), ("color_attr", 0)]]
    prompts = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    s = ed.geneval_summary(res, prompts)
    acc = {"single_object": 1.0, "two_object": 0.5, "counting": 0.0, "colors": 1.0, "position": 0.5,
           "color_attr": 0.0}
    assert {t: v["accuracy"] for t, v in s["tags"].items()} == acc
    assert s["overall"] == pytest.approx(3.0 / 6)
    assert s["image_accuracy"] == pytest.approx(6 / 12) and s["prompt_accuracy"] == pytest.approx(4 / 6)
    assert s["missing_tags"] == []
    part = ed.geneval_summary(res[:4], prompts[:4])  # two tags only: their mean, the rest listed
    assert (part["overall"] == pytest.approx(0.75)
            and set(part["missing_tags"]) == {"counting", "colors", "position", "color_attr"})


# --------------------------------------------------------------------------- ArcFace path (stand-in face app)
class FakeFace:
    def __init__(self, bbox, emb):
        self.bbox, self.normed_embedding = np.array(bbox, np.float32), np.array(emb, np.float32)


class FakeFaceApp:
    """insightface-like: faces in images whose red channel is high (read in BGR order, index 2); two
    faces there, the larger one carrying the identity. Dark-red images hold another identity."""
    def get(self, bgr):
        assert bgr.dtype == np.uint8 and bgr.shape[-1] == 3
        r, g, b = bgr[..., 2].mean(), bgr[..., 1].mean(), bgr[..., 0].mean()
        if r < 100 or g > 100:
            return []
        ident = [1.0, 0, 0] if r > 200 else [0, 1.0, 0]
        return [FakeFace([0, 0, 2, 2], [0, 0, 1.0]), FakeFace([0, 0, 20, 20], ident)]


def test_face_embeddings_take_the_largest_face_and_mark_no_face():
    ims = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 0, 0), (128, 0, 0), (0, 0, 255)]]
    emb = ed.face_embeddings(FakeFaceApp(), ims)
    np.testing.assert_allclose(emb[0], [1, 0, 0])
    assert emb[1] is None and emb[3] is None  # blue would be a face if channels were not swapped to BGR
    np.testing.assert_allclose(emb[2], [0, 1, 0])


def test_missing_face_and_style_backbones_stop_with_one_sentence(tmp_path):
    with pytest.raises(SystemExit, match="holds no .onnx files"):
        ed.load_face_app(str(tmp_path / "nowhere"), "cpu")
    try:
        import insightface  # noqa: F401
    except ImportError:
        pack = tmp_path / "buffalo_l"
        pack.mkdir()
        (pack / "w600k_r50.onnx").write_bytes(b"x")
        with pytest.raises(SystemExit, match="pip install insightface onnxruntime"):
            ed.load_face_app(str(pack), "cpu")
    with pytest.raises(SystemExit, match="is not a file"):
        ed.csd_embedder(str(tmp_path / "missing.pth"), "cpu")
    torch.save({"model_state_dict": {"w": torch.zeros(2)}}, tmp_path / "notcsd.pth")
    with pytest.raises(SystemExit, match="no CSD weights"):
        ed.csd_embedder(str(tmp_path / "notcsd.pth"), "cpu")
    with pytest.raises(SystemExit, match="could not load the Grounding DINO detector from the local folder"):
        ed.grounding_dino_detector(str(tmp_path / "no_such_gdino"), "cpu", 0.35, 0.25)


# ----------------------------------------------------------------------------- CSD checkpoint conversion
class QuickGELU(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(torch.nn.Module):
    """OpenAI CLIP's residual attention block, with its parameter names."""
    def __init__(self, w, heads):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(w, heads, batch_first=True)
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(w), torch.nn.LayerNorm(w)
        self.mlp = torch.nn.Sequential(OrderedDict(c_fc=torch.nn.Linear(w, 4 * w), gelu=QuickGELU(),
                                                   c_proj=torch.nn.Linear(4 * w, w)))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class RefViT(torch.nn.Module):
    """OpenAI CLIP's VisionTransformer without `proj` (as CSD's backbone), written independently of
    transformers."""
    def __init__(self, width=128, layers=2, patch=8, res=32):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = torch.nn.Parameter(torch.randn(width))
        self.positional_embedding = torch.nn.Parameter(torch.randn((res // patch) ** 2 + 1, width))
        self.ln_pre, self.ln_post = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList([RefBlock(width, width // 64)
                                                          for _ in range(layers)])

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], 1) + self.positional_embedding
        x = self.ln_pre(x)
        for blk in self.transformer.resblocks:
            x = blk(x)
        return self.ln_post(x[:, 0])


def make_csd_checkpoint(path, seed=0):
    """A tiny CSD-format checkpoint: module.backbone.* (OpenAI layout), module.last_layer_style, args."""
    torch.manual_seed(seed)
    ref = RefViT()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # every weight random and distinct, so a swapped key shows
            p.normal_(0, 0.1)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
                p.add_(1.0)
    style = torch.randn(128, 24) * 0.1
    sd = {f"module.backbone.{k}": v for k, v in ref.state_dict().items()}
    sd["module.last_layer_style"] = style
    sd["module.last_layer_content"] = torch.randn(128, 24)
    torch.save({"model_state_dict": sd, "epoch": 3, "args": argparse.Namespace(arch="vit_large")}, path)
    return ref.eval(), style


def test_csd_conversion_matches_the_openai_layout_forward(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    ref, style = make_csd_checkpoint(tmp_path / "csd.pth")
    sd = torch.load(tmp_path / "csd.pth", weights_only=False)["model_state_dict"]
    cfg, hf_sd = ed.csd_state_dict_to_hf(sd)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["patch_size"],
            cfg["image_size"], cfg["projection_dim"]) == (128, 2, 2, 8, 32, 24)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)).eval()
    model.load_state_dict(hf_sd, strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref(x) @ style, dim=1)
        got = torch.nn.functional.normalize(model(pixel_values=x).image_embeds, dim=1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # the full loader (pickled args in the file -> falls back to a full unpickle) gives unit-comparable
    # features
    embed = ed.csd_embedder(str(tmp_path / "csd.pth"), "cpu")
    f = embed([Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (40, 40), (10, 10, 240))])
    assert f.shape == (2, 24) and np.isfinite(f).all()


# -------------------------------------------------------------------- CLI on a synthetic folder (hand values)
R, D, K, W = (255, 0, 0), (128, 0, 0), (0, 0, 0), (255, 255, 255)
BOXES = {R: [[0, 0, 10, 10]], D: [[5, 0, 15, 10]], K: [], W: [[0, 0, 10, 10], [20, 20, 30, 30]]}


class FakeGenEval:
    """Stand-in for rewards.REWARDS['geneval'] with its interface: correct iff the image is R or D;
    detect returns fixed boxes per colour."""
    made = []

    def __init__(self, device, dtype, **opts):
        FakeGenEval.made.append(opts)

    @staticmethod
    def colour(img):
        return tuple(int(round(float(c) * 255)) for c in img.mean(dim=(1, 2)))

    def evaluate(self, images, metadata):
        assert images.dtype == torch.float32 and images.dim() == 4 and float(images.max()) <= 1.0
        return [{"tag": m["tag"], "correct": self.colour(im) in (R, D), "score": 0.5, "reason": ""}
                for im, m in zip(images, metadata)]

    calls = []

    def detect(self, images, class_names=None):
        FakeGenEval.calls.append(class_names)  # rewards.py's detect: one flat class list for the call
        return [[{"class": class_names[0], "box": b, "score": 0.9} for b in BOXES[self.colour(im)]]
                for im in images]


@pytest.fixture
def synthetic_folder(tmp_path):
    """2 prompts x (k=0, k=1) x 2 noises of constant colours, with GenEval metadata."""
    d = tmp_path / "synth"
    d.mkdir()
    colours = {(0, 0): [R, K], (0, 1): [D, R], (1, 0): [W, K], (1, 1): [D, W]}
    meta = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
            {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"}]
    rows = []
    for (p, k), cs in colours.items():
        for g, c in enumerate(cs):
            f = f"{p:05d}_k{k:02d}_g{g:02d}.png"
            save_png(d / f, c)
            rows.append({"prompt_index": p, "prompt": meta[p]["prompt"], "k": k, "g": g,
                         "seed": 4 * p + 2 * k + g, "file": f, "metadata": meta[p]})
    write_index(d, rows)
    return d


def test_cli_on_synthetic_folder_matches_hand_values(synthetic_folder, monkeypatch, capsys):
    import rewards
    monkeypatch.setattr(rewards, "REWARDS", {"geneval": FakeGenEval}, raising=False)
    monkeypatch.setattr(ed, "load_face_app", lambda path, dev: FakeFaceApp())
    FakeGenEval.made.clear()
    FakeGenEval.calls.clear()
    out = synthetic_folder / "eval.json"
    rep = ed.main([f"--samples={synthetic_folder}", "--metrics=ids,sdi,pvs,geneval", "--detector=geneval",
                   "--face_model=/packs/buffalo_l", '--geneval_opts={"detector": "tiny"}', f"--out={out}",
                   "--batch_size=3"])
    assert FakeGenEval.made == [{"detector": "tiny"}]
    # batches of 3 over rows p0 x4, p1 x4: the middle batch mixes the prompts -> one detect call per
    # class list
    assert FakeGenEval.calls == [["cat"], ["cat"], ["dog"], ["dog"]]
    on_disk = json.loads(out.read_text())
    assert on_disk["groups"]["all"]["sdi"] == pytest.approx(rep["groups"]["all"]["sdi"])
    assert not [p for p in os.listdir(synthetic_folder) if ".tmp" in p]  # atomic write left no temp file
    assert on_disk["backbones"] == {"ids": "arcface:/packs/buffalo_l", "sdi": "geneval_detector",
                                    "pvs": "none (HSV and luma statistics of the pixels)",
                                    "geneval": "rewards.REWARDS['geneval'] {\"detector\": \"tiny\"}"}
    assert on_disk["labels"]["ids"] == "IDS[arcface]" and on_disk["labels"]["sdi"] == "SDI[geneval]"
    g = on_disk["groups"]
    assert [(g[n]["images"], g[n]["prompts"]) for n in ("all", "k=0", "k>0")] == [(8, 2), (4, 2), (4, 2)]
    # SDI: layout similarities R-R 1, R-D 1/3, D-W 1/6, X-K 0 (K has no box), K-K 1
    assert g["k=0"]["sdi"] == pytest.approx(1.0)  # p0 R,K -> 1; p1 W,K -> 1
    assert g["k>0"]["sdi"] == pytest.approx(((1 - 1 / 3) + (1 - 1 / 6)) / 2)  # p0 D,R; p1 D,W
    assert g["all"]["sdi"] == pytest.approx(((1 - 5 / 18) + (1 - 2 / 9)) / 2)  # p0 R,K,D,R; p1 W,K,D,W
    assert g["all"]["sdi_no_boxes"] == 2
    # PVS of constant images: contrast 0, so std(S) + std(V); (S, V) of R (1, 1), K (0, 0), W (0, 1),
    # D (1, 128/255)
    vd = 128 / 255
    # the published PVS, over the whole set: k=0 is R, K, W, K: S [1, 0, 0, 0] -> sqrt(3)/4;
    # V [1, 0, 1, 0] -> 1/2
    assert g["k=0"]["pvs"] == pytest.approx(math.sqrt(3) / 4 + 0.5)
    # k>0 is D, R, D, W: S [1, 1, 1, 0] -> sqrt(3)/4; V [vd, 1, vd, 1] -> (1 - vd)/2
    assert g["k>0"]["pvs"] == pytest.approx(math.sqrt(3) / 4 + (1 - vd) / 2)
    # all eight: S [1, 0, 1, 1, 0, 0, 1, 0] -> 1/2; V four 1, two 0, two vd: mean (4 + 2 vd)/8
    m = (4 + 2 * vd) / 8
    assert g["all"]["pvs"] == pytest.approx(
        0.5 + math.sqrt((4 * (1 - m) ** 2 + 2 * m ** 2 + 2 * (vd - m) ** 2) / 8))
    # per prompt, averaged: k=0 p0 {R, K}: 1/2 + 1/2, p1 {W, K}: 0 + 1/2; k>0 p0 {D, R}: 0 + (1 - vd)/2,
    # p1 {D, W}
    assert g["k=0"]["pvs_per_prompt"] == pytest.approx((1.0 + 0.5) / 2)
    assert g["k>0"]["pvs_per_prompt"] == pytest.approx(((1 - vd) / 2 + (0.5 + (1 - vd) / 2)) / 2)
    # IDS[arcface]: R and D are faces (identities e0, e1), K and W have none and are counted
    # over the set: all = R, D, R (p0) and D (p1): of 6 pairs, R-R and D-D are the same identity -> 2/6
    assert g["all"]["ids"] == pytest.approx(1 / 3) and g["all"]["ids_faces"] == 4
    # p1 has one face
    assert g["all"]["ids_per_prompt"] == pytest.approx(1 / 3) and g["all"]["ids_prompts"] == 1
    assert g["all"]["ids_no_face"] == 4 and len(g["all"]["ids_no_face_files"]) == 4
    assert g["k=0"]["ids"] is None and g["k=0"]["ids_per_prompt"] is None  # one face at k=0: undefined, null
    # k>0 = D, R (p0) and D (p1): over the set 1/3 (the two Ds of different prompts); per prompt 0 (p0's D-R)
    assert g["k>0"]["ids"] == pytest.approx(1 / 3) and g["k>0"]["ids_faces"] == 3
    assert g["k>0"]["ids_per_prompt"] == pytest.approx(0.0) and g["k>0"]["ids_prompts"] == 1
    assert g["k>0"]["ids_no_face"] == 1
    # GenEval: correct = R or D
    assert g["all"]["geneval"]["tags"]["single_object"]["accuracy"] == pytest.approx(0.75)
    assert g["all"]["geneval"]["tags"]["counting"]["accuracy"] == pytest.approx(0.25)
    assert [g[n]["geneval"]["overall"] for n in ("all", "k=0", "k>0")] == pytest.approx([0.5, 0.25, 0.75])
    text = capsys.readouterr().out
    assert "IDS[arcface]" in text and "SDI[geneval]" in text and "had no face" in text


def test_cli_skips_what_the_inputs_cannot_support(synthetic_folder):
    rows = [json.loads(ln) for ln in (synthetic_folder / "index.jsonl").read_text().splitlines()]
    write_index(synthetic_folder, [dict(r, metadata={}) for r in rows])  # a .txt prompt file: no GenEval tags
    rep = ed.main([f"--samples={synthetic_folder}", "--metrics=pvs,geneval,asc"])
    assert rep["metrics"] == ["pvs"] and set(rep["skipped"]) == {"geneval", "asc"}
    assert "GenEval tags" in rep["skipped"]["geneval"] and "--reference" in rep["skipped"]["asc"]
    # over the set (hand case above)
    assert rep["groups"]["k=0"]["pvs"] == pytest.approx(math.sqrt(3) / 4 + 0.5)
    assert (rep["groups"]["k=0"]["pvs_per_prompt"] == pytest.approx(0.75)
            and "geneval" not in rep["groups"]["all"])


def test_cli_errors_are_one_clear_sentence(synthetic_folder, tmp_path, monkeypatch):
    import rewards
    with pytest.raises(SystemExit, match="index.jsonl not found"):
        ed.main([f"--samples={tmp_path / 'empty'}"])
    with pytest.raises(SystemExit, match="unknown metric"):
        ed.main([f"--samples={synthetic_folder}", "--metrics=ids,fid"])
    with pytest.raises(SystemExit, match="--face_model=.* holds no .onnx files"):
        ed.main([f"--samples={synthetic_folder}", "--metrics=ids", "--face_model=/no/such/pack"])
    monkeypatch.setattr(rewards, "REWARDS", {}, raising=False)
    with pytest.raises(SystemExit, match="no 'geneval' reward"):
        ed.main([f"--samples={synthetic_folder}", "--metrics=geneval"])
    os.remove(synthetic_folder / "00000_k00_g00.png")
    with pytest.raises(SystemExit, match="file is missing"):
        ed.main([f"--samples={synthetic_folder}", "--metrics=pvs"])
    assert not os.path.exists(synthetic_folder / "diversity.json")  # nothing half-written


def test_cli_refuses_what_one_sample_run_does_not_write(synthetic_folder, tmp_path):
    """What would change the metrics silently or end in a traceback is one sentence before any backbone loads:
    a broken line of index.jsonl (file and line), an image of another size, a greyscale image, a damaged PNG;
    and a report path that is a folder, or a file this script did not write (index.jsonl)."""
    index = synthetic_folder / "index.jsonl"
    good = index.read_text()
    pvs = ed.main([f"--samples={synthetic_folder}", "--metrics=pvs"])["groups"]["all"]["pvs"]
    index.write_text(good.replace("\n", "\n{broken\n", 1))
    with pytest.raises(SystemExit, match=re.escape(f"{index} line 2 is not valid JSON")):
        ed.main([f"--samples={synthetic_folder}", "--metrics=pvs"])
    index.write_text(good)
    f = synthetic_folder / "00001_k01_g01.png"
    kept = f.read_bytes()
    for broken, says in ((lambda: save_png(f, W, size=64), "is 64x64 RGB, 00000_k00_g00.png is 32x32"),
                         (lambda: Image.fromarray(np.full((32, 32), 255, np.uint8)).save(f), "is 32x32 L"),
                         (lambda: f.write_bytes(kept[:40]), "cannot be read as an image")):
        broken()
        with pytest.raises(SystemExit, match=re.escape(says)):
            ed.main([f"--samples={synthetic_folder}", "--metrics=pvs"])
        f.write_bytes(kept)
    with pytest.raises(SystemExit, match="batch_size=0 must be at least 1"):
        ed.main([f"--samples={synthetic_folder}", "--metrics=pvs", "--batch_size=0"])
    (tmp_path / "folder").mkdir()
    for where, says in ((tmp_path / "folder", "is a folder: name a file"),
                        (index, "is not a report of eval_diversity.py")):
        with pytest.raises(SystemExit, match=re.escape(says)):
            ed.main([f"--samples={synthetic_folder}", "--metrics=pvs", f"--out={where}"])
    assert index.read_text() == good
    assert ed.main([f"--samples={synthetic_folder}", "--metrics=pvs"])["groups"]["all"]["pvs"] == pvs


# ------------------------------------------------------------------- CLI end to end on sample.py --model=tiny
@pytest.fixture(scope="module")
def tiny_samples(tmp_path_factory):
    import sample
    d = tmp_path_factory.mktemp("e2e")
    prompts = d / "prompts.jsonl"  # GenEval-style: the metadata lands in index.jsonl
    prompts.write_text("".join(json.dumps(m) + "\n" for m in [
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
        {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "green"}],
         "prompt": "a photo of a green dog"},
        {"tag": "two_object", "include": [{"class": "bicycle", "count": 1}, {"class": "bench", "count": 1}],
         "prompt": "a photo of a bicycle and a bench"}]))
    sample.main(["--model=tiny", f"--prompts={prompts}", f"--out_dir={d / 'samples'}",
                 "--G=2", "--resolution=64", "--steps=2"])
    return d


def test_cli_end_to_end_on_tiny_samples(tiny_samples, capsys):
    d = tiny_samples
    ref = d / "reference"
    ref.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(10):
        save_png(ref / f"art{i}.png", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    make_csd_checkpoint(d / "csd.pth")
    rep = ed.main([f"--samples={d / 'samples'}", "--clip_model=tiny", "--detector_model=tiny",
                   "--box_threshold=0.0", f"--reference={ref}", f"--style_model={d / 'csd.pth'}",
                   "--batch_size=4", '--geneval_opts={"detector": "tiny", "clip": "tiny"}'])
    path = d / "samples" / "diversity.json"
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(rep))
    assert on_disk["metrics"] == ["ids", "asc", "sdi", "pvs", "vendi", "geneval"] and on_disk["skipped"] == {}
    assert (on_disk["backbones"]["ids"] == "clip:tiny"
            and on_disk["backbones"]["asc"] == f"csd:{d / 'csd.pth'}")
    assert on_disk["backbones"]["sdi"] == "grounding_dino:tiny"
    assert on_disk["labels"] == {"ids": "IDS[clip]", "ids_per_prompt": "IDS_per_prompt[clip]",
                                 "asc": "ASC[csd]", "sdi": "SDI[gdino]",
                                 "pvs": "PVS", "pvs_per_prompt": "PVS_per_prompt",
                                 "vendi": "Vendi[clip]", "cos": "cos[clip]", "geneval": "GenEval"}
    # K=1: no k>0 group
    assert (on_disk["images"], on_disk["prompts"]) == (6, 3) and list(on_disk["groups"]) == ["all"]
    g = on_disk["groups"]["all"]
    assert g["ids_no_face"] is None  # CLIP embeds whole images: faces are not checked, and the JSON says so
    # IDS[clip] per prompt is the CLIP mean pairwise cosine
    assert g["ids_per_prompt"] == pytest.approx(g["cos"])
    assert -1 <= g["ids"] <= 1 and 1 <= g["vendi"] <= 2 and 0 <= g["sdi"] <= 1 and g["pvs"] >= 0
    assert g["sdi_mean_boxes"] == 10  # threshold 0: every query of the tiny detector is kept
    a = g["asc_detail"]
    assert (a["n_train"], a["n"]) == (8, 2)  # 10 reference images, 20 % held out; synth cut to |test|
    assert 1 <= a["synth"]["k"] <= 2 and a["asc"] == pytest.approx(a["synth"]["n_ml"] / a["test"]["n_ml"])
    # the pure functions on the same CLIP features give the same numbers as the CLI
    clip = ed.clip_embedder("tiny", "cpu")
    rows = ed.read_index(str(d / "samples"))
    f = clip([ed.load_rgb(os.path.join(d / "samples", r["file"])) for r in rows])
    per_prompt = [ed.mean_pairwise_cosine(f[[i for i, r in enumerate(rows) if r["prompt_index"] == p]])
                  for p in range(3)]
    assert g["ids_per_prompt"] == pytest.approx(np.mean(per_prompt), rel=1e-6)
    # all 15 pairs
    assert g["ids"] == pytest.approx(ed.mean_pairwise_cosine(f), rel=1e-6) and g["ids_faces"] == 6
    assert g["pvs"] == pytest.approx(ed.photographic_variance(
        [ed.photo_stats(np.asarray(ed.load_rgb(os.path.join(d / "samples", r["file"])), np.float64) / 255)
         for r in rows]))
    # GenEval from rewards.py's scorer (tiny Mask2Former + tiny CLIP): every image judged, per tag
    ge = g["geneval"]
    assert ({t: v["images"] for t, v in ge["tags"].items()}
            == {"single_object": 2, "colors": 2, "two_object": 2})
    assert set(ge["missing_tags"]) == {"counting", "position", "color_attr"}
    assert ge["overall"] == pytest.approx(np.mean([v["accuracy"] for v in ge["tags"].values()]))
    assert "IDS[clip]" in capsys.readouterr().out


def test_cli_sdi_with_the_geneval_detector(tiny_samples):
    rep = ed.main([f"--samples={tiny_samples / 'samples'}", "--metrics=sdi", "--detector=geneval",
                   '--geneval_opts={"detector": "tiny", "clip": "tiny"}',
                   f"--out={tiny_samples / 'sdi.json'}"])
    g = rep["groups"]["all"]
    assert rep["backbones"] == {"sdi": "geneval_detector"} and rep["labels"] == {"sdi": "SDI[geneval]"}
    assert g["sdi_prompts"] == 3 and 0 <= g["sdi"] <= 1
    assert (json.loads((tiny_samples / "sdi.json").read_text())["groups"]["all"]["sdi"]
            == pytest.approx(g["sdi"]))


def test_cli_refuses_torchrun_and_keeps_gpu_arithmetic_fp32(synthetic_folder, monkeypatch):
    """Under torchrun every rank would score the whole folder on one GPU and write the same file: rank 0
    stops with one sentence, the others quietly. The run itself turns TF32 off (PyTorch lets cuDNN's
    convolutions use it by default), so a GPU's metrics are the CPU's to float32 rounding."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, code in (("0", "eval_diversity.py runs in one process: start it with python, not torchrun"),
                       ("1", 1)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as err:
            ed.main([f"--samples={synthetic_folder}", "--metrics=pvs", f"--out={synthetic_folder}/x.json"])
        assert err.value.code == code
    assert not os.path.exists(os.path.join(synthetic_folder, "x.json"))
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    ed.main([f"--samples={synthetic_folder}", "--metrics=pvs", "--device=cpu",
             f"--out={synthetic_folder}/x.json"])
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False


def test_image_processors_are_pils_on_every_machine(monkeypatch):
    """transformers 5 picks torchvision's image processors where torchvision is installed (a GPU machine)
    and PIL's here, and their resizing differs in the last bits: every processor load asks for PIL's."""
    import types

    import rewards

    class Stub:  # stands for whatever was loaded
        config = types.SimpleNamespace(num_labels=len(rewards.GENEVAL_CLASSES))

        def to(self, *a, **kw):
            return self

        def eval(self):
            return self

        def requires_grad_(self, *a):
            return self
    seen = []
    monkeypatch.setattr(rewards, "_from_pretrained", lambda cls, name, what, hint="", **kw: (
        seen.append((what, kw.get("backend"))), Stub())[1])
    rewards.load_clip("some/clip")
    rewards.geneval(detector="some/mask2former", clip="some/clip")
    ed.grounding_dino_detector("some/gdino", "cpu", 0.35, 0.25)
    procs = [w for w, b in seen if "processor" in w]
    assert len(procs) == 4 and all(b == "pil" for w, b in seen if "processor" in w), seen
    assert all(b is None for w, b in seen if "processor" not in w)  # models take no such option


def test_cli_reports_reward_means_beside_the_metrics(tiny_samples, capsys):
    """--reward_means: each named reward of rewards.py averaged over every group's images (the paper's second
    table: PickScore and the unseen rewards beside IDS), equal to the reward computed on the same files."""
    import rewards
    d = tiny_samples
    rep = ed.main([f"--samples={d / 'samples'}", "--metrics=pvs",
                   "--reward_means=pickscore,jpeg_incompressibility",
                   """--reward_opts={"pickscore": {"model": "tiny"}}""", f"--out={d / 'rw.json'}"])
    rows = ed.read_index(str(d / "samples"))
    ims = ed.to_tensor([ed.load_rgb(os.path.join(d / "samples", r["file"])) for r in rows])
    prompts, meta = [r["prompt"] for r in rows], [r["metadata"] for r in rows]
    g = rep["groups"]["all"]
    assert rep["rewards"] == ["pickscore", "jpeg_incompressibility"]
    assert g["reward_pickscore"] == pytest.approx(
        rewards.REWARDS["pickscore"](model="tiny")(ims, prompts, meta).mean().item(), rel=1e-6)
    assert g["reward_jpeg_incompressibility"] == pytest.approx(
        rewards.REWARDS["jpeg_incompressibility"]()(ims, prompts, meta).mean().item(), rel=1e-6)
    head = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("group ")]
    assert head and "pickscore" in head[0] and "jpeg_incompressibility" in head[0]  # the printed table
    with pytest.raises(SystemExit, match="unknown reward 'pickscor'"):
        ed.main([f"--samples={d / 'samples'}", "--metrics=pvs", "--reward_means=pickscor"])
