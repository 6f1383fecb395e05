"""bench.py's pure parts: the FLOP formula against torch's FlopCounterMode, the meta-device parameter counts
against public figures, the per-epoch arithmetic by hand, the peak table, and a whole tiny run."""
import json
import math
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import phase2_align as P2
import sample as S
import tiny

# A small SD3 transformer with what SD3.5-M has and the tiny one lacks: several dual-attention blocks, a
# plain block between them and the context_pre_only last block, qk rms-norm, in_channels != out_channels.
SMALL = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=4, attention_head_dim=8,
             num_attention_heads=3, joint_attention_dim=20, caption_projection_dim=24,
             pooled_projection_dim=12, pos_embed_max_size=16, dual_attention_layers=(0, 1),
             qk_norm="rms_norm")


def counted(tr, x, c, train):
    """FlopCounterMode's count per sample of one forward (and with train, its backward). SDPA goes through
    the math backend: on CPU the fused kernel is one op the counter has no formula for."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.set_grad_enabled(train):
        v = S.velocity(tr, x, 0.7, c)
        if train:
            v.float().square().mean().backward()
    return fc.get_total_flops() / len(x)


@pytest.mark.parametrize("which", ["tiny", "small dual-attention", "SD3.5-M on the meta device"])
def test_flops_match_flop_counter(which):
    """The formula counts exactly the matmuls (linears, convs, attention) and nothing else; so does
    FlopCounterMode, so the two must agree exactly (tolerance 0). What neither counts (norms, GELU, softmax,
    adaLN scale/shift/gate, residual adds: O(L*d) per block) is what separates both from a hardware count.
    SD3.5-M runs on the meta device: shapes only, no memory, so the real size is checked in seconds."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    dev = torch.device("meta" if which.startswith("SD3.5") else "cpu")
    with dev:
        if which == "tiny":
            tr, H, Lt = tiny.pipeline(0).transformer, 8, 77 + 16
        else:
            tr, H, Lt = ((SD3Transformer2DModel(**SMALL), 12, 10) if which.startswith("small")
                         else (SD3Transformer2DModel(**bench.SD35M), 64, 77 + 128))
        c = tr.config
        x = torch.randn(2, c.in_channels, H, H)
        cond = (torch.randn(2, Lt, c.joint_attention_dim), torch.randn(2, c.pooled_projection_dim))
        tr.requires_grad_(False)
        Li = (H // c.patch_size) ** 2
        assert counted(tr, x, cond, False) == bench.transformer_flops(c, Li, Lt)
        P2.add_adapters(tr, 4, 8)
    assert counted(tr, x, cond, False) == bench.transformer_flops(c, Li, Lt, 4)
    assert counted(tr, x, cond, True) == bench.transformer_flops(c, Li, Lt, 4, train=True)
    P2.use_adapter(tr, None)  # v_ref: the base model
    assert counted(tr, x, cond, False) == bench.transformer_flops(c, Li, Lt, 0)


def test_flops_sd35m_convention():
    """At 512 px the LoRA step's forward + backward is ~2x a forward (input gradients through the frozen
    base), not the 3x of full fine-tuning."""
    f = bench.transformer_flops(bench.SD35M, 1024, 205, 32)
    assert 2.0 < bench.transformer_flops(bench.SD35M, 1024, 205, 32, train=True) / f < 2.2


@pytest.fixture(scope="module")
def counts():
    return bench.meta_param_counts(32)


def test_meta_counts_against_public_figures(counts):
    print(f"SD3.5-M transformer: {counts['transformer']:,} parameters; "
          f"LoRA r=32: {counts['lora']:,} per adapter")
    assert 2.24e9 <= counts["transformer"] <= 2.5e9
    for name, public in (("clip_l", 123e6), ("clip_g", 695e6), ("t5", 4.76e9)):
        assert abs(counts[name] / public - 1) < 0.02, (name, counts[name])
    rows = dict(bench.weight_table(counts))
    assert rows["SD3.5-M transformer (bf16)"] == pytest.approx(counts["transformer"] * 2 / 2 ** 30)
    # the positional table is a buffer, not a parameter: 384^2 positions x 1536 features, 0.42 GiB in bf16
    assert counts["pos_embed"] == 384 ** 2 * 1536
    assert rows["its pos_embed buffer (bf16)"] == pytest.approx(384 ** 2 * 1536 * 2 / 2 ** 30)
    assert rows["total"] == pytest.approx(sum(v for k, v in rows.items() if not k.startswith("total")))


def test_meta_counts_equal_a_real_instantiation(monkeypatch):
    """The meta device builds the same modules: on a config cheap enough to build for real, the counts
    agree."""
    monkeypatch.setattr(bench, "SD35M", SMALL)
    meta = bench.meta_param_counts(4)
    from diffusers import SD3Transformer2DModel
    tr = SD3Transformer2DModel(**SMALL)
    assert meta["transformer"] == sum(p.numel() for p in tr.parameters())
    assert meta["pos_embed"] == sum(b.numel() for b in tr.buffers()) > 0
    P2.add_adapters(tr, 4, 8)
    assert meta["lora"] == sum(p.numel() for p in P2.adapter_params(tr, "default"))


def test_saved_activation_bytes_by_hand():
    """exp keeps its output z, sin keeps its input (z again: one storage, counted once), a product keeps both
    factors (sin(z), and a view of a: a's whole storage), a linear layer with a frozen weight keeps only
    the weight (a parameter: left out when passed as one)."""
    W = torch.nn.Parameter(torch.randn(3, 6), requires_grad=False)
    a = torch.randn(5, 6, requires_grad=True)

    def fn():
        z = torch.nn.functional.linear(a, W).exp()
        return z.sin() * a[:, :3]
    # z 5x3, sin(z) 5x3, a 5x6, float32
    assert bench.saved_activation_bytes(fn, [W]) == (15 + 15 + 30) * 4
    assert bench.saved_activation_bytes(fn) == (15 + 15 + 30 + 18) * 4
    with torch.no_grad():
        assert bench.saved_activation_bytes(fn, [W]) == 0


def test_training_forward_activations_grow_linearly_with_the_batch():
    """The bench counts the theta forward of a training timestep on a batch of two and scales: from two
    samples on, the count is linear in the batch. Gradient checkpointing keeps the blocks' activations out
    of the count (it holds their inputs itself), so the count falls."""
    torch.manual_seed(0)
    from diffusers import SD3Transformer2DModel
    tr = SD3Transformer2DModel(**SMALL).requires_grad_(False)
    P2.add_adapters(tr, 4, 8)
    P2.use_adapter(tr, "default")
    tr.train()

    def count(B):
        x, t = torch.randn(B, 4, 16, 16), torch.full((B,), 0.5)
        c = (torch.randn(B, 7, SMALL["joint_attention_dim"]), torch.randn(B, SMALL["pooled_projection_dim"]))
        return bench.saved_activation_bytes(lambda: P2.policy_velocities(tr, x, t, c), tr.parameters())
    two, four, eight = count(2), count(4), count(8)
    assert two > 0 and four == 2 * two and eight == 4 * two
    tr.enable_gradient_checkpointing()
    assert count(4) < four / 4


def small_encoders(monkeypatch, depth):
    """bench's three text encoders swapped for small ones of the same classes, `depth` blocks each."""
    small_clip = dict(hidden_size=32, num_hidden_layers=depth, num_attention_heads=2, intermediate_size=64,
                      projection_dim=32)
    monkeypatch.setattr(bench, "CLIP_L", small_clip)
    monkeypatch.setattr(bench, "CLIP_G", dict(small_clip, hidden_size=48, projection_dim=48))
    monkeypatch.setattr(bench, "T5_XXL", dict(vocab_size=1000, d_model=32, d_ff=64, num_layers=depth,
                                              num_heads=2, d_kv=16, feed_forward_proj="gated-gelu",
                                              is_encoder_decoder=False))


def test_encoder_activations_are_counted_per_sequence(monkeypatch):
    """Phase I's count on small encoders of the real classes: every encoder keeps something for the backward
    to its delta, and more for longer T5 inputs. CLIP keeps the same per sequence on two and on four
    sequences; T5 keeps its relative-position bias (1 x heads x L x L) once for the whole batch, so its
    figure per sequence on two sequences exceeds that on four by a quarter of those bytes: 1 % here, under
    1 % at T5-XXL's shape."""
    small_encoders(monkeypatch, 2)
    two, four = bench.encoder_activation_bytes("cpu", 2, 16), bench.encoder_activation_bytes("cpu", 4, 16)
    assert set(two) == {"clip_l", "clip_g", "t5"} and all(v > 0 for v in two.values())
    assert two["clip_l"] == four["clip_l"] and two["clip_g"] == four["clip_g"]
    assert four["t5"] < two["t5"] < 1.02 * four["t5"]
    assert bench.encoder_activation_bytes("cpu", 2, 32)["t5"] > two["t5"]
    # the depth: counted from copies of one and two blocks, the same as counting the whole encoder
    for depth in (2, 3):
        for key, field in (("CLIP_L", "num_hidden_layers"), ("CLIP_G", "num_hidden_layers"),
                           ("T5_XXL", "num_layers")):
            monkeypatch.setattr(bench, key, dict(getattr(bench, key), **{field: depth}))
        whole = bench.encoder_activation_bytes("cpu", 2, 16, layers={"clip_l": depth, "clip_g": depth,
                                                                      "t5": depth})
        assert bench.encoder_activation_bytes("cpu", 2, 16) == whole


def test_generator_activations_by_variant_pair_and_prompt_and_in_depth(monkeypatch):
    """The amortized generator's count: a step of P prompts at K keeps
    P * ((K - 1) a + (K - 1)(K - 2)/2 c + b) (a variant's encoder passes, a pair's cosine products in L_div, a
    prompt's generator pass). From the counts
    at K = 2, 3 and 4 that gives a direct count at K = 6 exactly, on the tiny encoders; on small encoders of
    the real classes, the count extrapolated from one and two blocks equals the count of the whole depth."""
    import phase1_perturb as P1
    text = S.load_text("tiny", t5_len=16)
    gen = S.PerturbationGenerator(
        {n: (S.token_embedding(e).weight.shape[1], e.config.d_model if n == "t5" else e.config.hidden_size,
             0.02) for n, e in text["encoders"].items()}, rank=5, hidden=8)
    prompts = ["a photo of a cat", "two dogs on a green lawn"]
    tokens = S.tokenize(text, prompts)
    at = {K: bench.saved_activation_bytes(
        lambda: P1.generator_loss(gen, text, prompts, K, 0.85, 0.025, 1.0, 0, tokens),
        [p for e in text["encoders"].values() for p in e.parameters()] + list(gen.parameters())) / 2
        for K in (2, 3, 4, 6)}
    c = at[4] - 2 * at[3] + at[2]
    a, b = at[3] - at[2] - c, 2 * at[2] - at[3] + c
    assert a > 0 and b > 0 and c > 0 and at[6] == 5 * a + 10 * c + b
    small_encoders(monkeypatch, 3)
    whole = bench.generator_activation_bytes("cpu", 16, rank=4, hidden=8,
                                             layers={"clip_l": 3, "clip_g": 3, "t5": 3})
    assert bench.generator_activation_bytes("cpu", 16, rank=4, hidden=8) == whole
    assert all(v > 0 for fig in whole.values() for v in fig)
    assert (bench.generator_step_bytes(whole, 4, 12)
            == 4 * sum(11 * a + 55 * c + b for a, c, b in whole.values()))


def test_epoch_cost_by_hand():
    b = bench.read_budget("config/geneval_g4k12.py")
    assert ((b["G"], b["K"], b["prompts_per_epoch"], b["steps"], b["timestep_fraction"])
            == (4, 12, 24, 10, 0.99))
    cost = dict(sample=0.01, decode=0.02, train=0.03, tail=0.5)
    per_gpu, parts, total = bench.epoch_cost(b, 8, cost)
    # 24 prompts x 12 x 4 = 1152 samples / 8 GPUs = 144; 10 sampler steps;
    # floor(10 * 0.99) = 9 training timesteps
    assert per_gpu == 144
    assert parts["sample"] == pytest.approx(144 * 10 * 0.01)
    assert parts["decode"] == pytest.approx(144 * 0.02)
    assert parts["train"] == pytest.approx(144 * 9 * 0.03 + 0.5)
    assert total == pytest.approx(14.4 + 2.88 + 38.88 + 0.5)
    nft = bench.read_budget("config/geneval_nft_g24.py")
    assert bench.epoch_cost(nft, 8, cost)[0] == 144 and math.isclose(bench.epoch_cost(nft, 8, cost)[2], total)


def test_grpo_epoch_flops_and_cost_by_hand():
    """objective="grpo": CFG doubles every call; E²PO's "orig" scoring adds a call at each perturbed step
    (gamma > 0: the first 7 of SD3.5's 10 shift-3 steps at rho = 0.4, sigma 0.6022 > 0.6 the last); each of
    the 9 trained steps costs theta's forward and backward and the base's forward (kl_beta > 0)."""
    flow = bench.read_budget("config/geneval_flowgrpo_g24.py")
    e2po = bench.read_budget("config/geneval_grpo_g4k12.py")
    assert bench.grpo_forwards(flow) == (2, 0, True) and bench.grpo_forwards(e2po) == (2, 7, True)
    assert bench.grpo_forwards(dict(e2po, grpo_old_logprob="sampling"))[1] == 0
    assert bench.grpo_forwards(dict(e2po, use_schedule=False))[1] == 10
    f_fwd, f_ref, f_train = 1.0, 10.0, 100.0
    assert bench.epoch_flops(flow, f_fwd, f_ref, f_train) == 1152 * 2 * (10 * 1 + 9 * (100 + 10))
    assert bench.epoch_flops(e2po, f_fwd, f_ref, f_train) == 1152 * 2 * (17 * 1 + 9 * (100 + 10))
    plain = dict(flow, kl_beta=0.0, guidance=1.0)  # no CFG, no KL term
    assert bench.epoch_flops(plain, f_fwd, f_ref, f_train) == 1152 * (10 + 900)
    cost = dict(sample=0.01, decode=0.02, train=0.03, tail=0.5, grpo_sample=0.04, grpo_train=0.05)
    per_gpu, parts, total = bench.epoch_cost(flow, 8, cost)
    assert per_gpu == 144 and parts["sample"] == pytest.approx(144 * 10 * 0.04)
    assert parts["train"] == pytest.approx(144 * 9 * 0.05 + 2 * 0.5)  # 2 optimizer steps an epoch
    assert bench.epoch_cost(e2po, 8, cost)[1]["sample"] == pytest.approx(144 * 17 * 0.04)


def test_peak_lookup():
    assert bench.lookup_peak("NVIDIA H100 80GB HBM3") == 989
    assert bench.lookup_peak("NVIDIA H100 PCIe") == 756
    assert bench.lookup_peak("NVIDIA A100-SXM4-80GB") == 312
    assert bench.lookup_peak("NVIDIA GeForce RTX 4090") == 165
    assert bench.lookup_peak("cpu") is None and bench.lookup_peak("NVIDIA H100 NVL") is None
    assert bench.lookup_peak("cpu", 100) == 100


def test_tiny_run_prints_every_section(capsys):
    bench.main(["--shape=tiny", "--repeats=1", "--epoch_prompts=1"])
    out = capsys.readouterr().out
    for heading in ("== model FLOPs", "== resident weights", "== activations of a training forward",
                    "== sampling", "ours / diffusers", "== VAE decode", "== training step",
                    "checkpointing off", "== epoch at equal N", "== per GPU per epoch",
                    "config/pickscore_g8k3.py", "== objective=grpo (Flow-GRPO's) with CFG",
                    "config/geneval_flowgrpo_g24.py", "objective=grpo with CFG:"):
        assert heading in out, heading
    assert "MFU n/a" in out and "n/a (CPU)" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the default shape runs the real benchmark")
def test_sd35m_on_cpu_prints_the_exact_parts_and_stops(capsys):
    bench.main([])
    out = capsys.readouterr().out
    assert "== resident weights" in out and "--shape=tiny" in out and "== sampling" not in out
    assert "--count_activations=True" in out and "== activations" not in out


def test_transformer_activations_extrapolate_from_two_blocks():
    """SD3.5-Large's count is taken on copies of one and two blocks and extrapolated: equal to the count of
    the whole depth for a transformer whose blocks are alike (no dual-attention ones), here three."""
    small = dict(bench.SD35L, num_layers=3, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
                 pos_embed_max_size=16)
    whole = bench.transformer_activation_bytes(small, "cpu", res=64, t5_tokens=8, rank=4, depth=3)
    assert whole > 0
    assert bench.transformer_activation_bytes(small, "cpu", res=64, t5_tokens=8, rank=4) == whole
    deeper = bench.transformer_activation_bytes(dict(small, num_layers=5), "cpu", res=64, t5_tokens=8, rank=4)
    assert deeper > whole


def test_gpu_check_in_process_sections_run_on_cpu(tmp_path, monkeypatch):
    """The GPU script's in-process checks (theta under DDP, the reward backbones, bf16 determinism) run here
    at tiny size: a name error in them would otherwise first show on a lent GPU, whose minutes are few."""
    import gpu_check as G
    monkeypatch.setattr(G, "quick", True)
    monkeypatch.setattr(G, "repeats", 1)
    dev = torch.device("cpu")
    where = {"work": str(tmp_path / "work"), "logs": str(tmp_path / "logs")}
    for d in where.values():
        os.mkdir(d)
    for fn in (G.check_ddp, G.check_rewards, G.check_determinism):
        figs = {}
        summary = fn(dev, where, figs, 60)
        assert isinstance(summary, str) and summary and figs, fn.__name__
    assert "bit for bit" in G.check_determinism(dev, where, {}, 60)


def test_gpu_check_writes_three_files_to_OUT(tmp_path, monkeypatch):
    """The GPU machine's tool brings back at most 8 files from $OUT: the report and one archive of the logs go
    there, the sections' runs (dozens of files) elsewhere. A time budget under 10 s skips every section."""
    import tarfile

    import gpu_check as G
    report, scratch = tmp_path / "OUT", tmp_path / "scratch"
    monkeypatch.setenv("OUT", str(report))
    monkeypatch.chdir(tmp_path)  # main moves to the repository's root; monkeypatch moves back
    G.main(["--device=cpu", "--time_budget=5", f"--out={scratch}"])
    assert sorted(os.listdir(report)) == ["gpu_check.json", "gpu_check.md", "gpu_check_logs.tar.gz"]
    assert sorted(os.listdir(scratch)) == ["logs", "work"]
    with open(report / "gpu_check.json", encoding="utf-8") as f:
        sections = json.load(f)["sections"]
    assert sorted(sections) == list("abcde") and all(s["status"] == "skipped" for s in sections.values())
    with tarfile.open(report / "gpu_check_logs.tar.gz") as tar:
        assert tar.getnames() == ["logs"]
