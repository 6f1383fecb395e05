#!/usr/bin/env bash
# The variance study (docs/variance_study.md): in which shapes-world settings does DiffusionNFT's intra-group
# reward std collapse, and does E²PO hold it at the same number of samples per prompt? One world a call:
#
#   WORLD=easy   bash data/shapes/variance_study.sh   # `shapes` (GenEval rules), colour + single-object tasks
#   WORLD=jpeg   bash data/shapes/variance_study.sh   # jpeg_incompressibility (DDPO's), text-independent
#   WORLD=colour bash data/shapes/variance_study.sh   # colour_share: dense, its optimum depends on the prompt
#   WORLD=amount EPOCHS=300 SEEDS="0 1 2 3 4" NOISES=256 CONFIGS="nft_g16 nft_g48 e2po_4x4 e2po_4x12" \
#       bash data/shapes/variance_study.sh           # the gated colour amount (docs/collapse_world.md)
#   WORLD=easy SEEDS="0 1" EPOCHS=60 CONFIGS="nft_g16 e2po_4x4" bash data/shapes/variance_study.sh
#   WORLD=jpeg CONFIGS="grpo_g16 e2po_grpo_4x4" REF=grpo_g16 SEEDS="0 1 2 3 4" \
#       bash data/shapes/variance_study.sh           # Flow-GRPO's objective against E²PO on it
#
# Each configuration (CONFIGS, below) runs Phase II (config/shapes_variance.py: 150 steps of 3 prompts, so
# every configuration draws the same prompts at each step of a seed) for every seed in SEEDS, then its final
# evaluation (data/shapes/final_eval.py: the held-out prompts x 64 noises shared by every run), JOBS runs side
# by side with one thread each. The prior's final evaluation, the perturbation probe of the prior and of the
# nft_g16, e2po_4x4(_shared) and KL 1e-2 runs (final_eval.py --perturbations), the table and the plot
# (compare_runs.py) close it. The default grid, 5 configurations x 3 seeds, takes 65-80 minutes a world on an
# idle 2-core machine (one run of 150 steps: about 5 minutes at 16 samples a prompt, 13 at 48).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORLD=${WORLD:-easy}
OUT=${OUT:-out/variance}/$WORLD
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-150}
JOBS=${JOBS:-2}
NOISES=${NOISES:-64}  # final evaluation: images per held-out prompt
ARGS=${ARGS:-}  # more Phase II arguments for every run (a pilot's learning rate: ARGS=--lr=3e-3)
REF=${REF:-nft_g16,nft_g48}  # the table's references (those in CONFIGS): each run against one of its N
CONFIGS=${CONFIGS:-"nft_g16 nft_g48 e2po_4x4 e2po_4x12 e2po_4x4_shared"}
export OMP_NUM_THREADS=1
CFG=config/shapes_variance.py
case $WORLD in  # the training prompts (P, Phase I's too), and the held-out prompts and reward (W)
    easy) P=data/shapes/train_easy.jsonl
          W=(--eval_prompts=data/shapes/test_easy.jsonl "--reward={'shapes': 1.0}") ;;
    jpeg) P=data/shapes/train_small.jsonl
          W=(--eval_prompts=data/shapes/test_small.jsonl "--reward={'jpeg_incompressibility': 1.0}") ;;
    colour) P=data/shapes/train_colors.jsonl
            W=(--eval_prompts=data/shapes/test_colors.jsonl "--reward={'colour_share': 1.0}") ;;
    amount) P=data/shapes/train_colors_14.jsonl
            W=(--eval_prompts=data/shapes/test_colors_16.jsonl "--reward={'colour_amount': 1.0}"
               "--reward_opts={'colour_amount': {'gate': True}}") ;;
    *) echo "WORLD=$WORLD: use easy, jpeg, colour or amount" >&2; exit 2 ;;
esac
mkdir -p "$OUT"

phase1() {  # name args...: a Phase I file for this world's training prompts, made once
    local name=$1
    shift
    [ -f "$OUT/$name.safetensors" ] || python phase1_perturb.py $CFG --prompts=$P \
        --perturbations="$OUT/$name.safetensors" "$@" > "$OUT/$name.log" 2>&1
    echo "--perturbations=$OUT/$name.safetensors"
}
spec() {  # configuration -> its Phase II arguments (building the Phase I file it needs)
    case $1 in
        nft_g16) echo "--K=1 --G=16" ;;
        nft_g48) echo "--K=1 --G=48" ;;
        e2po_4x4) echo "--K=4 --G=4 $(phase1 k4 --K=4)" ;;
        e2po_4x12) echo "--K=12 --G=4 $(phase1 k12 --K=12)" ;;
        e2po_4x4_shared) echo "--K=4 --G=4 $(phase1 k4 --K=4) --shared_noise=True" ;;
        all_in_k) echo "--K=16 --G=1 $(phase1 k16 --K=16)" ;;
        e2po_8x2) echo "--K=2 --G=8 $(phase1 k2 --K=2)" ;;
        e2po_2x8) echo "--K=8 --G=2 $(phase1 k8 --K=8)" ;;
        grpo_g16) echo "--objective=grpo --K=1 --G=16" ;;  # Flow-GRPO's objective (docs/flow_grpo.md)
        e2po_grpo_4x4) echo "--objective=grpo --K=4 --G=4 $(phase1 k4 --K=4)" ;;
        no_anchor) echo "--K=4 --G=4 $(phase1 k4 --K=4) --use_anchor=False" ;;
        no_schedule) echo "--K=4 --G=4 $(phase1 k4 --K=4) --use_schedule=False" ;;
        mu0.7) echo "--K=4 --G=4 $(phase1 k4_mu0.7 --K=4 --mu=0.7)" ;;
        mu0.6) echo "--K=4 --G=4 $(phase1 k4_mu0.6 --K=4 --mu=0.6)" ;;
        rho0.7) echo "--K=4 --G=4 $(phase1 k4 --K=4) --rho=0.7" ;;
        mu0.6_rho0.7) echo "--K=4 --G=4 $(phase1 k4_mu0.6 --K=4 --mu=0.6) --rho=0.7" ;;
        kl1e-4) echo "--K=4 --G=4 $(phase1 k4 --K=4) --kl_beta=1e-4" ;;
        kl1e-2) echo "--K=4 --G=4 $(phase1 k4 --K=4) --kl_beta=1e-2" ;;
        nft_kl1e-2) echo "--K=1 --G=16 --kl_beta=1e-2" ;;
        *) echo "unknown configuration $1" >&2; return 1 ;;
    esac
}
epochs_done() {  # run folder -> epochs its log.jsonl holds (0 without one)
    python -c "import json, sys
print(1 + max([json.loads(l)['epoch'] for l in open(sys.argv[1]) if l.strip()] + [-1]))" "$1/log.jsonl" \
        2>/dev/null || echo 0
}
run() {  # configuration seed: Phase II, then the final evaluation of its EMA weights. A grid stopped part way
    # (a session's end) picks up where it was: finished runs are skipped, unfinished ones resumed from their
    # last checkpoint (--resume replays exactly), runs without a checkpoint started again
    local dir=$OUT/$1/seed$2 mode=--overwrite=True
    [ -f "$dir/final_eval.json" ] && return
    mkdir -p "$OUT/$1"
    if [ "$(epochs_done "$dir")" -lt "$EPOCHS" ]; then
        ls "$dir"/checkpoint*/state.pt > /dev/null 2>&1 && mode=--resume=True
        # shellcheck disable=SC2046
        python phase2_align.py $CFG --prompts=$P "${W[@]}" $(spec "$1") $ARGS --seed="$2" --epochs="$EPOCHS" \
            --out_dir="$dir" $mode >> "$dir.log" 2>&1 || { echo "FAILED: $dir.log"; return; }
    fi
    python data/shapes/final_eval.py --run="$dir" --noises="$NOISES" >> "$dir.log" 2>&1 \
        || echo "FAILED (final): $dir.log"
}
for c in $CONFIGS; do spec "$c" > /dev/null; done  # every Phase I file first, once
for seed in $SEEDS; do
    for c in $CONFIGS; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
        run "$c" "$seed" &
    done
done
wait
first=$(ls -d "$OUT"/*/seed* | head -1)
python data/shapes/final_eval.py --run="$first" --lora=none --noises="$NOISES" \
    --out="$(realpath -m "$OUT")/prior_final_eval.json" > "$OUT/prior_final_eval.log" 2>&1
if [ -f "$OUT/k4.safetensors" ]; then  # the perturbation probe: how the prior and the final models answer Δ
    probe=(--noises=1 --perturbations="$OUT/k4.safetensors")
    python data/shapes/final_eval.py --run="$first" --lora=none "${probe[@]}" \
        --out="$(realpath -m "$OUT")/prior_probe.json" > "$OUT/prior_probe.log" 2>&1
    for d in "$OUT"/{nft_g16,e2po_4x4,e2po_4x4_shared,nft_kl1e-2,kl1e-2}/seed*; do
        [ -f "$d/final_eval.json" ] && python data/shapes/final_eval.py --run="$d" "${probe[@]}" \
            --out="$(realpath -m "$d")/probe.json" >> "$d.log" 2>&1
    done
fi
refs=$(for r in ${REF//,/ }; do case " $CONFIGS " in *" $r "*) printf '%s,' "$r" ;; esac; done)
python compare_runs.py --runs="$OUT" --plot="$OUT/compare.png" --title="world: $WORLD" --block=10 \
    --window=10 ${refs:+--ref="${refs%,}"} | tee "$OUT/compare.md"
