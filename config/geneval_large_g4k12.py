# E²PO's "high exploration" GenEval budget (G=4 noises x K=12 conditions) on SD3.5-Large, the paper's named
# next step: the same code and recipe as config/geneval_g4k12.py on the larger transformer (38 blocks, no
# dual-attention ones; the same text encoders, VAE and scheduler).
#   torchrun --nproc_per_node=8 phase1_perturb.py config/geneval_large_g4k12.py
#   torchrun --nproc_per_node=8 phase2_align.py config/geneval_large_g4k12.py
# At 1024 px, not SD3.5-M's 512: SD3.5-Large is a 1-megapixel model, and RL tunes the policy at the
# resolution it samples. Memory (python bench.py --count_activations=True, counted): 26.9 GiB of resident
# weights, 16.5 GiB with the text encoders offloaded, and 14.96 GiB of activations a sample without gradient
# checkpointing at 1024 px, so micro-batches of 2: 46.5 GiB with text_offload, which an 80 GB GPU holds. An
# epoch is 1,671 PFLOP of model FLOPs, about 10 minutes on 8 H100s at 35 % MFU, 4.3x one at 512 px
# (--resolution=512 --train_batch=8: 4.30 GiB a sample, 51.0 GiB, 140 s an epoch, the policy then sampled
# below the resolution it was trained for). Everything else is ours, as for SD3.5-M (README, "Choices where
# the paper is silent").
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
sample_batch = 8  # the fp32 VAE decodes a chunk of sample_batch images: at 1024 px, 4x 512 px's memory
train_batch = 2
resolution = 1024
opt_steps_per_epoch = 1
text_offload = True
