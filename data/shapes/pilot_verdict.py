"""
The go/no-go rule of a collapse-world pilot (docs/collapse_world.md), fixed before any pilot ran, applied to
one baseline run (its log.jsonl and final_eval.json) and the prior's final evaluation on the same prompts:

  1. collapse     the group std's 10-step block means: peak block / last block >= 3
  2. signal       group_std_rel (group std / the step's std, what the advantages see), mean over the last
                  block <= 0.8 x its mean over the peak block: the normalised signal falls too
  3. accuracy     held-out strict accuracy (final_eval's `strict`) minus the prior's, per prompt, mean >=
                  -2 x its standard error over prompts: not measurably below the prior
  4. text         the final images scored as if their prompt asked for another colour
                  (`reward_other_colour`) <= 0.5 x their own reward: the images follow the text

    python data/shapes/pilot_verdict.py --run=out/collapse_pilots/tint/run \
        --prior=out/collapse_pilots/tint/prior_final_eval.json

Prints a markdown table of the four criteria and GO when all pass; exits 0 either way.
"""
import argparse
import json
import math
import os


def blocks(values, size=10):
    """Means of consecutive blocks of `size` values (a last, shorter block is dropped)."""
    return [sum(values[a:a + size]) / size for a in range(0, len(values) - size + 1, size)]


def verdict(log, final, prior, block=10):
    """[(criterion, measured, rule, passed)] for a run's log records, its final evaluation and the prior's."""
    train = [r for r in log if r.get("epoch", -1) >= 0]
    std = blocks([r["group_std"] for r in train], block)
    rel = blocks([r["group_std_rel"] for r in train], block)
    peak = max(range(len(std)), key=std.__getitem__)
    d = [a - b for a, b in zip(final["per_prompt"]["strict"], prior["per_prompt"]["strict"])]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
    other = final.get("reward_other_colour", float("nan"))
    return [
        ("collapse: group std, peak block / last block",
         f"{std[peak]:.4f} (steps {peak * block}-{peak * block + block - 1}) / {std[-1]:.4f} = "
         f"{std[peak] / max(std[-1], 1e-12):.2f}", ">= 3", std[peak] >= 3 * std[-1]),
        ("signal: group_std_rel, last block / peak block", f"{rel[-1]:.3f} / {rel[peak]:.3f} = "
         f"{rel[-1] / max(rel[peak], 1e-12):.2f}", "<= 0.8", rel[-1] <= 0.8 * rel[peak]),
        ("accuracy: held-out strict, run - prior (per prompt)",
         f"{final['strict']:.3f} - {prior['strict']:.3f} = {mean:+.3f} ± {se:.3f}", ">= -2 SE",
         mean >= -2 * se),
        ("text: reward as another colour's prompt / own reward",
         f"{other:.4f} / {final['reward']:.4f} = {other / final['reward']:.2f}" if final["reward"] else "n/a",
         "<= 0.5", bool(final["reward"]) and other <= 0.5 * final["reward"]),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--run", required=True, help="the pilot's run folder (log.jsonl, final_eval.json)")
    p.add_argument("--prior", required=True, help="the prior's final_eval.json on the same held-out prompts")
    a = p.parse_args(argv)
    with open(os.path.join(a.run, "log.jsonl"), encoding="utf-8") as f:
        log = [json.loads(ln) for ln in f if ln.strip()]
    with open(os.path.join(a.run, "final_eval.json"), encoding="utf-8") as f:
        final = json.load(f)
    with open(a.prior, encoding="utf-8") as f:
        prior = json.load(f)
    rows = verdict(log, final, prior)
    evals = [r["eval_reward"] for r in log if "eval_reward" in r]
    print(f"### {a.run}\n\nheld-out reward (every evaluation): {' '.join(f'{e:.3f}' for e in evals)}; "
          f"final {final['reward']:.4f} (prior {prior['reward']:.4f})\n")
    print("| criterion | measured | rule | pass |\n|---|---|---|---|")
    for name, measured, rule, ok in rows:
        print(f"| {name} | {measured} | {rule} | {'yes' if ok else 'no'} |")
    print(f"\n**{'GO' if all(r[3] for r in rows) else 'NO-GO'}**")


if __name__ == "__main__":
    main()
