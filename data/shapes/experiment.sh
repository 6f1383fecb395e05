#!/usr/bin/env bash
# The variance experiment of docs/shapes_world.md's "The variance finding on a CPU": five Phase II
# configurations on the shapes prior with the same prompts, reward, sampler steps and samples per prompt
# (N = G*K = 16), several seeds each; then one plot and one table (compare_runs.py) and sample grids of the
# prior and of the trained EMA weights (sample.py: a K x G grid per prompt). Each run, and the prior, ends
# with a final held-out evaluation larger than the one during training: the 22 test tasks x 64 noises (the
# same noises for every run), judged by eval_diversity.py as GenEval judges (per-tag accuracy and mean).
#   bash data/shapes/experiment.sh
#   SEEDS="0 1 2 3 4" EPOCHS=40 JOBS=1 OUT=out/shapes_exp2 bash data/shapes/experiment.sh
# JOBS runs go side by side, one thread each (on this 2-core machine: JOBS=2). A rerun into the same OUT
# replaces what the last one wrote (--overwrite=True at every stage).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-out/shapes_exp}
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-100}
JOBS=${JOBS:-2}
export OMP_NUM_THREADS=1
CFG=config/shapes_cpu.py
mkdir -p "$OUT"

# Phase I once per K (its result depends on the prompts and K, not on the Phase II seed)
python phase1_perturb.py $CFG --K=4 --perturbations=$OUT/perturbations_k4.safetensors --overwrite=True \
    > $OUT/phase1_k4.log 2>&1
python phase1_perturb.py $CFG --K=16 --perturbations=$OUT/perturbations_k16.safetensors --overwrite=True \
    > $OUT/phase1_k16.log 2>&1

final() {  # dir [--lora=...]: sample the test tasks x 64 from fixed noises into dir/, judge them
    local dir=$1
    shift
    python sample.py $CFG --K=1 --G=64 --prompts=data/shapes/test_small.jsonl --out_dir=$dir \
        --overwrite=True "$@" > $dir.log 2>&1 || echo "FAILED: $dir.log"
    python eval_diversity.py --samples=$dir --metrics=geneval --geneval_scorer=shapes --device=cpu \
        >> $dir.log 2>&1 || echo "FAILED: $dir.log"
}
run() {  # label seed args...: one Phase II run, its output in OUT/label/seedN.log, and its final evaluation
    local label=$1 seed=$2
    shift 2
    mkdir -p $OUT/$label
    python phase2_align.py $CFG --seed=$seed --epochs=$EPOCHS \
        --out_dir=$OUT/$label/seed$seed --overwrite=True "$@" \
        > $OUT/$label/seed$seed.log 2>&1 || echo "FAILED: $OUT/$label/seed$seed.log"
    final $OUT/$label/seed$seed/final --lora=$OUT/$label/seed$seed/checkpoint/lora_ema
}
final $OUT/prior_final &
K4="--perturbations=$OUT/perturbations_k4.safetensors"
for seed in $SEEDS; do
    for spec in "a_nft_k1g16 --K=1 --G=16" \
                "b_e2po_g4k4 --K=4 --G=4 $K4" \
                "c_all_k16g1 --K=16 --G=1 --perturbations=$OUT/perturbations_k16.safetensors" \
                "d_no_anchor --K=4 --G=4 $K4 --use_anchor=False" \
                "e_no_schedule --K=4 --G=4 $K4 --use_schedule=False"; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
        run ${spec%% *} $seed ${spec#* } &
    done
done
wait

python compare_runs.py --runs=$OUT --plot=$OUT/compare.png | tee $OUT/compare.md
# grids: the prior, and the first seed's EMA weights of DiffusionNFT and of E²PO, on the same noises
first=${SEEDS%% *}
python sample.py $CFG $K4 --out_dir=$OUT/grids/prior --overwrite=True > $OUT/grids_prior.log 2>&1
python sample.py $CFG $K4 --lora=$OUT/a_nft_k1g16/seed$first/checkpoint/lora_ema \
    --out_dir=$OUT/grids/a_nft_k1g16 --overwrite=True > $OUT/grids_a.log 2>&1
python sample.py $CFG $K4 --lora=$OUT/b_e2po_g4k4/seed$first/checkpoint/lora_ema \
    --out_dir=$OUT/grids/b_e2po_g4k4 --overwrite=True > $OUT/grids_b.log 2>&1
# name only what was written (compare_runs.py draws no plot without matplotlib, and says so)
[ -f "$OUT/compare.png" ] && echo "plot: $OUT/compare.png"
echo "table: $OUT/compare.md  grids: $OUT/grids/*/NNNNN_grid.png"
