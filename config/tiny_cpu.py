# The embedded tiny model: a seeded random-weight SD3.5-M-shaped model, every stage on CPU in seconds; its
# images are noise, so it checks the plumbing (the README's first command runs config/shapes_quick.py).
#   python phase1_perturb.py config/tiny_cpu.py && python phase2_align.py config/tiny_cpu.py
model = "tiny"
device = "cpu"
prompts = "data/tiny_prompts.txt"
perturbations = "out/tiny/perturbations.safetensors"
K = 4
G = 2
t5_len = 32
resolution = 64
iters = 200

# phase2_align.py: 2 prompts x K=4 conditions x G=2 noises = 16 samples an epoch
reward = {"jpeg_incompressibility": 1.0}
eval_prompts = "data/tiny_prompts.txt"
out_dir = "out/tiny/align"  # sample.py's output goes to out/tiny/samples (its own --out_dir)
prompts_per_epoch = 2
epochs = 4
sample_batch = 16
train_batch = 8
opt_steps_per_epoch = 1
lora_rank = 4
lora_alpha = 8
ckpt_every = 2
eval_every = 2
eval_steps = 10
# eval_diversity.py reads what sample.py wrote with --out_dir=out/tiny/samples (tiny random backbones)
samples = "out/tiny/samples"
clip_model = "tiny"
detector_model = "tiny"
geneval_opts = {"detector": "tiny", "clip": "tiny"}
