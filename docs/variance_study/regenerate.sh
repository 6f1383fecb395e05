#!/usr/bin/env bash
# Every table (compare*.md) and figure (*.png) of docs/variance_study.md, from the logs committed here:
#   bash docs/variance_study/regenerate.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
D=docs/variance_study
cr() { python compare_runs.py --block=10 --window=10 "$@"; }
# shellcheck disable=SC2068
runs() { local w=$1; shift; ls -d ${@/#/$D/$w/} | paste -sd,; }  # world, label/seed globs -> run folders
main=("nft_g16/seed*" "nft_g48/seed*" "e2po_4x4/seed*" "e2po_4x12/seed*" "e2po_4x4_shared/seed*")
for w in easy colour jpeg; do  # every label of the world: the full tables, the prior and the probe
    cr --runs=$D/$w --plot=/dev/null --ref=nft_g16,nft_g48 | grep -v "^plot: /dev/null" > $D/$w/compare.md
    cr --runs="$(runs $w "${main[@]}")" --plot=$D/$w.png --ref=nft_g16,nft_g48 --title="world: $w" > /dev/null
done
cr --runs="$(runs easy {nft_g16,e2po_4x4,no_anchor,no_schedule,all_in_k}/seed*)" \
    --plot=$D/easy_ablations.png --ref=e2po_4x4 --title="world: easy, ablations" \
    > $D/easy/compare_ablations.md
cr --runs="$(runs jpeg {nft_g16,e2po_4x4,mu0.7,mu0.6,rho0.7,mu0.6_rho0.7}/seed*)" \
    --plot=$D/jpeg_strength.png --ref=nft_g16 --title="world: jpeg, perturbation strength" \
    > $D/jpeg/compare_strength.md
cr --runs="$(runs jpeg {nft_g16,nft_kl1e-2,e2po_4x4,kl1e-4,kl1e-2}/seed*)" \
    --plot=$D/jpeg_kl.png --ref=nft_kl1e-2 --title="world: jpeg, the KL term" > $D/jpeg/compare_kl.md
