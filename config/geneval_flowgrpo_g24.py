# The Flow-GRPO baseline on GenEval, as its public SD3.5-M recipe (github.com/yifan123/flow_grpo, MIT licence:
# config/grpo.py geneval_sd3 over config/base.py, trained by scripts/train_sd3.py), on this code's
# objective = "grpo": 48 prompts x 24 images an epoch (1152 samples), 10 SDE steps at noise_level 0.7 with
# CFG 4.5 (negative prompt ""), the first 9 of them trained, 2 optimizer steps an epoch, PPO clip 1e-4,
# advantages clipped to 5 with the std of all rewards, KL beta 0.04, AdamW lr 3e-4 (wd 1e-4), grad clip 1,
# LoRA r 32 alpha 64 on the same modules, 512 px, T5 at 128 tokens, evaluation at 40 steps with CFG.
#   torchrun --nproc_per_node=8 phase2_align.py config/geneval_flowgrpo_g24.py
# The layout mapped: Flow-GRPO counts per GPU over 32 GPUs (9 images a GPU a batch, 4 batches an epoch =
# 48 / (32 * 9 / 24), a gradient step every 2 batches). Here an epoch is one list of samples over any GPU
# count: prompts_per_epoch = 48 x G = 24 is the same 1152 samples, opt_steps_per_epoch = 2 the same 576 a
# step, on 8 GPUs (144 a GPU) as on 32 (36). Its micro-batch is 9 a GPU, ours 8 (a step's gradient is the mean
# over its samples either way). Not as Flow-GRPO (docs/flow_grpo.md): its EMA (decay min((1+s)/(10+s), 0.9))
# moves every 8th step, ours every step; it runs fp16 autocast, we bf16; and our prompts are
# data/geneval/prepare.py's (its are its dataset/geneval), the benchmark GenEval's 553, as every GenEval
# config here. E²PO on this objective at the paper's budget: config/geneval_grpo_g4k12.py.
# The recipe's values not set below are phase2_align.py's defaults (test_grpo.py checks each of them).
model = "stabilityai/stable-diffusion-3.5-medium"
prompts = "data/geneval/train_metadata.jsonl"
eval_prompts = "data/geneval/evaluation_metadata.jsonl"  # GenEval's official 553 prompts (the benchmark)
eval_G = 4  # images per prompt, as GenEval
out_dir = "out/geneval_flowgrpo_g24"
samples = "out/geneval_flowgrpo_g24/samples"
reward = {"geneval": 1.0}
objective = "grpo"
K = 1
G = 24
prompts_per_epoch = 48
guidance = 4.5
kl_beta = 0.04
opt_steps_per_epoch = 2
eval_every = 60  # its eval_freq and save_freq
