"""
Rewards: every reward is `fn(images, prompts, metadata) -> scores [B]`, images a float tensor
[B, 3, H, W] in [0, 1] on the training device. Built once by name from REWARDS.

(Foundation stub: the shared CLIP loader; the rewards themselves land with issue 4.)
"""
import torch


def tiny_clip(seed=0, image_size=32):
    """A seeded random-weight CLIPModel + processor of the real classes, built offline (tests, --model=tiny)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor
    from sample import tiny_clip_tokenizer
    tok = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=image_size, patch_size=8),
                     projection_dim=16)
    proc = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                                               crop_size={"height": image_size, "width": image_size}),
                         tokenizer=tok)
    return CLIPModel(cfg).eval(), proc


def load_clip(name, device="cpu", dtype=torch.float32):
    """(CLIPModel, CLIPProcessor) from a hub id or local folder, or "tiny"; frozen, on `device`."""
    if name == "tiny":
        model, proc = tiny_clip()
    else:
        from transformers import CLIPModel, CLIPProcessor
        try:
            model, proc = CLIPModel.from_pretrained(name, torch_dtype=dtype), CLIPProcessor.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise SystemExit(f"could not load CLIP '{name}' ({type(err).__name__}): download it on a machine with internet "
                             f"(huggingface-cli download {name}) or pass a local folder")
    return model.to(device, dtype).requires_grad_(False).eval(), proc
