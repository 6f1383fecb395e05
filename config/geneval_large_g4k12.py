# E²PO's "high exploration" GenEval budget (G=4 noises x K=12 conditions) on SD3.5-Large, the paper's named
# next step: the same code and recipe as config/geneval_g4k12.py on the larger transformer (38 blocks, no
# dual-attention ones; the same text encoders, VAE and scheduler).
#   torchrun --nproc_per_node=8 phase1_perturb.py config/geneval_large_g4k12.py
#   torchrun --nproc_per_node=8 phase2_align.py config/geneval_large_g4k12.py
# Memory (python bench.py --count_activations=True, counted): 26.8 GiB of resident weights, 16.4 GiB with
# the text encoders offloaded, and 4.30 GiB of activations a sample without gradient checkpointing, 34.4 GiB
# a micro-batch of 8: 50.8 GiB with text_offload, which an 80 GB GPU holds. On smaller GPUs turn
# grad_checkpointing on or lower train_batch. Everything else is ours, as for SD3.5-M (README, "Choices
# where the paper is silent").
model = "stabilityai/stable-diffusion-3.5-large"
prompts = "data/geneval/train_metadata.jsonl"
eval_prompts = "data/geneval/evaluation_metadata.jsonl"  # GenEval's official 553 prompts (the benchmark)
eval_G = 4
perturbations = "out/geneval_large_g4k12/perturbations.safetensors"
out_dir = "out/geneval_large_g4k12"
samples = "out/geneval_large_g4k12/samples"
reward = {"geneval": 1.0}
K = 12
G = 4
prompts_per_epoch = 24
sample_batch = 16
train_batch = 8
opt_steps_per_epoch = 1
text_offload = True
