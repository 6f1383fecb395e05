# E²PO on Flow-GRPO's objective, GenEval, at the paper's "high exploration" budget (G=4 noises x K=12
# conditions, 24 prompts = the same 1152 samples an epoch as the Flow-GRPO baseline
# config/geneval_flowgrpo_g24.py, whose recipe it keeps: SDE rollouts with CFG 4.5, PPO clip 1e-4, KL 0.04,
# 2 optimizer steps an epoch). The paper ran E²PO on DiffusionNFT only; this pairing and how its ratio treats
# a perturbed sample (grpo_old_logprob) are ours (README, "Choices where the paper is silent").
#   torchrun --nproc_per_node=8 phase1_perturb.py config/geneval_g4k12.py   # its Phase I file serves here
#   torchrun --nproc_per_node=8 phase2_align.py config/geneval_grpo_g4k12.py
# The recipe's values not set below are phase2_align.py's defaults (test_grpo.py checks each of them).
model = "stabilityai/stable-diffusion-3.5-medium"
prompts = "data/geneval/train_metadata.jsonl"
eval_prompts = "data/geneval/evaluation_metadata.jsonl"  # GenEval's official 553 prompts (the benchmark)
eval_G = 4
perturbations = "out/geneval_g4k12/perturbations.safetensors"  # the same model, prompts and K
out_dir = "out/geneval_grpo_g4k12"
samples = "out/geneval_grpo_g4k12/samples"
reward = {"geneval": 1.0}
objective = "grpo"
grpo_old_logprob = "orig"
K = 12
G = 4
prompts_per_epoch = 24
guidance = 4.5
kl_beta = 0.04
opt_steps_per_epoch = 2
eval_every = 60
