"""
The shapes world's data: GenEval-style prompt files over filled circles, squares and triangles, and a
renderer that draws an image satisfying any such prompt exactly.

    python data/shapes/prepare.py        # -> data/shapes/{train,test}_metadata.jsonl, the balanced
                                         #    {train,test}_small.jsonl, test_single_object.jsonl, and
                                         #    {train,test}_{easy,colors}.jsonl (colors + single_object;
                                         #    colors alone)
    python data/shapes/prepare.py --seed=1 --test_fraction=0.3 --out_dir=out/shapes
    python data/shapes/prepare.py --preview=out/shapes_preview.png   # also a grid of rendered test prompts

Every task of GenEval's six tags over world.SHAPE_CLASSES and GenEval's ten colours is enumerated
once, in GenEval's prompt templates (data/geneval/prepare.py's wording): single_object (3 tasks),
two_object (3), counting 2-4 with the exclude clause n+1 (9), colors (30), position with the four
relations (24), color_attr (270). Tasks are told apart by rewards.geneval_task (the wording of "a circle
and a square" vs "a square and a circle" is one task). Per tag, a seeded shuffle puts test_fraction of
the tasks (at least one) in the test file and the rest (at least one) in the train file, so the two are
disjoint by task and both hold every tag. Each line is one JSON object {"tag", "include": [{"class",
"count", "color"?, "position"?: [relation, clause_index]}], "exclude"?, "prompt"}, the format of
GenEval's evaluation_metadata.jsonl and of rewards.geneval_rules.

`render(metadata, resolution, seed)` draws one image that satisfies a metadata dict exactly, on the
plain background, objects non-overlapping and apart: clauses without a colour get random palette
colours, sizes and places are random, a position clause holds with a clear margin (the object lies
wholly on its side of the target, within ~27 degrees of the axis). It is what the prior trains on
(data/shapes/train_prior.py) and what the tests judge. The prior may see every task's caption; only
the RL prompt files are split.
"""
import argparse
import importlib.util
import itertools
import json
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)
from rewards import (GENEVAL_COLORS, GENEVAL_POSITIONS, GENEVAL_TAGS, geneval_task,  # noqa: E402
                     relative_position)
from rewards import shapes_world  # noqa: E402

# the world's shapes, colours and sizes, from the module its detector and rewards live in
W = shapes_world()
SHAPE_CLASSES, SHAPES_BACKGROUND, SHAPES_PALETTE, SHAPES_SIZE = (W.SHAPE_CLASSES, W.SHAPES_BACKGROUND,
                                                                 W.SHAPES_PALETTE, W.SHAPES_SIZE)
shape_mask = W.shape_mask


def _geneval_prepare():
    # data/geneval/prepare.py is a script, not a package: load it by path for its wording helpers
    spec = importlib.util.spec_from_file_location("geneval_prepare",
                                                  os.path.join(ROOT, "data", "geneval", "prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_gp = _geneval_prepare()
article, plural, NUMBERS, write_jsonl = _gp.article, _gp.plural, _gp.NUMBERS, _gp.write_jsonl


# ----------------------------------------------------------------------------- tasks and prompts
def prompt_of(tag, include):
    """GenEval's template for a tag and its include clauses (in clause order)."""
    a = include[0]
    if tag == "single_object":
        return f"a photo of {article(a['class'])}"
    if tag == "two_object":
        return f"a photo of {article(a['class'])} and {article(include[1]['class'])}"
    if tag == "counting":
        return f"a photo of {NUMBERS[a['count']]} {plural(a['class'])}"
    if tag == "colors":
        return f"a photo of {article(a['color'])} {a['class']}"
    if tag == "position":  # clause 1 is "A", placed relative to clause 0, "B"
        b = include[1]
        return f"a photo of {article(b['class'])} {b['position'][0]} {article(a['class'])}"
    if tag == "color_attr":
        b = include[1]
        return f"a photo of {article(a['color'])} {a['class']} and {article(b['color'])} {b['class']}"
    raise ValueError(f"unknown GenEval tag '{tag}'")


def task(tag, include, exclude=None):
    m = {"tag": tag, "include": include}
    if exclude:
        m["exclude"] = exclude
    m["prompt"] = prompt_of(tag, include)
    return m


def all_tasks():
    """Every task of the six tags, one metadata dict each, in a fixed order."""
    out = [task("single_object", [{"class": a, "count": 1}]) for a in SHAPE_CLASSES]
    out += [task("two_object", [{"class": a, "count": 1}, {"class": b, "count": 1}])
            for a, b in itertools.combinations(SHAPE_CLASSES, 2)]
    out += [task("counting", [{"class": a, "count": n}], [{"class": a, "count": n + 1}])
            for a in SHAPE_CLASSES for n in sorted(NUMBERS)]
    out += [task("colors", [{"class": a, "count": 1, "color": c}])
            for a in SHAPE_CLASSES for c in GENEVAL_COLORS]
    out += [task("position", [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}])
            for a, b in itertools.permutations(SHAPE_CLASSES, 2) for rel in GENEVAL_POSITIONS]
    out += [task("color_attr", [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}])
            for a, b in itertools.combinations(SHAPE_CLASSES, 2)
            for ca, cb in itertools.permutations(GENEVAL_COLORS, 2)]
    return out


def wordings(meta):
    """Every caption of the same task: the clause orders of two_object and color_attr ("a circle and a
    square" = "a square and a circle"); one caption for the other tags."""
    if meta["tag"] in ("two_object", "color_attr"):
        return [prompt_of(meta["tag"], list(inc)) for inc in itertools.permutations(meta["include"])]
    return [meta["prompt"]]


def split_tasks(tasks, seed=0, test_fraction=0.25):
    """(train, test): per tag a seeded shuffle, round(test_fraction * n) tasks (at least 1, at most
    n - 1) to test, the rest to train. Disjoint by rewards.geneval_task."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for tag in GENEVAL_TAGS:
        pool = [m for m in tasks if m["tag"] == tag]
        order = rng.permutation(len(pool))
        n_test = min(max(1, round(test_fraction * len(pool))), len(pool) - 1)
        test += [pool[i] for i in order[:n_test]]
        train += [pool[i] for i in order[n_test:]]
    assert not {geneval_task(m) for m in train} & {geneval_task(m) for m in test}
    return train, test


def per_tag(rows, n):
    """The first n rows of each tag, in file order: a tag-balanced subset (the full files are ~80 %
    color_attr, the one tag with 270 tasks)."""
    return [m for tag in GENEVAL_TAGS for m in [r for r in rows if r["tag"] == tag][:n]]


# ----------------------------------------------------------------------------- the renderer
def _apart(a, b, gap):
    """Boxes (x0, y0, x1, y1) at least `gap` pixels apart on some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _clearly(rel, a, b, gap):
    """A (box a) stands `rel` of B with a clear margin: wholly on its side with a gap, and its centre
    within ~27 degrees of the axis (perpendicular offset at most half the axial one), so GenEval's
    relative_position names exactly this relation."""
    dx = (a[0] + a[2] - b[0] - b[2]) / 2
    dy = (a[1] + a[3] - b[1] - b[3]) / 2
    side = {"left of": a[2] + gap <= b[0], "right of": b[2] + gap <= a[0],
            "above": a[3] + gap <= b[1], "below": b[3] + gap <= a[1]}[rel]
    along, across = (dx, dy) if rel in ("left of", "right of") else (dy, dx)
    return side and abs(across) <= 0.5 * abs(along) and relative_position(a, b) == {rel}


def layout(meta, resolution, rng, tries=200):
    """Objects [(class, colour, box)] satisfying `meta` exactly, in clause order, at `resolution` px."""
    S = resolution
    n_obj = sum(c["count"] for c in meta["include"])
    lo, hi = SHAPES_SIZE
    if n_obj >= 3:  # room for four objects with gaps
        hi = 0.28
    gap, margin = max(2, round(0.05 * S)), max(1, round(0.03 * S))
    for _ in range(1000):  # restart when an object finds no room
        objs, clause_boxes = [], []
        for clause in meta["include"]:
            boxes = []
            for _ in range(clause["count"]):
                for _ in range(tries):
                    s = int(rng.integers(round(lo * S), round(hi * S) + 1))
                    x0, y0 = (int(v) for v in rng.integers(margin, S - margin - s + 1, size=2))
                    box = (x0, y0, x0 + s, y0 + s)
                    if not all(_apart(box, o[2], gap) for o in objs):
                        continue
                    if "position" in clause:
                        rel, target = clause["position"]
                        if not all(_clearly(rel, box, t, gap) for t in clause_boxes[target]):
                            continue
                    break
                else:
                    break
                colour = clause.get("color") or GENEVAL_COLORS[int(rng.integers(len(GENEVAL_COLORS)))]
                objs.append((clause["class"], colour, box))
                boxes.append(box)
            if len(boxes) < clause["count"]:
                break
            clause_boxes.append(boxes)
        else:
            return objs
    raise RuntimeError(f"no layout found for {meta['prompt']!r} at {resolution} px")


def draw(objs, resolution):
    """uint8 [H, W, 3]: the objects over the plain background."""
    img = np.empty((resolution, resolution, 3), np.uint8)
    img[:] = SHAPES_BACKGROUND
    for cls, colour, (x0, y0, x1, y1) in objs:
        img[y0:y1, x0:x1][shape_mask(cls, x1 - x0, y1 - y0)] = SHAPES_PALETTE[colour]
    return img


def render(meta, resolution=64, seed=0):
    """One image (uint8 [H, W, 3]) that satisfies `meta` exactly; the same seed gives the same image."""
    if resolution < 64:
        raise SystemExit(f"resolution {resolution} is below 64 px: the shapes world needs at least 64")
    return draw(layout(meta, resolution, np.random.default_rng(seed)), resolution)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test_fraction", type=float, default=0.25,
                   help="share of each tag's tasks in the test file")
    p.add_argument("--small", type=int, default=6,
                   help="tasks per tag in the balanced {train,test}_small.jsonl")
    p.add_argument("--out_dir", default=here)
    p.add_argument("--preview", default=None,
                   help="also write a PNG grid of the test prompts rendered at 64 px")
    a = p.parse_args(argv)
    if not 0 < a.test_fraction < 1:
        raise SystemExit(f"--test_fraction={a.test_fraction} must lie strictly between 0 and 1")
    train, test = split_tasks(all_tasks(), a.seed, a.test_fraction)
    os.makedirs(a.out_dir, exist_ok=True)
    for name, rows in (("train_metadata.jsonl", train), ("test_metadata.jsonl", test),
                       ("train_small.jsonl", per_tag(train, a.small)),
                       ("test_small.jsonl", per_tag(test, a.small)),
                       ("test_single_object.jsonl", [r for r in test if r["tag"] == "single_object"]),
                       # the variance study's worlds (docs/variance_study.md): tasks this prior nearly solves,
                       # and the colour tasks of the colour_share reward
                       ("train_easy.jsonl", [r for r in train if r["tag"] in ("colors", "single_object")]),
                       ("test_easy.jsonl", [r for r in test if r["tag"] in ("colors", "single_object")]),
                       ("train_colors.jsonl", [r for r in train if r["tag"] == "colors"]),
                       ("test_colors.jsonl", [r for r in test if r["tag"] == "colors"])):
        write_jsonl(os.path.join(a.out_dir, name), rows)
        counts = {t: sum(r["tag"] == t for r in rows) for t in GENEVAL_TAGS}
        print(f"{os.path.join(a.out_dir, name)}: {len(rows)} prompts {counts}")
    if a.preview:
        from PIL import Image
        imgs = [render(m, 64, seed=i) for i, m in enumerate(test)]
        ncol = 12
        grid = np.full((-(-len(imgs) // ncol) * 66, ncol * 66, 3), 255, np.uint8)
        for i, im in enumerate(imgs):
            r, c = divmod(i, ncol)
            grid[r * 66:r * 66 + 64, c * 66:c * 66 + 64] = im
        os.makedirs(os.path.dirname(os.path.abspath(a.preview)), exist_ok=True)
        Image.fromarray(grid).save(a.preview)
        print(f"{a.preview}: {len(imgs)} test prompts rendered")


if __name__ == "__main__":
    main()
