"""
Compare Phase II runs from their log.jsonl: the intra-group reward std (the learning signal whose
collapse E²PO fights) and the held-out reward of the EMA weights, against the optimizer step, as one
PNG (mean over seeds, shaded min..max) and one markdown table.

    # every run of an experiment folder laid out as ROOT/<label>/seed<N>/log.jsonl
    python compare_runs.py --runs=out/shapes_exp
    # or runs named one by one (label = the folder name, or its parent's for .../seed<N>)
    python compare_runs.py --runs=out/a,out/b --plot=out/a_vs_b.png

matplotlib is optional: without it the table still prints. The table's columns, per label, mean ± std
over seeds: the group std at the first and the last epoch and its mean over all epochs (the area
under the curve divided by the length), the share of collapsed groups (std < 1e-3) at the last epoch,
the held-out reward before training, at the end and its mean over the evaluations after training
started; and, for runs whose folder holds final/diversity.json (eval_diversity.py's GenEval summary of
sample.py's images of the final EMA weights, as data/shapes/experiment.sh writes it), the final GenEval
score (mean of the tag accuracies, strict) and mean partial credit on those images. A folder
prior_final/ next to the runs gives the same two figures for the untrained model, printed below the table.
"""
import glob
import json
import math
import os
import re
import sys

# -----------------------------------------------------------------------------
# config (overridden by configurator.py: python compare_runs.py --key=value)
runs = "out/shapes_exp"  # comma-separated: experiment folders (<label>/seed<N>/log.jsonl) or run folders
plot = None  # PNG path; None = compare.png in the first folder of `runs`
title = ""  # figure title
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))]


def read_log(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(ln) for ln in f if ln.strip()]


def find_runs(roots):
    """{label: [run records, one list per seed]} from a list of folders. A folder with a log.jsonl is one
    run, labelled by its name (its parent's, for a folder named seed<N>); any other folder is searched for
    <label>/seed<N>/log.jsonl and <label>/log.jsonl."""
    found = {}
    for root in roots:
        if os.path.isfile(os.path.join(root, "log.jsonl")):
            paths = [os.path.join(root, "log.jsonl")]
        else:
            paths = sorted(glob.glob(os.path.join(glob.escape(root), "*", "seed*", "log.jsonl")) +
                           glob.glob(os.path.join(glob.escape(root), "*", "log.jsonl")))
        if not paths:
            raise SystemExit(f"no log.jsonl in or under '{root}': "
                             f"pass run folders or a folder of <label>/seed<N>/ runs")
        for p in paths:
            d = os.path.dirname(os.path.abspath(p))
            label = (os.path.basename(os.path.dirname(d)) if re.fullmatch(r"seed\d+", os.path.basename(d))
                     else os.path.basename(d))
            found.setdefault(label, []).append(read_log(p) + final_records(d))
    return found


def final_records(folder, sub="final"):
    """[{"final_geneval", "final_credit"}] from FOLDER/sub/diversity.json (eval_diversity.py's output),
    or [] when there is none."""
    path = os.path.join(folder, sub, "diversity.json")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        ge = json.load(f)["groups"]["all"].get("geneval")
    return [{"final_geneval": ge["overall"], "final_credit": ge["mean_score"]}] if ge else []


def curve(records, key):
    """(steps, values) of `key` over a run's records, in step order."""
    pts = sorted((r["step"], r[key]) for r in records if key in r and r[key] is not None)
    return [s for s, _ in pts], [v for _, v in pts]


def mean_std(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def run_figures(records):
    """The table's figures of one run."""
    train = [r for r in records if "group_std" in r]
    _, std = curve(train, "group_std")
    steps, ev = curve(records, "eval_reward")
    start = [v for s, v in zip(steps, ev) if s == 0]
    after = [v for s, v in zip(steps, ev) if s > 0]
    final = [r for r in records if "final_geneval" in r]
    return {"steps": train[-1]["step"] if train else 0,
            "std_first": std[0] if std else None, "std_last": std[-1] if std else None,
            "std_mean": sum(std) / len(std) if std else None,
            "collapsed_last": train[-1]["collapsed_groups"] if train else None,
            "eval_start": start[0] if start else None, "eval_last": after[-1] if after else None,
            "eval_mean": sum(after) / len(after) if after else None,
            "final_geneval": final[-1]["final_geneval"] if final else None,
            "final_credit": final[-1]["final_credit"] if final else None}


COLUMNS = (("std_first", "group std, first"), ("std_last", "group std, last"),
           ("std_mean", "group std, mean"), ("collapsed_last", "collapsed, last"),
           ("eval_start", "held-out, start"), ("eval_last", "held-out, last"),
           ("eval_mean", "held-out, mean"), ("final_geneval", "final GenEval"),
           ("final_credit", "final credit"))


def table(groups):
    """A markdown table: one row per label, mean ± std over its seeds."""
    figs_of = {label: [run_figures(r) for r in runs_] for label, runs_ in groups.items()}
    # the final-evaluation columns only when some run has one
    cols = [(k, n) for k, n in COLUMNS
            if not k.startswith("final") or any(f[k] is not None for fs in figs_of.values() for f in fs)]
    head = "| run | seeds | steps | " + " | ".join(name for _, name in cols) + " |"
    lines = [head, "|" + "---|" * (3 + len(cols))]
    for label, runs_ in groups.items():
        figs = figs_of[label]
        cells = []
        for key, _ in cols:
            m, s = mean_std([f[key] for f in figs])
            cells.append("n/a" if m is None else f"{m:.4f} ± {s:.4f}")
        lines.append(f"| {label} | {len(runs_)} | {max(f['steps'] for f in figs)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw(groups, path, title=""):
    """Two panels against the optimizer step: the group std (log scale) and the held-out reward; one line
    per label (mean over seeds), shaded from the lowest to the highest seed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot, the table above is the result")
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, runs_ in groups.items():
        for ax, key in zip(axes, ("group_std", "eval_reward")):
            curves = [dict(zip(*curve(r, key))) for r in runs_]
            steps = sorted(set().union(*curves))
            if not steps:
                continue
            vals = [[c[s] for c in curves if s in c] for s in steps]
            mean = [sum(v) / len(v) for v in vals]
            line, = ax.plot(steps, mean, label=f"{label} ({len(runs_)})",
                            marker="o" if key == "eval_reward" else None, ms=3)
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals],
                            color=line.get_color(), alpha=0.15)
    axes[0].set_yscale("log")
    axes[0].set_title("intra-group reward std (training samples)")
    axes[1].set_title("held-out reward (EMA weights)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    from configurator import configure
    configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    roots = [p.strip() for p in runs.split(",") if p.strip()]
    if not roots:
        raise SystemExit("--runs names no folder: pass run folders or experiment folders, comma-separated")
    groups = find_runs(roots)
    print(table(groups))
    for root in roots:
        for r in final_records(root, "prior_final"):
            print(f"\nthe prior, untrained ({root}/prior_final): final GenEval {r['final_geneval']:.4f}, "
                  f"final credit {r['final_credit']:.4f}")
    path = plot or os.path.join(roots[0], "compare.png")
    if draw(groups, path, title):
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
