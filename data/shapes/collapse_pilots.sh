#!/usr/bin/env bash
# The pilots of the collapse-world search (docs/collapse_world.md): for each candidate reward, the baseline
# alone (DiffusionNFT, K = 1, G = 16) at one seed for 100 steps with the variance study's recipe
# (config/shapes_variance.py), its final evaluation and the prior's, then the go/no-go rule written before any
# pilot ran (data/shapes/pilot_verdict.py). Two runs side by side, one thread each; about 5 minutes a pilot.
#
#   bash data/shapes/collapse_pilots.sh                       # every pilot below
#   PILOTS="tint colour_amount" bash data/shapes/collapse_pilots.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/collapse_pilots}
PILOTS=${PILOTS:-"tint tint_gated colour_amount colour_amount_gated layout"}
EPOCHS=${EPOCHS:-100}
SEED=${SEED:-0}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=1
COLOURS=(--prompts=data/shapes/train_colors.jsonl --eval_prompts=data/shapes/test_colors.jsonl)
EASY=(--prompts=data/shapes/train_easy.jsonl --eval_prompts=data/shapes/test_easy.jsonl)
spec() {  # pilot -> its prompts and reward
    case $1 in
        tint) echo "${COLOURS[*]} --reward={'tint':1.0}" ;;
        tint_gated) echo "${COLOURS[*]} --reward={'tint':1.0} --reward_opts={'tint':{'gate':True}}" ;;
        colour_amount) echo "${COLOURS[*]} --reward={'colour_amount':1.0}" ;;
        colour_amount_gated) echo "${COLOURS[*]} --reward={'colour_amount':1.0} \
--reward_opts={'colour_amount':{'gate':True}}" ;;
        colour_amount_gated_lr2e-3) echo "$(spec colour_amount_gated) --lr=2e-3" ;;
        colour_amount_0.33) echo "${COLOURS[*]} --reward={'colour_amount':1.0} \
--reward_opts={'colour_amount':{'side':0.33}}" ;;
        colour_amount_0.33_gated) echo "${COLOURS[*]} --reward={'colour_amount':1.0} \
--reward_opts={'colour_amount':{'side':0.33,'gate':True}}" ;;
        colour_amount_0.33_kl1e-2) echo "$(spec colour_amount_0.33) --kl_beta=1e-2" ;;
        colour_amount_0.33_kl1e-3) echo "$(spec colour_amount_0.33) --kl_beta=1e-3" ;;
        layout) echo "${EASY[*]} --reward={'layout':1.0}" ;;
        *) echo "unknown pilot $1" >&2; return 1 ;;
    esac
}
pilot() {
    local dir=$OUT/$1
    mkdir -p "$dir"
    # shellcheck disable=SC2046
    python phase2_align.py config/shapes_variance.py $(spec "$1") --K=1 --G=16 --seed="$SEED" \
        --epochs="$EPOCHS" --out_dir="$dir/run" --overwrite=True > "$dir/run.log" 2>&1 \
        || { echo "FAILED: $dir/run.log"; return; }
    python data/shapes/final_eval.py --run="$dir/run" >> "$dir/run.log" 2>&1
    local prior
    prior=$(realpath -m "$dir")/prior_final_eval.json
    python data/shapes/final_eval.py --run="$dir/run" --lora=none --out="$prior" >> "$dir/run.log" 2>&1
    python data/shapes/pilot_verdict.py --run="$dir/run" --prior="$prior" | tee "$dir/verdict.md"
}
for p in $PILOTS; do spec "$p" > /dev/null; done
for p in $PILOTS; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    pilot "$p" &
done
wait
