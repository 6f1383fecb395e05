"""
Pictures of the variance study's final models (docs/variance_study.md): for each run, a few held-out prompts
x the first `--noises` noises of the final evaluation (data/shapes/final_eval.py's, so rows of different
runs start from the same noises), each image captioned with its reward.

    python data/shapes/variance_grid.py --root=out/variance/easy --labels=prior,nft_g16,e2po_4x4,no_schedule \
        --out=docs/variance_study/easy_no_schedule.png

A label is a configuration folder under --root (its --seed run's EMA LoRA), or `prior` (the untrained
model).
"""
import argparse
import glob
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rewards as RW  # noqa: E402
import sample as S  # noqa: E402
from final_eval import eval_noise  # noqa: E402  (data/shapes/final_eval.py, beside this file)

LORA = os.path.join("checkpoint", "lora_ema")


def draw(root, labels, seed=0, prompt_ids=(0, 1, 5), noises=8, eval_noises=64):
    """[(row label, [(image uint8 [H, W, 3], reward caption), ...])]: a row per label and prompt."""
    runs = {c: os.path.join(root, c, f"seed{seed}") for c in labels if c != "prior"}
    for run in runs.values():
        if not os.path.isfile(os.path.join(run, LORA, "pytorch_lora_weights.safetensors")):
            raise SystemExit(f"{run} holds no checkpoint/lora_ema: pass finished runs of --root")
    configs = sorted(glob.glob(os.path.join(glob.escape(root), "*", "seed*", "config.json")))
    if not configs:
        raise SystemExit(f"no <configuration>/seed<N>/config.json under {root}")
    cfg = json.load(open(configs[0], encoding="utf-8"))  # the world's model, held-out prompts and reward
    prompts, meta = S.read_prompts(cfg["eval_prompts"])
    reward = RW.build_reward(cfg["reward"], "cpu", torch.float32, opts=cfg.get("reward_opts"))
    S.quiet()
    pipe = S.load_pipeline(cfg["model"], "cpu", torch.float32)
    text = S.load_text(cfg["model"], "cpu", torch.float32, cfg["t5_len"], pipe=pipe)
    shape = S.latent_shape(pipe, cfg["resolution"])
    sigmas = S.sigma_grid(pipe.scheduler, cfg["eval_steps"])
    conds = {i: S.encode(text, [prompts[i]]) for i in prompt_ids}  # once: a LoRA touches only the transformer
    rows = []
    for label in labels:
        if label != "prior":
            with S.diffusers_notes_off():
                pipe.load_lora_weights(os.path.join(runs[label], LORA))
        for i in prompt_ids:
            c = tuple(torch.cat([part] * noises) for part in conds[i])
            noise = eval_noise([(i, g) for g in range(noises)], eval_noises, shape)
            with torch.no_grad():
                x0 = S.sample(pipe.transformer, sigmas, noise, c, solver=cfg["eval_solver"])
                im = S.decode(pipe.vae, x0)
            r = reward(im, [prompts[i]] * noises, [meta[i]] * noises)[0]
            pixels = (im.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().numpy()
            captions = [f"{float(v):.2f}" for v in r]
            rows.append((f"{label} (seed {seed}): {prompts[i]}", list(zip(pixels, captions))))
        if label != "prior":
            pipe.unload_lora_weights()  # the next label starts from the untrained model again
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--root", required=True, help="a world's folder of <configuration>/seed<N>/ runs")
    p.add_argument("--labels", default="prior,nft_g16,e2po_4x4")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", default="0,1,5", help="indices into the runs' held-out prompt file")
    p.add_argument("--noises", type=int, default=8)
    p.add_argument("--eval_noises", type=int, default=64,
                   help="final_eval.py's --noises (the noise seeds depend on it)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    rows = draw(a.root, a.labels.split(","), a.seed, [int(i) for i in a.prompts.split(",")], a.noises,
                a.eval_noises)
    S.captioned_grid(rows, a.out)
    print(f"{len(rows)} rows -> {a.out}")
    return rows


if __name__ == "__main__":
    main()
