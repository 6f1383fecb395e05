# The Flow-GRPO baseline on PickScore, as its public SD3.5-M recipe (github.com/yifan123/flow_grpo, MIT
# licence: config/grpo.py pickscore_sd3 over config/base.py, trained by scripts/train_sd3.py), on this code's
# objective = "grpo": config/geneval_flowgrpo_g24.py's settings (which says how its 32-GPU layout maps here
# and what differs) with the PickScore reward and KL beta 0.01; its prompts, Flow-GRPO's Pick-a-Pic split
# (python data/pickscore/prepare.py).
#   torchrun --nproc_per_node=8 phase2_align.py config/pickscore_flowgrpo_g24.py
# E²PO on this objective at the paper's budget: config/pickscore_grpo_g8k3.py.
# The recipe's values not set below are phase2_align.py's defaults (test_grpo.py checks each of them).
model = "stabilityai/stable-diffusion-3.5-medium"
prompts = "data/pickscore/train.txt"
eval_prompts = "data/pickscore/test.txt"
out_dir = "out/pickscore_flowgrpo_g24"
samples = "out/pickscore_flowgrpo_g24/samples"
reward = {"pickscore": 1.0}
objective = "grpo"
K = 1
G = 24
prompts_per_epoch = 48
guidance = 4.5
kl_beta = 0.01
opt_steps_per_epoch = 2
eval_every = 60  # its eval_freq and save_freq
