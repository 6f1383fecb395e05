# The README's first command: E²PO (G=4 noises x K=4 conditions) on the guidance-distilled shapes prior
# (data/shapes/prior_cfgfree) with the `shapes` reward, 30 steps of 64 samples, about 3 minutes on 2 cores.
#   python phase1_perturb.py config/shapes_quick.py && python phase2_align.py config/shapes_quick.py
# Its held-out evaluation is the one held-out single-object task ("a photo of a triangle", 256 fixed noises,
# EMA weights): this prior leaves about a fifth of those canvases empty, a failure that is a choice and that
# RL fixes within these 30 steps (docs/shapes_world.md). The other settings are config/shapes_cpu.py's
# but for Phase I's iters.
model = "data/shapes/prior_cfgfree"
device = "cpu"
resolution = 64
t5_len = 16  # the prior's text length (data/shapes/prior_cfgfree/shapes_prior.json)
prompts = "data/shapes/train_small.jsonl"  # 28 training tasks, at most 6 per tag
eval_prompts = "data/shapes/test_single_object.jsonl"  # held out: no training prompt has this task
eval_G = 256
eval_steps = 10
eval_solver = "dpm2"
perturbations = "out/shapes_quick/perturbations.safetensors"
out_dir = "out/shapes_quick/align"
samples = "out/shapes_quick/samples"
reward = {"shapes": 1.0}
K = 4
G = 4
iters = 400  # Phase I: every variant lands inside the ring (200 left 2-7 % of the CLIP variants outside)
prompts_per_epoch = 4
epochs = 30
sample_batch = 64
train_batch = 16
timestep_fraction = 0.3
kl_beta = 0.0
lr = 1e-3
lora_rank = 16
lora_alpha = 32
eval_every = 10
ckpt_every = 10
batch_size = 64  # sample.py
