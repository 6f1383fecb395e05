# The variance study's Phase II recipe (docs/variance_study.md; data/shapes/variance_study.sh runs it in
# three reward worlds): config/shapes_quick.py's settings on the guidance-distilled shapes prior, 3 prompts a
# step for every configuration (the same prompts at each step for a seed, whatever G and K), 150 steps, the
# held-out reward every 10 steps on 8 fixed noises a prompt. The world's prompts, held-out prompts and reward,
# and each configuration's G, K and perturbation file, come from the script's command line.
model = "data/shapes/prior_cfgfree"
device = "cpu"
resolution = 64
t5_len = 16  # the prior's text length (data/shapes/prior_cfgfree/shapes_prior.json)
prompts = "data/shapes/train_easy.jsonl"
eval_prompts = "data/shapes/test_easy.jsonl"
eval_G = 8
eval_steps = 10
eval_solver = "dpm2"
out_dir = "out/variance/run"
reward = {"shapes": 1.0}
K = 1
G = 16
iters = 400  # Phase I: every variant inside the ring at K = 4 (config/shapes_quick.py)
prompts_per_epoch = 3
epochs = 150
sample_batch = 48
train_batch = 16
timestep_fraction = 0.3
kl_beta = 0.0
lr = 1e-3
lora_rank = 16
lora_alpha = 32
eval_every = 10
ckpt_every = 50
