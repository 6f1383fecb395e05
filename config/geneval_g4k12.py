# E²PO "high exploration" budget on GenEval: G=4 noises x K=12 conditions = 48 samples per prompt.
#   python data/geneval/prepare.py
#   torchrun --nproc_per_node=8 phase1_perturb.py config/geneval_g4k12.py
#   torchrun --nproc_per_node=8 phase2_align.py config/geneval_g4k12.py
# The DiffusionNFT baseline at the same 1152 samples an epoch is config/geneval_nft_g24.py
# (48 prompts x G=24).
# prompts_per_epoch and the batch sizes are ours (24 prompts x 48 = 1152 samples an epoch, 144 per GPU);
# the paper's hyperparameter tables are not available to us.
model = "stabilityai/stable-diffusion-3.5-medium"
prompts = "data/geneval/train_metadata.jsonl"
eval_prompts = "data/geneval/evaluation_metadata.jsonl"  # GenEval's official 553 prompts (the benchmark)
eval_G = 4  # images per prompt, as GenEval and DiffusionNFT's evaluation
perturbations = "out/geneval_g4k12/perturbations.safetensors"
out_dir = "out/geneval_g4k12"
samples = "out/geneval_g4k12/samples"
reward = {"geneval": 1.0}
K = 12
G = 4
prompts_per_epoch = 24
sample_batch = 16
train_batch = 8
opt_steps_per_epoch = 1
