"""
The shapes world's detector and rewards: a synthetic GenEval that a CPU can learn. Filled circles, squares and
triangles in GenEval's ten colours on a plain grey background; data/shapes/prepare.py renders them and writes
GenEval-style prompt files, data/shapes/train_prior.py trains an SD3-shaped prior on them, and the rewards
here judge its images. They are registered in rewards.REWARDS by name (`shapes`, `colour_share`, ...), so
every script takes them like any other reward; rewards.shapes_world() returns this module.

`shapes` finds the objects with pixel rules (`shapes_detect`) and judges them with GenEval's own rules
(rewards.geneval_rules): the reward has exactly GenEval's structure, but is exact and takes a millisecond an
image. docs/shapes_world.md records how its thresholds were calibrated.
"""
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from rewards import (GENEVAL_COLORS, GENEVAL_CREDITS, THRESHOLD, _uint8_images, geneval_rules,  # noqa: E402
                     opts_hint)

SHAPE_CLASSES = ("circle", "square", "triangle")
# RGB of each GenEval colour: recognisably its name, and every two of them (background included) at
# least ~118 apart in RGB, so naming a pixel by its nearest palette colour survives a VAE's blur.
SHAPES_PALETTE = {
    "red": (215, 15, 50), "orange": (255, 130, 0), "yellow": (240, 240, 40), "green": (20, 175, 65),
    "blue": (20, 90, 220), "purple": (140, 20, 205), "pink": (255, 125, 220), "brown": (110, 65, 15),
    "black": (0, 0, 0), "white": (255, 255, 255)}
SHAPES_BACKGROUND = (140, 140, 140)
# greys are no colour of the palette: a pixel nearer one of these than to any palette colour or the background
# is named "grey" (a half-transparent white over the background, a dark or light grey shape), never pink,
# white or brown
SHAPES_GREYS = ((70, 70, 70), (200, 200, 200))
# object sizes: the renderer draws SHAPES_SIZE (fractions of the image side); the detector drops specks whose
# longer side is under SHAPES_MIN_PIXELS (absolute: a small extra object is seen, at any resolution) and
# lowers the confidence of objects beyond the rendered sizes (a canvas-filling colour is not "a square"),
# reaching 0 at SHAPES_MAX_SIDE
SHAPES_SIZE = (0.22, 0.36)
SHAPES_MIN_PIXELS, SHAPES_MAX_SIDE = 4, 0.6
# below this many pixels (longer side) no shape can be told from another (a 6-px disk is a diamond in pixels):
# such an object is judged by the best IoU alone, on SHAPES_SMALL_IOU_RAMP, with no lookalike or solidity test
SHAPES_RESOLVED, SHAPES_SMALL_IOU_RAMP = 8, (0.6, 0.7)
# the IoU with its ideal shape at which an object's score starts to rise and reaches 1, per class.
# Calibrated on VAE reconstructions of rendered shapes (a 1-2 px blur): 90 % of circles and squares
# keep IoU >= 0.88, of triangles >= 0.73 (their apex and corners, long boundary for their area, blur
# first); a diamond or ellipse judged as a circle stays <= 0.72, an upside-down triangle <= 0.57.
SHAPES_IOU_RAMP = {"circle": (0.7, 0.85), "square": (0.7, 0.85), "triangle": (0.6, 0.75)}
# the box's aspect (short / long side) at which the score starts to rise and reaches 1: every shape is drawn
# in a square box; an equilateral triangle (0.866) is a triangle with room to spare
SHAPES_ASPECT_RAMP = {"circle": (0.6, 0.85), "square": (0.6, 0.85), "triangle": (0.5, 0.75)}
# the lookalikes (_lookalikes) a shape is compared with: (family, lo, hi) = the score is 0 when one of them
# fits the object better than the ideal shape by -lo or more, 1 while it fits better by at most -hi. A turned
# square read as a square is a square (a person agrees); read as a circle it is nothing. Calibrated on VAE
# reconstructions of rendered shapes and on the distilled prior's samples, whose circles a turned square fits
# up to 0.025 better, a hexagon up to 0.023, and whose squares a cut corner up to 0.021 (VAE: the middle
# 99 %); the lookalikes drawn cleanly fit 0.036 to 0.17 better
SHAPES_LOOKALIKES = {"circle": (("turned", -0.05, -0.03), ("polygons", -0.07, -0.04)),
                     "square": (("cut", -0.035, -0.025),), "triangle": ()}
# area over the convex hull's, against the ideal shape's own: 0 below lo, 1 from hi (None: not tested). A
# bitten square keeps 0.83, a plus sign 0.78-0.82, a pac-man 0.86-0.90; VAE reconstructions of squares keep
# >= 0.913 and of circles >= 0.967 (99.5 %). Triangles are not tested: no lookalike of theirs needs it, and a
# VAE rounds their corners most.
SHAPES_SOLIDITY = {"circle": (0.9, 0.95), "square": (0.86, 0.9), "triangle": None}


def shape_mask(cls, w, h):
    """The ideal filled shape in a w x h pixel box, bool [h, w], sampled at pixel centres. The renderer
    draws exactly this; the detector compares each found object with it. Triangles stand apex up; a
    row's width is read at its lower edge, so the apex row is never empty (the box stays tight)."""
    import numpy as np
    u = (np.arange(w) + 0.5) / w
    if cls == "circle":
        v = (np.arange(h) + 0.5) / h
        return (u[None] - 0.5) ** 2 + (v[:, None] - 0.5) ** 2 <= 0.25
    if cls == "square":
        return np.ones((h, w), bool)
    if cls == "triangle":
        v = (np.arange(h) + 1.0) / h
        return np.abs(u[None] - 0.5) <= v[:, None] / 2 + 1e-9
    raise ValueError(f"unknown shape '{cls}': one of {', '.join(SHAPE_CLASSES)}")


def _convex_mask(verts, w, h):
    """A convex polygon (vertices in any units, scaled to fill the box) as a bool [h, w] mask, sampled at
    pixel centres like shape_mask."""
    import numpy as np
    v = np.asarray(verts, np.float64)
    v = (v - v.min(0)) / (v.max(0) - v.min(0))
    X, Y = np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h)
    turn = np.sign((v[1, 0] - v[0, 0]) * (v[2, 1] - v[1, 1]) - (v[1, 1] - v[0, 1]) * (v[2, 0] - v[1, 0]))
    inside = np.ones((h, w), bool)
    for a, b in zip(v, np.roll(v, -1, axis=0)):
        inside &= turn * ((b[0] - a[0]) * (Y - a[1]) - (b[1] - a[1]) * (X - a[0])) >= -1e-9
    return inside


@functools.lru_cache(maxsize=4096)
def _lookalikes(w, h):
    """Shapes a person tells apart from a circle or a square, in a w x h box: {"turned": squares turned by 5
    to 45 degrees, "cut": squares with a corner cut off, "polygons": regular pentagons and hexagons, and
    octagons from 32 px on (below, an octagon's flats lie within a pixel of its circle, which a VAE's blur
    also moves)}, each a tuple of masks. SHAPES_LOOKALIKES says which ones each shape is compared with."""
    import math
    turn = lambda n, rot: [(math.cos(rot + 2 * math.pi * i / n), math.sin(rot + 2 * math.pi * i / n))
                           for i in range(n)]
    sq, cut = [(0, 0), (1, 0), (1, 1), (0, 1)], []
    for f in (0.3, 0.5):
        for c in range(4):
            (px, py), prev, nxt = sq[c], sq[c - 1], sq[(c + 1) % 4]
            cut.append(sq[:c] + [(px + (prev[0] - px) * f, py + (prev[1] - py) * f),
                                 (px + (nxt[0] - px) * f, py + (nxt[1] - py) * f)] + sq[c + 1:])
    polys = {"turned": [turn(4, math.radians(d) + math.pi / 4) for d in range(5, 46, 5)], "cut": cut,
             "polygons": [turn(n, -math.pi / 2 + half * math.pi / n)
                          for n in ((5, 6, 8) if min(w, h) >= 32 else (5, 6)) for half in (0, 1)]}
    return {k: tuple(_convex_mask(p, w, h) for p in v) for k, v in polys.items()}


def _solidity(mask):
    """Area over the area of the convex hull of the mask's pixels (their corners): 1 for a convex shape
    (less by its pixel staircase), lower for a bitten, notched or cross-shaped one."""
    import numpy as np
    from scipy.spatial import ConvexHull
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    return float(mask.sum() / ConvexHull(corners).volume)


def _iou(a, b):
    return float((a & b).sum() / (a | b).sum())


def _ramp(x, lo, hi):
    return min(max((x - lo) / (hi - lo), 0.0), 1.0)


def pixel_names(image):
    """Every pixel of a uint8 [H, W, 3] image named by its nearest colour: an index [H, W] into
    GENEVAL_COLORS (0-9), then SHAPES_GREYS (10, 11: "grey"), then the background (12)."""
    import numpy as np
    ref = np.array([SHAPES_PALETTE[c] for c in GENEVAL_COLORS] + list(SHAPES_GREYS) + [SHAPES_BACKGROUND],
                   np.float32)
    return ((image[..., None, :3].astype(np.float32) - ref) ** 2).sum(-1).argmin(-1)


def shapes_detect(image):
    """GenEval-format detections of one uint8 [H, W, 3] image: {class: [(box, score, colour), ...]},
    box = (x0, y0, x1, y1) in pixels (x1, y1 exclusive), unfiltered (geneval_rules applies thresholds).

    Every pixel is named by its nearest colour among the palette, the greys and the background; the
    connected non-background regions are the objects (regions under SHAPES_MIN_PIXELS on both sides are
    specks and dropped; those under SHAPES_RESOLVED are judged by their best IoU alone). An object's class
    is the shape whose ideal mask in the object's own box overlaps its (hole-filled) mask best (IoU); its
    colour is the majority name of its interior (one pixel in from
    the edge, where a VAE blurs colours into each other), "grey" when greys win. Its score is a product of
    ramps in [0, 1], each 1 for a cleanly drawn shape, as a person would judge it: the best IoU
    (SHAPES_IOU_RAMP), its margin over the second-best shape (0 -> 0.04; a perfect shape's margin is >=
    0.21) and over its lookalikes (SHAPES_LOOKALIKES: a circle against turned squares and regular
    polygons, a square against squares with a cut corner), the solidity against the ideal shape's own
    (SHAPES_SOLIDITY: a bitten, notched or cross-shaped object is no shape), the interior's colour
    purity (0.6 -> 0.9), the box's aspect ratio (SHAPES_ASPECT_RAMP; every shape is drawn in a square
    box), the size (1 up to 0.45 of the image side, 0 at SHAPES_MAX_SIDE), and half for an object touching
    the image border (cut off).
    Rendered shapes score 1; blurred or misshapen ones fall under GenEval's counting threshold (0.9) first
    and its detection threshold (0.3) later; noise and merged blobs score ~0."""
    import numpy as np
    from scipy import ndimage
    H, W = image.shape[:2]
    S = min(H, W)
    name = pixel_names(image)
    bg = len(GENEVAL_COLORS) + len(SHAPES_GREYS)
    regions, _ = ndimage.label(name != bg)  # 4-connected: shapes touching only at a corner stay apart
    out = {}
    for i, sl in enumerate(ndimage.find_objects(regions)):
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if max(h, w) < SHAPES_MIN_PIXELS:
            continue
        mask = ndimage.binary_fill_holes(regions[sl] == i + 1)
        iou = {cls: _iou(mask, shape_mask(cls, w, h)) for cls in SHAPE_CLASSES}
        ranked = sorted(SHAPE_CLASSES, key=lambda c: -iou[c])
        best = ranked[0]
        resolved = max(h, w) >= SHAPES_RESOLVED
        alike = 1.0  # how little the lookalikes of the best shape fit better than it
        for family, lo, hi in SHAPES_LOOKALIKES[best] if resolved else ():
            alike *= _ramp(iou[best] - max(_iou(mask, t) for t in _lookalikes(w, h)[family]), lo, hi)
        solid = (_ramp(_solidity(mask) / _solidity(shape_mask(best, w, h)), *SHAPES_SOLIDITY[best])
                 if resolved and SHAPES_SOLIDITY[best] else 1.0)
        core = ndimage.binary_erosion(mask)
        if core.sum() < 0.25 * mask.sum():  # thin objects: use every pixel
            core = mask
        votes = np.bincount(name[sl][core], minlength=bg + 1)  # background-named holes count against purity
        top = int(votes[:len(GENEVAL_COLORS)].argmax())
        grey = votes[len(GENEVAL_COLORS):bg].sum()
        colour, n_colour = ("grey", grey) if grey > votes[top] else (GENEVAL_COLORS[top], votes[top])
        purity = n_colour / max(int(core.sum()), 1)
        on_border = sl[0].start == 0 or sl[1].start == 0 or sl[0].stop == H or sl[1].stop == W
        score = (_ramp(iou[best], *(SHAPES_IOU_RAMP[best] if resolved else SHAPES_SMALL_IOU_RAMP))
                 * _ramp(iou[best] - iou[ranked[1]], 0.0, 0.04)
                 * alike * solid
                 * _ramp(purity, 0.6, 0.9) * _ramp(min(h, w) / max(h, w), *SHAPES_ASPECT_RAMP[best])
                 * _ramp(-max(h, w) / S, -SHAPES_MAX_SIDE, -0.45) * (0.5 if on_border else 1.0))
        box = (float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop))
        out.setdefault(best, []).append((box, float(score), colour))
    return out


def shapes(device="cpu", dtype=torch.float32, strict=False, credit="server"):
    """The shapes world's GenEval: `shapes_detect` finds the objects, `geneval_rules` judges them. The
    reward is the partial-credit score (formula `credit`, as the geneval reward's), or 0/1 correctness if
    `strict` (the benchmark verdict). No model: device and dtype are accepted for the registry's uniform
    call. Extra attributes, as the geneval reward's: .evaluate(images, metadata) -> [{"tag", "correct",
    "score", "reason", "detections"}] and .detect(images, class_names=None, threshold=THRESHOLD) -> per
    image [{"class", "box", "score"}]."""
    if credit not in GENEVAL_CREDITS:
        raise SystemExit(f"unknown shapes credit '{credit}': use 'server' (the public reward server's "
                         f"formula, the default) or 'fixed', e.g. {opts_hint('shapes', 'credit', 'fixed')}")

    def evaluate(images, metadata):
        metadata = list(metadata)
        if len(metadata) != len(images) or any(not m.get("include") for m in metadata):
            raise SystemExit("the shapes reward needs GenEval-style metadata for every image: "
                             "use a .jsonl prompt file with 'tag' and 'include' fields "
                             "(data/shapes/prepare.py writes them)")
        asked = {c["class"] for m in metadata for c in m["include"] + m.get("exclude", [])}
        if not asked <= set(SHAPE_CLASSES):
            raise SystemExit(f"the shapes reward knows only {', '.join(SHAPE_CLASSES)}, but the metadata "
                             f"asks for {', '.join(sorted(asked - set(SHAPE_CLASSES)))}: "
                             f"use data/shapes/*_metadata.jsonl")
        results = []
        for im, meta in zip(_uint8_images(images), metadata):
            dets = shapes_detect(im)
            correct, score, reason = geneval_rules(dets, meta, credit)
            results.append({"tag": meta.get("tag"), "correct": correct, "score": score, "reason": reason,
                            "detections": dets})
        return results

    def detect(images, class_names=None, threshold=THRESHOLD):
        keep = None if class_names is None else set(class_names)
        return [[{"class": c, "box": list(box), "score": s} for c, dets in shapes_detect(im).items()
                 for box, s, _ in dets if (keep is None or c in keep) and s > threshold]
                for im in _uint8_images(images)]

    def fn(images, prompts=None, metadata=None):
        res = evaluate(images, metadata if metadata is not None else [{}] * len(images))
        vals = [float(r["correct"]) if strict else r["score"] for r in res]
        return torch.tensor(vals, dtype=torch.float32, device=images.device)

    fn.evaluate, fn.detect = evaluate, detect
    return fn


def colour_share(device="cpu", dtype=torch.float32):
    """The share of the image's pixels whose nearest colour among SHAPES_PALETTE and the background is a
    colour the prompt asks for (the `color` of its include clauses), in [0, 1]: a dense reward of the shapes
    world whose optimum depends on the text ("a red circle" wants red pixels), so a policy that stops
    listening to the prompt cannot climb it. Pixels are rounded to uint8 first, as a saved PNG is. Kept as
    the variance study ran it, with its one off-text channel: greys are not among the names, so a canvas
    darkened below ~70 counts as "black" and one lightened above ~200 as "white"; `colour_amount` (below)
    caps the share at one object's area, which closes it."""
    names = list(GENEVAL_COLORS) + ["background"]
    ref = torch.tensor([SHAPES_PALETTE[c] for c in GENEVAL_COLORS] + [SHAPES_BACKGROUND], dtype=torch.float32)

    def fn(images, prompts=None, metadata=None):
        metadata = list(metadata) if metadata is not None else [{}] * len(images)
        asked = [{c["color"] for c in m.get("include", []) if c.get("color")} for m in metadata]
        if len(asked) != len(images) or not all(asked):
            raise SystemExit("the colour_share reward needs prompts that ask for a colour: a .jsonl "
                             "prompt file whose 'include' clauses have a 'color' "
                             "(e.g. data/shapes/train_colors.jsonl)")
        px = torch.from_numpy(_uint8_images(images)).float().flatten(1, 2)  # [B, H*W, 3]
        # exact in float32 (integers), first on a tie; unlike shapes_detect, SHAPES_GREYS are not among the
        # names, so a grey pixel counts for its nearest palette colour (the variance study's reward, kept)
        name = ((px[:, :, None] - ref) ** 2).sum(-1).argmin(-1)  # [B, H*W]: index of the nearest colour
        want = torch.tensor([[n in a for n in names] for a in asked])  # [B, 11]
        return want.gather(1, name).float().mean(1).to(images.device)
    return fn


# ------------------------------------ candidate worlds for the collapse question (docs/collapse_world.md)
# Rewards whose optimum depends on the prompt and that a policy can saturate, so that a group's images can
# all reach the top while still following their text: each is piloted before any E²PO comparison. With
# gate=True a reward is multiplied by the `shapes` partial credit of the same image (the object must still be
# drawn as asked).
def _first_clause(metadata, name, colour=True):
    """(class, colour) of each prompt's first include clause; stops with one sentence when a prompt has none
    (or no colour, when the reward needs one)."""
    out = []
    for m in metadata:
        inc = (m or {}).get("include") or [{}]
        if "class" not in inc[0] or (colour and not inc[0].get("color")):
            raise SystemExit(f"the {name} reward needs GenEval-style prompts whose first 'include' clause "
                             f"has a 'class'{' and a color' if colour else ''} "
                             "(e.g. data/shapes/train_colors.jsonl)")
        out.append((inc[0]["class"], inc[0].get("color")))
    return out


def _gated(name, score_fn, gate, colour=True):
    """The reward fn(images, prompts, metadata): score_fn(uint8 image, class, colour) per image, times the
    `shapes` credit when gate."""
    credit = shapes() if gate else None

    def fn(images, prompts=None, metadata=None):
        metadata = list(metadata) if metadata is not None else [{}] * len(images)
        asked = _first_clause(metadata, name, colour)
        vals = torch.tensor([score_fn(im, cls, col) for im, (cls, col) in zip(_uint8_images(images), asked)],
                            dtype=torch.float32)
        if gate:
            vals = vals * credit(images, prompts, metadata).cpu()
        return vals.to(images.device)
    return fn


TINT_SHIFT, TINT_WIDTH = 25.0, 15.0  # RGB units: the target's distance from the grey, the Gaussian's width


def tint_target(colour):
    """The background the `tint` reward asks for: SHAPES_BACKGROUND moved TINT_SHIFT towards the colour (RGB).
    25 units stays well inside the background's own cell (every palette colour and grey is >= 104 away), so a
    tinted background is still background to the detector."""
    import numpy as np
    bg = np.array(SHAPES_BACKGROUND, np.float64)
    d = np.array(SHAPES_PALETTE[colour], np.float64) - bg
    return bg + TINT_SHIFT * d / np.linalg.norm(d)


def tint(device="cpu", dtype=torch.float32, gate=False):
    """A background tinted towards the asked colour (a text-dependent global style, like a preference model's
    taste for a colour-coordinated picture): exp(-|b - b*(c)|^2 / (2 TINT_WIDTH^2)), b the mean RGB of the
    pixels named background, b*(c) = tint_target(c) for the first include clause's colour c; 0 when no
    pixel is background. In [0, 1]; the prior's flat grey scores exp(-25^2 / 450) = 0.25."""
    import numpy as np
    targets = {c: tint_target(c) for c in GENEVAL_COLORS}
    bg = len(GENEVAL_COLORS) + len(SHAPES_GREYS)

    def score(im, cls, colour):
        sel = pixel_names(im) == bg
        if not sel.any():
            return 0.0
        b = im[sel][:, :3].astype(np.float64).mean(0)
        return float(np.exp(-((b - targets[colour]) ** 2).sum() / (2 * TINT_WIDTH ** 2)))
    return _gated("tint", score, gate)


AMOUNT_SIDE = 0.40  # colour_amount's default target: the asked shape's area at this side (the detector's size
# ramp starts at 0.45)


def colour_amount(device="cpu", dtype=torch.float32, gate=False, side=AMOUNT_SIDE):
    """Enough of the asked colour: min(1, share_c / a(class)), share_c the share of pixels named the first
    include clause's colour c, a(class) the area of that class's ideal shape at `side` of the image side
    (at 0.40: square 0.16, circle 0.126, triangle 0.080 of the canvas). Capped, so that a large object of the
    right colour is as good as it gets: no incentive to paint the canvas (colour_share's channel)."""
    if not 0 < side <= 1:
        raise SystemExit(f"colour_amount's side={side!r} must be a fraction of the image side in (0, 1]")
    n = 64
    area = {c: float(shape_mask(c, n, n).mean()) * side ** 2 for c in SHAPE_CLASSES}

    def score(im, cls, colour):
        share = float((pixel_names(im) == GENEVAL_COLORS.index(colour)).mean())
        return min(1.0, share / area[cls])
    return _gated("colour_amount", score, gate)


LAYOUT_BROAD, LAYOUT_NARROW = (0.6, 0.2), (1.0, 0.08)  # (height, width as a fraction of the side)
LAYOUT_CORNERS = ((0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75))


def layout_corner(cls, colour):
    """The prompt's corner (x, y as fractions of the side) of the `layout` reward's narrow peak: a fixed
    function of the asked class and colour, so two prompts that differ in either word may differ in corner."""
    k = SHAPE_CLASSES.index(cls) + (GENEVAL_COLORS.index(colour) + 1 if colour else 0)
    return LAYOUT_CORNERS[k % 4]


def layout(device="cpu", dtype=torch.float32, gate=True):
    """Two peaks per prompt for where the asked object sits: a broad one worth 0.6 at the centre and a narrow
    one worth 1.0 at a corner the prompt decides (layout_corner):
        max(0.6 exp(-d_c^2 / (2 0.2^2)), exp(-d_k^2 / (2 0.08^2)))
    d_c and d_k the distances (fractions of the side) of the asked object's box centre (its most confident
    detection of the asked class) from the centre and from the corner; 0 when no such object is found.
    Gated by the `shapes` credit by default. Does a baseline settle on the broad peak, leaving reward on the
    table, and do perturbations find the narrow one?"""
    import numpy as np
    (hb, wb), (hn, wn) = LAYOUT_BROAD, LAYOUT_NARROW

    def score(im, cls, colour):
        dets = shapes_detect(im).get(cls, [])
        if not dets:
            return 0.0
        (x0, y0, x1, y1), _, _ = max(dets, key=lambda d: d[1])
        side = min(im.shape[:2])
        c = np.array([(x0 + x1) / 2 / side, (y0 + y1) / 2 / side])
        d_c = np.linalg.norm(c - 0.5)
        d_k = np.linalg.norm(c - np.array(layout_corner(cls, colour)))
        return float(max(hb * np.exp(-d_c ** 2 / (2 * wb ** 2)), hn * np.exp(-d_k ** 2 / (2 * wn ** 2))))
    return _gated("layout", score, gate, colour=False)
