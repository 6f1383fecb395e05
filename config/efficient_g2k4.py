# E²PO "efficient" budget on GenEval: G=2 noises x K=4 conditions = 8 samples per prompt.
#   torchrun --nproc_per_node=8 phase1_perturb.py config/efficient_g2k4.py
#   torchrun --nproc_per_node=8 phase2_align.py config/efficient_g2k4.py
# prompts_per_epoch and the batch sizes are ours (48 prompts x 8 = 384 samples an epoch, 48 per GPU: a third
# of the 1152 of config/geneval_g4k12.py and of the DiffusionNFT baseline config/geneval_nft_g24.py).
model = "stabilityai/stable-diffusion-3.5-medium"
prompts = "data/geneval/train_metadata.jsonl"
eval_prompts = "data/geneval/evaluation_metadata.jsonl"  # GenEval's official 553 prompts (the benchmark)
eval_G = 4  # images per prompt, as GenEval and DiffusionNFT's evaluation
perturbations = "out/efficient_g2k4/perturbations.safetensors"
out_dir = "out/efficient_g2k4"
samples = "out/efficient_g2k4/samples"
reward = {"geneval": 1.0}
K = 4
G = 2
prompts_per_epoch = 48
sample_batch = 16
train_batch = 8
opt_steps_per_epoch = 1
