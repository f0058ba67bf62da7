#!/usr/bin/env bash
# Copy the real data sets the study needs from ../shared/data into the checkout's ignored .data/ folder, laid out as
# ../shared/data is, so `paths.data_root=$PWD/.data` (device) and `paths.data_root=../shared/data` (here) are the same
# study. The device tool carries at most 64 MiB per call (the repository included), so the copies are grouped into
# pieces of at most ~55 MiB that travel in consecutive calls to one warm machine (each call's `carry` names one
# piece; what an earlier call carried stays there). COCO needs two pieces, so unet_coco runs in the call that carries
# the second of them:
#
#   piece text              .data/tinyshakespeare .data/tinystories_sample                    (~3 MiB: fits beside
#                           the Python wheels)                                                 -> llm_text
#   piece cifar10_coco_val  .data/cifar10_jpeg .data/coco2017_tiny/val2017        (~53 MiB)   -> resnet_cifar10
#   piece coco_train        .data/coco2017_tiny/annotations .data/coco2017_tiny/train2017  (~47 MiB) -> unet_coco
#
# Usage: bench/stage_study_data.sh [SHARED_DATA_DIR]   (default: ../shared/data next to the checkout)
# Prints each piece's carry list and size; exits non-zero naming the missing file if a source is absent.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$(cd "${1:-$repo/../shared/data}" && pwd)"
dst="$repo/.data"
limit_bytes=$((55 * 1024 * 1024))

# the ignored folder must stay out of what the device tool sends uninvited
exclude="$repo/.git/info/exclude"
if [ -d "$repo/.git" ] && ! grep -qx '/.data/' "$exclude" 2>/dev/null; then
    echo '/.data/' >>"$exclude"
fi

declare -A pieces=(
    [text]="tinyshakespeare/input.txt tinystories_sample/tinystories_train_first2MiB.txt"
    [cifar10_coco_val]="cifar10_jpeg/cifar10_jpeg_train20k_test10k.zip coco2017_tiny/val2017"
    [coco_train]="coco2017_tiny/annotations coco2017_tiny/train2017"
)

for name in text cifar10_coco_val coco_train; do
    carry=()
    for item in ${pieces[$name]}; do
        if [ ! -e "$src/$item" ]; then
            echo "error: $src/$item is missing (expected the shared data sets; pass their folder as \$1)" >&2
            exit 1
        fi
        mkdir -p "$dst/$(dirname "$item")"
        # -u: an unchanged staged copy is left alone; plain files, so the copy travels (links would not)
        cp -R -u --preserve=timestamps "$src/$item" "$dst/$(dirname "$item")/"
        chmod -R u+w "$dst/$item"  # the shared copies are read-only; staged ones must be replaceable
        top="${item%%/*}"
        case "$top" in
            coco2017_tiny) carry+=(".data/$(echo "$item" | cut -d/ -f1-2)") ;;
            *) carry+=(".data/$top") ;;
        esac
    done
    bytes=$(du -cb "${carry[@]/#/$repo/}" | tail -1 | cut -f1)
    if [ "$bytes" -gt "$limit_bytes" ]; then
        echo "error: piece $name is $bytes bytes, over the $limit_bytes-byte budget of one device call" >&2
        exit 1
    fi
    mib="$(awk "BEGIN {print $bytes / 1048576}")"
    printf '%-16s %6.1f MiB  carry: %s\n' "$name" "$mib" "$(IFS=,; echo "${carry[*]}")"
done
