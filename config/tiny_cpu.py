# The embedded tiny default: a seeded random-weight SD3.5-M-shaped model, every stage on CPU in seconds.
#   python phase1_perturb.py config/tiny_cpu.py && python phase2_align.py config/tiny_cpu.py
model = "tiny"
device = "cpu"
prompts = "data/tiny_prompts.txt"
perturbations = "out/tiny/perturbations.safetensors"
K = 4
G = 2
t5_len = 32
resolution = 64
iters = 100
out_dir = "out/tiny/samples"
