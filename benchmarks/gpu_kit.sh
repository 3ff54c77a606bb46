#!/usr/bin/env bash
# Run HERE, before a GPU check: put in .gpu/ (git-ignored) what benchmarks/gpu_check.sh needs on a lent GPU
# machine, which reaches no package index and no ../shared:
#   .gpu/whl/   wheels for Python 3.12 of emseg's dependencies that the machine's image lacks (it has
#               torch, torchvision, timm, numpy, scipy, scikit-image, tifffile, OpenCV, matplotlib, ...),
#               and MONAI for the inference benchmark
#   .gpu/data/  ISBI 2012 (training and test volumes), EPFL mitochondria and NASA Super1, as in ../shared/data
#               (about 35 MB; never committed): gpu_check.sh needs ISBI, gpu_transfer.sh and gpu_pretrain.sh all three
#
#   bash benchmarks/gpu_kit.sh [DATA_DIR]     # DATA_DIR: the shared data folder (default ../shared/data); it
#                                             # must hold isbi2012/, and may hold epfl_mito/ and nasa_super/
# The versions are this checkout's .venv's, so the check runs the code the CPU runs were measured with.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-../shared/data}
[ -f "$src/isbi2012/train-volume.tif" ] && [ -f "$src/isbi2012/train-membranes.tif" ] \
    || { echo "gpu_kit: $src/isbi2012 has no train-volume.tif and train-membranes.tif (ISBI 2012); give the shared data folder" >&2; exit 1; }
if exclude="$(git rev-parse --git-path info/exclude 2>/dev/null)"; then  # a plain copy has no .git: nothing to ignore
    grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
fi
rm -rf .gpu && mkdir -p .gpu/whl .gpu/data/isbi2012
cp "$src/isbi2012/"*.tif .gpu/data/isbi2012/
for set in epfl_mito nasa_super; do  # for gpu_transfer.sh and gpu_pretrain.sh
    if [ -d "$src/$set" ]; then cp -r "$src/$set" .gpu/data/
    else echo "gpu_kit: no $src/$set (gpu_transfer.sh and gpu_pretrain.sh need it)" >&2; fi
done
PY=${PYTHON:-.venv/bin/python}
pins=$("$PY" -m pip freeze 2>/dev/null | grep -i -E '^(segmentation.models.pytorch|albumentations|albucore|pydantic|pydantic.core|annotated.types|typing.inspection|simsimd|stringzilla|torchinfo|monai)==')
[ "$(echo "$pins" | wc -l)" -eq 11 ] || { echo "gpu_kit: expected 11 pinned packages in $PY's environment, got:" >&2; echo "$pins" >&2; exit 1; }
platforms=()
for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 -d .gpu/whl $pins
du -sh .gpu
