"""
GenEval prompt metadata for training, and a GenEval-style held-out split, generated deterministically
from a seed:

    python data/geneval/prepare.py                      # -> data/geneval/{train,test}_metadata.jsonl
    python data/geneval/prepare.py --n_train=200 --n_test=20 --seed=1
    python data/geneval/prepare.py --exclude=more_metadata.jsonl     # keep these tasks out as well
    # the bundled tiny files (tests check they match this command):
    python data/geneval/prepare.py --n_train=4 --n_test=2 \
        --train_file=tiny_train.jsonl --test_file=tiny_test.jsonl

The benchmark itself is GenEval's own 553 prompts, data/geneval/evaluation_metadata.jsonl (shipped
byte for byte and read here through its sha256 check; source and licence in data/geneval/README.md):
evaluation samples that file. Nothing generated here shares a *task* with it, always (no flag):
tasks are compared by rewards.geneval_task (tag, include and exclude clauses; the two objects of "a
cat and a dog" in either order), not by prompt text, since our English plurals ("two sheep") are not
GenEval's ("two sheeps"). Every one of the 80 single-object tasks is a benchmark prompt, so the splits
hold no single_object prompts; the other tags lose only the benchmark's few (counting keeps 160 of
240, colors 696 of 790). main() checks the result again before writing.

Six tags, as GenEval's benchmark: single_object, two_object, counting (2-4, with an exclude clause
for one more), colors, position, color_attr, over GenEval's 80 COCO object names, its 10 colours and
4 relations. No colour is ever asked of "person" (as GenEval). Each line is one JSON object
{"tag", "include": [{"class", "count", "color"?, "position"?: [relation, clause_index]}],
"exclude"?, "prompt"}, the format of GenEval's evaluation_metadata.jsonl and of rewards.geneval_rules.

Per tag, tasks not yet taken are drawn with the seed; the first n_test go to the test set, the next
n_train to the train set, so the two are disjoint by task as well. The test split is a quick
GenEval-style held-out set for monitoring; report GenEval numbers on the official file.
"""
import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from rewards import (GENEVAL_BENCHMARK, GENEVAL_CLASSES, GENEVAL_COLORS, GENEVAL_POSITIONS,  # noqa: E402
                     GENEVAL_TAGS, geneval_benchmark, geneval_task)

NUMBERS = {2: "two", 3: "three", 4: "four"}
IRREGULAR = {"person": "people", "sheep": "sheep", "skis": "skis", "scissors": "scissors", "knife": "knives",
             "computer mouse": "computer mice", "broccoli": "broccoli"}


def article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def plural(name):
    if name in IRREGULAR:
        return IRREGULAR[name]
    if name.endswith(("s", "sh", "ch", "x")):
        return name + "es"
    return name + "s"


COLORABLE = [c for c in GENEVAL_CLASSES if c != "person"]


def sample(tag, rng):
    """One random metadata dict of `tag`."""
    if tag == "single_object":
        a = rng.choice(GENEVAL_CLASSES)
        return dict(tag=tag, include=[{"class": a, "count": 1}], prompt=f"a photo of {article(a)}")
    if tag == "two_object":
        a, b = rng.sample(GENEVAL_CLASSES, 2)
        return dict(tag=tag, include=[{"class": a, "count": 1}, {"class": b, "count": 1}],
                    prompt=f"a photo of {article(a)} and {article(b)}")
    if tag == "counting":
        a, n = rng.choice(GENEVAL_CLASSES), rng.choice(sorted(NUMBERS))
        return dict(tag=tag, include=[{"class": a, "count": n}], exclude=[{"class": a, "count": n + 1}],
                    prompt=f"a photo of {NUMBERS[n]} {plural(a)}")
    if tag == "colors":
        a, c = rng.choice(COLORABLE), rng.choice(GENEVAL_COLORS)
        return dict(tag=tag, include=[{"class": a, "count": 1, "color": c}],
                    prompt=f"a photo of {article(c)} {a}")
    if tag == "position":
        a, b = rng.sample(GENEVAL_CLASSES, 2)  # "a photo of A <rel> B": clause 0 is B, the target
        rel = rng.choice(GENEVAL_POSITIONS)
        return dict(tag=tag,
                    include=[{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                    prompt=f"a photo of {article(a)} {rel} {article(b)}")
    if tag == "color_attr":
        (a, b), (ca, cb) = rng.sample(COLORABLE, 2), rng.sample(GENEVAL_COLORS, 2)
        return dict(tag=tag,
                    include=[{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                    prompt=f"a photo of {article(ca)} {a} and {article(cb)} {b}")
    raise ValueError(f"unknown GenEval tag '{tag}'")


def shared_tasks(rows, others):
    """The rows (metadata dicts) whose task (rewards.geneval_task) is also one of `others`' tasks."""
    tasks = {geneval_task(m) for m in others}
    return [m for m in rows if geneval_task(m) in tasks]


def make_splits(seed=0, n_train=1000, n_test=100, exclude=None):
    """(train, test) lists of metadata dicts, disjoint by task; no task of `exclude` appears in either.
    `exclude` holds metadata dicts (compared by task; a plain string is a prompt text, kept out by text);
    None, the default, is GenEval's benchmark prompts, so that no caller leaks them by forgetting; ()
    keeps nothing out. A tag stops when 2000 draws in a row hit taken tasks (its pool has run dry)."""
    exclude = geneval_benchmark() if exclude is None else exclude
    rng = random.Random(seed)
    taken = {geneval_task(m) for m in exclude if not isinstance(m, str)}
    taken_text = {m for m in exclude if isinstance(m, str)}
    train, test = [], []
    for tag in GENEVAL_TAGS:
        # small pools (80 single-object tasks, all in the benchmark; 240 counting tasks, 160 outside it):
        # the test split takes at most 20, so that most of the pool stays for training
        n_te = min(n_test, 20) if tag in ("single_object", "counting") else n_test
        drawn, misses = [], 0
        while len(drawn) < n_te + n_train and misses < 2000:  # stop when the tag's pool runs dry
            m = sample(tag, rng)
            task = geneval_task(m)
            if task in taken or m["prompt"] in taken_text:
                misses += 1
                continue
            taken.add(task)
            drawn.append(m)
            misses = 0
        test += drawn[:n_te]
        train += drawn[n_te:]
    return train, test


def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)  # never leave a half-written file


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train", type=int, default=1000,
                   help="train prompts per tag (fewer where the tag runs out)")
    p.add_argument("--n_test", type=int, default=100,
                   help="test prompts per tag (single_object, counting: at most 20)")
    p.add_argument("--exclude", default=None,
                   help="a metadata .jsonl whose tasks must not be generated, on top of "
                        "GenEval's benchmark prompts (always kept out)")
    p.add_argument("--out_dir", default=here)
    p.add_argument("--train_file", default="train_metadata.jsonl")
    p.add_argument("--test_file", default="test_metadata.jsonl")
    a = p.parse_args(argv)
    benchmark = geneval_benchmark()  # sha256-checked
    exclude = list(benchmark)
    if a.exclude:
        if not os.path.isfile(a.exclude):
            raise SystemExit(f"--exclude file '{a.exclude}' not found: pass a GenEval-style metadata .jsonl")
        with open(a.exclude, encoding="utf-8") as f:
            exclude += [json.loads(ln) for ln in f if ln.strip()]
    train, test = make_splits(a.seed, a.n_train, a.n_test, exclude)
    # checked again on the result, so no change to the generator can leak the benchmark into training
    leaks = shared_tasks(train + test, exclude) + shared_tasks(train, test)
    if leaks:
        raise SystemExit(f"refusing to write: {len(leaks)} generated prompts share a task with the "
                         f"benchmark, the --exclude file or the other split (e.g. '{leaks[0]['prompt']}'); "
                         f"nothing was written")
    print(f"kept out: every task of the {len(benchmark)} GenEval benchmark prompts ({GENEVAL_BENCHMARK})"
          + (f" and of {a.exclude}" if a.exclude else ""))
    os.makedirs(a.out_dir, exist_ok=True)
    for name, rows in zip((a.train_file, a.test_file), (train, test)):
        write_jsonl(os.path.join(a.out_dir, name), rows)
        counts = {t: sum(r["tag"] == t for r in rows) for t in GENEVAL_TAGS}
        print(f"{os.path.join(a.out_dir, name)}: {len(rows)} prompts {counts}")


if __name__ == "__main__":
    main()
