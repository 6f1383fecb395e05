# The Flow-GRPO baseline on PickScore, as its public SD3.5-M recipe (github.com/yifan123/flow_grpo, MIT
# licence: config/grpo.py pickscore_sd3 over config/base.py, trained by scripts/train_sd3.py), on this code's
# objective = "grpo": config/geneval_flowgrpo_g24.py's settings (which says how its 32-GPU layout maps here
# and what differs) with the PickScore reward and KL beta 0.01; its prompts, Flow-GRPO's Pick-a-Pic split
# (python data/pickscore/prepare.py).
#   torchrun --nproc_per_node=8 phase2_align.py config/pickscore_flowgrpo_g24.py
# E²PO on this objective at the paper's budget: config/pickscore_grpo_g8k3.py.
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
steps = 10
guidance = 4.5
noise_level = 0.7
clip_range = 1e-4
adv_clip = 5.0
global_std = True
kl_beta = 0.01
timestep_fraction = 0.99
lr = 3e-4
weight_decay = 1e-4
grad_clip = 1.0
opt_steps_per_epoch = 2
sample_batch = 16
train_batch = 8
eval_steps = 40
eval_solver = "euler"  # its evaluation: the SDE step at noise_level 0, i.e. Euler
eval_every = 60  # its eval_freq and save_freq
