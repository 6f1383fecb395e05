# The DiffusionNFT baseline on PickScore, as its public config (config/nft.py: sd3_pickscore): 48 groups of
# G=24 images an epoch (1152 samples, 144 per GPU), K=1 (no perturbations, no Phase I), same code path.
#   torchrun --nproc_per_node=8 phase2_align.py config/pickscore_nft_g24.py
# E²PO at the same 1152 samples an epoch: config/pickscore_g8k3.py (48 prompts x G=8 x K=3).
model = "stabilityai/stable-diffusion-3.5-medium"
prompts = "data/pickscore/train.txt"
eval_prompts = "data/pickscore/test.txt"
out_dir = "out/pickscore_nft_g24"
samples = "out/pickscore_nft_g24/samples"
reward = {"pickscore": 1.0}
K = 1
G = 24
prompts_per_epoch = 48
sample_batch = 16
train_batch = 8
opt_steps_per_epoch = 1
