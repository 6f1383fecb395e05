"""
The variance study's final evaluation of one Phase II run (docs/variance_study.md): the run's held-out
prompts x `--noises` images sampled from its EMA LoRA, scored by the run's own reward, and the diversity of
each prompt's images. The noises depend only on (prompt, noise index), never on the run, so every run and
the prior are compared image by image (paired). Writes RUN/final_eval.json, which compare_runs.py reads.

    python data/shapes/final_eval.py --run=out/variance/easy/nft_g16/seed0
    python data/shapes/final_eval.py --run=out/variance/easy/nft_g16/seed0 --lora=none --out=prior.json

Beside the reward: `strict`, the share of images the shapes detector judges correct by GenEval's rules (does
the model still draw what is asked, whatever it was trained on), and `reward_other_colour`, the reward of a
colour prompt's images scored as if the prompt had asked for another colour (lower than `reward` if the
images follow their text).

Diversity, per prompt over its images (then averaged over prompts), all computable offline:
  pixel_dist  mean over pairs of the RMS difference of the two images (pixels in [0, 1]; 0 = identical)
  sdi         1 - mean Hungarian-IoU layout similarity of the shapes detector's boxes (eval_diversity.py)
  pvs         std of mean saturation + std of mean value + std of contrast (eval_diversity.py)

With --perturbations=FILE (a Phase I file of the run's training prompts) it also probes how the model
answers its own perturbations: each training prompt x --probe_noises noises x the file's K conditions,
drawn as Phase II draws them (the schedule mixes C^opt_k into C^orig, rho of the run), every condition of a
noise from one x_1; it reports the mean reward on C^orig (k = 0) and on the perturbations (k > 0), how far a
perturbed image lies from its noise's k = 0 image (RMS pixel difference) and the share of those pairs
whose reward differs. A model that became robust to its perturbations has k > 0 close to k = 0.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import eval_diversity as ED  # noqa: E402
import rewards as RW  # noqa: E402
import sample as S  # noqa: E402

NOISE_SEED = 10 ** 7  # the evaluation noises: image g of prompt i starts from seed NOISE_SEED + i * n + g


def eval_noise(items, n, shape):
    """The evaluation's initial noises [len(items), *shape] of the (prompt i, noise g) items at n noises a
    prompt: seed NOISE_SEED + i * n + g, whatever the run, the batch or the order."""
    return S.image_noise([NOISE_SEED + i * n + g for i, g in items], shape, "cpu")


def pixel_distance(images):
    """Mean over the pairs of images [n, 3, H, W] of their RMS pixel difference; nan for fewer than two."""
    n = len(images)
    if n < 2:
        return float("nan")
    f = images.flatten(1).double()
    sq = (f * f).sum(1)
    d2 = (sq[:, None] + sq[None] - 2 * f @ f.T).clamp(min=0) / f.shape[1]
    iu = torch.triu_indices(n, n, 1)
    return d2[iu[0], iu[1]].sqrt().mean().item()


def other_colour_reward(reward, images, prompt, meta):
    """The mean reward of a prompt's images scored as if the prompt had asked for each other colour (its first
    include clause's colour swapped for each of the other nine): if the images follow their text, it is lower
    than their own reward. nan for a prompt without a colour."""
    first = meta["include"][0]
    if not first.get("color"):
        return float("nan")
    out = []
    for c in RW.GENEVAL_COLORS:
        if c != first["color"]:
            m = {**meta, "include": [{**first, "color": c}, *meta["include"][1:]]}
            out.append(reward(images, [prompt] * len(images), [m] * len(images))[0].mean().item())
    return float(np.mean(out))


def probe(pipe, text, reward, cfg, path, n, batch):
    """The perturbation probe (see the module docstring): {K, reward_k0, reward_kp, pixel_dist_kp,
    changed_kp}, over the run's training prompts x n noises x K conditions."""
    prompts, meta = S.read_prompts(cfg["prompts"])
    pert = S.load_perturbations(path, text, prompts, None)
    K, shape = pert["K"], S.latent_shape(pipe, cfg["resolution"])
    sigmas = S.sigma_grid(pipe.scheduler, cfg["steps"])
    R, images = {}, {}
    for i in range(len(prompts)):
        orig = S.encode(text, [prompts[i]])
        opt = [torch.cat([o, p]) for o, p in zip(orig, S.perturbed_conditions(text, pert, prompts, [i]))]
        items = [(k, g) for k in range(K) for g in range(n)]
        for s in range(0, len(items), batch):
            chunk = items[s:s + batch]
            c_orig = tuple(torch.cat([c] * len(chunk)) for c in orig)
            c_opt = tuple(torch.stack([c[k] for k, _ in chunk]) for c in opt)
            noise = S.image_noise([2 * NOISE_SEED + i * n + g for _, g in chunk], shape, "cpu")
            x0 = S.sample(pipe.transformer, sigmas, noise, c_orig, c_opt, cfg["rho"], solver=cfg["solver"])
            ims = S.decode(pipe.vae, x0)
            scores = reward(ims, [prompts[i]] * len(chunk), [meta[i]] * len(chunk))[0]
            for (k, g), im, r in zip(chunk, ims, scores):
                R[i, k, g], images[i, k, g] = float(r), im
    pairs = [(i, k, g) for (i, k, g) in R if k > 0]
    rms = lambda a, b: float(((a - b) ** 2).mean().sqrt())
    return {"K": K, "noises": n, "reward_k0": float(np.mean([R[key] for key in R if key[1] == 0])),
            "reward_kp": float(np.mean([R[key] for key in pairs])),
            "pixel_dist_kp": float(np.mean([rms(images[i, k, g], images[i, 0, g]) for i, k, g in pairs])),
            "changed_kp": float(np.mean([R[i, k, g] != R[i, 0, g] for i, k, g in pairs]))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--run", required=True, help="a Phase II run folder (its config.json and checkpoint/)")
    p.add_argument("--lora", default="checkpoint/lora_ema",
                   help="LoRA folder, relative to the run (or absolute); 'none' evaluates the base model")
    p.add_argument("--noises", type=int, default=64, help="images per held-out prompt")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default="final_eval.json", help="output JSON, relative to the run (or absolute)")
    p.add_argument("--perturbations", default=None, help="a Phase I file of the training prompts: the probe")
    p.add_argument("--probe_noises", type=int, default=16, help="noises per training prompt in the probe")
    a = p.parse_args(argv)
    cfg_path = os.path.join(a.run, "config.json")
    if not os.path.isfile(cfg_path):
        raise SystemExit(f"{a.run} holds no config.json: pass a Phase II run folder")
    cfg = json.load(open(cfg_path, encoding="utf-8"))
    lora = None if a.lora == "none" else os.path.join(a.run, a.lora)
    if lora and not os.path.isfile(os.path.join(lora, "pytorch_lora_weights.safetensors")):
        raise SystemExit(f"{lora} holds no pytorch_lora_weights.safetensors")
    prompts, meta = S.read_prompts(cfg["eval_prompts"])
    S.quiet()
    torch.manual_seed(0)
    pipe = S.load_pipeline(cfg["model"], "cpu", torch.float32)
    text = S.load_text(cfg["model"], "cpu", torch.float32, cfg["t5_len"], pipe=pipe)
    if lora:
        with S.diffusers_notes_off():
            pipe.load_lora_weights(lora)
    reward = RW.build_reward(cfg["reward"], "cpu", torch.float32, opts=cfg.get("reward_opts"))
    detector = RW.shapes_world().shapes()
    shape = S.latent_shape(pipe, cfg["resolution"])
    sigmas = S.sigma_grid(pipe.scheduler, cfg["eval_steps"])
    items = [(i, g) for i in range(len(prompts)) for g in range(a.noises)]
    conds = {i: S.encode(text, [prompts[i]]) for i in range(len(prompts))}
    R, images = [], []
    for s in range(0, len(items), a.batch):
        chunk = items[s:s + a.batch]
        c = tuple(torch.cat([conds[i][n] for i, _ in chunk]) for n in range(2))
        noise = eval_noise(chunk, a.noises, shape)
        x0 = S.sample(pipe.transformer, sigmas, noise, c, None, solver=cfg["eval_solver"])
        im = S.decode(pipe.vae, x0)
        R.append(reward(im, [prompts[i] for i, _ in chunk], [meta[i] for i, _ in chunk])[0].float())
        images.append(im)
    R, images = torch.cat(R), torch.cat(images)
    per_prompt = {k: [] for k in ("reward", "strict", "reward_other_colour", "pixel_dist", "sdi", "pvs")}
    for i in range(len(prompts)):
        ims = images[i * a.noises:(i + 1) * a.noises]
        boxes = [[d["box"] for d in dets] for dets in detector.detect(ims)]
        rgb = ims.permute(0, 2, 3, 1).numpy()
        per_prompt["reward"].append(R[i * a.noises:(i + 1) * a.noises].mean().item())
        verdicts = detector.evaluate(ims, [meta[i]] * len(ims))  # GenEval's verdict, whatever the reward
        per_prompt["strict"].append(float(np.mean([v["correct"] for v in verdicts])))
        per_prompt["reward_other_colour"].append(other_colour_reward(reward, ims, prompts[i], meta[i]))
        per_prompt["pixel_dist"].append(pixel_distance(ims))
        per_prompt["sdi"].append(ED.spatial_dispersion(boxes))
        per_prompt["pvs"].append(ED.photographic_variance([ED.photo_stats(x) for x in rgb]))
    out = {"run": a.run, "lora": lora, "reward_spec": cfg["reward"], "prompts": cfg["eval_prompts"],
           "noises": a.noises, "rewards": R.tolist(), "per_prompt": per_prompt,
           **{k: float(np.nanmean(v)) if not np.isnan(v).all() else float("nan")  # one image a prompt: nan
              for k, v in per_prompt.items()}}
    if a.perturbations:
        out["probe"] = probe(pipe, text, reward, cfg, a.perturbations, a.probe_noises, a.batch)
    path = a.out if os.path.isabs(a.out) else os.path.join(a.run, a.out)
    S.write_json_atomic(path, out)
    print(f"{a.run}: reward {out['reward']:.4f}, pixel_dist {out['pixel_dist']:.4f}, sdi {out['sdi']:.4f}, "
          f"pvs {out['pvs']:.4f} over {len(prompts)} prompts x {a.noises} -> {path}")


if __name__ == "__main__":
    main()
