"""
The tiny models: seeded, random-weight models of the real classes with tiny widths, built offline in
seconds. `--model=tiny` (every script) and the reward models' "tiny" ids run on them, and so do the tests:
they exercise every code path of the real models (the same classes, tokenizers, processors and dtypes)
on a laptop. Real widths in comments. Nothing here is needed to run the method on real weights.

    import tiny
    pipe = tiny.pipeline(0)                # a StableDiffusion3Pipeline shaped like SD3.5-Medium
    model, processor = tiny.clip(0)        # CLIPModel + CLIPProcessor (PickScore, CLIPScore, GenEval colours)

The pipeline's T5 d_model (96) stays >= CLIP-L + CLIP-G hidden (32 + 48), so the zero-padding of the CLIP
features into T5's width mirrors the real 2048 -> 4096 one.
"""
import torch


def clip_tokenizer(pad_token="<|endoftext|>"):
    """A real CLIPTokenizer (byte-level BPE) with the byte alphabet and no merges: every character is
    a token, BOS/EOS are the two highest ids (as in real CLIP, so legacy argmax pooling finds EOS).
    SD3's tokenizer pads with EOS, tokenizer_2 with '!' (id 0): pass pad_token="!" for the latter."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=77)


def t5_tokenizer():
    """A real T5Tokenizer (unigram) over single characters; <pad>=0, </s>=1, <unk>=2 as in T5."""
    from transformers import T5Tokenizer
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.!?'\"-:;()#&/"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in alphabet] + [("\u2581" + c, -2.5) for c in alphabet]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def text_components(seed=0):
    """(tokenizers, encoders) of the tiny model; each encoder seeded on its own so that loading the
    text side alone gives the same weights as the full pipeline."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    tok_l, tok_g, tok_t5 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    clip_cfg = dict(vocab_size=len(tok_l), max_position_embeddings=77, num_hidden_layers=2,
                num_attention_heads=2, hidden_act="gelu", bos_token_id=tok_l.bos_token_id,
                eos_token_id=2)  # eos 2 = legacy argmax pooling, as SD3's configs
    torch.manual_seed(seed + 1)
    enc_l = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=32, intermediate_size=64, projection_dim=32, **clip_cfg))  # 768, proj 768
    torch.manual_seed(seed + 2)
    enc_g = CLIPTextModelWithProjection(  # 1280, proj 1280
        CLIPTextConfig(hidden_size=48, intermediate_size=96, projection_dim=48, **clip_cfg))
    torch.manual_seed(seed + 3)
    enc_t5 = T5EncoderModel(T5Config(vocab_size=len(tok_t5), d_model=96, d_kv=16, d_ff=64, num_layers=2,
                                     num_heads=2, feed_forward_proj="gated-gelu",
                                     is_encoder_decoder=False))  # T5-XXL: 4096
    return (tok_l, tok_g, tok_t5), (enc_l, enc_g, enc_t5)


def pipeline(seed=0, large=False):
    """A StableDiffusion3Pipeline shaped like SD3.5-Medium, or with large=True like SD3.5-Large (more heads,
    no dual-attention blocks; the same text encoders, VAE and scheduler)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    (tok_l, tok_g, tok_t5), (enc_l, enc_g, enc_t5) = text_components(seed)
    torch.manual_seed(seed + 4)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16,  # SD3.5-M and -L: 128, 2, 16, 16
        num_layers=2,  # 24; L: 38
        attention_head_dim=8, num_attention_heads=3 if large else 2,  # 64, 24; L: 64, 38
        joint_attention_dim=96, caption_projection_dim=24 if large else 16,  # 4096, 1536; L: 4096, 2432
        pooled_projection_dim=80, pos_embed_max_size=16,  # 2048, 384; L: 2048, 192
        dual_attention_layers=() if large else (0,), qk_norm="rms_norm")  # (0..12); L: none. rms_norm
    torch.manual_seed(seed + 5)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 16, 16, 16), scaling_factor=1.5305, shift_factor=0.0609,
                        use_quant_conv=False, use_post_quant_conv=False)  # 4 blocks: 8x down, as the real VAE
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                                    text_encoder=enc_l, tokenizer=tok_l,
                                    text_encoder_2=enc_g, tokenizer_2=tok_g,
                                    text_encoder_3=enc_t5, tokenizer_3=tok_t5)



def clip(seed=0, image_size=32):
    """A seeded random-weight CLIPModel + processor of the real classes, built offline (tests,
    --model=tiny)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor
    tok = clip_tokenizer()
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=image_size, patch_size=8),
                     projection_dim=16)
    proc = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                               crop_size={"height": image_size,
                                                                          "width": image_size}),
                         tokenizer=tok)
    return CLIPModel(cfg).eval(), proc


def mask2former(seed=0, num_labels=80):
    """A seeded random-weight Mask2FormerForUniversalSegmentation (tiny Swin backbone, 80 COCO labels) and
    its image processor, built offline."""
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                              Mask2FormerImageProcessorPil, SwinConfig)
    torch.manual_seed(seed)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                          num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=64, encoder_layers=1, decoder_layers=2,
                            num_attention_heads=2, dim_feedforward=64, num_queries=10, num_labels=num_labels)
    proc = Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 128})
    return Mask2FormerForUniversalSegmentation(cfg).eval(), proc


def grounding_dino(seed=0):
    """A seeded random-weight GroundingDinoForObjectDetection + processor of the real classes, built
    offline (Swin backbone, BERT text encoder with a character-level WordPiece vocabulary)."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessorPil, GroundingDinoProcessor, SwinConfig)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,'-"
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars)
                                        + ["##" + c for c in chars])}
    tok = BertTokenizer(vocab=vocab)
    proc = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64}),
        tokenizer=tok)
    # real grounding-dino-tiny: Swin-T, BERT-base, d_model 256, 900 queries, 6+6 layers
    cfg = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 2, 2], window_size=4, out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32, max_position_embeddings=256),
        d_model=32, num_queries=10, encoder_layers=1,
        decoder_layers=2,  # 2: the bbox-head tying needs > 1 decoder layer
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_n_points=2, decoder_n_points=2)
    torch.manual_seed(seed)
    return GroundingDinoForObjectDetection(cfg).eval(), proc


def open_clip_model(open_clip, seed=0):
    """A seeded random CLIP of open_clip's own class (HPSv2's), with ViT-H-14's tokenizer vocabulary, and
    its evaluation transform ("longest": resize the longer side and pad, as HPS evaluates)."""
    torch.manual_seed(seed)
    vision = dict(image_size=32, layers=2, width=32, head_width=16, patch_size=8)
    text = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    model = open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text)
    return model, open_clip.image_transform(32, is_train=False, resize_mode="longest")
