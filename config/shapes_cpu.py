# The shapes world on CPU: E²PO (G=4 noises x K=4 conditions = 16 samples per prompt) on the trained
# shapes prior (data/shapes/prior) with the `shapes` reward, GenEval's rules on exact pixel detections.
#   python phase1_perturb.py config/shapes_cpu.py && python phase2_align.py config/shapes_cpu.py
#   bash data/shapes/experiment.sh      # the five-way variance experiment
#                                       # (docs/shapes_world.md, "The variance finding on a CPU")
# The settings are ours, chosen for a 2-core CPU (docs/shapes_world.md): 64 samples an epoch, 3 of the
# 10 grid times trained per sample, no KL term; the rest is the GenEval recipe's.
model = "data/shapes/prior"
device = "cpu"
resolution = 64
t5_len = 16  # the prior's text length (data/shapes/prior/shapes_prior.json)
prompts = "data/shapes/train_small.jsonl"  # 28 training tasks, at most 6 per tag
eval_prompts = "data/shapes/test_small.jsonl"  # 22 held-out tasks, none shared with the training prompts
eval_G = 8
eval_steps = 10
eval_solver = "dpm2"
perturbations = "out/shapes/perturbations.safetensors"
out_dir = "out/shapes/align"
samples = "out/shapes/samples"
reward = {"shapes": 1.0}
K = 4
G = 4
iters = 200
prompts_per_epoch = 4
epochs = 20
sample_batch = 64
train_batch = 16
timestep_fraction = 0.3
kl_beta = 0.0
lr = 1e-3
lora_rank = 16
lora_alpha = 32
eval_every = 5
ckpt_every = 10
batch_size = 64  # sample.py
