"""
Tests of the E²PO reference implementation, all on CPU with the tiny random-weight model:
    python -m pytest -q
Math units are pinned to values worked by hand from the paper's formulas; every script runs end to end.
"""
import json
import math
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

import numpy as np
import pytest
import torch

import phase1_perturb
import sample
import tiny
from configurator import configure

PROMPTS = ["a photo of a red cat", "two dogs on a green lawn", "Two dogs!", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def pipe():
    return tiny.pipeline(0)


@pytest.fixture(scope="module")
def text(pipe):
    return sample.load_text("tiny", t5_len=16, pipe=pipe)


@pytest.fixture
def prompt_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS[:3]) + "\n")
    return str(p)


# ------------------------------------------------- gamma and mix_condition (the paper's noise-aware schedule)
def test_gamma_edges():
    rho = 0.4
    assert sample.gamma(1.0, rho) == pytest.approx(1.0)
    assert sample.gamma(1 - rho, rho) == pytest.approx(0.0, abs=1e-7)
    assert sample.gamma(0.3, rho) == 0.0  # below 1 - rho: clipped to 0
    assert sample.gamma(0.8, rho) == pytest.approx(0.5)  # (0.8 - 0.6) / 0.4
    for s in (0.0, 0.25, 0.7, 1.0):  # rho = 1: gamma is sigma itself
        assert sample.gamma(s, 1.0) == pytest.approx(s)
    g = sample.gamma(torch.tensor([1.0, 0.8, 0.5]), rho)
    assert torch.allclose(g, torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError):
        sample.gamma(0.5, 0.0)


def test_mix_condition_endpoints_and_midpoint():
    c_opt = (torch.full((2, 3, 4), 2.0), torch.full((2, 5), 2.0))
    c_orig = (torch.zeros(2, 3, 4), torch.zeros(2, 5))
    assert all(torch.equal(a, b) for a, b in zip(sample.mix_condition(c_opt, c_orig, 1.0, 0.4), c_opt))
    assert all(torch.equal(a, b) for a, b in zip(sample.mix_condition(c_opt, c_orig, 0.5, 0.4), c_orig))
    mid = sample.mix_condition(c_opt, c_orig, 0.8, 0.4)
    assert torch.allclose(mid[0], torch.ones(2, 3, 4)) and torch.allclose(mid[1], torch.ones(2, 5))
    per = sample.mix_condition(c_opt, c_orig, torch.tensor([1.0, 0.5]), 0.4)  # per-sample sigma
    assert torch.equal(per[0][0], c_opt[0][0]) and torch.equal(per[0][1], c_orig[0][1])
    assert torch.equal(per[1][0], c_opt[1][0]) and torch.equal(per[1][1], c_orig[1][1])


# ----------------------------------------------------------------------------- embedding_loss (Phase I)
def test_embedding_loss_by_hand():
    s = 1 / math.sqrt(2)
    # two orthogonal variants, anchor halfway: cos_anc = 0.7071 each, pairwise cos = 0
    e, e_anc = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 1.0])
    expected = 2 * (abs(s - 0.85) - 0.05)  # L_div = 0; L_anc = 2 * 0.0929
    assert (phase1_perturb.embedding_loss(e, e_anc, 0.85, 0.05, 1.0).item()
            == pytest.approx(expected, abs=1e-6))
    # three variants at 0, 90 and 45 degrees: pairwise cos (0, 0.7071, 0.7071) -> mean 0.4714
    e3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    anc = torch.tensor([1.0, 0.0])  # cos_anc = 1, 0, 0.7071
    L_div = (0 + s + s) / 3
    L_anc = max(abs(1 - 0.85) - 0.05, 0) + max(abs(0 - 0.85) - 0.05, 0) + max(abs(s - 0.85) - 0.05, 0)
    got = phase1_perturb.embedding_loss(e3, anc, 0.85, 0.05, 2.0).item()
    assert got == pytest.approx(2.0 * L_div + L_anc, abs=1e-6)
    # lambda_div = 0 and mu = 1 - cos of the 45 degree variant: pure anchor term on the other two
    assert phase1_perturb.embedding_loss(e3, anc, s, 0.0, 0.0).item() == pytest.approx((1 - s) + s, abs=1e-6)


def test_embedding_loss_dead_zone_and_batch():
    # a variant with cos_anc = 0.82 sits inside the ring [0.80, 0.90]: no anchor loss, no gradient
    c = 0.82
    e = torch.tensor([[c, math.sqrt(1 - c * c)]], requires_grad=True)
    loss = phase1_perturb.embedding_loss(e, torch.tensor([1.0, 0.0]), 0.85, 0.05, 1.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(e.grad == 0)
    # just outside the ring the hinge is linear: |0.79 - 0.85| - 0.05 = 0.01
    c = 0.79
    e = torch.tensor([[c, math.sqrt(1 - c * c)]])
    assert (phase1_perturb.embedding_loss(e, torch.tensor([1.0, 0.0]), 0.85, 0.05, 1.0).item()
            == pytest.approx(0.01, abs=1e-6))
    # a batch of prompts is the sum of the prompts alone
    torch.manual_seed(0)
    eb, ab = torch.randn(3, 4, 8), torch.randn(3, 8)
    single = sum(phase1_perturb.embedding_loss(eb[i], ab[i], 0.85, 0.05, 0.7) for i in range(3))
    assert (phase1_perturb.embedding_loss(eb, ab, 0.85, 0.05, 0.7).item()
            == pytest.approx(single.item(), rel=1e-6))


# --------------------------------------------------------------------------- encoding (Phase I, the schedule)
def test_encode_equals_diffusers_encode_prompt(pipe, text):
    ref = pipe.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                             max_sequence_length=16)
    pe, pooled = sample.encode(text, PROMPTS)
    assert pe.shape == (4, 77 + 16, 96) and pooled.shape == (4, 80)
    assert torch.equal(pe, ref[0]) and torch.equal(pooled, ref[2])
    zero = {n: torch.zeros(4, ids.shape[1], sample.token_embedding(text["encoders"][n]).weight.shape[1])
            for n, (ids, _) in sample.tokenize(text, PROMPTS).items()}
    pe0, pooled0 = sample.encode(text, PROMPTS, zero)  # delta = 0 through the hook: bit-identical
    assert torch.equal(pe0, ref[0]) and torch.equal(pooled0, ref[2])


def test_content_positions(text):
    tok = sample.tokenize(text, ["Two dogs!", "a red cat"])
    # "Two dogs!" is 8 characters = 8 tokens in the tiny tokenizers; CLIP-G pads with '!' (id 0),
    # the same id as the '!' inside the prompt, which must stay a content token
    for name in ("clip_l", "clip_g"):
        ids, content = tok[name]
        assert content[0].tolist() == [False] + [True] * 8 + [False] * 68  # BOS, 8 content, EOS + padding
        assert content[1].sum() == 7  # "a red cat": spaces are not tokens
    ids, content = tok["clip_g"]
    # '!' in prompt vs '!' padding
    assert ids[0, 8] == 0 and ids[0, 20] == 0 and content[0, 8] and not content[0, 20]
    ids, content = tok["t5"]  # T5: no BOS; content then </s> then <pad>
    assert (content[0].tolist()
            == [True] * ids[0].ne(0).sum().sub(1).item() + [False] * (16 - ids[0].ne(0).sum().item() + 1))
    assert ids[0, content[0].sum()] == 1  # the </s> right after the content


def _first_layer(enc):
    return (enc.encoder.block[0] if hasattr(enc, "encoder") and hasattr(enc.encoder, "block")
            else enc.text_model.encoder.layers[0])


def test_prompts_cut_at_an_encoders_limit_are_noted(text, capsys):
    """A prompt longer than CLIP's 77 tokens or T5's t5_len is cut, as diffusers cuts it: said once, with
    how many and at which encoder; prompts that fit say nothing."""
    long = " ".join(["a red cat"] * 40)  # 120 words
    sample.note_cut_prompts(text, PROMPTS[:1] + [long])
    said = capsys.readouterr().out
    assert ("1 of 2 at clip_l's 77 tokens, 1 of 2 at clip_g's 77 tokens, 1 of 2 at t5's 16 tokens" in said
            and said.count("note:") == 1)
    sample.note_cut_prompts(text, PROMPTS[:1])
    assert capsys.readouterr().out == ""


def test_delta_touches_only_content_positions(text):
    tokens = sample.tokenize(text, PROMPTS[:2])
    torch.manual_seed(0)
    deltas = {n: torch.randn(2, ids.shape[1], sample.token_embedding(text["encoders"][n]).weight.shape[1])
              for n, (ids, _) in tokens.items()}  # nonzero everywhere, padding included
    for name, (ids, content) in tokens.items():
        enc, seen = text["encoders"][name], []
        h = _first_layer(enc).register_forward_pre_hook(
            lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
        try:
            plain = sample.run_encoders(text, PROMPTS[:2], names=[name])[name]
            pert = sample.run_encoders(text, PROMPTS[:2], {name: deltas[name]}, names=[name])[name]
        finally:
            h.remove()
        x0, x1 = seen[0], seen[1]  # input embeddings entering the first layer
        assert torch.equal(x0[~content], x1[~content]), name  # BOS, EOS, padding untouched
        assert torch.allclose(x1[content] - x0[content], deltas[name][content], atol=1e-5), name
        assert not torch.allclose(plain[0], pert[0]) and not torch.allclose(plain[1], pert[1]), name
    assert len(sample.token_embedding(text["encoders"]["t5"])._forward_hooks) == 0  # hooks removed


def test_hook_removed_on_error(text):
    bad = {"clip_l": torch.zeros(1, 5, 32)}  # wrong sequence length: the hook raises inside the forward
    with pytest.raises(RuntimeError):
        sample.run_encoders(text, PROMPTS[:1], bad, names=["clip_l"])
    assert len(sample.token_embedding(text["encoders"]["clip_l"])._forward_hooks) == 0


def test_scatter_content():
    content = torch.tensor([[False, True, True, False], [False, True, False, False]])
    # prompt 0: 2 variants x 2 tokens
    rows = [torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]]), torch.tensor([[[5.0]]])]
    dense = sample.scatter_content(rows, content)
    assert dense.squeeze(-1).tolist() == [[0, 1, 2, 0], [0, 3, 4, 0], [0, 5, 0, 0]]


def test_local_folder_loads_like_tiny(pipe, text, tmp_path):
    pipe.save_pretrained(tmp_path)
    t2 = sample.load_text(str(tmp_path), t5_len=16)
    a, b = sample.encode(text, PROMPTS), sample.encode(t2, PROMPTS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    p2 = sample.load_pipeline(str(tmp_path))
    assert p2.tokenizer_2.pad_token == "!" and tuple(p2.transformer.config.dual_attention_layers) == (0,)


def test_missing_model_is_one_clear_sentence():
    with pytest.raises(SystemExit, match="does not exist"):
        sample.load_text("/nonexistent/sd35")
    with pytest.raises(SystemExit, match="download it first"):
        sample.load_text("stabilityai/stable-diffusion-3.5-medium")


# ----------------------------------------------------------------------------- sampler
class GaussianFlow(torch.nn.Module):
    """The exact velocity of x_t = (1-t) x0 + t eps for x0 ~ N(m, s^2): the ODE maps eps to m + s*eps.
    Records the conditions it is called with."""

    def __init__(self, m=0.5, s=0.3):
        super().__init__()
        self.m, self.s, self.calls = m, s, []

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict=False):
        x, t = hidden_states, timestep[0].item() / 1000
        self.calls.append((t, encoder_hidden_states.clone(), pooled_projections.clone()))
        var = (1 - t) ** 2 * self.s ** 2 + t ** 2
        x0 = self.m + (1 - t) * self.s ** 2 / var * (x - (1 - t) * self.m)
        return ((x - x0) / t,)


def test_solvers_converge_at_their_order(pipe):
    """Error against the exact ODE solution when steps double: Euler halves (1st order), dpm2 quarters
    (2nd)."""
    torch.manual_seed(0)
    noise, cond = torch.randn(4, 16, 4, 4), (torch.zeros(4, 3, 2), torch.zeros(4, 2))
    exact = 0.5 + 1.0 * noise
    err = {(s, n): (sample.sample(GaussianFlow(0.5, 1.0), sample.sigma_grid(pipe.scheduler, n), noise, cond,
                                  solver=s) - exact).abs().max().item()
           for s in ("euler", "dpm2") for n in (80, 160)}
    assert 1.7 < err["euler", 80] / err["euler", 160] < 2.3
    assert err["dpm2", 80] / err["dpm2", 160] > 3.5 and err["dpm2", 160] < 0.01
    with pytest.raises(ValueError, match="unknown solver"):
        sample.sample(GaussianFlow(), sample.sigma_grid(pipe.scheduler, 3), noise, cond, solver="heun")


def test_sampler_mixes_conditions_per_step(pipe):
    """Rows of c_opt follow the gamma schedule; rows whose c_opt equals c_orig (k = 0) stay C^orig."""
    flow = GaussianFlow()
    c_orig = (torch.zeros(2, 3, 2), torch.zeros(2, 2))
    c_opt = (torch.stack([torch.zeros(3, 2), torch.ones(3, 2)]), torch.stack([torch.zeros(2), torch.ones(2)]))
    sig = sample.sigma_grid(pipe.scheduler, 10)
    sample.sample(flow, sig, torch.randn(2, 16, 4, 4), c_orig, c_opt, rho=0.4)
    assert len(flow.calls) == 10
    for (t, pe, pooled), s in zip(flow.calls, sig[:-1].tolist()):
        assert t == pytest.approx(s, abs=1e-5)
        assert torch.all(pe[0] == 0) and torch.all(pooled[0] == 0)
        assert (torch.allclose(pe[1], torch.full((3, 2), sample.gamma(s, 0.4)))
                and torch.allclose(pooled[1], torch.full((2,), sample.gamma(s, 0.4))))
    gammas = [sample.gamma(s, 0.4) for s in sig[:-1].tolist()]
    assert (gammas[0] == 1.0 and gammas[-1] == 0.0
            and sum(g > 0 for g in gammas) == sum(s > 0.6 for s in sig[:-1].tolist()))


def test_sampling_is_deterministic_under_seed(pipe, text):
    cond = tuple(c.repeat_interleave(2, 0) for c in sample.encode(text, PROMPTS[:1]))
    shape = sample.latent_shape(pipe, 64)
    runs = [sample.sample(pipe.transformer, sample.sigma_grid(pipe.scheduler, 3),
                          sample.image_noise([7, 8], shape, "cpu"), cond)
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0][0], runs[0][1])
    img = sample.decode(pipe.vae, runs[0])
    assert img.shape == (2, 3, 64, 64) and img.min() >= 0 and img.max() <= 1


# -------------------------------------------------------------------------- Phase I and the perturbation file
@pytest.fixture(scope="module")
def phase1_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("p1")
    pf = d / "prompts.txt"
    pf.write_text("\n".join(PROMPTS[:3]) + "\n")
    out = str(d / "pert.safetensors")
    phase1_perturb.main(["config/tiny_cpu.py", f"--prompts={pf}", f"--perturbations={out}",
                         "--K=4", "--iters=100", "--t5_len=16"])
    return str(pf), out


def test_phase1_reaches_the_ring_and_spreads(phase1_file):
    pf, out = phase1_file
    from safetensors import safe_open
    meta = json.loads(safe_open(out, "pt").metadata()["e2po"])
    assert meta["K"] == 4 and meta["encoders"] == ["clip_l", "clip_g", "t5"] and meta["n_prompts"] == 3
    for name, s in meta["summary"].items():
        # inside [mu-eps, mu+eps] up to 0.01
        assert abs(s["cos_anchor_final"] - meta["mu"]) <= meta["eps"] + 0.01, name
        assert s["cos_anchor_init"] > 0.95  # sigma_init is small: variants start near the anchor
        assert s["pairwise_final"] < s["pairwise_init"] - 0.2, name  # L_div spread them apart


@pytest.mark.parametrize("K", [3, 4, 12])
def test_phase1_every_variant_ends_strictly_inside_the_ring(K, tmp_path, capsys):
    """K = 3 is the paper's PickScore budget: with two variants and lambda_div = 1 the spreading term
    beats the hinge and both end at cos 0.5. The default balance lands every K inside [0.80, 0.90]."""
    pf = tmp_path / "p.txt"
    pf.write_text(PROMPTS[3] + "\n")
    out = tmp_path / "p.safetensors"
    phase1_perturb.main(["config/tiny_cpu.py", f"--prompts={pf}", f"--perturbations={out}", f"--K={K}",
                         "--t5_len=16"])
    from safetensors import safe_open
    meta = json.loads(safe_open(str(out), "pt").metadata()["e2po"])
    assert meta["lambda_div"] == (K - 2) / 2
    for name, s in meta["summary"].items():
        assert s["in_ring"] == 1.0, (K, name, s)  # strictly: |cos - mu| <= eps for every variant
        assert s["pairwise_final"] < s["pairwise_init"] - 0.2, name
    assert "WARNING" not in capsys.readouterr().out


def test_phase1_ring_report_is_strict_and_warns(tmp_path, capsys):
    """A variant at 0.7995 is outside [0.80, 0.90] (no hidden slack); a run that ends outside says so."""
    cos = torch.tensor([[0.7995, 0.801, 0.899, 0.9005]])
    summary, _ = phase1_perturb.summarize(
        {"t5": {"init": (cos, torch.zeros(1)), "final": (cos, torch.zeros(1))}}, 0.85, 0.05)
    assert summary["t5"]["in_ring"] == 0.5
    pf = tmp_path / "p.txt"
    pf.write_text(PROMPTS[3] + "\n")
    phase1_perturb.main(["config/tiny_cpu.py", f"--prompts={pf}",
                         f"--perturbations={tmp_path / 'p.safetensors'}", "--K=3", "--t5_len=16",
                         "--iters=2"])
    assert "WARNING" in capsys.readouterr().out


def test_code_lines_fit_110_columns():
    # the repository is read as much as it is run: code and scripts stay within 110 columns
    root = os.path.dirname(os.path.abspath(__file__))
    long = []
    for folder, subs, files in os.walk(root):
        subs[:] = [d for d in subs if not d.startswith(".") and d not in ("out", "venv", "__pycache__")]
        for name in files:
            if name.endswith((".py", ".sh")):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    long += [f"{os.path.relpath(path, root)}:{i}" for i, ln in enumerate(f, 1)
                             if len(ln.rstrip("\n")) > 110]
    assert not long, f"lines over 110 characters: {', '.join(long[:10])}"


def test_stages_share_only_keys_that_mean_the_same():
    # one config file serves every stage: a key two stages both read must mean the same in both (Phase I's
    # learning rate was once `lr`, so a config setting Phase II's lr froze Phase I's deltas)
    import sample
    shared = set(phase1_perturb.config_keys) & set(phase2_align.config_keys)
    assert shared == {"K", "device", "dtype", "model", "overwrite", "perturbations", "prompts", "seed",
                      "t5_len"}
    assert shared == set(phase1_perturb.config_keys) & set(sample.config_keys)
    for mod in (phase1_perturb, phase2_align, sample):  # constants (upper case) are not settings
        # K and G are the paper's symbols
        assert not [k for k in mod.config_keys if k.isupper() and len(k) > 1]


def test_phase1_deterministic_and_batch_independent(text):
    kw = dict(names=("clip_l",), K=3, mu=0.85, eps=0.05, lambda_div=1.0,
              sigma_init=0.1, delta_lr=0.05, iters=5, seed=1)
    a, _ = phase1_perturb.learn_perturbations(text, PROMPTS, [0, 1], **kw)
    b, _ = phase1_perturb.learn_perturbations(text, PROMPTS, [0, 1], **kw)
    c, _ = phase1_perturb.learn_perturbations(text, PROMPTS, [1], **kw)  # prompt 1 alone
    L = sample.tokenize(text, PROMPTS[:1])["clip_l"][1].sum().item()  # 15 characters without spaces
    assert torch.equal(a[0]["clip_l"], b[0]["clip_l"]) and a[0]["clip_l"].shape == (2, L, 32) and L == 15
    assert torch.allclose(a[1]["clip_l"].float(), c[1]["clip_l"].float(), atol=2e-3)


def test_perturbation_file_round_trip(phase1_file):
    pf, out = phase1_file
    prompt_list, _ = sample.read_prompts(pf)
    text = sample.load_text("tiny", t5_len=16)
    pert = sample.load_perturbations(out, text, prompt_list, K=4)
    rows = pert["rows"](1)
    assert rows["t5"].shape[0] == 3 and rows["t5"].dtype == torch.float16
    pe, pooled = sample.perturbed_conditions(text, pert, prompt_list, [1, 2])
    assert pe.shape == (6, 77 + 16, 96) and pooled.shape == (6, 80)
    tokens = sample.tokenize(text, [prompt_list[1]])
    dense = {n: sample.scatter_content([rows[n].float()], tokens[n][1]) for n in rows}
    ref = sample.encode(text, [prompt_list[1]] * 3, dense)
    assert torch.allclose(pe[:3], ref[0], atol=1e-5) and torch.allclose(pooled[:3], ref[1], atol=1e-5)
    orig = sample.encode(text, [prompt_list[1]])
    assert not torch.allclose(pe[0], orig[0][0])


def test_mismatched_perturbation_file_is_refused(phase1_file, tmp_path):
    pf, out = phase1_file
    prompt_list, _ = sample.read_prompts(pf)
    text = sample.load_text("tiny", t5_len=16)
    with pytest.raises(SystemExit, match="other prompts"):
        sample.load_perturbations(out, text, prompt_list[:2])
    with pytest.raises(SystemExit, match="K=4 conditions"):
        sample.load_perturbations(out, text, prompt_list, K=12)
    with pytest.raises(SystemExit, match="t5_len"):
        sample.load_perturbations(out, sample.load_text("tiny", t5_len=32), prompt_list)
    with pytest.raises(SystemExit, match="learned on model 'tiny'"):
        sample.load_perturbations(out, dict(text, model="stabilityai/stable-diffusion-3.5-medium"),
                                  prompt_list)
    # same prompts, but rows of another token length (another tokenizer)
    from safetensors import safe_open
    h = safe_open(out, "pt")
    meta = json.loads(h.metadata()["e2po"])
    rows = {i: {n: h.get_tensor(f"{i}.{n}") for n in meta["encoders"]} for i in range(3)}
    rows[2]["clip_g"] = rows[2]["clip_g"][:, :-1]
    bad = str(tmp_path / "bad.safetensors")
    phase1_perturb.save_perturbations(bad, rows, meta)
    with pytest.raises(SystemExit, match="content tokens"):
        sample.load_perturbations(bad, text, prompt_list)
    with pytest.raises(SystemExit, match="not found"):
        sample.load_perturbations(str(tmp_path / "none.safetensors"), text, prompt_list)


# ----------------------------------------------------------------------------- the sample.py CLI
def test_sample_cli_with_and_without_perturbations(phase1_file, tmp_path):
    pf, out = phase1_file
    common = ["config/tiny_cpu.py", f"--prompts={pf}", "--t5_len=16", "--steps=3", "--G=2"]
    sample.main(common + ["--K=1", f"--out_dir={tmp_path / 'a'}"])
    sample.main(common + ["--K=4", f"--perturbations={out}", f"--out_dir={tmp_path / 'b'}"])
    for sub, K in (("a", 1), ("b", 4)):
        d = tmp_path / sub
        index = [json.loads(ln) for ln in (d / "index.jsonl").read_text().splitlines()]
        assert len(index) == 3 * K * 2
        assert ({(r["prompt_index"], r["k"], r["g"]) for r in index}
                == {(p, k, g) for p in range(3) for k in range(K) for g in range(2)})
        assert all((d / r["file"]).is_file() for r in index) and len(list(d.glob("*_grid.png"))) == 3
        assert json.loads((d / "config.json").read_text())["K"] == K
    import numpy as np
    from PIL import Image
    png = lambda sub, f: np.asarray(Image.open(tmp_path / sub / f))
    a, b0, b1 = png("a", "00000_k00_g00.png"), png("b", "00000_k00_g00.png"), png("b", "00000_k01_g00.png")
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b0)  # k = 0 is C^orig with the same seed in both runs
    assert not np.array_equal(b0, b1)


def test_sample_cli_under_torchrun_writes_what_one_process_writes(phase1_file, tmp_path):
    """torchrun --nproc_per_node=2 sample.py: prompts shared out over ranks, batches across prompts (of
    other compositions than one process makes), the same PNG files byte for byte and one index.jsonl."""
    pf, out = phase1_file
    args = ["config/tiny_cpu.py", f"--prompts={pf}", f"--perturbations={out}", "--K=4", "--G=2",
            "--t5_len=16", "--steps=3", "--batch_size=5"]
    _torchrun("sample.py", [*args, f"--out_dir={tmp_path / 'one'}"], 1)
    _torchrun("sample.py", [*args, f"--out_dir={tmp_path / 'two'}"], 2)
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "index.jsonl").read_text() == (two / "index.jsonl").read_text()
    names = sorted(p.name for p in one.iterdir() if p.suffix == ".png")
    assert (len(names) == 3 * 4 * 2 + 3
            and names == sorted(p.name for p in two.iterdir() if p.suffix == ".png"))
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)


def test_sample_cli_replaces_earlier_samples_only_when_told(prompt_file, tmp_path, monkeypatch):
    """sample.py into a folder of earlier samples: refused before any model loads, nothing touched; with
    --overwrite=True the earlier samples go (no old PNG stays beside the new ones), the folder's other files
    stay, and a prompt file inside what it would remove is refused."""
    d = tmp_path / "s"
    common = ["config/tiny_cpu.py", f"--prompts={prompt_file}", "--K=1", "--t5_len=16", "--steps=2",
              f"--out_dir={d}"]
    sample.main(common + ["--G=2"])
    (d / "notes.txt").write_text("mine")
    before = _files(d)
    real = sample.load_pipeline
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit, match="holds earlier samples .*pass --overwrite=True"):
        sample.main(common + ["--G=1"])
    with pytest.raises(SystemExit, match="would remove .*index.jsonl, which holds the prompt file"):
        sample.main(common[:1] + [f"--prompts={d / 'index.jsonl'}"] + common[2:] + ["--overwrite=True"])
    assert _files(d) == before
    monkeypatch.setattr(sample, "load_pipeline", real)
    sample.main(common + ["--G=1", "--overwrite=True"])
    index = [json.loads(ln) for ln in (d / "index.jsonl").read_text().splitlines()]
    assert len(index) == 3 and (d / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in d.glob("*_k*_g*.png")) == sorted(r["file"] for r in index)


def test_sample_cli_checks_every_setting_before_loading(prompt_file, tmp_path, monkeypatch):
    """sample.py's settings, its LoRA and its out_dir are checked before any model loads: one sentence each,
    nothing written."""
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "pytorch_lora_weights.safetensors").write_bytes(b"\x08" + b"\x00" * 20)
    for extra, says in (("--resolution=30", "resolution=30 must be a positive multiple of 16"),
                        ("--guidance=0.5", "guidance=0.5 must be finite and >= 1"), ("--G=0", "G=0 must be"),
                        ("--steps=0", "steps=0 must be at least 1"), ("--solver=rk4", "solver='rk4' must be"),
                        ("--device=cuda", "this machine has no CUDA GPU"),
                        (f"--out_dir={tmp_path / 'file'}", "is a file: name a folder"),
                        (f"--lora={tmp_path / 'cut'}", "pytorch_lora_weights.safetensors cannot be read"),
                        (f"--lora={tmp_path}", "holds no pytorch_lora_weights.safetensors")):
        with pytest.raises(SystemExit, match=re.escape(says)):
            sample.main(["config/tiny_cpu.py", f"--prompts={prompt_file}", "--K=1",
                         f"--out_dir={tmp_path / 's'}", extra])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "file", "prompts.txt"]


def test_sample_cli_refuses_k_without_file(prompt_file, tmp_path):
    with pytest.raises(SystemExit, match="needs --perturbations"):
        sample.main(["config/tiny_cpu.py", f"--prompts={prompt_file}", "--K=4", "--perturbations=None",
                     f"--out_dir={tmp_path / 'x'}"])
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- prompts and config
def test_bad_prompt_files(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        sample.read_prompts(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(SystemExit, match="holds no prompts"):
        sample.read_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"tag": "x"}\n')
    with pytest.raises(SystemExit, match="line 2 has no 'prompt'"):
        sample.read_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "ok.jsonl").write_text('{"prompt": "a cat", "tag": "single_object"}\n')
    assert (sample.read_prompts(str(tmp_path / "ok.jsonl"))
            == (["a cat"], [{"prompt": "a cat", "tag": "single_object"}]))


def test_phase1_removes_the_temp_files_of_killed_runs(prompt_file, tmp_path):
    out = tmp_path / "p.safetensors"
    stale = [tmp_path / "p.safetensors.tmp4242", tmp_path / "p-00001-of-00002.safetensors.tmp77"]
    keep = tmp_path / "p2.safetensors.tmp5"  # another output's: not ours to remove
    for f in stale + [keep]:
        f.write_bytes(b"half a file")
    phase1_perturb.main(["config/tiny_cpu.py", f"--prompts={prompt_file}", f"--perturbations={out}", "--K=3",
                         "--iters=2", "--t5_len=16"])
    assert (sorted(p.name for p in tmp_path.iterdir() if "safetensors" in p.name)
            == ["p.safetensors", "p2.safetensors.tmp5"])


def test_phase1_config_keys_are_only_its_settings():
    assert "ENCODERS" not in phase1_perturb.config_keys and "encoders" in phase1_perturb.config_keys


def test_perturbation_file_accepts_the_same_model_folder_spelled_differently(
        tiny_folder, prompt_file, tmp_path):
    out = str(tmp_path / "p.safetensors")
    phase1_perturb.main(["config/tiny_cpu.py", f"--model={tiny_folder}/", f"--prompts={prompt_file}",
                         f"--perturbations={out}", "--K=3", "--iters=2", "--t5_len=16"])
    prompt_list, _ = sample.read_prompts(prompt_file)
    text = sample.load_text(tiny_folder, t5_len=16)  # "/path/model" vs the "/path/model/" it was learned with
    assert sample.load_perturbations(out, text, prompt_list, K=3)["K"] == 3
    with pytest.raises(SystemExit, match="learned on model"):
        sample.load_perturbations(out, dict(text, model=str(tmp_path)), prompt_list, K=3)


def test_phase1_bad_input_writes_nothing(tmp_path):
    out = tmp_path / "p.safetensors"
    with pytest.raises(SystemExit, match="not found"):
        phase1_perturb.main(["config/tiny_cpu.py", f"--prompts={tmp_path / 'none.txt'}",
                             f"--perturbations={out}"])
    with pytest.raises(SystemExit, match="at least 2"):
        phase1_perturb.main(["config/tiny_cpu.py", "--K=1", f"--perturbations={out}"])
    with pytest.raises(SystemExit, match="non-empty subset"):
        phase1_perturb.main(["config/tiny_cpu.py", "--encoders=('clip_x',)", f"--perturbations={out}"])
    assert not out.exists()


def test_phase1_refuses_to_replace_its_output_unless_told(prompt_file, tmp_path):
    """Phase I behaves like Phase II: a K=3 run onto a K=4 file stops, naming what it would replace, and the
    file is untouched; with --overwrite=True it is replaced."""
    out = tmp_path / "p.safetensors"
    args = ["config/tiny_cpu.py", f"--prompts={prompt_file}", f"--perturbations={out}", "--iters=2",
            "--t5_len=16"]
    phase1_perturb.main(args + ["--K=4"])
    before = out.read_bytes()
    with pytest.raises(SystemExit, match=re.escape(f"{out} holds the K=4 perturbations of 3 prompts of "
                                                   f"{prompt_file}: pass --overwrite=True to replace it")):
        phase1_perturb.main(args + ["--K=3"])
    assert out.read_bytes() == before
    phase1_perturb.main(args + ["--K=3", "--overwrite=True"])
    from safetensors import safe_open
    assert json.loads(safe_open(str(out), "pt").metadata()["e2po"])["K"] == 3


def test_phase1_checks_every_setting_and_its_output_before_loading(prompt_file, tmp_path, monkeypatch):
    """Where Phase I would write (a folder, a path under a file, a file it did not write, even with
    --overwrite=True) and every setting are checked before the encoders load: one sentence, nothing written.
    A run that diverges writes nothing and says so (not a NaN file for Phase II to trip on)."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    prompts_before = open(prompt_file).read()
    monkeypatch.setattr(sample, "load_text", lambda *a, **k: pytest.fail("loaded the encoders"))
    args = ["config/tiny_cpu.py", f"--prompts={prompt_file}", "--t5_len=16"]
    for extra, says in (((f"--perturbations={tmp_path / 'folder'}",), "is a folder: name a file"),
                        ((f"--perturbations={tmp_path / 'file' / 'p.safetensors'}",),
                         "not a writable folder"),
                        ((f"--perturbations={prompt_file}", "--overwrite=True"),
                         "is not a file phase1_perturb"),
                        (("--iters=0",), "iters=0 must be at least 1"),
                        (("--mu=1.5",), "mu=1.5 must be in (0, 1)"),
                        (("--mu=0",), "mu=0.0 must be in (0, 1)"),
                        (("--delta_lr=0",), "delta_lr=0.0 must be finite and > 0"),
                        (("--batch_prompts=0",), "batch_prompts=0 must be at least 1"),
                        (("--refine_iters=(5, -1)",), "refine_iters=(5, -1) must be whole numbers >= 0"),
                        (("--eps=1",), "eps=1.0 must be below 1"),
                        (("--sigma_init=-1",), "sigma_init=-1.0 must be finite and > 0"),
                        (("--amortize=True", "--gen_batch=0"), "gen_batch=0 must be at least 1"),
                        (("--device=cuda",), "this machine has no CUDA GPU")):
        extra = extra if extra[0].startswith("--perturbations") else (f"--perturbations={tmp_path / 'p'}",
                                                                      *extra)
        with pytest.raises(SystemExit, match=re.escape(says)):
            phase1_perturb.main(args + list(extra))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder", "prompts.txt"]
    assert open(prompt_file).read() == prompts_before
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="Phase I diverged: .* are not finite; nothing written"):
        phase1_perturb.main(args + [f"--perturbations={tmp_path / 'p'}", "--delta_lr=1e30", "--iters=3"])
    assert (sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
            == ["file", "folder", "prompts.txt"])


def test_configurator(tmp_path):
    g = {"lr": 1e-3, "K": 2, "name": "x", "path": None, "encoders": ("a", "b"), "flag": False}
    keys = list(g)
    cfg = configure(g, keys, ["--lr=1", "--path=out/p.safetensors", "--name=123", "--encoders=['a']",
                              "--flag=True"])
    assert cfg == {"K": 2, "encoders": ("a",), "flag": True, "lr": 1.0, "name": "123",
                   "path": "out/p.safetensors"}
    assert isinstance(g["lr"], float)
    with pytest.raises(SystemExit, match="unknown config key 'lrr'"):
        configure(g, keys, ["--lrr=1"])
    with pytest.raises(SystemExit, match="'K' expects int"):
        configure(g, keys, ["--K=0.5"])
    with pytest.raises(SystemExit, match="--key=value"):
        configure(g, keys, ["--K"])
    f = tmp_path / "c.py"
    f.write_text("K = 4\nbeta = 0.1\nimport math\n")  # beta is phase2's: skipped here
    f.write_text("K = 4\nmu = 0.9\nimport math\n")  # mu is phase1's: skipped by a script without it
    assert configure(g, keys, [str(f)])["K"] == 4
    f.write_text("K = 4\nlearning_rat = 0.1\n")
    with pytest.raises(SystemExit, match="'learning_rat', which no stage knows"):
        configure(g, keys, [str(f)])
    with pytest.raises(SystemExit, match="not found"):
        configure(g, keys, [str(tmp_path / "none.py")])


# --------------------------------------------------------------- Phase II formulas (DiffusionNFT's objective)
import phase2_align  # noqa: E402


def test_advantages_by_hand():
    R = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 13.0])
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    dev = torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0])  # minus the group means 2 and 11
    std = math.sqrt(129.5 / 6)  # population std of all six rewards (mean 6.5)
    assert torch.allclose(phase2_align.advantages(R, gid), dev / (std + 1e-4) / 10 + 0.5, atol=1e-6)
    per = torch.tensor([math.sqrt(2 / 3)] * 3 + [math.sqrt(2)] * 3)  # ddof 0 within each group
    assert torch.allclose(phase2_align.advantages(R, gid, global_std=False), dev / (per + 1e-4) / 10 + 0.5,
                          atol=1e-6)
    # group ids need not be contiguous or sorted
    assert torch.allclose(phase2_align.advantages(R, torch.tensor([7, 7, 7, 3, 3, 3])),
                          phase2_align.advantages(R, gid))


def test_advantages_clip_and_range():
    R = torch.tensor([0.0] * 29 + [1.0])  # one group: A of the outlier = sqrt(29) = 5.39 > 5
    r = phase2_align.advantages(R, torch.zeros(30, dtype=torch.long))
    std = math.sqrt(29) / 30
    assert r[-1].item() == 1.0  # clipped at A = 5 -> 5/10 + 0.5
    assert r[0].item() == pytest.approx(-(1 / 30) / (std + 1e-4) / 10 + 0.5, abs=1e-6)
    # clip = 10 leaves A = 5.38 alone and maps it by A / 20 + 0.5
    assert (phase2_align.advantages(R, torch.zeros(30, dtype=torch.long), clip=10.0)[-1].item()
            == pytest.approx((29 / 30) / (std + 1e-4) / 20 + 0.5, abs=1e-6))
    same = phase2_align.advantages(torch.full((4,), 3.0), torch.tensor([0, 0, 1, 1]))
    assert torch.all(same == 0.5)  # a collapsed group carries no signal: r = 1/2 for all
    rnd = phase2_align.advantages(torch.randn(64) * 100, torch.arange(64) // 8)
    assert rnd.min() >= 0 and rnd.max() <= 1


def _scalar(v):
    return torch.tensor([[[[v]]]], dtype=torch.float64)


def test_nft_loss_by_hand():
    # v_theta = 1, v_old = 0.5, x_t = 2, x0 = 1, t = 0.5, r = 0.75
    args = lambda: (_scalar(1.0), _scalar(0.5), _scalar(2.0), _scalar(1.0),
                    torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.75], dtype=torch.float64))
    # beta = 1: v+ = 1, v- = 0 -> x0+ = 1.5 (L+ = 0.25/0.5), x0- = 2 (L- = 1/1)
    assert phase2_align.nft_loss(*args(), beta=1.0).item() == pytest.approx(0.75 * 0.5 + 0.25 * 1.0)
    # beta = 0.5: v+ = 0.75, v- = 0.25 -> errors 0.625 and 0.875, L = |err|
    assert phase2_align.nft_loss(*args(), beta=0.5).item() == pytest.approx(0.75 * 0.625 + 0.25 * 0.875)
    # self-normalisation over CHW: errors (1, 3) -> mean(err^2) / mean|err| = 5 / 2
    x0 = torch.tensor([[[[0.0, 0.0]]]])
    got = phase2_align.nft_loss(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2),
                                torch.tensor([[[[1.0, 3.0]]]]), x0,
                                torch.tensor([0.5]), torch.tensor([1.0]), 1.0)
    assert got.item() == pytest.approx(2.5)


def test_nft_objective_by_hand():
    """The whole per-sample objective: nft_loss * adv_clip / beta + kl_beta * mean (v_theta - v_ref)^2."""
    args = (_scalar(1.0), _scalar(0.5), _scalar(0.25), _scalar(2.0), _scalar(1.0),
            torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.75], dtype=torch.float64))
    loss, nft, kl = phase2_align.nft_objective(*args, beta=0.5, adv_clip=5.0, kl_beta=0.1)
    # nft_loss at beta 0.5 (above), times adv_clip / beta
    nft_by_hand = (0.75 * 0.625 + 0.25 * 0.875) * 5.0 / 0.5
    assert nft.item() == pytest.approx(nft_by_hand) and kl.item() == pytest.approx(0.75 ** 2)
    assert loss.item() == pytest.approx(nft_by_hand + 0.1 * 0.5625)
    no_ref = phase2_align.nft_objective(args[0], args[1], None, *args[3:], beta=0.5, adv_clip=5.0,
                                        kl_beta=0.1)
    assert no_ref[0].item() == pytest.approx(nft_by_hand) and no_ref[2].item() == 0


def test_epoch_samples_layout():
    """j = (slot * K + k) * G + g, contiguous slices over ranks: K=3, G=2, 2 prompts = 12 samples, 2 ranks."""
    draw = [7, 4]
    js, idx, ks = phase2_align.epoch_samples(2, 3, 2, rank=1, n_local=6, draw=draw)
    assert list(js) == [6, 7, 8, 9, 10, 11]  # rank 1 holds the second prompt's group whole
    assert idx == [4] * 6 and ks == [0, 0, 1, 1, 2, 2]
    # 3 ranks: a group spans two
    js, idx, ks = phase2_align.epoch_samples(2, 3, 2, rank=0, n_local=4, draw=draw)
    assert idx == [7, 7, 7, 7] and ks == [0, 0, 1, 1]


def test_nft_loss_gradients_only_into_v_theta():
    v_theta, v_old = _scalar(1.0).requires_grad_(), _scalar(0.5).requires_grad_()
    x_t = _scalar(2.0).requires_grad_()
    loss = phase2_align.nft_loss(v_theta, v_old, x_t, _scalar(1.0),
                                 torch.tensor([0.5]), torch.tensor([1.0]), 1.0)
    loss.backward()
    assert v_old.grad is None and x_t.grad is None
    # r = 1: L = err^2 / stopgrad|err| with err = x_t - t v - x0 = 0.5 -> dL/dv = -2 t sign(err) = -1
    # (without the stop-gradient on w it would be -t = -0.5)
    assert v_theta.grad.item() == pytest.approx(-1.0)


def test_nft_loss_beta_one_positive_branch_ignores_v_old():
    torch.manual_seed(0)
    v_theta, x_t, x0 = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.3, 0.6, 0.9])
    one, zero = torch.ones(3), torch.zeros(3)
    a = phase2_align.nft_loss(v_theta, torch.randn(3, 4, 2, 2), x_t, x0, t, one, 1.0)
    b = phase2_align.nft_loss(v_theta, torch.randn(3, 4, 2, 2), x_t, x0, t, one, 1.0)
    assert torch.allclose(a, b)  # beta = 1: v+ = v_theta, r = 1 uses L+ only
    v_old = torch.randn(3, 4, 2, 2)
    neg = phase2_align.nft_loss(v_theta, v_old, x_t, x0, t, zero, 1.0)
    err = x_t - t.view(-1, 1, 1, 1) * (2 * v_old - v_theta) - x0  # v- = 2 v_old - v_theta
    assert torch.allclose(neg, (err ** 2).mean((1, 2, 3)) / err.abs().mean((1, 2, 3)))


def test_condition_stats_and_paired_distance_by_hand():
    # two groups of K=2 x G=2: rows (k, g) = k * G + g; k = 0 rewards (1, 3) and (5, 5), k = 1 (0, 4), (2, 2)
    R = torch.tensor([1.0, 3.0, 0.0, 4.0, 5.0, 5.0, 2.0, 2.0])
    gid, k = torch.arange(8) // 4, (torch.arange(8) // 2) % 2
    st = phase2_align.condition_stats(R, gid, k)
    assert st["reward_k0"] == pytest.approx(3.5) and st["reward_kp"] == pytest.approx(2.0)
    assert st["group_std_k0"] == pytest.approx((1 + 0) / 2)
    assert st["group_std_kp"] == pytest.approx((2 + 0) / 2)
    assert phase2_align.condition_stats(R, gid, torch.zeros(8, dtype=torch.long)) == {}  # K = 1
    # paired distance: each k > 0 sample against the k = 0 sample of its noise (j - k * G), local pairs only
    x0 = torch.zeros(8, 1, 2, 2)
    x0[2] += 1.0  # sample (k=1, g=0) of group 0: mean |x0 - x0 of sample 0| = 1
    x0[7, 0, 0, 0] = 2.0  # sample (k=1, g=1) of group 1: 2 / 4 = 0.5 from sample 5
    d = phase2_align.paired_distance(x0, range(8), K=2, G=2)
    assert d.tolist() == pytest.approx([1.0 + 0.0 + 0.0 + 0.5, 4.0])
    # a rank holding samples 2..5 holds no pair: 2 and 3 (k = 1 of group 0) have their partners 0 and 1 on
    # another rank, and 4 and 5 are k = 0
    assert phase2_align.paired_distance(x0[2:6], range(2, 6), K=2, G=2).tolist() == [0.0, 0.0]
    d = phase2_align.paired_distance(x0[4:8], range(4, 8), K=2, G=2)  # group 1 whole: pairs (6, 4), (7, 5)
    assert d.tolist() == pytest.approx([0.5, 2.0])


def test_group_stats_and_decays():
    std, collapsed = phase2_align.group_stats(torch.tensor([1.0, 3.0, 5.0, 5.0]), torch.tensor([0, 0, 1, 1]))
    assert std == pytest.approx(0.5) and collapsed == 0.5  # group stds 1 and 0
    assert (phase2_align.old_decay(0) == 0.0 and phase2_align.old_decay(100) == pytest.approx(0.1)
            and phase2_align.old_decay(10 ** 4) == 0.5)
    assert (phase2_align.old_decay(74, 0.0075, 0.999, 75) == 0.0
            and phase2_align.old_decay(175, 0.0075, 0.999, 75) == pytest.approx(0.75))
    assert (phase2_align.ema_decay(0) == pytest.approx(0.1)
            and phase2_align.ema_decay(10) == pytest.approx(11 / 20))
    assert phase2_align.ema_decay(10 ** 4) == 0.9


# ----------------------------------------------------------------------------- LoRA adapters
def test_adapters_start_equal_and_save_loads_in_plain_diffusers(tmp_path):
    pipe = tiny.pipeline(0)
    tr = pipe.transformer
    torch.manual_seed(0)
    x, cond = torch.randn(2, 16, 8, 8), (torch.randn(2, 20, 96), torch.randn(2, 80))
    base = sample.velocity(tr, x, 0.7, cond)
    phase2_align.add_adapters(tr, 4, 8)
    for name in phase2_align.ADAPTERS:  # lora_B = 0: every adapter is the base model at step 0
        phase2_align.use_adapter(tr, name)
        assert torch.allclose(sample.velocity(tr, x, 0.7, cond), base, atol=1e-6)
    phase2_align.use_adapter(tr, "default")
    trainable = [n for n, p in tr.named_parameters() if p.requires_grad]
    # theta only, once "default" is active
    assert trainable and all(".default." in n and "lora_" in n for n in trainable)
    with torch.no_grad():
        for p in phase2_align.adapter_params(tr, "default"):
            p.add_(torch.randn_like(p) * 0.1)
    phase2_align.use_adapter(tr, "default")
    v_theta = sample.velocity(tr, x, 0.7, cond)
    phase2_align.blend_adapter(tr, "old", "default", 0.25)  # old = 0.25 old + 0.75 theta
    p_old, p_th = phase2_align.adapter_params(tr, "old"), phase2_align.adapter_params(tr, "default")
    # lora_B started at 0
    assert all(torch.allclose(a, b) for a, b in zip(p_old[1::2], [0.75 * q for q in p_th[1::2]]))
    phase2_align.save_lora(tr, "default", str(tmp_path / "lora"))
    fresh = tiny.pipeline(0)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    assert torch.allclose(sample.velocity(fresh.transformer, x, 0.7, cond), v_theta, atol=1e-5)
    assert not torch.allclose(v_theta, base, atol=1e-3)


# ---------------------------------------------------------------------- Phase II end to end on the tiny model
def _phase2(tmp, pert_file, prompt_file, *extra):
    return ["config/tiny_cpu.py", f"--prompts={prompt_file}", f"--perturbations={pert_file}", "--t5_len=16",
            "--steps=4", f"--out_dir={tmp}", "--eval_prompts=None", *extra]


def _log(d):
    return [json.loads(ln) for ln in (d / "log.jsonl").read_text().splitlines()]


def _log_without_timings(d):
    """The run's log records without their wall-clock fields, for comparing two runs."""
    return [{k: v for k, v in r.items() if not k.startswith(("time", "img"))} for r in _log(d)]


def test_phase2_trains_on_c_orig_for_every_sample(phase1_file, tmp_path, monkeypatch):
    pf, out = phase1_file
    prompt_list, _ = sample.read_prompts(pf)
    text = sample.load_text("tiny", t5_len=16)
    orig = sample.encode(text, prompt_list)[0]
    calls, real = [], sample.velocity

    def spy(transformer, x, sigma, cond):
        calls.append((torch.is_grad_enabled(), cond[0].detach().clone()))
        return real(transformer, x, sigma, cond)

    monkeypatch.setattr(sample, "velocity", spy)

    def is_orig(rows):  # which rows equal one of the prompts' C^orig
        return [any(torch.allclose(row, o, atol=1e-5) for o in orig) for row in rows]

    for anchor in (True, False):
        calls.clear()
        phase2_align.main(_phase2(tmp_path / str(anchor), out, pf, "--epochs=1", f"--use_anchor={anchor}"))
        # the first sampler call: sigma = 1, pure C^opt for k > 0
        sampling = [c for g, c in calls if not g][:1]
        train = [c for g, c in calls if g]  # the v_theta forwards
        assert sum(is_orig(sampling[0])) == 2 * 2  # per prompt: G=2 samples of k = 0 out of K*G = 8
        assert len(train) == 2 * 3  # 2 micro-batches x floor(4 * 0.99) = 3 timesteps
        flags = [f for c in train for f in is_orig(c)]
        if anchor:
            assert all(flags)
        else:
            assert not all(flags)


def test_phase2_end_to_end_log_and_lora(phase1_file, tmp_path):
    pf, out = phase1_file
    d = tmp_path / "run"
    phase2_align.main(_phase2(d, out, pf, "--epochs=2", "--ckpt_every=1", f"--eval_prompts={pf}",
                              "--eval_every=2"))
    start, *log = _log(d)  # the first line is the held-out reward before training
    assert (start == {"epoch": -1, "step": 0, "eval_reward": start["eval_reward"]}
            and math.isfinite(start["eval_reward"]))
    assert [r["epoch"] for r in log] == [0, 1] and [r["step"] for r in log] == [1, 2]
    for key in ("reward_mean", "group_std", "collapsed_groups", "loss", "nft", "kl",
                "time_sample", "time_train", "img_per_s"):
        assert all(math.isfinite(r[key]) for r in log), key
    assert "eval_reward" in log[1] and "eval_reward" not in log[0]
    assert log[0]["group_std"] > 0
    # the group std in units of the step's std, and every sample's reward beside the log: the group std
    # recomputed from rewards.jsonl (sample j in group j // (K G)) is the logged one
    per = [json.loads(ln) for ln in (d / "rewards.jsonl").read_text().splitlines()]
    assert [(p["epoch"], p["step"], p["K"], p["G"]) for p in per] == [(0, 1, 4, 2), (1, 2, 4, 2)]
    for rec, p in zip(log, per):
        assert rec["group_std_rel"] == pytest.approx(rec["group_std"] / (rec["reward_std"] + 1e-4))
        R = np.array(p["rewards"]).reshape(len(p["prompts"]), p["K"] * p["G"])
        assert R.mean() == pytest.approx(rec["reward_mean"])
        assert R.std(1).mean() == pytest.approx(rec["group_std"])
    ck = d / "checkpoint"
    assert all((ck / s / "pytorch_lora_weights.safetensors").is_file()
               for s in ("lora", "lora_old", "lora_ema"))
    assert json.loads((ck / "config.json").read_text())["K"] == 4
    fresh = tiny.pipeline(0)
    x, cond = torch.randn(1, 16, 8, 8), (torch.randn(1, 20, 96), torch.randn(1, 80))
    base = sample.velocity(fresh.transformer, x, 0.9, cond)
    fresh.load_lora_weights(str(ck / "lora"))
    assert not torch.allclose(sample.velocity(fresh.transformer, x, 0.9, cond), base)  # theta moved


def test_phase2_resume_reproduces_the_next_step(phase1_file, tmp_path):
    pf, out = phase1_file
    full, cut = tmp_path / "full", tmp_path / "cut"
    phase2_align.main(_phase2(full, out, pf, "--epochs=2", "--ckpt_every=1"))
    phase2_align.main(_phase2(cut, out, pf, "--epochs=1", "--ckpt_every=1"))
    phase2_align.main(_phase2(cut, out, pf, "--epochs=2", "--ckpt_every=1", "--resume=True"))
    a, b = _log(full), _log(cut)
    assert [r["epoch"] for r in b] == [0, 1]
    # rewards.jsonl is trimmed and replayed like the log: the same lines as the uninterrupted run's
    assert (cut / "rewards.jsonl").read_text() == (full / "rewards.jsonl").read_text()
    for key in ("reward_mean", "group_std", "loss", "nft", "kl", "grad_norm"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-6, abs=1e-9), key


class Killed(BaseException):
    """A simulated kill: not an Exception, so nothing in the code under test catches it."""


@pytest.mark.parametrize("kill_at", [1, 2])
def test_phase2_resume_after_a_kill_inside_save_checkpoint(phase1_file, tmp_path, monkeypatch, kill_at):
    """A kill at the first rename of epoch 1's save (checkpoint -> .old) leaves the epoch-0 checkpoint in
    place and a finished .tmp; a kill at the second (.tmp -> checkpoint) leaves only .old (epoch 0) and the
    finished .tmp (epoch 1). Either way the log already holds epoch 1. A fresh run refuses to touch the
    folder; --resume=True finds the complete checkpoint, drops the log lines it replays, and goes on
    exactly as an uninterrupted run."""
    pf, out = phase1_file
    full, cut = tmp_path / "full", tmp_path / "cut"
    phase2_align.main(_phase2(full, out, pf, "--epochs=3", "--ckpt_every=1"))
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        if (os.path.dirname(str(src)) == str(cut)
                and os.path.basename(str(src)) in ("checkpoint", "checkpoint.tmp")):
            calls.append(src)
            # epoch 0's save renames once (no checkpoint to move yet), epoch 1's twice
            if len(calls) == 1 + kill_at:
                raise Killed()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(Killed):
        phase2_align.main(_phase2(cut, out, pf, "--epochs=3", "--ckpt_every=1"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert [r["epoch"] for r in _log(cut)] == [0, 1]
    assert (cut / "checkpoint.tmp" / "state.pt").is_file() and (kill_at == 1) == (cut / "checkpoint").exists()
    with pytest.raises(SystemExit, match="holds a run"):
        phase2_align.main(_phase2(cut, out, pf, "--epochs=3"))
    assert (cut / "checkpoint.tmp" / "state.pt").is_file()  # untouched
    phase2_align.main(_phase2(cut, out, pf, "--epochs=3", "--ckpt_every=1", "--resume=True"))
    a, b = _log(full), _log(cut)
    assert [r["epoch"] for r in b] == [0, 1, 2]  # no duplicates of replayed epochs
    for key in ("reward_mean", "group_std", "loss", "grad_norm"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-6, abs=1e-9), key
    assert sorted(p.name for p in cut.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


def test_phase2_resume_uses_the_settings_it_is_given(phase1_file, tmp_path):
    """--resume=True --lr=0.0: the optimizer state comes back, but with the new lr (theta stays put)."""
    pf, out = phase1_file
    d = tmp_path / "run"
    phase2_align.main(_phase2(d, out, pf, "--epochs=1", "--ckpt_every=1"))
    from safetensors.torch import load_file
    lora = str(d / "checkpoint" / "lora" / "pytorch_lora_weights.safetensors")
    before = load_file(lora)
    phase2_align.main(_phase2(d, out, pf, "--epochs=2", "--ckpt_every=1", "--resume=True", "--lr=0.0"))
    after = load_file(lora)
    assert _log(d)[1]["grad_norm"] > 0 and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # AdamW with lr 0 moves nothing, bit for bit
    assert json.loads((d / "config.json").read_text())["lr"] == 0.0


def test_phase2_refuses_to_overwrite_a_run(phase1_file, tmp_path):
    pf, out = phase1_file
    d = tmp_path / "run"
    phase2_align.main(_phase2(d, out, pf, "--epochs=1"))
    files = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    for extra, says in (((), "holds a run"), (("--rho=1.5",), "rho=1.5 must lie in"),
                        (("--lr=1e-3",), "holds a run")):
        with pytest.raises(SystemExit, match=says):
            phase2_align.main(_phase2(d, out, pf, "--epochs=1", *extra))
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == files  # nothing touched
    phase2_align.main(_phase2(d, out, pf, "--epochs=1", "--overwrite=True", "--seed=1"))
    assert json.loads((d / "config.json").read_text())["seed"] == 1 and len(_log(d)) == 1


def _files(d):
    """Every file under d with its bytes: a folder's state, to show that a refused command touched nothing."""
    return {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def run_folder(phase1_file, tmp_path_factory):
    """A finished 1-epoch Phase II run (K=4, G=2, LoRA r=4) with its checkpoint, log and config."""
    pf, out = phase1_file
    d = tmp_path_factory.mktemp("run") / "run"
    phase2_align.main(_phase2(d, out, pf, "--epochs=1"))
    return d


@pytest.mark.parametrize("extra, says", [
    ("--resolution=0", "resolution=0 must be a positive multiple of 16"),
    ("--prompts_per_epoch=0", "prompts_per_epoch=0 must be at least 1"),
    ("--ckpt_every=0", "ckpt_every=0 must be at least 1"),
    ("--eval_every=0", "eval_every=0 must be at least 1"),
    ("--epochs=0", "epochs=0 must be at least 1"), ("--epochs=-2", "epochs=-2 must be at least 1"),
    ("--lr=-1", "lr=-1.0 must be finite and >= 0"), ("--lora_rank=0", "lora_rank=0 must be at least 1"),
    ("--device=cuda", "device='cuda', but this machine has no CUDA GPU"),
    ("--guidance=3", "guidance=3.0 must be 1.0"),
    ("--reward={'jpeg_incompressibility': 1e400}",
     "weight of reward 'jpeg_incompressibility' must be finite"),
    ("--reward={'jpeg_incompressibility': 0}", "every reward weight is 0 (jpeg_incompressibility)"),
    ("--reward_opts={'pickscore': {'model': 'x'}}", "reward_opts names 'pickscore', which is not a reward"),
    ("--resume=True", "--resume=True continues the run in out_dir and --overwrite=True replaces it"),
    ("--resolution=100", "resolution=100 must be a positive multiple of 16"),
    ("--lr=1e400", "lr=inf must be"), ("--device=tpu", "device='tpu' is not a device"),
    ("--timestep_fraction=0", "leaves no training timestep"),
    ("--ema_max=1", "ema_max=1.0 must be in [0, 1)"),
    ("--old_decay_max=1", "old_decay_max=1.0 must be in [0, 1)"),
    ("--out_dir=conftest.py", "out_dir=conftest.py is a file: name a folder to write into"),
    ("--perturbations=/no/such.safetensors", "perturbation file '/no/such.safetensors' not found")])
def test_phase2_overwrite_checks_every_setting_before_it_removes_anything(run_folder, phase1_file, tmp_path,
                                                                          monkeypatch, extra, says):
    """--overwrite=True with a bad setting: one sentence, before any model loads, and the earlier run (its
    checkpoint, log and evaluations) is untouched, byte for byte."""
    pf, out = phase1_file
    monkeypatch.setattr(sample, "load_pipeline",
                        lambda *a, **k: pytest.fail("loaded a model for a bad setting"))
    before = _files(run_folder)
    with pytest.raises(SystemExit, match=re.escape(says)):
        phase2_align.main(_phase2(run_folder, out, pf, "--epochs=1", "--overwrite=True", extra))
    assert _files(run_folder) == before
    assert not os.path.exists(str(run_folder) + ".lock")


def test_phase2_resume_stops_on_a_setting_that_changes_the_checkpoint(run_folder, phase1_file, tmp_path,
                                                                       monkeypatch):
    """--resume=True with another LoRA rank, K, model or prompt list: one sentence naming the setting and both
    values, never advice to --overwrite a good checkpoint; nothing loaded, nothing touched. A run that has
    done its epochs says so. The settings resume honours (lr, epochs, ...) go through and are named."""
    pf, out = phase1_file
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    before = _files(run_folder)
    other = tmp_path / "other.txt"
    other.write_text("a blue square\n" + open(pf).read())
    for extra, says in ((("--lora_rank=8",), "lora_rank=8 (the checkpoint's: 4)"),
                        (("--K=1",), "K=1 (the checkpoint's: 4)"),
                        (("--objective=grpo",), "objective='grpo' (the checkpoint's: 'nft')"),
                        (("--G=4", "--seed=3"), "G=4 (the checkpoint's: 2), seed=3 (the checkpoint's: 0)"),
                        (("--model=tiny-large", "--K=1"), "model='tiny-large' (the checkpoint's: 'tiny')"),
                        ((f"--prompts={other}", "--K=1"), "prompts="),
                        (("--epochs=1",), "has done 1 epochs of --epochs=1: pass --epochs above 1")):
        with pytest.raises(SystemExit, match=re.escape(says)) as err:
            phase2_align.main(_phase2(run_folder, out, pf, "--epochs=2", "--resume=True", *extra))
        assert "overwrite" not in str(err.value) and "damaged" not in str(err.value)
    assert _files(run_folder) == before
    monkeypatch.undo()
    d = tmp_path / "run"
    import shutil
    shutil.copytree(run_folder, d)
    copy = tmp_path / "moved_prompts.txt"  # the same prompts from another file: the same run
    copy.write_text(open(pf).read())
    phase2_align.main(_phase2(d, out, str(copy), "--epochs=2", "--resume=True", "--lr=1e-3",
                              "--ckpt_every=5"))
    assert [r["epoch"] for r in _log(d)] == [0, 1]


def test_phase2_resume_names_a_broken_log_line_and_drops_a_torn_one(run_folder, phase1_file, tmp_path,
                                                                    capsys, monkeypatch):
    """Two writers or an edit can break a line of log.jsonl: resume names the file and the line before any
    model loads and changes nothing. A last line cut short by a kill (no newline) is dropped with a note
    (once): the checkpoint is older than it anyway."""
    import shutil
    pf, out = phase1_file
    d = tmp_path / "run"
    shutil.copytree(run_folder, d)
    good = (d / "log.jsonl").read_text()
    (d / "log.jsonl").write_text(good + '{"epoch": 1, "step"\n' + good)
    before = _files(d)
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit, match=re.escape(f"{d / 'log.jsonl'} line 2 is not valid JSON")):
        phase2_align.main(_phase2(d, out, pf, "--epochs=2", "--resume=True"))
    assert _files(d) == before
    monkeypatch.undo()
    (d / "log.jsonl").write_text(good + '{"epoch": 1, "st')
    phase2_align.main(_phase2(d, out, pf, "--epochs=2", "--resume=True"))
    assert capsys.readouterr().out.count("line 2 is incomplete (a write cut short): left out") == 1
    assert [r["epoch"] for r in _log(d)] == [0, 1]


def test_one_writer_per_output_folder(phase1_file, tmp_path):
    """Two Phase II runs on one out_dir at once: the second stops with one sentence naming the first's PID
    and writes nothing; the first finishes as if alone, and its lock is gone afterwards. A lock left by a
    killed writer is taken over, and said; a run that stops after claiming (a model folder that does not
    exist) leaves no lock behind."""
    import subprocess
    import sys
    import time
    pf, out = phase1_file
    d = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "phase2_align.py", *_phase2(d, out, pf, "--epochs=2")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    lock = str(d) + ".lock"
    while not os.path.exists(lock) and first.poll() is None:
        time.sleep(0.1)
    with pytest.raises(SystemExit, match=f"{d} is being written by process {first.pid} on "):
        phase2_align.main(_phase2(d, out, pf, "--epochs=2", "--overwrite=True"))
    said, _ = first.communicate(timeout=300)
    assert first.returncode == 0, said[-2000:]
    assert [r["epoch"] for r in _log(d)] == [0, 1] and not os.path.exists(lock)
    # a writer killed while it holds the claim: the system drops the lock, the file stays; the next one takes
    # it over and says so
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, sample; sample.claim(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(tmp_path / "x")],
                              stdout=subprocess.PIPE, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SystemExit, match=f"process {holder.pid} on"):
        sample.claim(str(tmp_path / "x"))
    holder.kill()
    holder.wait()
    res = subprocess.run([sys.executable, "phase2_align.py", *_phase2(tmp_path / "x", out, pf, "--K=1",
                                                                      f"--model={tmp_path / 'no_model'}")],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert res.returncode == 1
    assert f"took over {tmp_path / 'x'}.lock, left by process {holder.pid}" in res.stdout
    assert "model folder" in res.stderr and "does not exist" in res.stderr
    assert not os.path.exists(str(tmp_path / "x") + ".lock") and not (tmp_path / "x").exists()


def test_phase2_checks_settings_before_loading(phase1_file, tmp_path, monkeypatch):
    """Bad settings stop with one sentence before any model is loaded or anything written."""
    pf, out = phase1_file
    monkeypatch.setattr(sample, "load_pipeline",
                        lambda *a, **k: pytest.fail("loaded a model for bad settings"))
    (tmp_path / "file").write_text("x")
    for extra, msg in ((("--rho=0.0",), "rho=0.0 must lie in"), (("--rho=1.5",), "rho=1.5 must lie in"),
                       ((f"--out_dir={tmp_path / 'file' / 'run'}",), "not a writable folder"),
                       (("--resume=True",), "no checkpoint in"), (("--beta=0.0",), "beta=0.0 must be > 0"),
                       (("--solver='rk4'",), "one of 'euler', 'dpm2'")):
        with pytest.raises(SystemExit, match=msg):
            phase2_align.main(_phase2(tmp_path / "d", out, pf, *extra))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    with pytest.raises(SystemExit, match="rho=2.0 must lie in"):
        sample.main([f"--prompts={pf}", "--model=tiny", "--rho=2.0", f"--out_dir={tmp_path / 's'}"])


def test_damaged_files_are_named_in_one_sentence(phase1_file, tmp_path):
    pf, out = phase1_file
    prompt_list, _ = sample.read_prompts(pf)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(open(out, "rb").read()[:1000])  # a file truncated by a crash
    with pytest.raises(SystemExit, match=f"perturbation file {bad} cannot be read"):
        sample.load_perturbations(str(bad), sample.load_text("tiny", t5_len=16), prompt_list)
    d = tmp_path / "run"
    phase2_align.main(_phase2(d, out, pf, "--epochs=1"))
    (d / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="checkpoint .* cannot be read"):
        phase2_align.main(_phase2(d, out, pf, "--epochs=2", "--resume=True"))


def test_phase2_divergence_saves_no_poisoned_checkpoint(phase1_file, tmp_path):
    """lr = 1e30: the first step's loss is finite but its weights are not usable; no checkpoint keeps them."""
    pf, out = phase1_file
    d = tmp_path / "run"
    with pytest.raises(SystemExit, match="non-finite .*no checkpoint was written"):
        phase2_align.main(_phase2(d, out, pf, "--epochs=3", "--ckpt_every=1", "--lr=1e30"))
    assert not any(p.name.startswith("checkpoint") for p in d.iterdir())


def test_phase2_text_offload_changes_nothing_but_where_the_encoders_wait(phase1_file, tmp_path, monkeypatch):
    """--text_offload=True: the encoders sit on the CPU between encodings (trivially so on a CPU run) and the
    run is the same bit for bit; every encoding happens inside sample.text_on."""
    pf, out = phase1_file
    inside, real_on = [], sample.text_on

    def tracked_on(*a, **kw):
        inside.append(True)
        return real_on(*a, **kw)
    monkeypatch.setattr(sample, "text_on", tracked_on)
    phase2_align.main(_phase2(tmp_path / "a", out, pf, "--epochs=1", f"--eval_prompts={pf}",
                              "--eval_every=1"))
    phase2_align.main(_phase2(tmp_path / "b", out, pf, "--epochs=1", f"--eval_prompts={pf}",
                              "--eval_every=1", "--text_offload=True"))
    assert _log_without_timings(tmp_path / "a") == _log_without_timings(tmp_path / "b")
    assert len(inside) == 2 * 3  # per run: the start evaluation, the epoch's groups, the end evaluation


def test_text_on_keeps_one_cpu_copy_of_every_encoder_tensor():
    """text_on(offload=True) puts each encoder tensor on the device for the block and back on its kept CPU
    copy after it: the encoders are frozen, so nothing is copied back and no host memory is reallocated at
    each encoding (on a GPU the copies are pinned: gpu_check.py checks that; here the device is the CPU,
    and the storages must simply stay the same ones, block after block)."""
    text = sample.load_text("tiny", t5_len=16)
    tensors = [t for e in text["encoders"].values() for t in (*e.parameters(), *e.buffers())]
    before = [(t.data_ptr(), t.clone()) for t in tensors]
    for _ in range(2):
        with sample.text_on(text, "cpu", offload=True):
            sample.encode(text, ["a cat"])
        assert [t.data_ptr() for t in tensors] == [p for p, _ in before]
        assert all(torch.equal(t, c) for t, (_, c) in zip(tensors, before))
    kept = [t for t, _ in text["cpu_copies"]]  # each tensor once (tied weights included)
    assert len(kept) == len(tensors) and all(a is b for a, b in zip(kept, tensors))


def test_phase2_gradient_checkpointing_changes_nothing_but_memory(phase1_file, tmp_path):
    """grad_checkpointing (off by default: docs/performance.md) only re-runs theta's forward in the backward:
    two epochs with it on and off log the same losses and rewards and save the same LoRA, bit for bit (the
    re-run forward repeats the same float operations on the same inputs)."""
    from safetensors.torch import load_file
    pf, out = phase1_file
    for name, on in (("on", True), ("off", False)):
        phase2_align.main(_phase2(tmp_path / name, out, pf, "--epochs=2", f"--grad_checkpointing={on}"))
    assert _log_without_timings(tmp_path / "on") == _log_without_timings(tmp_path / "off")
    for sub in ("lora", "lora_old", "lora_ema"):
        files = sorted((tmp_path / "on" / "checkpoint" / sub).glob("*.safetensors"))
        assert files
        for f in files:
            a, b = load_file(f), load_file(tmp_path / "off" / "checkpoint" / sub / f.name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_phase2_k1_is_plain_diffusionnft_without_a_file(prompt_file, tmp_path):
    d = tmp_path / "k1"
    phase2_align.main(_phase2(d, str(tmp_path / "none.safetensors"), prompt_file,
                              "--epochs=1", "--K=1", "--G=4"))
    assert _log(d)[0]["step"] == 1


def test_phase2_bad_input(phase1_file, tmp_path, monkeypatch):
    pf, out = phase1_file
    d = tmp_path / "bad"
    with pytest.raises(SystemExit, match="unknown reward 'no_such_reward'"):
        phase2_align.main(_phase2(d, out, pf, "--reward={'no_such_reward': 1.0}"))
    with pytest.raises(SystemExit, match="K=4 conditions"):
        phase2_align.main(_phase2(d, out, pf, "--K=3", "--train_batch=4"))
    with pytest.raises(SystemExit, match="train_batch=0 and sample_batch=16 must be at least 1"):
        phase2_align.main(_phase2(d, out, pf, "--train_batch=0"))
    with pytest.raises(SystemExit, match="amp='yes' must be True, False or None"):
        phase2_align.main(_phase2(d, out, pf, "--amp=yes"))
    with pytest.raises(SystemExit, match="float16' is not supported: T5-XXL overflows"):
        phase2_align.main(_phase2(d, out, pf, "--dtype=float16"))
    assert not d.exists()  # nothing written for bad settings
    import rewards
    monkeypatch.setitem(rewards.REWARDS, "nan_reward", lambda device="cpu", dtype=None, **kw:
                        (lambda im, p, m: torch.full((len(im),), float("nan"))))
    with pytest.raises(SystemExit, match="non-finite reward"):
        phase2_align.main(_phase2(d, out, pf, "--reward={'nan_reward': 1.0}"))
    # that run stopped before its log's first line: nothing to keep, and no --overwrite=True asked for
    assert (d / "log.jsonl").read_text() == ""
    phase2_align.main(_phase2(d, out, pf, "--epochs=1"))
    assert len(_log(d)) == 1


def _torchrun(script, args, nproc):
    """`torchrun --nproc_per_node=nproc script args` on CPU (gloo), one thread per process, as users run
    it."""
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}", script, *args]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
                         capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny pipeline saved to a folder and loaded from it, as a real checkpoint is (the in-memory
    builder reseeds before every component, which hides rank-dependent seeding)."""
    d = tmp_path_factory.mktemp("tiny_model")
    tiny.pipeline(0).save_pretrained(str(d))
    return str(d)


def test_phase2_two_processes_match_one(tiny_folder, tmp_path):
    """torchrun with 2 processes against 1 process, on a model loaded from a folder, with 2 optimizer
    steps per epoch: the same samples, rewards, loss and gradient (bit for bit where the arithmetic is
    the same; to float32 summation order where ranks add up different partial sums), and ranks that
    hold one model (the run checks that before every checkpoint). train_batch=3 does not divide a step's
    samples (8 in one process, 4 a rank in two): micro-batches of 3, 3, 2 and of 3, 1 give one step."""
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS[:3]) + "\n")
    pert = str(tmp_path / "p.safetensors")
    phase1_perturb.main(["config/tiny_cpu.py", f"--model={tiny_folder}", f"--prompts={pf}",
                         f"--perturbations={pert}", "--K=4", "--iters=10", "--t5_len=16"])
    lr = 3e-4
    args = [*_phase2("X", pert, pf, "--epochs=2", "--ckpt_every=1", f"--model={tiny_folder}", f"--lr={lr}",
                     "--reward={'clipscore': 1.0}", "--reward_opts={'clipscore': {'model': 'tiny'}}",
                     "--sample_batch=8", "--train_batch=3", "--opt_steps_per_epoch=2")]
    for n in (1, 2):
        _torchrun("phase2_align.py",
                  [a if a != "--out_dir=X" else f"--out_dir={tmp_path / str(n)}" for a in args], n)
    a, b = _log(tmp_path / "1"), _log(tmp_path / "2")
    assert not any(os.path.exists(f"{tmp_path / str(n)}.lock") for n in (1, 2))  # rank 0's claim, released
    # epoch 0 samples with the initial adapters: every image and reward is computed on the same inputs
    # in batches of the same shape, so they are bit-identical; the loss and gradient are sums of the
    # same terms in another order (16 samples x 3 timesteps: relative error below ~50 float32 eps)
    for key in ("reward_mean", "group_std"):
        assert b[0][key] == a[0][key], key
    for key in ("loss", "nft", "kl", "grad_norm"):
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-5, abs=1e-12), key
    # after the steps: each AdamW step moves a weight by at most lr * (1 - b1) / sqrt(1 - b2) = 3.16 lr,
    # so runs whose gradients differ only in rounding stay within twice that per step of each other
    # (ranks that held different adapters differ by O(1): lora_A is drawn with std 1/r)
    from safetensors.torch import load_file
    bound = 2 * 3.17 * lr * b[-1]["step"]
    for sub in ("lora", "lora_old", "lora_ema"):
        A, B = (load_file(str(d / "checkpoint" / sub / "pytorch_lora_weights.safetensors"))
                for d in (tmp_path / "1", tmp_path / "2"))
        assert max((A[k] - B[k]).abs().max().item() for k in A) < bound, sub


def test_phase2_a_nan_on_one_rank_stops_every_rank_with_one_sentence(tiny_folder, tmp_path):
    """The perturbations of the prompt that lands on rank 1 are NaN: only rank 1 would sample NaN latents and
    see a NaN loss. Every rank checks the rows of all the epoch's prompts before sampling, so both ranks stop
    at the same check; rank 0 names the file and the prompt, once (not the loss: the file is the cause), and
    no rank is left waiting in a collective (no gloo errors)."""
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS[:3]) + "\n")
    pert = tmp_path / "p.safetensors"
    phase1_perturb.main(["config/tiny_cpu.py", f"--model={tiny_folder}", f"--prompts={pf}",
                         f"--perturbations={pert}", "--K=4", "--iters=2", "--t5_len=16"])
    from safetensors import safe_open
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(phase2_align.sample_seed(0, 0))
    on_rank1 = torch.randperm(3, generator=g)[:2].tolist()[1]  # epoch 0's prompt slot 1 (rank 1 of 2)
    with safe_open(str(pert), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for k in tensors:
        if k.startswith(f"{on_rank1}."):
            tensors[k] = torch.full_like(tensors[k], float("nan"))
    save_file(tensors, str(pert), metadata=meta)
    import subprocess
    import sys
    args = _phase2(tmp_path / "run", str(pert), pf, "--epochs=1", f"--model={tiny_folder}",
                   "--reward={'clipscore': 1.0}", "--reward_opts={'clipscore': {'model': 'tiny'}}")
    with pytest.raises(AssertionError) as failed:
        _torchrun("phase2_align.py", args, 2)
    out = str(failed.value)
    assert out.count("non-finite") == 1 and "gloo" not in out.lower(), out[-3000:]
    assert f"perturbation file {pert}: the clip_l perturbations of prompt {on_rank1} hold non-finite" in out


def test_a_bad_setting_under_torchrun_is_said_once(phase1_file, tmp_path):
    """Under torchrun every rank checks the settings and stops at the same one: rank 0 prints the sentence,
    the other ranks exit quietly with the same code (the sentence is not printed once per GPU)."""
    pf, out = phase1_file
    for script, args in (("phase2_align.py", _phase2(tmp_path / "run", out, pf, "--beta=0")),
                         ("phase1_perturb.py", ["config/tiny_cpu.py", f"--prompts={pf}", "--K=0",
                                                f"--perturbations={tmp_path / 'p.safetensors'}"])):
        with pytest.raises(AssertionError) as failed:
            _torchrun(script, args, 2)
        said = str(failed.value)
        sentence = "beta=0.0 must be > 0" if script == "phase2_align.py" else "K=0"
        assert said.count(sentence) == 1, said[-3000:]
    assert not (tmp_path / "run").exists()


def test_phase2_geneval_reward_needs_geneval_metadata(phase1_file, tmp_path):
    pf, out = phase1_file
    with pytest.raises(SystemExit, match="needs GenEval metadata"):
        phase2_align.main(_phase2(tmp_path / "g", out, pf, "--reward={'geneval': 1.0}"))
    assert not (tmp_path / "g").exists()


def test_phase1_two_processes_write_shards_read_as_one_file(phase1_file, tmp_path):
    """torchrun --nproc_per_node=2: one shard per rank, read back as a set, the same perturbations as
    the single-process file (each prompt's δ is seeded by its index, not by its rank)."""
    import socket
    import subprocess
    import sys
    pf, single = phase1_file
    out = tmp_path / "pert.safetensors"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "phase1_perturb.py", "config/tiny_cpu.py", f"--prompts={pf}",
           f"--perturbations={out}", "--K=4", "--iters=100", "--t5_len=16"]
    res = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pert-00000-of-00002.safetensors",
                                                          "pert-00001-of-00002.safetensors"]
    prompt_list, _ = sample.read_prompts(pf)
    text = sample.load_text("tiny", t5_len=16)
    a, b = (sample.load_perturbations(single, text, prompt_list, K=4),
            sample.load_perturbations(str(out), text, prompt_list, K=4))
    for i in range(3):
        for name in ("clip_l", "clip_g", "t5"):
            assert torch.allclose(a["rows"](i)[name].float(), b["rows"](i)[name].float(),
                                  atol=2e-3), (i, name)
    # a later single-process run refuses to replace them unless told, then replaces them instead of leaving
    # them to shadow or mix
    args = ["config/tiny_cpu.py", f"--prompts={pf}", f"--perturbations={out}", "--K=4", "--iters=2",
            "--t5_len=16"]
    with pytest.raises(SystemExit, match="pert-00000-of-00002.safetensors holds the K=4 perturbations of 3"):
        phase1_perturb.main(args)
    phase1_perturb.main(args + ["--overwrite=True"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pert.safetensors"]


def test_paper_configs_share_the_sample_budget():
    """DiffusionNFT's public runs are 48 prompts x G=24 = 1152 samples an epoch; the E²PO budgets run at the
    same N, and every paper config splits over 8 GPUs."""
    def n_and_split(name):
        g = {k: getattr(phase2_align, k) for k in phase2_align.config_keys}
        cfg = configure(g, phase2_align.config_keys, [f"config/{name}.py"])
        n = cfg["prompts_per_epoch"] * cfg["K"] * cfg["G"]
        phase2_align.samples_per_rank(cfg["prompts_per_epoch"], cfg["K"], cfg["G"], 8,
                                      cfg["opt_steps_per_epoch"])
        return n, cfg
    n, nft = n_and_split("geneval_nft_g24")
    assert (n, nft["K"], nft["G"], nft["prompts_per_epoch"]) == (1152, 1, 24, 48)
    assert n_and_split("geneval_g4k12")[0] == n and n_and_split("pickscore_g8k3")[0] == n
    assert n_and_split("pickscore_nft_g24")[0] == n
    assert n_and_split("efficient_g2k4")[0] == n // 3


def test_samples_per_rank():
    """Any GPU count that divides an epoch's samples into equal optimizer-step shares runs: micro-batches
    take train_batch samples at a time, the last of a step fewer. Otherwise one sentence names a
    prompts_per_epoch that works."""
    assert phase2_align.samples_per_rank(24, 12, 4, 8, 2) == 144  # config/geneval_g4k12.py on 8 GPUs
    for world in (1, 2, 3, 4, 6, 8, 16):  # the same config on these counts: 1152 / world samples a GPU
        assert phase2_align.samples_per_rank(24, 12, 4, world, 2) == 1152 // world
    assert phase2_align.samples_per_rank(2, 4, 2, 8, 1) == 2  # config/tiny_cpu.py on 8 GPUs: 2 a rank
    # 1152 samples x 2 steps on 5 GPUs: prompts_per_epoch must be a multiple of 5 (48 * 25 = 1200)
    with pytest.raises(SystemExit, match=r"do not split over 5 GPUs .* use prompts_per_epoch=25 \(any "
                                         r"multiple of 5\)"):
        phase2_align.samples_per_rank(24, 12, 4, 5, 2)
    with pytest.raises(SystemExit, match="opt_steps_per_epoch=3"):
        phase2_align.samples_per_rank(2, 4, 2, 1, 3)


def test_step_assignment_is_balanced_and_rank_free():
    """Each block of S consecutive samples sends one member to each of the S optimizer steps: any rank's
    contiguous slice holds the same number of samples per step, and the draw depends on the seed only."""
    step, key = phase2_align.step_assignment(48, 3, seed=0, epoch=5)
    assert sorted(step.view(16, 3).sort(dim=1).values.unique(dim=0).tolist()) == [[0, 1, 2]]
    for world in (1, 2, 4, 8):  # 48/world samples a rank, each rank a third in each step
        for r in range(world):
            sl = step[r * 48 // world:(r + 1) * 48 // world]
            if len(sl) % 3 == 0:
                assert torch.bincount(sl, minlength=3).tolist() == [len(sl) // 3] * 3
    again = phase2_align.step_assignment(48, 3, seed=0, epoch=5)
    assert torch.equal(again[0], step) and torch.equal(again[1], key)
    assert not torch.equal(phase2_align.step_assignment(48, 3, seed=0, epoch=6)[0], step)


def test_phase2_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(phase1_file, tmp_path, monkeypatch):
    pf, out = phase1_file
    d = tmp_path / "nan"
    real, calls = phase2_align.nft_loss, []

    def nan_after_first_epoch(*a, **kw):  # epoch 0 makes 2 micro-batches x 3 timesteps = 6 calls
        calls.append(1)
        loss = real(*a, **kw)
        return loss if len(calls) <= 6 else loss * float("nan")

    monkeypatch.setattr(phase2_align, "nft_loss", nan_after_first_epoch)
    with pytest.raises(SystemExit, match="non-finite loss or gradient at epoch 1, step 2; "
                                         "the last good checkpoint is .*checkpoint$"):
        phase2_align.main(_phase2(d, out, pf, "--epochs=3", "--ckpt_every=1"))
    state = torch.load(d / "checkpoint" / "state.pt", weights_only=False)
    assert state["epoch"] == 0 and state["step"] == 1
    assert not (d / "checkpoint.tmp").exists()


def test_mix_condition_keeps_gamma_in_fp32_for_bf16_conditions():
    """With bf16 conditions (a GPU run) the mix is computed in fp32 and rounded once: gamma itself is not
    rounded to bf16 (sigma 0.72 at rho 0.4 gives gamma 0.3, which bf16 holds as 0.30078: a 0.3 % larger
    perturbation). A per-sample sigma tensor mixes each row at its own gamma."""
    torch.manual_seed(0)
    orig, opt = (torch.randn(2, 5, 8), torch.randn(2, 4)), (torch.randn(2, 5, 8), torch.randn(2, 4))
    b16 = lambda c: tuple(x.bfloat16() for x in c)
    sigma, g = 0.72, sample.gamma(0.72, 0.4)
    got = sample.mix_condition(b16(opt), b16(orig), sigma, 0.4)
    for m, o, p in zip(got, b16(orig), b16(opt)):
        assert m.dtype == torch.bfloat16
        assert torch.equal(m, torch.lerp(o.float(), p.float(), g).bfloat16())
    rows = sample.mix_condition(opt, orig, torch.tensor([1.0, 0.5]), 0.4)  # gamma 1 and 0
    assert torch.equal(rows[0][0], opt[0][0]) and torch.equal(rows[0][1], orig[0][1])
    assert torch.equal(rows[1][0], opt[1][0]) and torch.equal(rows[1][1], orig[1][1])


def test_mix_of_equal_conditions_is_exact_and_k0_samples_plainly(pipe):
    """C^orig mixed with itself is C^orig bit for bit at every sigma (g*C + (1-g)*C is not, in floating
    point), so the k = 0 samples of a group, and K = 1 runs, are plain sampling exactly."""
    torch.manual_seed(0)
    c = (torch.randn(2, 93, 96), torch.randn(2, 80))
    sigmas = sample.sigma_grid(pipe.scheduler, 10)
    for s in sigmas.tolist() + [0.7, 0.83]:
        assert all(torch.equal(m, x) for m, x in zip(sample.mix_condition(c, c, s, 0.4), c)), s
    noise = torch.randn(2, 16, 8, 8)
    plain = sample.sample(pipe.transformer, sigmas, noise, c)
    assert torch.equal(sample.sample(pipe.transformer, sigmas, noise, c, c_opt=c), plain)


def test_phase2_shared_noise_pairs_the_k_conditions(phase1_file, tmp_path, monkeypatch):
    """shared_noise: the K conditions of noise g start from one x_1; by default every sample has its own."""
    pf, out = phase1_file
    seen, real = [], sample.sample

    def spy(transformer, sigmas, noise, *a, **kw):
        seen.append(noise.clone())
        return real(transformer, sigmas, noise, *a, **kw)

    monkeypatch.setattr(sample, "sample", spy)
    for shared in (True, False):
        seen.clear()
        phase2_align.main(_phase2(tmp_path / str(shared), out, pf, "--epochs=1", f"--shared_noise={shared}"))
        x1 = seen[0]  # the first sampling batch: prompt slot 0, rows (k, g) = k * G + g, K=4, G=2
        rows = [x1[k * 2 + g] for g in range(2) for k in range(4)]
        same = [torch.equal(rows[i], rows[j]) for i in range(8) for j in range(i + 1, 8)]
        # with sharing, exactly the pairs of equal g (2 noises x 6 pairs of conditions) coincide
        assert sum(same) == (12 if shared else 0)
        # the log splits the group's rewards by condition, and with shared noise measures the pairs
        rec = _log(tmp_path / str(shared))[0]
        assert {"reward_k0", "reward_kp", "group_std_k0", "group_std_kp"} <= set(rec)
        assert ("dist_kp" in rec) == shared and (not shared or rec["dist_kp"] > 0)


def test_sampler_cfg_and_trajectory():
    """guidance g: v = v_neg + g (v_cond - v_neg); one Euler step from sigma 1 to 0 is x - v."""
    class PooledFlow(torch.nn.Module):  # v = the first pooled feature, everywhere
        def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections,
                    return_dict=False):
            return (pooled_projections[:, :1, None, None].expand_as(hidden_states),)

    noise = torch.zeros(2, 4, 2, 2)
    cond, neg = (torch.zeros(2, 3, 2), torch.ones(2, 2)), (torch.zeros(1, 3, 2), torch.zeros(1, 2))
    x, traj = sample.sample(PooledFlow(), torch.tensor([1.0, 0.0]), noise, cond, guidance=3.0, c_neg=neg,
                            return_traj=True)
    assert torch.allclose(x, torch.full_like(x, -3.0)) and len(traj) == 2 and torch.equal(traj[0], noise)
    x1 = sample.sample(PooledFlow(), torch.tensor([1.0, 0.5, 0.0]), noise, cond)  # no CFG: v = 1
    assert torch.allclose(x1, torch.full_like(x1, -1.0))


def test_bf16_path_runs_on_cpu_close_to_fp32(phase1_file, tmp_path, monkeypatch):
    """--dtype=bfloat16 runs the precision path of a GPU on CPU: bf16 frozen models under bf16 autocast, fp32
    LoRA, fp32 ODE state and VAE, fp32 reward models. Phase I writes its file; two epochs of Phase II give
    finite losses, a LoRA that loads in plain diffusers, and figures close to the same run in fp32.
    The bounds follow from bf16's 8 significant bits (each rounding errs by at most u = 2^-8 relative):
    the mean reward and the loss average many elements' independent roundings, so they stay within one u
    of fp32 (measured 7e-6 and 1e-4 relative); the gradient norm within 4 u (measured 2 u); the LoRA after
    two AdamW steps within the 2 x 3.17 lr a step that any two gradients allow (measured 6 lr)."""
    pf, out = phase1_file
    pert = str(tmp_path / "p.safetensors")
    phase1_perturb.main(["config/tiny_cpu.py", f"--prompts={pf}", f"--perturbations={pert}", "--K=4",
                         "--iters=3", "--t5_len=16", "--dtype=bfloat16"])
    from safetensors import safe_open
    t5 = safe_open(pert, "pt").get_tensor("0.t5")
    assert t5.dtype == torch.float16 and torch.isfinite(t5).all()
    import rewards
    monkeypatch.setitem(rewards.REWARDS, "brightness",  # smooth in the pixels, unlike a JPEG size
                        lambda device="cpu", dtype=None, **kw: (lambda im, p, m: im.mean((1, 2, 3))))
    built, casts, real_build, real_autocast = [], [], rewards.build_reward, torch.autocast
    monkeypatch.setattr(rewards, "build_reward", lambda spec, dev, dtype, **kw: (
        built.append(dtype), real_build(spec, dev, dtype, **kw))[1])
    monkeypatch.setattr(torch, "autocast",
                        lambda *a, **kw: (casts.append((a, kw)), real_autocast(*a, **kw))[1])
    runs = {}
    for dt in ("float32", "bfloat16"):
        casts.clear()
        d = tmp_path / dt
        phase2_align.main(_phase2(d, out, pf, "--epochs=2", f"--dtype={dt}", "--reward={'brightness': 1.0}"))
        runs[dt] = d
        # autocast wherever the frozen weights are bf16 (amp=None), on the CPU as on a GPU
        assert bool(casts) == (dt == "bfloat16") and all(a == ("cpu",) and kw == {"dtype": torch.bfloat16}
                                                         for a, kw in casts)
    assert built == [torch.float32, torch.float32]  # the reward models in fp32 whatever the run's dtype
    a, b = _log(runs["float32"]), _log(runs["bfloat16"])
    u = 2.0 ** -8
    for x, y in zip(a, b):
        assert all(math.isfinite(y[k]) for k in ("loss", "reward_mean", "grad_norm")) and y["grad_norm"] > 0
        assert y["reward_mean"] == pytest.approx(x["reward_mean"], rel=u)
        assert y["loss"] == pytest.approx(x["loss"], rel=u)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=4 * u)
    from safetensors.torch import load_file
    for sub in ("lora", "lora_old", "lora_ema"):
        A, B = (load_file(str(runs[dt] / "checkpoint" / sub / "pytorch_lora_weights.safetensors"))
                for dt in ("float32", "bfloat16"))
        assert all(v.dtype == torch.float32 for v in B.values())
        assert max((A[k] - B[k]).abs().max().item() for k in A) < 2 * 3.17 * 3e-4 * 2, sub
    p = sample.load_pipeline("tiny", "cpu", torch.bfloat16)  # the VAE decodes in fp32 whatever the dtype
    assert p.transformer.dtype == torch.bfloat16 and p.vae.dtype == torch.float32
    with sample.diffusers_notes_off():
        p.load_lora_weights(str(runs["bfloat16"] / "checkpoint" / "lora_ema"))  # plain diffusers reads it
    text = sample.load_text("tiny", "cpu", torch.bfloat16, 16, pipe=p)
    v = sample.velocity(p.transformer, torch.randn(1, 16, 8, 8), 0.5, sample.encode(text, ["a cat"]))
    assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all()
    with pytest.raises(SystemExit, match="not one of auto"):
        sample.pick_device("cpu", "float8")
    with pytest.raises(SystemExit, match="float16' is not supported"):
        sample.pick_device("cpu", "float16")


def test_theta_under_ddp_in_bf16_without_autocast(tmp_path):
    """theta's forward goes through the DDP wrapper, which has no .dtype: fp32 latents must still reach a
    bf16 model as bf16 (with --amp=False nothing else casts them), and gradients reach the fp32 LoRA. The
    wrapper leaves the frozen base and the buffers out of its broadcasts (SD3's pos_embed is 453 MB in bf16
    and never changes), and keeps every LoRA tensor of the three adapters in them."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        pipe = sample.load_pipeline("tiny", "cpu", torch.bfloat16)
        tr = pipe.transformer
        phase2_align.add_adapters(tr, 4, 8)
        with torch.no_grad():  # a nonzero lora_B, so that the LoRA path is exercised
            for p in phase2_align.adapter_params(tr, "default"):
                p.normal_(0, 0.1)
        ddp = phase2_align.ddp_theta(tr, torch.device("cpu"))
        ignored = set(tr._ddp_params_and_buffers_to_ignore)
        assert "pos_embed.pos_embed" in ignored and not any("lora_" in n for n in ignored)
        assert {n for n, _ in tr.named_parameters() if "lora_" not in n} <= ignored
        assert not ddp.modules_buffers and not ddp.will_sync_module_buffers()
        text = sample.load_text("tiny", "cpu", torch.bfloat16, 16, pipe=pipe)
        cond = sample.encode(text, ["a cat", "a dog"])
        x, t = torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.7])  # fp32, as the ODE state and times are
        v = sample.velocity(ddp, x, t, cond)
        assert v.dtype == torch.bfloat16 and torch.equal(v, sample.velocity(tr, x, t, cond))
        v.float().pow(2).mean().backward()
        grads = [p.grad for p in phase2_align.adapter_params(tr, "default")]
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    finally:
        dist.destroy_process_group()


def test_perturbing_one_encoder_leaves_the_others_alone(prompt_file, tmp_path):
    out = str(tmp_path / "clip_l_only.safetensors")
    phase1_perturb.main(["config/tiny_cpu.py", f"--prompts={prompt_file}", f"--perturbations={out}", "--K=3",
                         "--iters=5", "--t5_len=16", "--encoders=('clip_l',)"])
    prompt_list, _ = sample.read_prompts(prompt_file)
    text = sample.load_text("tiny", t5_len=16)
    pert = sample.load_perturbations(out, text, prompt_list, K=3)
    pe, pooled = sample.perturbed_conditions(text, pert, prompt_list, [0])
    pe0, pooled0 = sample.encode(text, prompt_list[:1])
    # prompt_embeds = [CLIP-L 32 | CLIP-G 48 | zero pad 16] x 77 tokens, then T5 x 16 tokens;
    # pooled = [L 32 | G 48]
    assert not torch.allclose(pe[:, :77, :32], pe0[:, :77, :32].expand(2, -1, -1))
    assert torch.allclose(pe[:, :77, 32:], pe0[:, :77, 32:].expand(2, -1, -1), atol=1e-6)
    assert torch.allclose(pe[:, 77:], pe0[:, 77:].expand(2, -1, -1), atol=1e-6)
    assert torch.allclose(pooled[:, 32:], pooled0[:, 32:].expand(2, -1), atol=1e-6)
    assert torch.all(pe[:, :77, 80:] == 0)  # the zero padding of the CLIP features stays zero


def test_use_adapter_equals_peft_model_switching():
    """The cached per-layer switch gives bit for bit what diffusers/peft's model-level set_adapter and
    disable_adapters give, for every adapter and for the base model, in any order of switches."""
    tr = tiny.pipeline(0).transformer
    phase2_align.add_adapters(tr, 4, 8)
    torch.manual_seed(0)
    with torch.no_grad():
        for i, name in enumerate(phase2_align.ADAPTERS):
            for p in phase2_align.adapter_params(tr, name):
                p.add_(torch.randn_like(p) * 0.1 * (i + 1))
    x, cond = torch.randn(2, 16, 8, 8), (torch.randn(2, 20, 96), torch.randn(2, 80))
    with torch.no_grad():
        for name in ("old", None, "ema", "default", None, "old", "default"):
            if name is None:
                tr.disable_adapters()
            else:
                tr.enable_adapters()
                tr.set_adapter(name)
            ref = sample.velocity(tr, x, 0.6, cond)
            phase2_align.use_adapter(tr, "ema" if name != "ema" else "old")  # somewhere else first
            phase2_align.use_adapter(tr, name)
            assert torch.equal(sample.velocity(tr, x, 0.6, cond), ref), name


def test_policy_velocities_use_old_base_and_trained_models():
    tr = tiny.pipeline(0).transformer
    torch.manual_seed(0)
    x, t, cond = (torch.randn(2, 16, 8, 8), torch.tensor([0.9, 0.4]),
                  (torch.randn(2, 20, 96), torch.randn(2, 80)))
    base = sample.velocity(tr, x, t, cond)
    phase2_align.add_adapters(tr, 4, 8)
    with torch.no_grad():  # make theta and old differ from each other and from the base model
        for name, scale in (("default", 0.1), ("old", 0.2)):
            for p in phase2_align.adapter_params(tr, name):
                p.add_(torch.randn_like(p) * scale)
    expect = {}
    for name in ("old", "default"):
        phase2_align.use_adapter(tr, name)
        with torch.no_grad():
            expect[name] = sample.velocity(tr, x, t, cond)
    v_old, v_ref, v_theta = phase2_align.policy_velocities(tr, x, t, cond)
    assert torch.allclose(v_old, expect["old"], atol=1e-6) and not v_old.requires_grad
    assert torch.allclose(v_ref, base, atol=1e-6) and not v_ref.requires_grad
    assert torch.allclose(v_theta, expect["default"], atol=1e-6) and v_theta.requires_grad
    assert not torch.allclose(v_old, v_theta, atol=1e-3) and not torch.allclose(v_ref, v_theta, atol=1e-3)
    v_theta.sum().backward()  # gradients reach theta only
    assert all(p.grad is not None for p in phase2_align.adapter_params(tr, "default"))
    assert all(p.grad is None for n in ("old", "ema") for p in phase2_align.adapter_params(tr, n))
    assert phase2_align.policy_velocities(tr, x, t, cond, with_ref=False)[1] is None


# ----------------------------------------------------------------------------- compare_runs.py
def _write_run(d, std, evals):
    d.mkdir(parents=True)
    lines = [{"epoch": -1, "step": 0, "eval_reward": evals[0]}]
    for i, s in enumerate(std):
        rec = {"epoch": i, "step": i + 1, "reward_mean": 0.5, "group_std": s,
               "collapsed_groups": 0.25 * (s < 0.01)}
        if i + 1 < len(evals):
            rec["eval_reward"] = evals[i + 1]
        lines.append(rec)
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_compare_runs_table_and_plot(tmp_path, capsys, monkeypatch):
    import compare_runs
    _write_run(tmp_path / "nft" / "seed0", [0.2, 0.1, 0.005], [0.3, 0.4, 0.5, 0.6])
    _write_run(tmp_path / "nft" / "seed1", [0.2, 0.1, 0.007], [0.3, 0.4, 0.5, 0.8])
    _write_run(tmp_path / "e2po" / "seed0", [0.3, 0.3, 0.3], [0.3, 0.5])
    compare_runs.main([f"--runs={tmp_path}", f"--plot={tmp_path / 'c.png'}"])
    out = capsys.readouterr().out
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in out.splitlines() if ln.startswith("| ")}
    # nft: last std (0.005, 0.007) -> 0.006 ± 0.001;
    # mean std per seed 0.101667 and 0.102333 -> 0.1020 ± 0.0003;
    # held-out last (0.6, 0.8) -> 0.7 ± 0.1,
    # mean over evaluations after the start (0.5, 0.5667) -> 0.5333 ± 0.0333
    col = {name: i for i, name in enumerate(rows["run"])}
    nft = lambda name: rows["nft"][col[name]]
    assert rows["nft"][:3] == ["2", "", "3"]  # seeds, N (no config.json), steps
    assert nft("group std, last") == "0.0060 ± 0.0010" and nft("group std, mean") == "0.1020 ± 0.0003"
    assert nft("collapsed, last") == "0.2500 ± 0.0000" and nft("held-out, start") == "0.3000 ± 0.0000"
    assert nft("held-out, last") == "0.7000 ± 0.1000" and nft("held-out, mean") == "0.5333 ± 0.0333"
    assert nft("group std / step std, last") == "n/a"  # these logs have no reward_std
    assert rows["e2po"][:3] == ["1", "", "3"] and rows["e2po"][col["held-out, last"]] == "0.5000 ± 0.0000"
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "c.png").stat().st_size > 1000
    except ImportError:
        assert "matplotlib is not installed" in out
    import builtins
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("matplotlib") else real_import(name, *a, **k))
    compare_runs.main([f"--runs={tmp_path / 'nft' / 'seed0'}", f"--plot={tmp_path / 'd.png'}"])
    out = capsys.readouterr().out
    assert ("| nft | 1 |  | 3 |" in out and "matplotlib is not installed" in out
            and not (tmp_path / "d.png").exists())
    with pytest.raises(SystemExit, match="no log.jsonl"):
        compare_runs.main([f"--runs={tmp_path / 'none'}"])
    with pytest.raises(SystemExit, match="--runs names no folder"):
        compare_runs.main(["--runs= , "])
    # final evaluations (eval_diversity's summary in <run>/final/ and <root>/prior_final/) add two columns
    # and a line for the prior; a run without one shows n/a
    finals = (("nft/seed0", 0.5, 0.6), ("nft/seed1", 0.7, 0.8), ("prior_final", 0.25, 0.4))
    for run, overall, credit in finals:
        folder = tmp_path / run / ("" if run == "prior_final" else "final")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "diversity.json").write_text(json.dumps(
            {"groups": {"all": {"geneval": {"overall": overall, "mean_score": credit}}}}))
    compare_runs.main([f"--runs={tmp_path}", f"--plot={tmp_path / 'e.png'}"])
    out = capsys.readouterr().out
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in out.splitlines() if ln.startswith("| ")}
    assert rows["run"][-2:] == ["final GenEval", "final credit"]
    assert rows["nft"][-2:] == ["0.6000 ± 0.1000", "0.7000 ± 0.1000"]
    assert rows["e2po"][-2:] == ["n/a", "n/a"]
    assert "the prior, untrained" in out and "final GenEval 0.2500, final credit 0.4000" in out


def test_compare_runs_names_a_broken_line_and_checks_its_plot_path(tmp_path, capsys):
    """A broken line of a run's log.jsonl (two writers, an edit) is named by file and line, a broken
    final_eval.json by file; a last line cut short (a run still writing it) is left out with a note; the
    plot must be an image file in a writable place, checked before anything is read or drawn."""
    import compare_runs
    d = tmp_path / "exp" / "a" / "seed0"
    _write_run(d, [0.2, 0.1], [0.5, 0.6])
    log = d / "log.jsonl"
    good = log.read_text()
    log.write_text(good.replace("\n", '\n{"epoch": 0, "st\n', 1))
    with pytest.raises(SystemExit, match=re.escape(f"{log} line 2 is not valid JSON")):
        compare_runs.main([f"--runs={tmp_path / 'exp'}", f"--plot={tmp_path / 'p.png'}"])
    log.write_text(good + '{"epoch": 2, "st')
    compare_runs.main([f"--runs={tmp_path / 'exp'}", f"--plot={tmp_path / 'p.png'}"])
    assert "line 4 is incomplete (a write cut short): left out" in capsys.readouterr().out
    (d / "final_eval.json").write_text('{"reward": ')
    with pytest.raises(SystemExit, match=re.escape(f"{d / 'final_eval.json'} is not valid JSON")):
        compare_runs.main([f"--runs={tmp_path / 'exp'}", f"--plot={tmp_path / 'p.png'}"])
    (d / "final_eval.json").unlink()
    with pytest.raises(SystemExit, match=re.escape("--ref=b: b is not a label of these runs (a)")):
        compare_runs.main([f"--runs={tmp_path / 'exp'}", f"--plot={tmp_path / 'p.png'}", "--ref=b"])
    (tmp_path / "f").write_text("x")
    for plot, says in ((log, "must name a .png, .pdf or .svg file"),
                       (tmp_path / "f" / "x.png", "not a writable folder")):
        with pytest.raises(SystemExit, match=re.escape(says)):
            compare_runs.main([f"--runs={tmp_path / 'exp'}", f"--plot={plot}"])
    assert log.read_text() == good + '{"epoch": 2, "st'


def test_compare_runs_blocks_paired_difference_and_mechanism(tmp_path, capsys):
    """The variance study's figures: first/last as means over --block steps, the final reward's difference
    from the reference label at the same samples per prompt, paired by seed and image (mean ± standard error
    over seeds, the paired t-test's p), the normalised group std, and the k = 0 / k > 0 table of the runs
    that log it with what sampling alone gives each part."""
    import compare_runs
    finals = {("nft", 0): [0.2, 0.4], ("nft", 1): [0.5, 0.5],
              ("e2po", 0): [0.3, 0.7], ("e2po", 1): [0.5, 0.9]}
    for (label, seed), rewards_ in finals.items():
        d = tmp_path / label / f"seed{seed}"
        _write_run(d, [0.4, 0.3, 0.2, 0.1] if label == "nft" else [0.5, 0.4, 0.3, 0.3], [0.3, 0.4])
        (d / "config.json").write_text(json.dumps({"K": 1, "G": 16} if label == "nft" else {"K": 4, "G": 4}))
        if label == "e2po":  # the per-condition fields, on every training record
            recs = [json.loads(ln) for ln in (d / "log.jsonl").read_text().splitlines()]
            for i, r in enumerate(x for x in recs if "group_std" in x):
                r.update(reward_k0=0.5 + 0.1 * i, reward_kp=0.3 + 0.1 * i, group_std_k0=0.1, group_std_kp=0.2)
            (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        more = 0.05 * (seed + 1) if label == "e2po" else 0.0  # e2po's pixel distance: +0.05, +0.10
        (d / "final_eval.json").write_text(json.dumps({"reward": sum(rewards_) / 2, "rewards": rewards_,
                                                       "pixel_dist": 0.1 + more, "sdi": 0.2, "pvs": 0.3}))
    compare_runs.main([f"--runs={tmp_path}", f"--plot={tmp_path / 'c.png'}", "--block=2", "--ref=nft",
                       "--window=2"])
    main_table, count, mech_table, _, binomial = capsys.readouterr().out.split("\n\n")[:5]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in main_table.splitlines() if ln.startswith("| ")}
    head = rows["run"]
    # first / last blocks of two steps: (0.4 + 0.3) / 2, (0.2 + 0.1) / 2
    assert rows["nft"][head.index("group std, first")] == "0.3500 ± 0.0000"
    assert rows["nft"][head.index("group std, last")] == "0.1500 ± 0.0000"
    # paired by seed: the final reward, seed 0 (0.1 + 0.3) / 2 = 0.2, seed 1 (0 + 0.4) / 2 = 0.2 -> 0.2 ± 0;
    # the last block's group std (0.3 + 0.3) / 2 - 0.15 = 0.15 at both seeds
    # and the diversity figures: pixel distance (0.05 + 0.10) / 2 ± (0.05 / sqrt 2) / sqrt 2; the others equal
    # the p-values: a difference equal at both seeds (SE 0) is certain; pixel distance t = 0.075 / 0.025 = 3
    # on 1 degree of freedom: p = 2 (1/2 - atan(3) / pi) = 0.205
    assert head[-6:] == ["reference"] + [f"{name} − nft (paired, ± SE)" for name in (
        "group std, last", "final reward", "final pixel dist", "final SDI", "final PVS")]
    assert rows["e2po"][-6:] == ["nft", "0.1500 ± 0.0000 (p < 0.001)", "0.2000 ± 0.0000 (p < 0.001)",
                                 "0.0750 ± 0.0250 (p 0.2)", "0.0000 ± 0.0000 (p 1)", "0.0000 ± 0.0000 (p 1)"]
    assert compare_runs.paired_p(0.075, 0.025, 2) == pytest.approx(1 - 2 * math.atan(3) / math.pi)
    assert rows["nft"][-6:] == [""] * 6 and rows["nft"][1] == "16" and rows["e2po"][1] == "16"
    assert count.startswith("5 paired comparisons in this table")
    assert rows["e2po"][head.index("final reward")] == "0.6000 ± 0.1000"
    # the mechanism table: k = 0 reward over the first two steps (0.5, 0.6) and the last two (0.7, 0.8)
    mech = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in mech_table.splitlines() if ln.startswith("| ")}
    assert mech["run"][:2] == ["reward_k0, first", "reward_k0, last"] and "nft" not in mech
    assert mech["e2po"][:2] == ["0.5500 ± 0.0000", "0.7500 ± 0.0000"]
    # ... and what sampling alone gives a 0/1 reward at those means: n = G = 4 for k = 0, (K - 1) G = 12 for
    # k > 0 (binomial_std; 0.152 at p = 0.9, n = 4 and 0.239 at n = 12, worked by hand)
    expected = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
                for ln in binomial.splitlines() if ln.startswith("| ")}
    assert expected["e2po"] == [f"{compare_runs.binomial_std(p, n):.4f} ± 0.0000"
                                 for p, n in ((0.55, 4), (0.75, 4), (0.35, 12), (0.55, 12))]
    # n = 4: 3 of 4 (probability 0.2916) and 1 of 4 (0.0036) give sqrt(3/16), 2 of 4 (0.0486) gives 1/2
    want = (0.2916 + 0.0036) * (3 / 16) ** 0.5 + 0.0486 / 2
    assert compare_runs.binomial_std(0.9, 4) == pytest.approx(want)
    assert compare_runs.binomial_std(0.9, 12) == pytest.approx(0.2389, abs=1e-4)
    assert compare_runs.smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
    # equal N: a G = 48 reference serves the N = 48 label, the G = 16 one the rest; rel = group std / (step
    # std + 1e-4), computed for logs written before it was logged
    for label, (K, G) in {"nft_g48": (1, 48), "e2po_4x12": (12, 4)}.items():
        for seed in (0, 1):
            d = tmp_path / label / f"seed{seed}"
            _write_run(d, [0.3, 0.3, 0.3, 0.3], [0.3, 0.4])
            recs = [dict(r, reward_std=0.6 - 1e-4) if "group_std" in r else r
                    for r in map(json.loads, (d / "log.jsonl").read_text().splitlines())]
            (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            (d / "config.json").write_text(json.dumps({"K": K, "G": G}))
    compare_runs.main([f"--runs={tmp_path}", f"--plot={tmp_path / 'c.png'}", "--block=2",
                       "--ref=nft,nft_g48"])
    out = capsys.readouterr().out.split("\n\n")[0]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in out.splitlines() if ln.startswith("| ")}
    ref = rows["run"].index("reference")
    assert rows["e2po_4x12"][ref] == "nft_g48" and rows["e2po"][ref] == "nft" and rows["nft_g48"][ref] == ""
    # a planned contrast, paired by seed and image: e2po - (nft + e2po) / 2 = (e2po - nft) / 2: seed 0
    # ((0.3 - 0.2) + (0.7 - 0.4)) / 4 = 0.1, seed 1 ((0.5 - 0.5) + (0.9 - 0.5)) / 4 = 0.1 -> 0.1 ± 0
    m, se, p, n = compare_runs.contrast_of(compare_runs.find_runs([str(tmp_path)]), "e2po:nft,e2po")
    assert (m, n) == (pytest.approx(0.1), 2) and se == pytest.approx(0, abs=1e-12)
    with pytest.raises(SystemExit, match="not found: nope"):
        compare_runs.contrast_of(compare_runs.find_runs([str(tmp_path)]), "e2po:nope")
    assert rows["e2po_4x12"][rows["run"].index("group std / step std, last")] == "0.5000 ± 0.0000"
    # the perturbation probe (probe.json beside a run's final_eval.json, prior_probe.json at the root)
    for seed, (k0, kp) in enumerate(((0.9, 0.8), (0.7, 0.7))):
        (tmp_path / "e2po" / f"seed{seed}" / "probe.json").write_text(json.dumps({"probe": {
            "K": 4, "reward_k0": k0, "reward_kp": kp, "pixel_dist_kp": 0.1, "changed_kp": 0.2}}))
    (tmp_path / "prior_final_eval.json").write_text(json.dumps(
        {"reward": 0.5, "rewards": [0.5], "pixel_dist": 0.1, "sdi": 0.2, "pvs": 0.3}))
    (tmp_path / "prior_probe.json").write_text(json.dumps({"probe": {
        "K": 4, "reward_k0": 0.6, "reward_kp": 0.3, "pixel_dist_kp": 0.2, "changed_kp": 0.5}}))
    compare_runs.main([f"--runs={tmp_path}", f"--plot={tmp_path / 'c.png'}", "--block=2"])
    probe = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
             for ln in capsys.readouterr().out.split("\n\n")[4].splitlines() if ln.startswith("| ")}
    # e2po: k = 0 (0.9, 0.7) -> 0.8 ± 0.1; k > 0 (0.8, 0.7) -> 0.75 ± 0.05; gaps (-0.1, 0) -> -0.05 ± 0.05
    assert probe["e2po"] == ["2", "0.8000 ± 0.1000", "0.7500 ± 0.0500", "-0.0500 ± 0.0500",
                             "0.1000 ± 0.0000", "0.2000 ± 0.0000"]
    assert probe["prior (untrained)"][:4] == ["1", "0.6000 ± 0.0000", "0.3000 ± 0.0000", "-0.3000 ± 0.0000"]
    assert "nft" not in probe
    with pytest.raises(SystemExit, match="at least 1"):
        compare_runs.main([f"--runs={tmp_path}", "--block=0"])


def test_the_suite_hides_gpus_from_itself_and_its_subprocesses():
    """On a GPU machine the scripts would choose CUDA ("auto") and the two-process tests NCCL, with one GPU
    for two ranks: conftest.py hides the GPUs from the suite and every process it starts."""
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == "" and not torch.cuda.is_available()
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("model", ["tiny", "data/shapes/prior_cfgfree"])
def test_export_merges_the_lora_into_a_plain_pipeline(model, tmp_path):
    """export.py fuses a trained LoRA (diffusers format, as phase2 saves it) into the transformer and writes
    a folder that plain StableDiffusion3Pipeline.from_pretrained loads, with no adapter layers left. Its
    velocity equals the LoRA applied on the fly up to float32 rounding: the merged W + (alpha/r) B A is
    rounded once per weight, and a linear layer of fan-in at most d then differs by at most d u relative
    (u = 2^-24); a token passes about 6 linears a block and 4 more in series, so the bound is
    (6 blocks + 4) d u relative (measured 1e-7 and 3e-7), ten times below what the LoRA itself changes."""
    import export
    from diffusers import StableDiffusion3Pipeline
    if model != "tiny" and not os.path.isfile(os.path.join(model, "model_index.json")):
        pytest.skip(f"no prior in {model}")
    pipe = sample.load_pipeline(model)
    tr = pipe.transformer
    phase2_align.add_adapters(tr, 4, 8)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking LoRA: lora_B away from its zero init
        for p in phase2_align.adapter_params(tr, "ema"):
            p.normal_(0, 0.1)
    lora = tmp_path / "lora_ema"
    phase2_align.save_lora(tr, "ema", str(lora))
    out = tmp_path / "merged"
    export.main([f"--model={model}", f"--lora={lora}", f"--out_dir={out}", "--device=cpu"])
    merged = StableDiffusion3Pipeline.from_pretrained(str(out))
    assert not any("lora" in n for n, _ in merged.transformer.named_parameters())
    ref = sample.load_pipeline(model)
    with sample.diffusers_notes_off():
        ref.load_lora_weights(str(lora))
    text = sample.load_text(model, t5_len=16, pipe=ref)
    cond = sample.encode(text, ["a photo of a red circle", "two squares"])
    shape = sample.latent_shape(ref, 64)
    x, t = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        v_ref, v_merged = (sample.velocity(m, x, t, cond) for m in (ref.transformer, merged.transformer))
        v_base = sample.velocity(sample.load_pipeline(model).transformer, x, t, cond)
    c = tr.config
    d = max(c.joint_attention_dim, c.num_attention_heads * c.attention_head_dim * 4)
    bound = (6 * c.num_layers + 4) * d * 2.0 ** -24
    assert (v_merged - v_ref).norm() <= bound * v_ref.norm()
    assert (v_ref - v_base).norm() > 10 * bound * v_base.norm()  # an export without the merge fails
    with pytest.raises(SystemExit, match="holds an earlier export: pass --overwrite=True"):
        export.main([f"--model={model}", f"--lora={lora}", f"--out_dir={out}", "--device=cpu"])
    with pytest.raises(SystemExit, match="holds no pytorch_lora_weights"):
        export.main([f"--model={model}", f"--lora={tmp_path}", f"--out_dir={tmp_path / 'x'}"])
    assert not (tmp_path / "x").exists()


def test_bf16_export_against_bf16_base_and_fp32_lora(tmp_path):
    """export.py --dtype=bfloat16 merges the LoRA into bf16 weights, so each merged weight is rounded to bf16
    once, and a LoRA step below one bf16 step of W is lost there. Measured on the tiny model with a LoRA of
    |dW|/|W| ~ 0.3: the bf16 export lies as close to the fp32 reference (fp32 base + fp32 LoRA) as the
    training path does (bf16 base + fp32 LoRA under bf16 autocast; measured 5.8e-3 and 6.0e-3 of |v|), and
    keeps the LoRA's effect (they differ by 0.13 of it). The exported tokenizer folders hold tokenizer.json
    and tokenizer_config.json only; transformers 5 loads them as the classes model_index.json names, giving
    the ids of the model's own tokenizers."""
    import export
    from diffusers import StableDiffusion3Pipeline
    tr = sample.load_pipeline("tiny").transformer
    phase2_align.add_adapters(tr, 4, 8)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in phase2_align.adapter_params(tr, "ema"):
            p.normal_(0, 0.1)
    lora = tmp_path / "lora"
    phase2_align.save_lora(tr, "ema", str(lora))
    export.main(["--model=tiny", f"--lora={lora}", f"--out_dir={tmp_path / 'e'}", "--dtype=bfloat16",
                 "--device=cpu"])
    merged = StableDiffusion3Pipeline.from_pretrained(str(tmp_path / "e"), dtype=torch.bfloat16)
    ref = sample.load_pipeline("tiny")
    text = sample.load_text("tiny", t5_len=16, pipe=ref)
    cond = sample.encode(text, ["a photo of a red circle", "two squares"])
    x = torch.randn(2, *sample.latent_shape(ref, 64), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])

    def v(transformer, dtype, autocast=False):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return sample.velocity(transformer, x, t, tuple(c.to(dtype) for c in cond)).float()
    sample.load_lora(ref, str(lora), "tiny")
    v32 = v(ref.transformer, torch.float32)  # fp32 base + fp32 LoRA
    trained = sample.load_pipeline("tiny", dtype=torch.bfloat16).transformer
    phase2_align.add_adapters(trained, 4, 8)
    phase2_align.load_lora_into(trained, "default", str(lora))
    v_train = v(trained, torch.bfloat16, autocast=True)  # bf16 base + fp32 LoRA, as Phase II runs it
    v_base = v(sample.load_pipeline("tiny", dtype=torch.bfloat16).transformer, torch.bfloat16)
    v_export = v(merged.transformer, torch.bfloat16)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(v_export, v32) <= 1.1 * rel(v_train, v32)
    assert (v_export - v_train).norm() < 0.25 * (v_train - v_base).norm()
    for sub, name in (("tokenizer", "clip_l"), ("tokenizer_2", "clip_g"), ("tokenizer_3", "t5")):
        assert sorted(os.listdir(tmp_path / "e" / sub)) == ["tokenizer.json", "tokenizer_config.json"]
        tok = getattr(merged, sub)
        assert type(tok).__name__ == json.loads((tmp_path / "e" / "model_index.json").read_text())[sub][1]
        prompts = ["a photo of a red circle", "Two dogs!"]
        assert tok(prompts).input_ids == text["tokenizers"][name](prompts).input_ids


def test_export_never_replaces_its_own_inputs_or_a_run(run_folder, tmp_path, monkeypatch):
    """A config's out_dir is its run folder: exporting that run's LoRA there, even with --overwrite=True,
    stops with one sentence that names the LoRA and does not advise --overwrite, and the run (log,
    checkpoint, the LoRA itself) is untouched; so for a LoRA from elsewhere (a run is not an export), a folder
    of other files, and an export onto the model folder it reads. All before any model loads. A LoRA cut
    short is named."""
    import export
    import shutil
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    d = tmp_path / "run"
    shutil.copytree(run_folder, d)
    lora = d / "checkpoint" / "lora_ema"
    other = tmp_path / "lora_ema"
    shutil.copytree(lora, other)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    before = _files(tmp_path)
    for args, says in (((f"--lora={lora}", f"--out_dir={d}"), f"which holds the LoRA {lora}"),
                       ((f"--lora={other}", f"--out_dir={d}"),
                        "holds a Phase II run (checkpoint, log.jsonl)"),
                       ((f"--lora={other}", f"--out_dir={tmp_path / 'notes'}"), "holds files that are not a"),
                       ((f"--lora={other}", f"--model={tmp_path / 'model'}",
                         f"--out_dir={tmp_path / 'model'}"),
                        "which holds the model")):
        with pytest.raises(SystemExit, match=re.escape(says)) as err:
            export.main(["config/tiny_cpu.py", *args, "--overwrite=True"])
        assert "--overwrite=True to" not in str(err.value)
    assert _files(tmp_path) == before
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "pytorch_lora_weights.safetensors").write_bytes((other / "pytorch_lora_weights.safetensors")
                                                          .read_bytes()[:3000])
    with pytest.raises(SystemExit, match="pytorch_lora_weights.safetensors cannot be read .*truncated"):
        export.main(["config/tiny_cpu.py", f"--lora={cut}", f"--out_dir={tmp_path / 'x'}"])
    assert not (tmp_path / "x").exists()


def test_a_lora_for_another_model_is_one_sentence(tmp_path, capfd):
    """A LoRA trained on tiny-large given to sample.py or export.py with the tiny model: one sentence, not the
    library's ~85 lines of size mismatches, and nothing written."""
    import export
    tr = tiny.pipeline(0, large=True).transformer
    phase2_align.add_adapters(tr, 4, 8)
    phase2_align.save_lora(tr, "ema", str(tmp_path / "large_lora"))
    for run in (lambda: sample.main(["config/tiny_cpu.py", f"--lora={tmp_path / 'large_lora'}", "--G=1",
                                     "--K=1", "--steps=1", f"--out_dir={tmp_path / 's'}"]),
                lambda: export.main(["config/tiny_cpu.py", f"--lora={tmp_path / 'large_lora'}",
                                     f"--out_dir={tmp_path / 'e'}"])):
        capfd.readouterr()
        with pytest.raises(SystemExit, match="does not fit model tiny .*size mismatch.*trained on another"):
            run()
        said = capfd.readouterr()
        assert "size mismatch" not in said.out + said.err
    # (e.lock: export claimed its out_dir; this test process still holds it, a real run's ends with it)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["large_lora"]


def _wandb_history(run_dir, wait=30.0):
    """The history rows of an offline wandb run (its .wandb file: LevelDB-style log blocks of protobuf
    records; wandb 0.31 ships no reader of its own). wandb's service may still be writing the file when the
    run's finish() returns: read it again until its closing record is there."""
    import glob
    import struct
    import time

    from wandb.proto import wandb_internal_pb2 as pb
    (path,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    deadline = time.time() + wait
    while True:
        rows, done = _wandb_records(path, pb, struct)
        if done or time.time() > deadline:
            return rows
        time.sleep(0.5)


def _wandb_records(path, pb, struct):
    data, pos, part, rows, done = open(path, "rb").read(), 7, b"", [], False
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        part = chunk if kind in (1, 2) else part + chunk  # full, first / middle, last
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            kind = rec.WhichOneof("record_type")
            done |= kind == "exit"
            if kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in rec.history.item})
    return rows, done


def test_phase2_evaluation_grids_and_offline_tracking(phase1_file, tmp_path, monkeypatch):
    """Every evaluation writes OUT/evals/step_<step>.png (held-out prompts x noises, each image captioned
    with its reward; the same noises each time) and the run ends with the first and last side by side.
    With wandb_log=True and WANDB_MODE=offline (no account, no network) the run's wandb folder holds the
    scalars of log.jsonl at their steps, each epoch's reward histogram and the evaluation grids."""
    from PIL import Image
    pf, out = phase1_file
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    d = tmp_path / "run"
    phase2_align.main(_phase2(d, out, pf, "--epochs=2", f"--eval_prompts={pf}", "--eval_every=1",
                              "--eval_G=3", "--wandb_log=True"))
    n_prompts = len(sample.read_prompts(pf)[0])
    grids = sorted(p.name for p in (d / "evals").iterdir())
    assert grids == ["first_vs_last.png", "step_000000.png", "step_000001.png", "step_000002.png"]
    # rows: min(8, prompts) of 128 px images with a line of text above and below; 3 noises a row
    assert Image.open(d / "evals" / "step_000001.png").size == (3 * 128, min(8, n_prompts) * (128 + 28))
    log = _log(d)
    hist = {r["_step"]: r for r in _wandb_history(d)}
    assert sorted(hist) == [r["step"] for r in log] == [0, 1, 2]
    for r in log:
        row = hist[r["step"]]
        assert row["eval_reward"] == pytest.approx(r["eval_reward"])
        assert row["eval_grid/_type"] == "image-file"
        if r["epoch"] >= 0:
            assert row["reward_mean"] == pytest.approx(r["reward_mean"])
            assert row["group_std"] == pytest.approx(r["group_std"])
            assert row["loss"] == pytest.approx(r["loss"])
            # every sample of the epoch in the histogram: 2 prompts x K=4 x G=2
            assert row["reward_hist/_type"] == "histogram" and sum(row["reward_hist/values"]) == 16


def test_sd35_large_shape_runs_every_stage(prompt_file, tmp_path):
    """--model=tiny-large: a tiny model of SD3.5-Large's transformer structure (no dual-attention blocks,
    more heads) through Phase I, Phase II and sample.py: SD3.5-Large is the same code. Its config keeps the
    paper's GenEval budget."""
    pert = tmp_path / "p.safetensors"
    phase1_perturb.main(["config/tiny_cpu.py", "--model=tiny-large", f"--prompts={prompt_file}",
                         f"--perturbations={pert}", "--K=4", "--iters=3", "--t5_len=16"])
    d = tmp_path / "run"
    phase2_align.main(_phase2(d, str(pert), prompt_file, "--model=tiny-large", "--epochs=1"))
    assert math.isfinite(_log(d)[0]["loss"])
    sample.main(["config/tiny_cpu.py", "--model=tiny-large", f"--prompts={prompt_file}",
                 f"--perturbations={pert}", "--K=4", "--G=1", "--t5_len=16", "--steps=2",
                 f"--lora={d / 'checkpoint' / 'lora_ema'}", f"--out_dir={tmp_path / 'samples'}"])
    assert len((tmp_path / "samples" / "index.jsonl").read_text().splitlines()) == 3 * 4  # prompts x K x G
    tr = tiny.pipeline(0, large=True).transformer
    assert not any(b.attn2 is not None for b in tr.transformer_blocks if hasattr(b, "attn2"))
    assert any(getattr(b, "attn2", None) is not None for b in tiny.pipeline(0).transformer.transformer_blocks)
    g = {k: getattr(phase2_align, k) for k in phase2_align.config_keys}
    cfg = configure(g, phase2_align.config_keys, ["config/geneval_large_g4k12.py"])
    assert cfg["model"] == "stabilityai/stable-diffusion-3.5-large"
    assert cfg["prompts_per_epoch"] * cfg["K"] * cfg["G"] == 1152


def test_amortized_generator_serves_prompts_it_never_saw(prompt_file, tmp_path):
    """phase1_perturb.py --amortize=True trains one generator on L_emb itself; its file stands in for a
    perturbation file in sample.py and phase2_align.py, for prompts Phase I never saw: the same prompt gets
    the same Delta whatever its list or position, any K up to the generator's, calibrated onto the ring.
    Training lowers the held-out L_emb below the untrained generator's (the objective is learned, not
    regressed onto per-prompt Deltas)."""
    gen_file = tmp_path / "gen.safetensors"
    args = ["config/tiny_cpu.py", f"--prompts={prompt_file}", "--K=4", "--t5_len=16", "--amortize=True",
            "--gen_rank=4", "--gen_hidden=32", "--gen_batch=3"]
    phase1_perturb.main(args + [f"--perturbations={gen_file}", "--gen_iters=60"])
    phase1_perturb.main(args + [f"--perturbations={tmp_path / 'untrained.safetensors'}", "--gen_iters=1"])
    unseen = ["a purple giraffe", "three red cubes on a table", "a photo of a cat"]
    text = sample.load_text("tiny", t5_len=16)
    losses = {}
    for name in ("gen", "untrained"):
        pert = sample.load_perturbations(str(tmp_path / f"{name}.safetensors"), text, unseen, 4)
        gen = pert["generator"]
        with torch.no_grad():
            losses[name] = phase1_perturb.generator_loss(gen, text, unseen, 4, 0.85, 0.025, 1.0, 0).item()
    assert losses["gen"] < losses["untrained"], losses
    pert = sample.load_perturbations(str(gen_file), text, unseen, 4)
    rows = pert["rows"](1)
    assert set(rows) == {"clip_l", "clip_g", "t5"} and rows["t5"].shape[0] == 3
    assert rows["clip_l"].shape[1] == sample.tokenize(text, [unseen[1]])["clip_l"][1].sum()
    # K=3 from the same generator: the first two variants of K=4 (the first rows of the same rotation)
    again = sample.load_perturbations(str(gen_file), text, list(reversed(unseen)), 3)["rows"](1)
    assert all(torch.equal(again[n], rows[n][:2]) for n in rows)
    same = sample.load_perturbations(str(gen_file), text, ["x", "y", unseen[1]], 4)["rows"](2)
    assert all(torch.equal(same[n], rows[n]) for n in rows)  # by the prompt's text, not its position
    # calibrated onto the ring: the anchor cosine of every variant at mu - eps * (1 - margin)
    content = sample.tokenize(text, [unseen[1]])
    dense = {n: sample.scatter_content([rows[n].float()], content[n][1]) for n in rows}
    st = phase1_perturb.delta_stats(text, [unseen[1]], dense, ("clip_l", "clip_g", "t5"), 4)
    assert all(((a - 0.825).abs() < 0.02).all() for a, _ in st.values()), st
    # phase2 and sample.py take it in place of a perturbation file, on prompts it never saw
    pf = tmp_path / "unseen.txt"
    pf.write_text("\n".join(unseen) + "\n")
    d = tmp_path / "run"
    phase2_align.main(_phase2(d, str(gen_file), str(pf), "--epochs=1"))
    assert math.isfinite(_log(d)[0]["loss"]) and "reward_kp" in _log(d)[0]
    sample.main(["config/tiny_cpu.py", f"--prompts={pf}", f"--perturbations={gen_file}", "--K=4", "--G=1",
                 "--t5_len=16", "--steps=2", f"--out_dir={tmp_path / 'samples'}"])
    with pytest.raises(SystemExit, match="serves K from 2 to 4"):
        sample.load_perturbations(str(gen_file), text, unseen, 6)
    with pytest.raises(SystemExit, match="trained on model 'tiny'"):
        sample.load_perturbations(str(gen_file), {**text, "model": "other"}, unseen, 4)
    with pytest.raises(SystemExit, match="gen_rank"):
        phase1_perturb.main(args + [f"--perturbations={tmp_path / 'x.safetensors'}", "--K=6"])


def test_generator_is_saved_before_it_is_measured_in_batches(prompt_file, tmp_path, monkeypatch):
    """The held-out measurement runs in batches of batch_prompts (at SD3.5-M's encoders, every held-out
    prompt's K-1 sequences in one backward would not fit a GPU) and gives the table one batch gives; the
    generator is on disk before it is measured, so a measurement that fails (out of memory) keeps it."""
    held = tmp_path / "held.txt"
    held.write_text("a purple giraffe\nthree red cubes on a table\na photo of a cat\ntwo dogs\n"
                    "a blue square\n")
    args = ["config/tiny_cpu.py", f"--prompts={prompt_file}", "--K=4", "--t5_len=16", "--amortize=True",
            "--gen_rank=4", "--gen_hidden=32", "--gen_batch=3", "--gen_iters=5", f"--gen_eval_prompts={held}",
            "--iters=4", "--refine_iters=(0, 2)"]
    sizes, real = [], phase1_perturb.learn_perturbations

    def spy(text, prompt_list, indices, *a, **k):
        sizes.append(len(indices))
        return real(text, prompt_list, indices, *a, **k)
    monkeypatch.setattr(phase1_perturb, "learn_perturbations", spy)
    tables = {}
    from safetensors import safe_open
    for n in (2, 5):
        f = tmp_path / f"gen_{n}.safetensors"
        phase1_perturb.main(args + [f"--perturbations={f}", f"--batch_prompts={n}"])
        tables[n] = json.loads(safe_open(str(f), "pt").metadata()["e2po"])["held_out"]
        assert max(sizes) == n  # 2 + 2 + 1 prompts a batch, then all 5 at once
        sizes.clear()
    assert list(tables[2]) == list(tables[5]) and len(tables[2]) == 3  # generator, + 2 steps, per-prompt
    for label, row in tables[2].items():
        for m in ("clip_l", "clip_g", "t5"):
            for key, v in row[m].items():
                assert v == pytest.approx(tables[5][label][m][key], abs=1e-5), (label, m, key)
        assert row["L_emb_per_prompt"] == pytest.approx(tables[5][label]["L_emb_per_prompt"], rel=1e-5)

    def out_of_memory(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(phase1_perturb, "measure_generator", out_of_memory)
    f = tmp_path / "kept.safetensors"
    with pytest.raises(RuntimeError, match="out of memory"):
        phase1_perturb.main(args + [f"--perturbations={f}"])
    text = sample.load_text("tiny", t5_len=16)
    assert sample.load_perturbations(str(f), text, ["a new prompt"], 4)["rows"](0)["t5"].shape[0] == 3


def test_generator_output_is_content_only_distinct_and_on_the_ring(prompt_file, tmp_path):
    """The generator's Delta touches content tokens only (zero at BOS, EOS and padding), its K-1 variants
    are distinct directions, and calibration puts them on the ring for prompts it never saw: on the tiny
    model, 60 training steps and the calibration put every variant of 3 unseen prompts inside [0.80, 0.90]
    (measured: all within 0.825 +- 0.003; one of them needed the widened bracket). A generator is refused
    by a model whose encoders have other widths."""
    gen_file = tmp_path / "gen.safetensors"
    phase1_perturb.main(["config/tiny_cpu.py", f"--prompts={prompt_file}", "--K=4", "--t5_len=16",
                         "--amortize=True", "--gen_rank=4", "--gen_hidden=32", "--gen_batch=3",
                         "--gen_iters=60", f"--perturbations={gen_file}"])
    text = sample.load_text("tiny", t5_len=16)
    unseen = ["a purple giraffe", "three red cubes on a table", "a photo of a cat"]
    gen = sample.load_perturbations(str(gen_file), text, unseen, 4)["generator"]
    tokens = sample.tokenize(text, unseen)
    d = sample.generator_deltas(gen, text, unseen, 4, 0, tokens)
    for name, delta in d.items():
        content = tokens[name][1].repeat_interleave(3, 0)
        assert delta.abs().sum() > 0 and (delta[~content] == 0).all(), name  # content tokens only
        flat = torch.nn.functional.normalize(delta.flatten(1), dim=-1).view(3, 3, -1)  # [prompt, k, S*d]
        cos = flat @ flat.transpose(1, 2)
        off = cos[:, ~torch.eye(3, dtype=torch.bool)]
        assert off.abs().max() < 0.99, name  # no two variants are one direction
    st = phase1_perturb.delta_stats(text, unseen, sample.generator_deltas(gen, text, unseen, 4, 0, tokens,
                                                                          calibrate=(0.825, 8)),
                                    gen.names, 4)
    assert all(((a - 0.85).abs() <= 0.05).all() for a, _ in st.values()), st
    bigger = dict(text, encoders=dict(text["encoders"], t5=tiny.pipeline(0, large=False).text_encoder_3))
    bigger["encoders"]["t5"].shared = torch.nn.Embedding(10, 8)  # another width of T5's token embedding
    bigger["encoders"]["t5"].encoder.embed_tokens = torch.nn.Embedding(10, 8)
    with pytest.raises(SystemExit, match="made for a t5 encoder of width 96"):
        sample.load_perturbations(str(gen_file), bigger, unseen, 4)
