# E²PO "high exploration" budget on GenEval: G=4 noises x K=12 conditions = 48 samples per prompt.
#   python data/geneval/prepare.py
#   torchrun --nproc_per_node=8 phase1_perturb.py config/geneval_g4k12.py
#   torchrun --nproc_per_node=8 phase2_align.py config/geneval_g4k12.py
# Baseline (DiffusionNFT, same samples per prompt): ... phase2_align.py config/geneval_g4k12.py --K=1 --G=48
# prompts_per_epoch and the batch sizes are ours (24 prompts x 48 = 1152 samples an epoch, 144 per GPU);
# the paper's hyperparameter tables are not available to us (METHOD.md §5).
model = "stabilityai/stable-diffusion-3.5-medium"
prompts = "data/geneval/train_metadata.jsonl"
eval_prompts = "data/geneval/test_metadata.jsonl"
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
