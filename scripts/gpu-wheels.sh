#!/usr/bin/env bash
# Prepare a GPU lease for `python -m rable_nb campaign` (docs/gpu-lease.md): download the
# wheels a bare torch image lacks into .whl/ (cp312, manylinux x86_64), copy the CIFAR-10
# archives into .data/cifar10/, print their sizes and the one-line lease command.
# Both folders are git-ignored (.gitignore), so they travel only when carried: [".whl", ".data"].
# Usage: scripts/gpu-wheels.sh [CIFAR-10 folder with train.tar.gz/test.tar.gz]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# requirements.txt's pins of what the lease image lacks (docs/gpu-lease.md: the image has
# pytest, scikit-learn, scipy, requests, huggingface-hub, transformers; not these three).
WHEELS=(
  diffusers==0.42.1                   # pixel (UNet), feature (embeddings, schedulers), sd
  torchcfm==1.0.7 pot==0.9.7.post1    # pixel's flow matching (torchcfm imports POT: 33 MB)
)
{ git check-ignore -q .whl/x && git check-ignore -q .data/x; } || { echo "error: .whl/ and .data/ must be git-ignored" >&2; exit 1; }
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"
src=${1:-../shared/data/cifar10}
mkdir -p .data/cifar10
for a in train.tar.gz test.tar.gz; do
  [ -f ".data/cifar10/$a" ] || cp "$src/$a" ".data/cifar10/$a"
done
echo "wheels: $(ls .whl/*.whl | wc -l) files, $(du -cb .whl/*.whl | tail -1 | cut -f1 | awk '{printf "%.1f MB", $1/1e6}')"
echo "CIFAR-10 archives: $(du -cb .data/cifar10/*.tar.gz | tail -1 | cut -f1 | awk '{printf "%.1f MB", $1/1e6}')"
total=$(( $(du -cb .whl/*.whl | tail -1 | cut -f1) + $(du -cb .data/cifar10/*.tar.gz | tail -1 | cut -f1) \
         + $(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) ))
echo "with the tracked tree: $(awk -v t=$total 'BEGIN {printf "%.1f MB", t/1e6}') travel (limit 64 MiB = 67.1 MB)"
[ "$total" -le 67108864 ] || { echo "error: over the 64 MiB a lease call carries" >&2; exit 1; }
commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || echo "note: uncommitted changes travel too; commit first so the bundle names a real commit"
cat <<CMD
lease command (run with carry [".whl", ".data"], timeout_s 600):
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:\$PWD:\$PYTHONPATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RABLE_COMMIT=$commit; timeout -k 5 575 python3 -m rable_nb campaign --minutes 9 --device cuda --data .data/cifar10 2>&1 | tee \$OUT/campaign.log; b=\$(ls -td results/gpu-*/ | head -1); cp \$b/campaign.json \$OUT/; tar czf \$OUT/bundle.tgz \$b
CMD
