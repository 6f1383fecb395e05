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
overwrite = False  # replace an earlier export in out_dir (never a run folder, nor the LoRA or model exported)
device = "auto"
dtype = "auto"  # "auto" = bf16 on CUDA, fp32 on CPU; or float32 / bfloat16
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))]


def merge(pipe, lora_dir, model_id="the model"):
    """Fuse the LoRA of lora_dir into pipe's transformer weights (W <- W + (alpha / r) B A) and drop the
    adapter layers: the pipeline is then a plain one."""
    S.load_lora(pipe, lora_dir, model_id, adapter_name="export")
    pipe.fuse_lora(components=["transformer"], adapter_names=["export"])
    pipe.unload_lora_weights()
    return pipe


def check_out_dir():
    """What the export would replace: out_dir, whole. Only an earlier export (a pipeline folder: its
    model_index.json), and only with --overwrite=True; never a folder that holds this command's LoRA or model,
    a Phase II run or anything else (a config's out_dir is its run folder)."""
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    S.check_keeps_inputs([out_dir], {"the LoRA": lora, "the model": model}, f"exporting to {out_dir}")
    run = sorted({"log.jsonl", "checkpoint", "checkpoint.tmp", "checkpoint.old"} & set(os.listdir(out_dir)))
    if run:
        raise SystemExit(f"out_dir={out_dir} holds a Phase II run ({', '.join(run)}), which an export would "
                         f"replace: pass another --out_dir, e.g. {out_dir.rstrip(os.sep)}_merged")
    if not os.path.isfile(os.path.join(out_dir, "model_index.json")):
        raise SystemExit(f"out_dir={out_dir} holds files that are not a pipeline: export.py replaces only an "
                         "earlier export; pass another --out_dir")
    if not overwrite:
        raise SystemExit(f"out_dir={out_dir} exists and holds an earlier export: pass --overwrite=True to "
                         "replace it, or another --out_dir")


def main(argv=None):
    configure(globals(), config_keys, sys.argv[1:] if argv is None else argv)
    S.check_lora(lora)
    S.pick_device(device, dtype)
    S.check_writable(out_dir, "out_dir")
    release, _ = S.claim(out_dir, check_out_dir)  # one writer; nothing is loaded or replaced before this
    S.quiet()
    dev, dt = S.pick_device(device, dtype)
    pipe = merge(S.load_pipeline(model, dev, dt), lora, model)
    tmp = f"{out_dir.rstrip(os.sep)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    print(f"wrote {out_dir}: {model} with {lora} merged into its transformer "
          f"(StableDiffusion3Pipeline.from_pretrained loads it)")
    release()


if __name__ == "__main__":
    S.run_main(main)
