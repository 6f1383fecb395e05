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
block = 1  # the table's "first" and "last" figures are means over this many steps
window = 1  # the plot's per-step curves are running means over this many steps
# reference labels, comma-separated: the table adds each label's figures minus those of the reference with the
# same samples per prompt (N = G x K), paired by seed (and by image for the final reward)
ref = None
# a planned contrast of final rewards, "label:other,other": the label's final reward minus the mean of the
# others', paired by seed and image (e.g. e2po_4x4:nft_g16,all_in_k: a balanced split against both extremes)
contrast = None
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))]


def read_log(path):
    """The records of a run's log.jsonl; a broken line is named (file and line), a last line cut short (a run
    still writing it, or killed) left out with a note."""
    from sample import read_jsonl
    rows = read_jsonl(path, "fix or delete that line", torn_tail=True)
    for n, r in rows:
        if not isinstance(r, dict):
            raise SystemExit(f"{path} line {n} is not a JSON object: fix or delete that line")
    return [r for _, r in rows]


def read_json(path):
    """A JSON file of a run folder (diversity.json, final_eval.json, probe.json), named when it is broken."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as err:
            raise SystemExit(f"{path} is not valid JSON ({err}): rewrite it (rerun what wrote it)")


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
            runs_ = found.setdefault(label, [])
            final = final_records(d) or [{"run": os.path.basename(d)}]
            final[0].update(group_shape(d))
            runs_.append(read_log(p) + final)
    return found


def group_shape(folder):
    """{"G", "K", "N" = G x K} of a run, from its config.json ({} without one): comparisons are made at
    equal N, and the k = 0 / k > 0 split of a group holds G and (K - 1) G samples."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    G, K = cfg.get("G", 1), cfg.get("K", 1)
    return {"G": G, "K": K, "N": G * K}


def final_records(folder, sub="final"):
    """The final evaluation of a run folder, as one record: {"final_geneval", "final_credit"} from
    FOLDER/sub/diversity.json (eval_diversity.py's GenEval summary), and {"final_reward" (mean),
    "final_rewards" (per image), "final_pixel_dist", "final_sdi", "final_pvs"} from FOLDER/final_eval.json
    (data/shapes/final_eval.py), with the perturbation probe of FOLDER/probe.json (final_eval.py
    --perturbations) as "probe"; [] when there is none. "run" names the folder (seed<N> pairs runs)."""
    rec = {}
    path = os.path.join(folder, sub, "diversity.json")
    if os.path.isfile(path):
        ge = read_json(path)["groups"]["all"].get("geneval")
        if ge:
            rec.update(final_geneval=ge["overall"], final_credit=ge["mean_score"])
    path = os.path.join(folder, "final_eval.json") if sub == "final" else os.path.join(folder, sub)
    if os.path.isfile(path):
        fe = read_json(path)
        rec.update(final_reward=fe["reward"], final_rewards=fe["rewards"], final_pixel_dist=fe["pixel_dist"],
                   final_sdi=fe["sdi"], final_pvs=fe["pvs"])
    path = os.path.join(folder, "probe.json" if sub == "final" else sub.replace("final_eval", "probe"))
    if os.path.isfile(path):
        rec["probe"] = read_json(path)["probe"]
    return [dict(rec, run=os.path.basename(folder))] if rec else []


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


def block_mean(values, block, last=False):
    """Mean of the first (or last) `block` values: the first/last figures of a noisy per-step curve."""
    v = values[-block:] if last else values[:block]
    return sum(v) / len(v) if v else None


def with_rel(records):
    """The records with group_std_rel (group std / (the step's std + 1e-4), the scale the advantages are
    normalised by) computed from group_std and reward_std where a log from before it was logged lacks it."""
    return [dict(r, group_std_rel=r["group_std"] / (r["reward_std"] + 1e-4))
            if "group_std" in r and "reward_std" in r and "group_std_rel" not in r else r for r in records]


def run_figures(records, block=1):
    """The table's figures of one run; "first" and "last" are means over `block` steps."""
    train = with_rel([r for r in records if "group_std" in r])
    _, std = curve(train, "group_std")
    _, rel = curve(train, "group_std_rel")
    _, coll = curve(train, "collapsed_groups")
    steps, ev = curve(records, "eval_reward")
    start = [v for s, v in zip(steps, ev) if s == 0]
    after = [v for s, v in zip(steps, ev) if s > 0]
    final = ([r for r in records if "run" in r] or [{}])[-1]
    figs = {"steps": train[-1]["step"] if train else 0,
            "std_first": block_mean(std, block), "std_last": block_mean(std, block, last=True),
            "std_mean": sum(std) / len(std) if std else None,
            "rel_first": block_mean(rel, block), "rel_last": block_mean(rel, block, last=True),
            "collapsed_last": block_mean(coll, block, last=True),
            "eval_start": start[0] if start else None, "eval_last": after[-1] if after else None,
            "eval_mean": sum(after) / len(after) if after else None}
    for key in MECHANISM:
        _, v = curve(train, key)
        figs[f"{key}_first"], figs[f"{key}_last"] = block_mean(v, block), block_mean(v, block, last=True)
    figs.update({k: v for k, v in final.items() if k.startswith("final")})
    figs.update({f"probe_{k}": v for k, v in final.get("probe", {}).items() if k in PROBE})
    figs.update(run=final.get("run"), N=final.get("N"), G=final.get("G"), K=final.get("K"))
    return figs


COLUMNS = (("std_first", "group std, first"), ("std_last", "group std, last"),
           ("std_mean", "group std, mean"), ("rel_first", "group std / step std, first"),
           ("rel_last", "group std / step std, last"), ("collapsed_last", "collapsed, last"),
           ("eval_start", "held-out, start"), ("eval_last", "held-out, last"),
           ("eval_mean", "held-out, mean"), ("final_geneval", "final GenEval"),
           ("final_credit", "final credit"), ("final_reward", "final reward"),
           ("final_pixel_dist", "final pixel dist"), ("final_sdi", "final SDI"), ("final_pvs", "final PVS"))
# E²PO's variance by where it comes from (phase2_align.condition_stats, paired_distance): first and last block
MECHANISM = ("reward_k0", "reward_kp", "group_std_k0", "group_std_kp", "dist_kp")
# the final model's answer to its own perturbations (final_eval.py --perturbations: probe.json)
PROBE = ("reward_k0", "reward_kp", "pixel_dist_kp", "changed_kp")


def paired_difference(figs, ref_figs, key="final_reward"):
    """A figure of a label minus that of the reference label, paired by seed (runs matched by their folder
    name, seed<N>): the final reward as the mean over images of the per-image difference (the same noises
    and prompts), any other figure as the difference of the two runs' values; then the mean over seeds ± its
    standard error (std over seeds, ddof 1, / sqrt(seeds)) and the two-sided p-value of the paired t-test
    (seeds - 1 degrees of freedom: 3 seeds need t > 4.3 for p < 0.05). (None, None, None) without pairs."""
    if key == "final_reward":
        ref = {f["run"]: f["final_rewards"] for f in ref_figs if f.get("final_rewards")}
        d = [sum(a - b for a, b in zip(f["final_rewards"], ref[f["run"]])) / len(f["final_rewards"])
             for f in figs if f.get("final_rewards") and f["run"] in ref]
    else:
        ref = {f["run"]: f[key] for f in ref_figs if f.get(key) is not None}
        d = [f[key] - ref[f["run"]] for f in figs if f.get(key) is not None and f["run"] in ref]
    if not d:
        return None, None, None
    m = sum(d) / len(d)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
    return m, se, paired_p(m, se, len(d))


def paired_p(mean, se, n):
    """Two-sided p-value of a paired t-test from the mean difference, its standard error and n pairs."""
    if n < 2 or not se > 0:
        return float("nan") if n < 2 else (0.0 if mean else 1.0)
    from scipy.stats import t
    return float(2 * t.sf(abs(mean / se), n - 1))


def contrast_of(groups, spec):
    """A planned contrast of final rewards, spec "label:other,other": per seed (runs matched by folder name),
    the mean over the images of R_label - mean_o R_o (every run scores the same images), then the mean ± its
    standard error over seeds and the two-sided paired t-test. Returns (mean, se, p, seeds)."""
    label, _, others = spec.partition(":")
    others = [o.strip() for o in others.split(",") if o.strip()]
    missing = [n for n in [label, *others] if n not in groups]
    if missing or not others:
        raise SystemExit(f"--contrast={spec}: write label:other,other with labels of these runs "
                         f"({', '.join(groups)}); not found: {', '.join(missing) or 'the others'}")
    by = {n: {f["run"]: f["final_rewards"] for f in map(run_figures, groups[n]) if f.get("final_rewards")}
          for n in [label, *others]}
    seeds = sorted(set.intersection(*(set(v) for v in by.values())))
    d = []
    for sd in seeds:
        mine, rest = by[label][sd], [by[o][sd] for o in others]
        d.append(sum(a - sum(r[i] for r in rest) / len(rest) for i, a in enumerate(mine)) / len(mine))
    if not d:
        return None, None, None, 0
    m = sum(d) / len(d)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
    return m, se, paired_p(m, se, len(d)), len(d)


def _cell(m, s, sep="±", p=None):
    if m is None:
        return "n/a"
    if p is None or not math.isfinite(p):
        return f"{m:.4f} {sep} {s:.4f}"
    return f"{m:.4f} {sep} {s:.4f} (p {'< 0.001' if p < 1e-3 else f'{p:.2g}'})"


def reference_of(label, figs_of, refs):
    """The reference label a label is compared with: among `refs`, the one whose runs draw the same number
    of samples per prompt (N = G x K, from the runs' config.json), so that E²PO 4 x 12 meets G = 48, not
    G = 16; the first of `refs` (marked "†" in the table) when none does. None for a reference itself."""
    if label in refs:
        return None
    n = {f.get("N") for f in figs_of[label]}
    same = [r for r in refs if r in figs_of and {f.get("N") for f in figs_of[r]} == n and None not in n]
    return same[0] if same else refs[0]


def table(groups, block=1, ref=None):
    """A markdown table: one row per label, mean ± std over its seeds; with `ref` (a label, or several,
    comma-separated) columns of the paired differences from the reference at the same N (`reference_of`;
    mean ± standard error over seeds, with the paired t-test's p) of the last block's group std and
    normalised std, the final reward and the final diversity (is a gain in diversity bought with reward, or
    beside it?). Below the table: how many comparisons its p-values make."""
    figs_of = {label: [run_figures(r, block) for r in runs_] for label, runs_ in groups.items()}
    refs = [r.strip() for r in (ref or "").split(",") if r.strip() in figs_of]
    # the final-evaluation columns only when some run has one
    cols = [(k, n) for k, n in COLUMNS
            if not k.startswith("final") or any(f.get(k) is not None for fs in figs_of.values() for f in fs)]
    # with a reference label: each of these minus the reference's, paired by seed
    paired = [k for k in ("std_last", "rel_last", "final_reward", "final_pixel_dist", "final_sdi",
                          "final_pvs")
              if refs and any(f.get(k) is not None for r in refs for f in figs_of[r])]
    name = " or ".join(refs)
    head = ("| run | seeds | N | steps | " + " | ".join(n for _, n in cols)
            + (" | reference" if paired else "")
            + "".join(f" | {dict(COLUMNS)[k]} − {name} (paired, ± SE)" for k in paired) + " |")
    lines = [head, "|" + "---|" * (4 + len(cols) + len(paired) + bool(paired))]
    n_tests = 0
    for label, runs_ in groups.items():
        figs = figs_of[label]
        Ns = sorted({f["N"] for f in figs if f.get("N")})
        cells = [_cell(*mean_std([f.get(key) for f in figs])) for key, _ in cols]
        if paired:
            r = reference_of(label, figs_of, refs)
            mark = "" if r is None or {f.get("N") for f in figs_of[r]} == {f.get("N") for f in figs} else " †"
            cells.append("" if r is None else r + mark)
            diffs = [paired_difference(figs, figs_of[r], k) if r else (None, None, None) for k in paired]
            n_tests += sum(d[0] is not None for d in diffs)
            cells += ["" if r is None else _cell(m, se, p=p) for m, se, p in diffs]
        steps = max(f["steps"] for f in figs)
        lines.append(f"| {label} | {len(runs_)} | {','.join(map(str, Ns))} | {steps} | "
                     + " | ".join(cells) + " |")
    if paired:
        lines.append(f"\n{n_tests} paired comparisons in this table (p-values uncorrected; † = against a "
                     "reference of another N)")
    return "\n".join(lines)


def binomial_std(p, n):
    """The expected population std (ddof 0) of n draws of a 0/1 reward with mean p:
        E[sqrt(p^(1 - p^))], p^ = X / n, X ~ Binomial(n, p).
    It grows with n (0.15 at n = 4 against 0.24 at n = 12 for p = 0.9), so a group's k = 0 part (G samples)
    and its k > 0 part ((K - 1) G) must be compared against this, or at equal n, not with each other."""
    return sum(math.comb(n, x) * p ** x * (1 - p) ** (n - x) * math.sqrt(x / n * (1 - x / n))
               for x in range(n + 1))


def mechanism_table(groups, block=1):
    """For the runs that log it (K > 1): the reward and the within-group std of the k = 0 and of the k > 0
    samples, and (shared noise) the latent distance of a perturbed sample from its noise's k = 0 sample, in
    the first and the last `block` steps; mean ± std over seeds. "" when no run logs them."""
    figs_of = {label: [run_figures(r, block) for r in runs_] for label, runs_ in groups.items()}
    figs_of = {k: v for k, v in figs_of.items() if any(f["reward_kp_first"] is not None for f in v)}
    if not figs_of:
        return ""
    keys = [k for k in MECHANISM if any(f[f"{k}_first"] is not None for v in figs_of.values() for f in v)]
    head = "| run | " + " | ".join(f"{k}, first | {k}, last" for k in keys) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(keys))]
    for label, figs in figs_of.items():
        cells = [_cell(*mean_std([f[f"{k}_{end}"] for f in figs])) for k in keys for end in ("first", "last")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    # what sampling alone gives each part at its size, for a 0/1 reward at the logged means (in [0, 1])
    rows = []
    for label, figs in figs_of.items():
        ok = [f for f in figs if f.get("G") and all(0 <= (f[f"reward_{k}_{e}"] or -1) <= 1
                                                     for k in ("k0", "kp") for e in ("first", "last"))]
        if ok:
            n = lambda f, k: f["G"] * (1 if k == "k0" else f["K"] - 1)  # the part's samples in a group
            cells = [_cell(*mean_std([binomial_std(f[f"reward_{k}_{e}"], n(f, k)) for f in ok]))
                     for k in ("k0", "kp") for e in ("first", "last")]
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if rows:
        lines += ["", "The same parts' std expected from sampling alone (a 0/1 reward at the logged mean, "
                  "n = G for k = 0 and (K − 1) G for k > 0: `binomial_std`):", "",
                  "| run | group_std_k0 expected, first | last | group_std_kp expected, first | last |",
                  "|---|---|---|---|---|", *rows]
    return "\n".join(lines)


def probe_table(groups, roots):
    """The perturbation probe of the final EMA weights (runs with a probe.json; the untrained prior from
    ROOT/prior_probe.json): reward on C^orig and on the perturbations, their difference, how far a perturbed
    image lies from its noise's C^orig image and the share of those pairs whose reward differs; mean ± std
    over seeds. "" when no run has one."""
    rows = {}
    for root in roots:
        for r in final_records(root, "prior_final_eval.json"):
            if "probe" in r:
                rows["prior (untrained)"] = [{f"probe_{k}": r["probe"][k] for k in PROBE}]
    for label, runs_ in groups.items():
        figs = [f for f in (run_figures(r) for r in runs_) if f.get("probe_reward_k0") is not None]
        if figs:
            rows[label] = figs
    if not rows:
        return ""
    lines = ["| model | seeds | reward, k = 0 | reward, k > 0 | k > 0 − k = 0 | pixel distance to k = 0 | "
             "reward changed |", "|---|---|---|---|---|---|---|"]
    for label, figs in rows.items():
        gap = [f["probe_reward_kp"] - f["probe_reward_k0"] for f in figs]
        cells = [_cell(*mean_std([f[f"probe_{k}"] for f in figs])) for k in PROBE[:2]]
        cells += [_cell(*mean_std(gap))]
        cells += [_cell(*mean_std([f[f"probe_{k}"] for f in figs])) for k in PROBE[2:]]
        lines.append(f"| {label} | {len(figs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def smooth(values, window):
    """Running mean over the last `window` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def draw(groups, path, title="", window=1):
    """Panels against the optimizer step, as the paper's Fig. 2: the intra-group reward std (log scale) and
    the share of collapsed groups, both as running means over `window` steps, the held-out reward, and (when
    runs log it) the reward of the perturbed samples minus that of the k = 0 samples; one line per label
    (mean over seeds), shaded from the lowest to the highest seed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot, the table above is the result")
        return False
    panels = [("group_std", f"intra-group reward std (running mean of {window})"),
              ("group_std_rel", f"group std / the step's std, what the advantages see (running mean of "
                                f"{window})"),
              ("collapsed_groups", f"share of collapsed groups, std < 1e-3 (running mean of {window})"),
              ("eval_reward", "held-out reward (EMA weights)")]
    if any("reward_kp" in r for runs_ in groups.values() for recs in runs_ for r in recs):
        panels.append(("kp_minus_k0", f"reward of k > 0 minus k = 0 samples (running mean of {window})"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4))
    for label, runs_ in groups.items():
        color = None
        for ax, (key, _) in zip(axes, panels):
            if key == "kp_minus_k0":
                runs_k = [[dict(r, kp_minus_k0=r["reward_kp"] - r["reward_k0"]) for r in recs
                           if "reward_kp" in r] for recs in runs_]
            else:
                runs_k = runs_
            curves = []
            for recs in runs_k:
                st, v = curve(with_rel(recs), key)
                curves.append(dict(zip(st, v if key == "eval_reward" else smooth(v, window))))
            steps = sorted(set().union(*curves))
            if not steps:
                continue
            vals = [[c[s] for c in curves if s in c] for s in steps]
            mean = [sum(v) / len(v) for v in vals]
            line, = ax.plot(steps, mean, label=f"{label} ({len(runs_)})", color=color,
                            marker="o" if key == "eval_reward" else None, ms=3)
            color = line.get_color()
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.15)
    axes[0].set_yscale("log")
    for ax, (_, name) in zip(axes, panels):
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[3].legend(fontsize=8)
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
    if block < 1 or window < 1:
        raise SystemExit(f"--block={block} and --window={window} must be at least 1")
    path = plot or os.path.join(roots[0], "compare.png")
    if not path.lower().endswith((".png", ".pdf", ".svg")):
        raise SystemExit(f"--plot={path} must name a .png, .pdf or .svg file (what it would write)")
    from sample import check_writable
    check_writable(path, "plot", kind="file")
    groups = find_runs(roots)
    unknown = [r for r in (ref or "").split(",") if r.strip() and r.strip() not in groups]
    if unknown:
        raise SystemExit(f"--ref={ref}: {unknown[0].strip()} is not a label of these runs "
                         f"({', '.join(groups)})")
    print(table(groups, block, ref))
    if contrast:
        m, se, p, n = contrast_of(groups, contrast)
        print(f"\ncontrast {contrast} (final reward, paired by seed and image): "
              + ("no seed has every run's final evaluation" if m is None else
                 f"{_cell(m, se, p=p)} over {n} seeds (t = {m / se:.2f}, {n - 1} degrees of freedom)"
                 if se else f"{m:.4f} over {n} seed(s)"))
    mech = mechanism_table(groups, block)
    if mech:
        print("\n" + mech)
    probes = probe_table(groups, roots)
    if probes:
        print("\n" + probes)
    for root in roots:
        for r in final_records(root, "prior_final") + final_records(root, "prior_final_eval.json"):
            print(f"\nthe prior, untrained ({root}): "
                  + ", ".join(f"{name} {r[k]:.4f}" for k, name in COLUMNS if k in r))
    if draw(groups, path, title, window):
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
