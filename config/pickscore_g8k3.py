# E²PO on human preference (PickScore): G=8 noises x K=3 conditions = 24 samples per prompt.
#   python data/pickscore/prepare.py            (on a machine with internet)
#   torchrun --nproc_per_node=8 phase1_perturb.py config/pickscore_g8k3.py
#   torchrun --nproc_per_node=8 phase2_align.py config/pickscore_g8k3.py
# The DiffusionNFT baseline at the same 1152 samples an epoch is config/pickscore_nft_g24.py
# (48 prompts x G=24).
# prompts_per_epoch and the batch sizes are ours (48 prompts x 24 = 1152 samples an epoch, 144 per GPU).
model = "stabilityai/stable-diffusion-3.5-medium"
prompts = "data/pickscore/train.txt"
eval_prompts = "data/pickscore/test.txt"
perturbations = "out/pickscore_g8k3/perturbations.safetensors"
out_dir = "out/pickscore_g8k3"
samples = "out/pickscore_g8k3/samples"
reward = {"pickscore": 1.0}
K = 3
G = 8
prompts_per_epoch = 48
sample_batch = 16
train_batch = 8
opt_steps_per_epoch = 1
