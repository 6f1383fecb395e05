# ============================================================================= rewards
# Tests of rewards.py and the prompt generators under data/. Every model is a tiny random one of the
# real class, built offline; nothing is downloaded.
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rewards
import tiny
from rewards import GENEVAL_COLORS, geneval_rules, geneval_task, relative_position

REPO = os.path.dirname(os.path.abspath(__file__))


def _load_script(rel):
    spec = importlib.util.spec_from_file_location(rel.replace("/", "_").replace(".py", ""),
                                                  os.path.join(REPO, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.rand(3, 3, 40, 48)


PROMPTS = ["a photo of a red cat", "two dogs on a lawn", "a blue bicycle left of a bench"]


@pytest.fixture(scope="module")
def clip_ref():
    """The tiny CLIP the rewards build, built once more independently, and its reference logits."""
    model, proc = tiny.clip()

    def logits(imgs, prompts):  # logit_scale * cos, [images, prompts], through CLIPModel.forward
        inp = proc(text=prompts, images=rewards._to_pil(imgs), return_tensors="pt", padding=True)
        with torch.no_grad():
            return model(**inp).logits_per_image
    return model, proc, logits


# ----------------------------------------------------------------------------- no-weight rewards
def test_jpeg_orders_flat_below_noise():
    torch.manual_seed(0)
    imgs = torch.stack([torch.full((3, 64, 64), 0.5), torch.rand(3, 64, 64)])
    inc = rewards.REWARDS["jpeg_incompressibility"]()(imgs, ["", ""], [{}, {}])
    comp = rewards.REWARDS["jpeg_compressibility"]()(imgs, ["", ""], [{}, {}])
    assert inc.shape == (2,) and inc.dtype == torch.float32 and torch.isfinite(inc).all()
    assert inc[1] > 3 * inc[0] > 0  # noise is far bigger as a JPEG than a flat image
    assert torch.equal(comp, -inc) and comp[0] > comp[1]
    # kB of quality-95 JPEG of the uint8 image, checked against PIL directly
    import io
    buf = io.BytesIO()
    rewards._to_pil(imgs[1:])[0].save(buf, format="JPEG", quality=95)
    assert inc[1].item() == pytest.approx(buf.tell() / 1000)


# ----------------------------------------------------------------------------- CLIP-family rewards
def test_pickscore_is_logit_scale_times_cosine_of_each_pair(images, clip_ref):
    _, _, logits = clip_ref
    ref = logits(images, PROMPTS)
    s = rewards.REWARDS["pickscore"](model="tiny")(images, PROMPTS, [{}] * 3)
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    torch.testing.assert_close(s, ref.diagonal(), rtol=1e-4, atol=1e-4)  # image i with prompt i
    scaled = rewards.REWARDS["pickscore"](model="tiny", scale=1 / 26)(images, PROMPTS, [{}] * 3)
    torch.testing.assert_close(scaled, s / 26)


def test_clipscore_is_cosine_of_each_pair(images, clip_ref):
    model, _, logits = clip_ref
    ref = logits(images, PROMPTS) / model.logit_scale.exp()
    s = rewards.REWARDS["clipscore"](model="tiny")(images, PROMPTS, [{}] * 3)
    assert s.shape == (3,) and torch.isfinite(s).all() and (s.abs() <= 1).all()
    torch.testing.assert_close(s, ref.diagonal(), rtol=1e-4, atol=1e-4)
    flipped = rewards.REWARDS["clipscore"](model="tiny")(images, PROMPTS[::-1], [{}] * 3)
    torch.testing.assert_close(flipped, ref.flip(1).diagonal(), rtol=1e-4, atol=1e-4)


def test_aesthetic_loads_the_head_file_and_scores_normalised_embeddings(images, clip_ref, tmp_path):
    model, proc, _ = clip_ref
    torch.manual_seed(1)
    head = rewards.aesthetic_head(model.config.projection_dim)
    assert ([k for k in head.state_dict() if k.endswith("weight")]
            == [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)])
    path = tmp_path / "head.pth"
    torch.save(head.state_dict(), path)
    s = rewards.REWARDS["aesthetic"](clip="tiny", head=str(path))(images, PROMPTS, [{}] * 3)
    with torch.no_grad():
        emb = model.get_image_features(**proc(images=rewards._to_pil(images),
                                              return_tensors="pt")).pooler_output
        ref = head.eval().layers(F.normalize(emb, dim=-1)).squeeze(-1)
    assert s.shape == (3,) and torch.isfinite(s).all()
    torch.testing.assert_close(s, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit, match=r"improved-aesthetic-predictor.*"
                                         r"--reward_opts=\"\{'aesthetic': \{'head': 'PATH'\}\}\""):
        rewards.REWARDS["aesthetic"](clip="tiny", head=str(tmp_path / "missing.pth"))


# ----------------------------------------------------------------------------- optional packages
@pytest.mark.parametrize("name,module,pip", [("hpsv2", "open_clip", "open_clip_torch"),
                                             ("imagereward", "ImageReward", "image-reward")])
def test_optional_reward_without_its_package_fails_at_build(name, module, pip):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    for opts in ({}, dict(rewards.TINY_OPTS[name])):  # tiny too: the package is what is missing
        with pytest.raises(SystemExit) as e:
            rewards.REWARDS[name](**opts)
        msg = str(e.value)
        assert f"pip install {pip}" in msg and "\n" not in msg
    with pytest.raises(SystemExit, match=f"pip install {pip}"):
        rewards.build_reward({"clipscore": 1.0, name: 1.0}, tiny=True)


def test_hpsv2_scoring_path_on_a_standin(images, clip_ref):
    """_hps_fn on an open_clip-style stand-in (encode_image / encode_text) wrapping the tiny CLIP."""
    model, proc, logits = clip_ref
    standin = types.SimpleNamespace(
        parameters=model.parameters,
        # unnormalised
        encode_image=lambda pix: model.get_image_features(pixel_values=pix).pooler_output * 3.0,
        encode_text=lambda ids: model.get_text_features(input_ids=ids).pooler_output)
    preprocess = lambda pil: proc(images=pil, return_tensors="pt")["pixel_values"][0]  # noqa: E731
    tokenizer = lambda texts: proc.tokenizer(texts, padding="max_length", max_length=77,  # noqa: E731
                                             return_tensors="pt")["input_ids"]
    s = rewards._hps_fn(standin, preprocess, tokenizer, "cpu")(images, PROMPTS, [{}] * 3)
    assert s.shape == (3,) and torch.isfinite(s).all()
    # padding to 77 changes nothing for CLIP (causal mask, pooled at EOS): same cosine as the reference
    torch.testing.assert_close(s, (logits(images, PROMPTS) / model.logit_scale.exp()).diagonal(),
                               rtol=1e-4, atol=1e-4)


def test_hpsv2_tiny_with_open_clip(images):
    pytest.importorskip("open_clip")
    s = rewards.REWARDS["hpsv2"](checkpoint="tiny")(images, PROMPTS, [{}] * 3)
    assert s.shape == (3,) and torch.isfinite(s).all() and (s.abs() <= 1).all()


def test_imagereward_scoring_path_on_a_standin(images):
    """_imagereward_fn on a stand-in with ImageReward's attributes (blip.tokenizer / visual_encoder /
    text_encoder, mlp, mean, std, preprocess): batched = one by one, and (r - mean) / std applied."""
    torch.manual_seed(0)
    tok = tiny.clip_tokenizer()
    emb, patch, mlp = torch.nn.Embedding(len(tok), 8), torch.nn.Conv2d(3, 8, 8, 8), torch.nn.Linear(8, 1)

    def text_encoder(ids, attention_mask, encoder_hidden_states, encoder_attention_mask, return_dict):
        h = emb(ids) * attention_mask[..., None] + encoder_hidden_states.mean(1, keepdim=True)
        return types.SimpleNamespace(last_hidden_state=h.cumsum(1))  # position 0 ("CLS"): first token + image
    blip = types.SimpleNamespace(tokenizer=tok, visual_encoder=lambda x: patch(x).flatten(2).transpose(1, 2),
                                 text_encoder=text_encoder)
    params = list(emb.parameters()) + list(patch.parameters()) + list(mlp.parameters())
    preprocess = lambda pil: torch.from_numpy(  # noqa: E731
        np.array(pil.resize((32, 32)))).permute(2, 0, 1).float() / 255
    standin = types.SimpleNamespace(blip=blip, mlp=mlp, mean=0.0, std=1.0, preprocess=preprocess,
                                    parameters=lambda: iter(params))
    fn = rewards._imagereward_fn(standin, "cpu")
    raw = fn(images, PROMPTS, [{}] * 3)
    assert raw.shape == (3,) and torch.isfinite(raw).all()
    singles = torch.cat([fn(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(raw, singles, rtol=1e-5, atol=1e-5)
    standin.mean, standin.std = 0.5, 2.0
    torch.testing.assert_close(fn(images, PROMPTS), (raw - 0.5) / 2.0)
    assert not torch.allclose(raw, fn(images.flip(0), PROMPTS))  # the image matters


# ----------------------------------------------------------------------------- GenEval rules
def box(x0, y0, x1, y1):
    return (float(x0), float(y0), float(x1), float(y1))


B0 = box(0, 0, 10, 10)


def single(cls="dog"):
    return {"tag": "single_object", "include": [{"class": cls, "count": 1}], "prompt": f"a photo of a {cls}"}


def counting(n, cls="dog"):
    return {"tag": "counting", "include": [{"class": cls, "count": n}],
            "exclude": [{"class": cls, "count": n + 1}]}


def colors(color, cls="dog"):
    return {"tag": "colors", "include": [{"class": cls, "count": 1, "color": color}]}


def position(rel):  # "a photo of a dog <rel> a cat": clause 0 is the cat (target)
    return {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": [rel, 0]}]}


def dogs(n, score=0.95):
    return [(box(20 * i, 0, 20 * i + 10, 10), score, None) for i in range(n)]


# scores: (credit="server", the default: the public reward server's formula; credit="fixed")
@pytest.mark.parametrize("dets,meta,correct,server,fixed", [
    ({"dog": [(B0, 0.8, None)]}, single(), True, 1.0, 1.0),
    ({"dog": [(B0, 0.3, None)]}, single(), False, 0.0, 0.0),  # GenEval counts score > 0.3 only
    ({"cat": [(B0, 0.9, None)]}, single(), False, 0.0, 0.0),
    # benchmark: >= 1; training score wants exactly 1: 1 - 1/1
    ({"dog": dogs(2, 0.8)}, single(), True, 0.0, 0.0),
    ({"dog": dogs(3, 0.8)}, single(), True, -1.0, 0.0),  # 1 - |1 - 3| / 1 = -1; fixed: clipped at 0
    ({"dog": dogs(20, 0.8)}, single(), True, -14.0, 0.0),  # 16 kept: 1 - 15 / 1
    ({"dog": [(B0, 0.8, None)], "cat": [(B0, 0.5, None)]},
     {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]},
     True, 1.0, 1.0),
    ({"dog": [(B0, 0.8, None)]},
     {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]},
     False, 0.5, 0.5),
])
def test_geneval_rules_objects(dets, meta, correct, server, fixed):
    c, s, reason = geneval_rules(dets, meta)
    assert (c, s) == (correct, pytest.approx(server))
    assert (reason == "") == correct
    assert geneval_rules(dets, meta, credit="server") == (c, s, reason)
    # the verdict never changes
    assert geneval_rules(dets, meta, credit="fixed") == (c, pytest.approx(fixed), reason)


@pytest.mark.parametrize("dets,n,correct,server,fixed", [
    (dogs(2), 2, True, 1.0, 1.0),
    (dogs(2) + [(box(90, 0, 99, 9), 0.85, None)], 2, True, 1.0, 1.0),  # below the 0.9 counting threshold
    (dogs(3), 2, False, 0.5, 0.5),  # the exclude clause (3 or more) fails; count term 1 - 1/2
    (dogs(1), 2, False, 0.5, 0.5),
    (dogs(5), 2, False, -0.5, 0.0),  # 1 - 3/2 = -0.5; fixed: clipped at 0
    (dogs(20), 4, False, -2.0, 0.0),  # at most 16 objects a class are kept: 1 - 12/4 = -2
    (dogs(4), 4, True, 1.0, 1.0),
])
def test_geneval_rules_counting_with_exclude(dets, n, correct, server, fixed):
    c, s, reason = geneval_rules({"dog": dets}, counting(n))
    assert (c, s) == (correct, pytest.approx(server))
    assert geneval_rules({"dog": dets}, counting(n), credit="fixed")[:2] == (correct, pytest.approx(fixed))
    if dets == dogs(3):
        assert "fewer than 3" in reason


def test_geneval_rules_caps_objects_per_class():
    # 20 confident dogs, "four dogs": exclude counts only the 16 kept, still >= 5, so it fails
    assert geneval_rules({"dog": dogs(20)}, counting(4))[0] is False
    # and 17+ dogs never count as more than 16 for the include clause either
    meta = {"tag": "counting", "include": [{"class": "dog", "count": 16}]}
    assert geneval_rules({"dog": dogs(20)}, meta)[:2] == (True, pytest.approx(1.0))  # uncapped: 1 - 4/16


@pytest.mark.parametrize("dets,meta,correct,score", [
    ({"dog": [(B0, 0.9, "red")]}, colors("red"), True, 1.0),
    ({"dog": [(B0, 0.9, "blue")]}, colors("red"), False, 0.5),  # count term 1, colour term 0
    ({"dog": [(B0, 0.9, None)]}, colors("red"), False, 0.5),  # unclassified never matches
    # the benchmark judges the most confident dog, whatever the input order
    ({"dog": [(B0, 0.5, "red"), (B0, 0.9, "blue")]}, colors("red"), False, 0.0),
    ({"dog": [(B0, 0.5, "blue"), (B0, 0.9, "red")]}, colors("red"), True, 0.0),
    ({"dog": [(B0, 0.9, "red")], "cat": [(B0, 0.9, "blue")]},
     {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"},
                                       {"class": "cat", "count": 1, "color": "blue"}]}, True, 1.0),
    ({"dog": [(B0, 0.9, "blue")], "cat": [(B0, 0.9, "red")]},  # colours swapped
     {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"},
                                       {"class": "cat", "count": 1, "color": "blue"}]}, False, 0.5),
])
def test_geneval_rules_colors(dets, meta, correct, score):
    c, s, reason = geneval_rules(dets, meta)
    assert (c, s) == (correct, pytest.approx(score))
    assert geneval_rules(dets, meta, credit="fixed")[1] == pytest.approx(score)  # one colour clause: no quirk
    if not correct and meta["tag"] == "colors":
        assert "red dog" in reason


CAT = box(40, 40, 60, 60)


@pytest.mark.parametrize("dog,rel", [
    (box(0, 40, 20, 60), "left of"), (box(80, 40, 100, 60), "right of"),
    (box(40, 0, 60, 20), "above"), (box(40, 80, 60, 100), "below")])
def test_geneval_rules_position(dog, rel):
    assert relative_position(dog, CAT) == {rel}
    dets = {"cat": [(CAT, 0.9, None)], "dog": [(dog, 0.9, None)]}
    for other in rewards.GENEVAL_POSITIONS:
        c, s, reason = geneval_rules(dets, position(other))
        fixed = geneval_rules(dets, position(other), credit="fixed")[1]
        if other == rel:
            assert (c, s, reason) == (True, pytest.approx(1.0), "") and fixed == pytest.approx(1.0)
        else:
            # the server's loop appends 0, breaks, then appends 1: (1 + 1 + 0 + 1) / 4;
            # fixed: (1 + 1 + 0) / 3
            assert (c, s) == (False, pytest.approx(0.75)) and f"dog {other}" in reason
            assert fixed == pytest.approx(2 / 3)


def test_geneval_position_margins_and_diagonals():
    assert relative_position(box(0, 0, 10, 10), box(0, 0, 10, 10)) == set()  # same place: no relation
    # offset 3 < margin 0.1 * (20 + 20)
    assert relative_position(box(0, 40, 20, 60), box(3, 40, 23, 60)) == set()
    # past the margin, what remains must exceed half the offset: 7 - 4 < 3.5, 9 - 4 > 4.5
    assert relative_position(box(0, 40, 20, 60), box(7, 40, 27, 60)) == set()
    assert relative_position(box(0, 40, 20, 60), box(9, 40, 29, 60)) == {"left of"}
    assert relative_position(box(0, 0, 10, 10), box(100, 100, 110, 110)) == {"left of", "above"}  # 45 degrees
    assert relative_position(box(0, 0, 10, 10), box(100, 30, 110, 40)) == {"left of"}  # mostly sideways
    # the relation to the target clause needs the target found
    c, s, reason = geneval_rules({"dog": [(B0, 0.9, None)]}, position("left of"))
    # terms: cat 0, dog 1, position 0
    assert (c, s) == (False, pytest.approx(1 / 3)) and "no target" in reason
    assert (geneval_rules({"dog": [(B0, 0.9, None)]}, position("left of"), credit="fixed")[1]
            == pytest.approx(1 / 3))


def test_geneval_rules_exclude_without_include_clause_of_that_class():
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}],
            "exclude": [{"class": "cat", "count": 1}]}
    assert geneval_rules({"dog": [(B0, 0.9, None)]}, meta)[0] is True
    c, s, reason = geneval_rules({"dog": [(B0, 0.9, None)], "cat": [(B0, 0.4, None)]}, meta)
    assert c is False and s == pytest.approx(1.0) and "cat" in reason  # partial credit ignores exclude


CAT_DOG = {"cat": [(CAT, 0.9, None)]}
LEFT, RIGHT = box(0, 40, 20, 60), box(80, 40, 100, 60)  # of CAT


# a clause asking a colour and a position (GenEval's prompts never do; a shapes world may)
def dog_red_left():
    return {"tag": "position",
            "include": [{"class": "cat", "count": 1},
                        {"class": "dog", "count": 1, "color": "red", "position": ["left of", 0]}]}


@pytest.mark.parametrize("dets,meta,server,fixed", [
    # count off with a position clause: one 0 in both; 2 dogs: terms cat 1, dog 1 - 1/1 = 0, then 0
    ({**CAT_DOG, "dog": [(LEFT, 0.9, None), (RIGHT, 0.9, None)]}, position("left of"), 1 / 3, 1 / 3),
    # 3 dogs: the count term is 1 - 2 = -1 on the server: (1 - 1 + 0) / 3 = 0; fixed (1 + 0 + 0) / 3
    ({**CAT_DOG, "dog": [(LEFT, 0.9, None)] * 3}, position("left of"), 0.0, 1 / 3),
    # colour and position asked, count off: the server adds one 0 for both (1 + 0 + 0) / 3; fixed a 0 each
    ({**CAT_DOG, "dog": [(LEFT, 0.9, "red")] * 2}, dog_red_left(), 1 / 3, 1 / 4),
    # colour wrong: the server skips the position check (1 + 1 + 0) / 3; fixed scores it 0:
    # (1 + 1 + 0 + 0) / 4
    ({**CAT_DOG, "dog": [(LEFT, 0.9, "blue")]}, dog_red_left(), 2 / 3, 1 / 2),
    # colour right, position wrong: server (1 + 1 + 1 + 0 + 1) / 5; fixed (1 + 1 + 1 + 0) / 4
    ({**CAT_DOG, "dog": [(RIGHT, 0.9, "red")]}, dog_red_left(), 4 / 5, 3 / 4),
    ({**CAT_DOG, "dog": [(LEFT, 0.9, "red")]}, dog_red_left(), 1.0, 1.0),
    # no cat: its count term 0; the dog's count 1, colour 1, position 0 (no target): 2/4 in both
    ({"dog": [(LEFT, 0.9, "red")]}, dog_red_left(), 1 / 2, 1 / 2),
    ({"dog": [(LEFT, 0.9, None)]}, {"tag": "single_object", "include": []}, 0.0, 0.0),  # no clause: 0
])
def test_geneval_credit_server_formula_and_fixed_hand_cases(dets, meta, server, fixed):
    """The public reward server's partial credit (yifan123/reward-server, reward_server/gen_eval.py,
    evaluate_reward), worked by hand from its code, against the fixed variant."""
    assert geneval_rules(dets, meta)[1] == pytest.approx(server)
    assert geneval_rules(dets, meta, credit="fixed")[1] == pytest.approx(fixed)


def test_geneval_credit_is_checked():
    with pytest.raises(ValueError, match="unknown GenEval credit 'clipped'"):
        geneval_rules({}, single(), credit="clipped")
    with pytest.raises(SystemExit, match=r"unknown geneval credit 'clipped'.*--reward_opts=") as e:
        # before loading
        rewards.REWARDS["geneval"](detector="/never/loaded", clip="/never/loaded", credit="clipped")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- GenEval models
def test_instances_box_label_and_score_from_mask2former_outputs():
    """The post-processing on hand-made outputs: one confident query, mask on low-res rows 2-3, cols 4-5."""
    cls = torch.full((1, 2, 4), -10.0)
    cls[0, 0, 1] = 10.0  # query 0: class 1
    masks = torch.full((1, 2, 8, 8), -10.0)
    masks[0, 0, 2:4, 4:6] = 10.0
    out = types.SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks)
    dets = rewards._instances(out, torch.ones(1, 32, 32, dtype=torch.long), [(32, 32)])[0]
    assert len(dets) == 1 and dets[0]["label"] == 1
    # bilinear x4 upsampling: low-res cell edges, x1/y1 exclusive
    assert dets[0]["box"] == (16.0, 8.0, 24.0, 16.0)
    p = torch.softmax(cls[0, 0], -1)[1]
    assert 0.9 * p < dets[0]["score"] <= p  # class prob * mean mask prob inside the mask
    assert dets[0]["mask"].sum() == 64 - 4  # bilinear upsampling cuts the four corner pixels
    # padding: a 32x32 input padded to 32x48 must give the same box once cropped to the valid area
    pm = torch.zeros(1, 32, 48, dtype=torch.long)
    pm[:, :, :32] = 1
    masks_pad = torch.full((1, 2, 8, 12), -10.0)
    masks_pad[0, 0, 2:4, 4:6] = 10.0
    out = types.SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks_pad)
    assert rewards._instances(out, pm, [(64, 64)])[0][0]["box"] == (32.0, 16.0, 48.0, 32.0)  # and rescaled x2


@pytest.fixture(scope="module")
def geneval_dogs():
    """The tiny GenEval reward with its detector's class head forced to say "dog" for every query."""
    fn = rewards.REWARDS["geneval"](detector="tiny", clip="tiny")
    head = fn.detector[0].class_predictor
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[rewards.GENEVAL_CLASSES.index("dog")] = 12.0
    return fn


def test_geneval_tiny_detect_and_evaluate_follow_the_rules(geneval_dogs):
    torch.manual_seed(0)
    imgs = torch.rand(2, 3, 48, 40)
    dets = geneval_dogs.detect(imgs)
    assert len(dets) == 2 and all(len(d) > 0 for d in dets)
    for d in dets:
        assert all(x["class"] == "dog" and 0.3 < x["score"] <= 1 for x in d)
        assert [x["score"] for x in d] == sorted((x["score"] for x in d), reverse=True)
        assert all(0 <= x["box"][0] < x["box"][2] <= 40 and 0 <= x["box"][1] < x["box"][3] <= 48 for x in d)
    assert geneval_dogs.detect(imgs, class_names=["cat"]) == [[], []]
    metas = [single("dog"), single("cat"), counting(2), position("left of"),
             {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}]
    for meta in metas:
        res = geneval_dogs.evaluate(imgs, [meta, meta])
        for r, d in zip(res, dets):
            c, s, reason = geneval_rules({"dog": [(x["box"], x["score"], None) for x in d]}, meta)
            assert r == {"tag": meta["tag"], "correct": c, "score": s, "reason": reason}
    assert ([r["correct"] for r in geneval_dogs.evaluate(imgs, [single("dog"), single("cat")])]
            == [True, False])


def test_masked_crop_keeps_the_object_over_grey():
    from PIL import Image
    pil = Image.new("RGB", (8, 6), (255, 0, 0))
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:5] = True
    mask[1, 2] = False  # a hole in the mask shows the background
    c = np.array(rewards.masked_crop(pil, (2.0, 1.0, 6.0, 5.0), mask))
    assert c.shape == (4, 4, 3)
    assert (c[0, 1] == [255, 0, 0]).all() and (c[0, 0] == [0x99] * 3).all() and (c[:, 3] == 0x99).all()


def test_geneval_colour_classifier_averages_three_templates(geneval_dogs, clip_ref):
    model, proc, _ = clip_ref
    torch.manual_seed(3)
    crops = rewards._to_pil(torch.rand(4, 3, 20, 16))
    got = geneval_dogs.classify_colors(crops, ["dog", "dog", "cup", "cup"])
    with torch.no_grad():
        img = F.normalize(model.get_image_features(**proc(images=crops, return_tensors="pt")).pooler_output,
                          dim=-1)
        for e, cls, color in zip(img, ["dog", "dog", "cup", "cup"], got):
            texts = [t.format(color=c, cls=cls) for c in GENEVAL_COLORS for t in rewards.COLOR_TEMPLATES]
            assert "a photo of a red dog" in texts or cls == "cup"
            tok = proc.tokenizer(texts, padding=True, return_tensors="pt")
            txt = F.normalize(model.get_text_features(**tok).pooler_output, dim=-1).view(10, 3, -1).mean(1)
            assert color == GENEVAL_COLORS[int((F.normalize(txt, dim=-1) @ e).argmax())]
    assert geneval_dogs.classify_colors([], []) == []


def test_geneval_tiny_colour_path_names_exactly_one_colour(geneval_dogs):
    torch.manual_seed(1)
    img = torch.rand(1, 3, 48, 40).expand(len(GENEVAL_COLORS), -1, -1, -1)
    res = geneval_dogs.evaluate(img, [colors(c) for c in GENEVAL_COLORS])  # same image, each colour asked
    assert sum(r["correct"] for r in res) == 1  # the top dog's crop gets one colour out of ten


def test_geneval_reward_values_and_strict_mode(geneval_dogs):
    torch.manual_seed(2)
    imgs = torch.rand(3, 3, 48, 40)
    metas = [single("dog"), single("cat"), colors("red")]
    s = geneval_dogs(imgs, ["a", "b", "c"], metas)
    res = geneval_dogs.evaluate(imgs, metas)
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    # server credit: may be < 0
    assert s.tolist() == pytest.approx([r["score"] for r in res]) and (s <= 1).all()
    strict = rewards.geneval(detector="tiny", clip="tiny", strict=True)
    strict.detector[0].load_state_dict(geneval_dogs.detector[0].state_dict())
    assert strict(imgs, ["a", "b", "c"], metas).tolist() == [float(r["correct"]) for r in res]
    with pytest.raises(SystemExit, match="GenEval metadata"):
        geneval_dogs(imgs, ["a", "b", "c"], [{}, {}, {}])


def test_geneval_reward_credit_option_reaches_the_rules(geneval_dogs):
    """credit= through build_reward's opts (what --reward_opts carries) changes the reward, as the rules
    say."""
    fixed = rewards.build_reward({"geneval": 1.0}, tiny=True, opts={"geneval": {"credit": "fixed"}})
    fixed.fns["geneval"].detector[0].load_state_dict(geneval_dogs.detector[0].state_dict())
    torch.manual_seed(0)
    imgs = torch.rand(2, 3, 48, 40)
    dets = [{"dog": [(x["box"], x["score"], None) for x in d]} for d in geneval_dogs.detect(imgs)]
    assert all(len(d["dog"]) >= 3 for d in dets)  # the forced head finds many dogs: the server goes below 0
    meta = [single("dog")] * 2
    server = geneval_dogs(imgs, ["a photo of a dog"] * 2, meta)
    assert server.tolist() == pytest.approx([geneval_rules(d, m)[1] for d, m in zip(dets, meta)])
    assert server.tolist() == pytest.approx([2.0 - len(d["dog"]) for d in dets])  # 1 - |1 - k| / 1
    total, per = fixed(imgs, ["a photo of a dog"] * 2, meta)
    assert per["geneval"].tolist() == [0.0, 0.0] and total.tolist() == [0.0, 0.0]  # clipped at 0


# ----------------------------------------------------------------------------- registry and errors
def test_build_reward_total_is_the_weighted_sum(images):
    reward = rewards.build_reward({"jpeg_incompressibility": 0.5, "clipscore": 2.0, "aesthetic": -1.0},
                                  tiny=True)
    total, per = reward(images, PROMPTS, [{}] * 3)
    assert set(per) == {"jpeg_incompressibility", "clipscore", "aesthetic"}
    assert total.shape == (3,) and all(v.shape == (3,) for v in per.values())
    torch.testing.assert_close(total, 0.5 * per["jpeg_incompressibility"] + 2.0 * per["clipscore"]
                               - per["aesthetic"])
    torch.testing.assert_close(per["clipscore"], rewards.REWARDS["clipscore"](model="tiny")(images, PROMPTS))
    # a name, or "name:weight,..." as a command line carries it
    total1, per1 = rewards.build_reward("jpeg_compressibility")(images, PROMPTS, [{}] * 3)
    torch.testing.assert_close(total1, per1["jpeg_compressibility"])
    r2 = rewards.build_reward("jpeg_compressibility:2,jpeg_incompressibility:0.5")
    assert r2.weights == {"jpeg_compressibility": 2.0, "jpeg_incompressibility": 0.5}
    t2, p2 = r2(images, PROMPTS)
    torch.testing.assert_close(t2, 2 * p2["jpeg_compressibility"] + 0.5 * p2["jpeg_incompressibility"])


def test_build_reward_tiny_builds_the_geneval_scorer():
    reward = rewards.build_reward({"geneval": 1.0, "pickscore": 0.1}, tiny=True)
    assert callable(reward.fns["geneval"].evaluate) and callable(reward.fns["geneval"].detect)
    torch.manual_seed(0)
    total, per = reward(torch.rand(2, 3, 32, 32), ["a photo of a dog"] * 2, [single("dog")] * 2)
    assert total.shape == (2,) and torch.isfinite(total).all()
    torch.testing.assert_close(total, per["geneval"] + 0.1 * per["pickscore"])


@pytest.mark.parametrize("spec,match", [
    ({"pickscor": 1.0}, r"unknown reward 'pickscor': the known rewards are jpeg_compressibility, .*geneval"),
    ("clipscore,nope", r"unknown reward 'nope'"),
    ({}, r"no reward given"),
    ({"clipscore": "high"}, r"weight of reward 'clipscore' must be a number"),
    ("clipscore:x", r"is not a number"),
])
def test_build_reward_rejects_bad_specs_before_loading(spec, match):
    with pytest.raises(SystemExit, match=match) as e:
        rewards.build_reward(spec)
    assert "\n" not in str(e.value)


def test_rewards_load_from_local_folders(images, tmp_path):
    """The non-tiny loading code (from_pretrained of a folder), on the tiny models saved to disk."""
    model, proc = tiny.clip()
    model.save_pretrained(tmp_path / "clip")
    proc.save_pretrained(tmp_path / "clip")
    clip_dir = str(tmp_path / "clip")
    s = rewards.REWARDS["pickscore"](model=clip_dir, processor=clip_dir)(images, PROMPTS)
    torch.testing.assert_close(s, rewards.REWARDS["pickscore"](model="tiny")(images, PROMPTS))
    det, det_proc = tiny.mask2former()
    det.save_pretrained(tmp_path / "det")
    det_proc.save_pretrained(tmp_path / "det")
    fn = rewards.REWARDS["geneval"](detector=str(tmp_path / "det"), clip=clip_dir, detector_size=64)
    loaded, loaded_proc = fn.detector
    # mmdet's test scale
    assert loaded_proc.size["shortest_edge"] == 64 and loaded_proc.size["longest_edge"] == 1333
    for k, v in det.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    res = fn.evaluate(images[:1], [single("dog")])
    assert res == [{"tag": "single_object", "correct": False, "score": 0.0,
                    "reason": "expected 1 dog, found 0"}]


@pytest.mark.parametrize("name,opts", [
    ("pickscore", dict(model="/nonexistent/PickScore_v1")),
    ("clipscore", dict(model="/nonexistent/clip")),
    ("geneval", dict(detector="/nonexistent/mask2former", clip="tiny")),
])
def test_missing_weights_say_what_to_download(name, opts):
    with pytest.raises(SystemExit, match=r"could not load the .* from the local folder "
                                         r"'/nonexistent/.*save_pretrained.*hf download") as e:
        rewards.REWARDS[name](**opts)
    assert "\n" not in str(e.value)


def _cli_arg(msg, key):
    """The --key=... example in an error message, as a shell hands it to the script (quotes removed)."""
    m = re.search(rf'--{key}=("[^"]*"|\S+)', msg)
    assert m, f"no --{key}= example in: {msg}"
    return f"--{key}={m.group(1).strip(chr(34))}"


def test_a_zero_weight_logs_a_reward_and_all_zero_is_refused():
    """A reward at weight 0 beside a trained one is scored and logged without being trained on (the shapes
    credit beside a dense reward shows whether the images still follow the text); all weights 0 would tie
    every group, and is refused."""
    assert rewards.parse_spec({"jpeg_incompressibility": 1.0, "shapes": 0}) == {
        "jpeg_incompressibility": 1.0, "shapes": 0.0}
    reward = rewards.build_reward({"jpeg_incompressibility": 1.0, "jpeg_compressibility": 0.0})
    total, per = reward(torch.rand(2, 3, 32, 32), ["a", "b"])
    assert torch.equal(total, per["jpeg_incompressibility"]) and set(per) == {"jpeg_incompressibility",
                                                                           "jpeg_compressibility"}
    with pytest.raises(SystemExit, match="every reward weight is 0"):
        rewards.parse_spec({"jpeg_incompressibility": 0, "shapes": 0.0})
    with pytest.raises(SystemExit, match="must be finite, got inf"):
        rewards.parse_spec({"jpeg_incompressibility": float("inf")})


def test_error_hints_are_what_the_command_line_accepts(tmp_path):
    """Every --reward / --reward_opts example in an error passes phase2_align.py's configurator (a dict
    key takes a Python literal, not "name:weight") and then does what the message says."""
    from configurator import configure

    def parse(arg):  # phase2_align.py's two keys, with its defaults
        return configure({"reward": {"geneval": 1.0}, "reward_opts": {}}, ["reward", "reward_opts"], [arg])
    for spec in ("clipscore:x", {}, {"clipscore": "high"}):
        with pytest.raises(SystemExit) as e:
            rewards.parse_spec(spec)
        assert rewards.parse_spec(parse(_cli_arg(str(e.value), "reward"))["reward"]) == {"pickscore": 1.0,
                                                                                        "clipscore": 0.5}
    with pytest.raises(SystemExit) as e:
        rewards.REWARDS["geneval"](credit="clipped")
    opts = parse(_cli_arg(str(e.value), "reward_opts"))["reward_opts"]
    assert opts == {"geneval": {"credit": "fixed"}}
    assert rewards.build_reward({"geneval": 1.0}, tiny=True, opts=opts).fns["geneval"] is not None
    with pytest.raises(SystemExit) as e:
        rewards.REWARDS["aesthetic"](clip="tiny", head=str(tmp_path / "missing.pth"))
    assert parse(_cli_arg(str(e.value), "reward_opts"))["reward_opts"] == {"aesthetic": {"head": "PATH"}}
    for reward, key in (("hpsv2", "checkpoint"), ("imagereward", "model"), ("geneval", "detector")):
        assert (parse(rewards.opts_hint(reward, key, "x/y").replace('"', ""))["reward_opts"]
                == {reward: {key: "x/y"}})


class _NotCached:
    """A from_pretrained that records its keyword arguments and finds nothing."""
    calls = []

    @classmethod
    def from_pretrained(cls, name, **kw):
        cls.calls.append(kw)
        raise OSError(f"{name} not found")


def test_hub_ids_load_from_the_cache_first_and_fail_fast_when_the_hub_is_unreachable(monkeypatch):
    """_from_pretrained: the local cache first (no network); when that misses, the hub only if it answers
    one short probe; else one sentence at once, never the hub client's ~50 s of retries."""
    calls = _NotCached.calls
    calls.clear()
    monkeypatch.setattr(rewards, "hub_unreachable",
                        lambda timeout=5.0: "https://hub cannot be reached (ConnectError)")
    with pytest.raises(SystemExit, match=r"could not load the CLIP model 'org/clip': it is not in the local "
                                         r"Hugging Face cache and https://hub cannot be reached "
                                         r".*hf download org/clip") as e:
        rewards._from_pretrained(_NotCached, "org/clip", "CLIP model", dtype=torch.float32)
    assert "\n" not in str(e.value)
    # the cache only: no download attempted
    assert calls == [{"local_files_only": True, "dtype": torch.float32}]
    calls.clear()
    monkeypatch.setattr(rewards, "hub_unreachable", lambda timeout=5.0: "")  # the hub answers: download
    with pytest.raises(SystemExit, match=r"could not load the CLIP model 'org/clip' "
                                         r"\(OSError: org/clip not found\)"):
        rewards._from_pretrained(_NotCached, "org/clip", "CLIP model")
    assert calls == [{"local_files_only": True}, {}]

    class Cached:
        @classmethod
        def from_pretrained(cls, name, **kw):
            assert kw == {"local_files_only": True}
            return "loaded"

    def no_probe(timeout=5.0):
        raise AssertionError("a cached model must not touch the network")
    monkeypatch.setattr(rewards, "hub_unreachable", no_probe)
    assert rewards._from_pretrained(Cached, "org/clip", "CLIP model") == "loaded"


def test_hub_probe_reports_an_unreachable_endpoint_and_offline_mode(monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setattr(rewards, "_HUB_PROBED", {})
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert rewards.hub_unreachable() == "HF_HUB_OFFLINE is set"
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing answers HTTP there
    why = rewards.hub_unreachable(timeout=2.0)
    assert why.startswith("http://127.0.0.1:9 ")  # refused at once, or no answer within the timeout
    assert rewards._HUB_PROBED == {"http://127.0.0.1:9": why}  # probed once per process


def test_offline_model_id_fails_within_seconds_end_to_end(tmp_path):
    """The real path in a fresh process: HF_HUB_OFFLINE unset, an empty cache, a hub endpoint nobody
    answers. Before the probe this took ~50 s of retries; the 40 s limit only guards CI from hanging."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE" and "proxy" not in k.lower()}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    code = "import rewards; rewards.REWARDS['clipscore'](model='e2po-test/not-a-cached-model')"
    try:
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=40)
    except subprocess.TimeoutExpired:
        pytest.fail("loading an uncached model with no reachable hub did not stop within 40 s")
    assert res.returncode == 1, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]  # SystemExit's message, one line
    assert re.fullmatch(r"could not load the CLIP model 'e2po-test/not-a-cached-model': "
                        r"it is not in the local Hugging Face cache and "
                        r"http://127\.0\.0\.1:9 (cannot be reached \(\w+\)|did not answer within 5 s); "
                        r"download it on a machine with internet "
                        r"\(hf download e2po-test/not-a-cached-model\) "
                        r"and copy the cache \(~/\.cache/huggingface\), or pass a local folder", last), last


# ----------------------------------------------------------------------------- prompt sets
@pytest.fixture(scope="module")
def geneval_prepare():
    return _load_script("data/geneval/prepare.py")


# djghosh13/geneval's file
BENCHMARK_SHA256 = "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"


def test_geneval_benchmark_file_is_the_official_one():
    """data/geneval/evaluation_metadata.jsonl: GenEval's 553 prompts, byte for byte (sha256 pinned twice:
    here and in rewards.py), one JSON object a line, every clause in GenEval's vocabulary."""
    path = os.path.join(REPO, "data", "geneval", "evaluation_metadata.jsonl")
    assert rewards.GENEVAL_BENCHMARK == path and rewards.GENEVAL_BENCHMARK_SHA256 == BENCHMARK_SHA256
    with open(path, "rb") as f:
        raw = f.read()
    assert hashlib.sha256(raw).hexdigest() == BENCHMARK_SHA256 and len(raw) == 85209
    lines = raw.decode("utf-8").split("\n")
    assert len(lines) == 554 and lines[-1] == ""  # 553 lines, each ending in a newline
    rows = [json.loads(ln) for ln in lines[:-1]]
    assert rows == rewards.geneval_benchmark()
    assert Counter(m["tag"] for m in rows) == {"single_object": 80, "two_object": 99, "counting": 80,
                                               "colors": 94, "position": 100, "color_attr": 100}
    assert len({geneval_task(m) for m in rows}) == 553  # no task twice
    for m in rows:
        for req in m["include"] + m.get("exclude", []):
            assert req["class"] in rewards.GENEVAL_CLASSES and req.get("color", "red") in GENEVAL_COLORS
            assert req.get("position", ["above"])[0] in rewards.GENEVAL_POSITIONS
    assert [m["prompt"] for m in rows if m["tag"] == "counting" and m["include"][0]["class"] == "sheep"] == [
        "a photo of two sheeps"]  # GenEval's generator appends s: why tasks, not texts, are compared


def test_geneval_benchmark_sha256_is_checked(tmp_path, geneval_prepare):
    with open(rewards.GENEVAL_BENCHMARK, "rb") as f:
        raw = f.read()
    edited = tmp_path / "evaluation_metadata.jsonl"
    edited.write_bytes(raw.replace(b"two sheeps", b"two sheep"))  # one letter less
    with pytest.raises(SystemExit, match=r"is not GenEval's official prompt file "
                                         r"\(sha256 [0-9a-f]{16}\.\.\., expected "
                                         r"5c48e0813e812e3c.*git checkout") as e:
        rewards.geneval_benchmark(str(edited))
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="is missing: restore it"):
        rewards.geneval_benchmark(str(tmp_path / "gone.jsonl"))
    # prepare.py reads it through the check: an edited benchmark file stops it before anything is written
    prep = _load_script("data/geneval/prepare.py")
    prep.geneval_benchmark = lambda: rewards.geneval_benchmark(str(edited))
    with pytest.raises(SystemExit, match="not GenEval's official prompt file"):
        prep.main([f"--out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def default_geneval_splits(geneval_prepare, tmp_path_factory):
    """What the README's `python data/geneval/prepare.py` writes (no flag), into a temporary folder."""
    out = tmp_path_factory.mktemp("geneval")
    geneval_prepare.main([f"--out_dir={out}"])
    read = lambda name: [json.loads(ln) for ln in (out / name).read_text().splitlines()]  # noqa: E731
    return read("train_metadata.jsonl"), read("test_metadata.jsonl")


def test_default_prepare_shares_no_task_with_the_benchmark(default_geneval_splits):
    train, test = default_geneval_splits
    bench = {geneval_task(m) for m in rewards.geneval_benchmark()}
    assert [m["prompt"] for m in train + test if geneval_task(m) in bench] == []
    tr, te = [geneval_task(m) for m in train], [geneval_task(m) for m in test]
    assert len(set(tr)) == len(tr) and len(set(te)) == len(te) and not set(tr) & set(te)
    # GenEval's "two sheeps" is our "two sheep": that task is kept out, sheep's other counts are not
    sheep = {m["prompt"] for m in train + test
             if m["tag"] == "counting" and m["include"][0]["class"] == "sheep"}
    assert sheep == {"a photo of three sheep", "a photo of four sheep"}
    # all 80 single-object tasks are benchmark prompts; counting keeps the 160 of 240 outside it
    assert Counter(m["tag"] for m in train) == {"two_object": 1000, "counting": 140, "colors": 596,
                                                "position": 1000, "color_attr": 1000}
    assert Counter(m["tag"] for m in test) == {"two_object": 100, "counting": 20, "colors": 100,
                                               "position": 100, "color_attr": 100}


def test_a_benchmark_leak_is_caught_by_task_not_text(geneval_prepare, tmp_path, monkeypatch):
    bench = rewards.geneval_benchmark()
    two_sheep = {"tag": "counting", "include": [{"class": "sheep", "count": 2}],
                 "exclude": [{"class": "sheep", "count": 3}], "prompt": "a photo of two sheep"}  # our plural
    pair = next(m for m in bench if m["tag"] == "two_object")
    (a, b) = (c["class"] for c in pair["include"])
    # the same two objects, named the other way
    swapped = {"tag": "two_object", "include": pair["include"][::-1],
               "prompt": f"a photo of {geneval_prepare.article(b)} and {geneval_prepare.article(a)}"}
    three_sheep = dict(two_sheep, include=[{"class": "sheep", "count": 3}],
                       exclude=[{"class": "sheep", "count": 4}], prompt="a photo of three sheep")
    # texts differ... tasks not
    assert not {two_sheep["prompt"], swapped["prompt"]} & {m["prompt"] for m in bench}
    assert geneval_prepare.shared_tasks([two_sheep, three_sheep, swapped], bench) == [two_sheep, swapped]
    # main() checks what it is about to write: a generator that leaks is stopped, and nothing is written
    monkeypatch.setattr(geneval_prepare, "make_splits", lambda *args, **kw: ([three_sheep, two_sheep], []))
    with pytest.raises(SystemExit, match=r"refusing to write: 1 generated prompts share a task "
                                         r".*'a photo of two sheep'"):
        geneval_prepare.main([f"--out_dir={tmp_path}"])
    assert os.listdir(tmp_path) == []


def test_geneval_prompts_deterministic_disjoint_and_valid(geneval_prepare):
    train, test = geneval_prepare.make_splits(seed=3, n_train=30, n_test=10)
    assert (train, test) == geneval_prepare.make_splits(seed=3, n_train=30, n_test=10)
    assert test != geneval_prepare.make_splits(seed=4, n_train=30, n_test=10)[1]
    tr, te = [geneval_task(m) for m in train], [geneval_task(m) for m in test]
    # disjoint by task
    assert len(set(tr)) == len(train) and len(set(te)) == len(test) and not set(tr) & set(te)
    # the default keeps it out
    assert not geneval_prepare.shared_tasks(train + test, rewards.geneval_benchmark())
    for tag in rewards.GENEVAL_TAGS:
        # every single-object task is a benchmark prompt
        want = (0, 0) if tag == "single_object" else (10, 30)
        assert (sum(m["tag"] == tag for m in test), sum(m["tag"] == tag for m in train)) == want
    for m in train + test:
        json.dumps(m)
        for req in m["include"]:
            assert req["class"] in rewards.GENEVAL_CLASSES and req["count"] >= 1
            assert (req.get("color", "red") in GENEVAL_COLORS
                    and not ("color" in req and req["class"] == "person"))
            if "position" in req:
                assert req["position"][0] in rewards.GENEVAL_POSITIONS and req["position"][1] == 0
        if m["tag"] == "counting":
            assert m["exclude"] == [{"class": m["include"][0]["class"],
                                     "count": m["include"][0]["count"] + 1}]
            assert 2 <= m["include"][0]["count"] <= 4
        # a perfect detection of the prompt passes its own rules
        dets = {}
        for i, req in enumerate(m["include"]):
            y = (100.0 * i if "position" not in req
                 else {"above": -100.0, "below": 100.0}.get(req["position"][0], 0.0))
            x = {"left of": -100.0, "right of": 100.0}.get(req.get("position", [""])[0], 0.0)
            dets.setdefault(req["class"], [])
            dets[req["class"]] += [(box(x + 30 * k, y, x + 30 * k + 10, y + 10), 0.95, req.get("color"))
                                   for k in range(req["count"])]
        if len(dets) == len(m["include"]):  # two clauses of one class cannot be told apart: skip those
            assert geneval_rules(dets, m)[:2] == (True, pytest.approx(1.0)), m


def test_geneval_prompt_pools_and_exclude(geneval_prepare):
    # nothing kept out
    train, test = geneval_prepare.make_splits(seed=0, n_train=10_000, n_test=5, exclude=())
    singles = [m for m in train + test if m["tag"] == "single_object"]
    assert len(singles) == 80  # every object once, across the two splits
    # the whole pool: 80 objects x (2, 3, 4)
    assert sum(m["tag"] == "counting" for m in train + test) == 80 * 3
    # excluded by task: neither the excluded tasks nor their reorderings are drawn; strings by text
    excluded = [m for m in test if m["tag"] in ("two_object", "color_attr", "counting")]
    reordered = [dict(m, include=m["include"][::-1]) for m in excluded if m["tag"] != "counting"]
    train2, test2 = geneval_prepare.make_splits(seed=0, n_train=50, n_test=5,
                                                exclude=excluded + ["a photo of a bus"])
    assert not geneval_prepare.shared_tasks(train2 + test2, excluded + reordered)
    assert "a photo of a bus" not in {m["prompt"] for m in train2 + test2}


def test_bundled_tiny_prompt_files_match_their_generator(geneval_prepare, tmp_path):
    geneval_prepare.main(["--n_train=4", "--n_test=2", f"--out_dir={tmp_path}",
                          "--train_file=tiny_train.jsonl", "--test_file=tiny_test.jsonl"])
    for name in ("tiny_train.jsonl", "tiny_test.jsonl"):
        with open(os.path.join(REPO, "data/geneval", name)) as f, open(tmp_path / name) as g:
            assert f.read() == g.read()
    from sample import read_prompts
    prompts, meta = read_prompts(os.path.join(REPO, "data/geneval/tiny_test.jsonl"))
    # five tags: every single-object task is a benchmark prompt, so none is generated
    assert len(prompts) == 10 and {m["tag"] for m in meta} == set(rewards.GENEVAL_TAGS) - {"single_object"}
    for name in ("tiny_train.txt", "tiny_test.txt"):
        prompts, meta = read_prompts(os.path.join(REPO, "data/pickscore", name))
        assert len(prompts) >= 4 and meta == [{}] * len(prompts)


def test_pickscore_prepare_offline_says_what_to_do(tmp_path):
    prep = _load_script("data/pickscore/prepare.py")
    with pytest.raises(SystemExit, match=r"could not fetch .*machine with internet") as e:
        prep.main(["--url=http://127.0.0.1:9/{split}.txt", f"--out_dir={tmp_path / 'out'}"])
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()  # nothing half-written
    assert prep.clean([" a  b ", "", "a b", "c"]) == ["a b", "c"]
