# E²PO on Flow-GRPO's objective, PickScore, at the paper's budget (G=8 noises x K=3 conditions, 48 prompts =
# the same 1152 samples an epoch as the Flow-GRPO baseline config/pickscore_flowgrpo_g24.py, whose recipe it
# keeps: SDE rollouts with CFG 4.5, PPO clip 1e-4, KL 0.01, 2 optimizer steps an epoch). The paper ran E²PO on
# DiffusionNFT only; this pairing and how its ratio treats a perturbed sample (grpo_old_logprob) are ours
# (README, "Choices where the paper is silent").
#   torchrun --nproc_per_node=8 phase1_perturb.py config/pickscore_g8k3.py   # its Phase I file serves here
#   torchrun --nproc_per_node=8 phase2_align.py config/pickscore_grpo_g8k3.py
# The recipe's values not set below are phase2_align.py's defaults (test_grpo.py checks each of them).
model = "stabilityai/stable-diffusion-3.5-medium"
prompts = "data/pickscore/train.txt"
eval_prompts = "data/pickscore/test.txt"
perturbations = "out/pickscore_g8k3/perturbations.safetensors"  # the same model, prompts and K
out_dir = "out/pickscore_grpo_g8k3"
samples = "out/pickscore_grpo_g8k3/samples"
reward = {"pickscore": 1.0}
objective = "grpo"
grpo_old_logprob = "orig"
K = 3
G = 8
prompts_per_epoch = 48
guidance = 4.5
kl_beta = 0.01
opt_steps_per_epoch = 2
eval_every = 60
