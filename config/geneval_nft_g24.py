# The DiffusionNFT baseline on GenEval, as its public config (config/nft.py: sd3_geneval): 48 groups of
# G=24 images an epoch (1152 samples, 144 per GPU), K=1 (no perturbations, no Phase I), same code path.
#   torchrun --nproc_per_node=8 phase2_align.py config/geneval_nft_g24.py
# E²PO at the same 1152 samples an epoch: config/geneval_g4k12.py (24 prompts x G=4 x K=12).
# DiffusionNFT's micro-batch is 9 per GPU; ours is 8
# (one optimizer step an epoch, so the gradient is the same).
model = "stabilityai/stable-diffusion-3.5-medium"
prompts = "data/geneval/train_metadata.jsonl"
eval_prompts = "data/geneval/evaluation_metadata.jsonl"  # GenEval's official 553 prompts (the benchmark)
eval_G = 4  # images per prompt, as GenEval and DiffusionNFT's evaluation
out_dir = "out/geneval_nft_g24"
samples = "out/geneval_nft_g24/samples"
reward = {"geneval": 1.0}
K = 1
G = 24
prompts_per_epoch = 48
sample_batch = 16
train_batch = 8
opt_steps_per_epoch = 1
