"""
Export a trained LoRA merged into its pipeline: a folder that plain diffusers loads with
StableDiffusion3Pipeline.from_pretrained, with no LoRA or peft at serving time.

    python export.py config/geneval_g4k12.py --lora=out/geneval_g4k12/checkpoint/lora_ema \
        --out_dir=out/geneval_g4k12/merged
    python export.py config/shapes_quick.py --lora=out/shapes_quick/align/checkpoint/lora_ema \
        --out_dir=out/shapes_quick/merged

The LoRA (diffusers format, as phase2_align.py saves it) is fused into the transformer's weights in the
dtype the pipeline is loaded in (bf16 on CUDA: each merged weight is rounded once), then the whole pipeline
is written to a temporary folder and moved into place, so an interrupted export leaves no half-written
folder.
"""
import os
import shutil
import sys

import sample as S
from configurator import configure

# -----------------------------------------------------------------------------
model = "stabilityai/stable-diffusion-3.5-medium"  # hub id, local diffusers folder, or "tiny"
lora = None  # folder with pytorch_lora_weights.safetensors (a checkpoint's lora_ema)
out_dir = "out/merged"
overwrite = False  # replace what out_dir holds
device = "auto"
dtype = "auto"  # "auto" = bf16 on CUDA, fp32 on CPU; or float32 / bfloat16
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))]


def merge(pipe, lora_dir):
    """Fuse the LoRA of lora_dir into pipe's transformer weights (W <- W + (alpha / r) B A) and drop the
    adapter layers: the pipeline is then a plain one."""
    with S.diffusers_notes_off():  # its notes that the text encoders have no LoRA
        pipe.load_lora_weights(lora_dir, adapter_name="export")
    pipe.fuse_lora(components=["transformer"], adapter_names=["export"])
    pipe.unload_lora_weights()
    return pipe


def main(argv=None):
    configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    if not lora or not os.path.isfile(os.path.join(lora, "pytorch_lora_weights.safetensors")):
        raise SystemExit(f"--lora={lora} holds no pytorch_lora_weights.safetensors: pass a checkpoint's "
                         "lora_ema folder (phase2_align.py writes it)")
    if os.path.exists(out_dir) and not overwrite:
        raise SystemExit(f"{out_dir} exists: pass --overwrite=True to replace it, or another --out_dir")
    S.quiet()
    dev, dt = S.pick_device(device, dtype)
    pipe = merge(S.load_pipeline(model, dev, dt), lora)
    tmp = f"{out_dir.rstrip(os.sep)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    print(f"wrote {out_dir}: {model} with {lora} merged into its transformer "
          f"(StableDiffusion3Pipeline.from_pretrained loads it)")


if __name__ == "__main__":
    S.run_main(main)
