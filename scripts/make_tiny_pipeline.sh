#!/usr/bin/env bash
# Rebuilds tests/fixtures/tiny-dalle-mini, the tiny single-folder pipeline the CLI uses by
# default and the pipeline tests load, from the golden fixtures (text model + VQGAN in the
# released two-repo msgpack layout) with `dalle-flax convert`.
# Usage: scripts/make_tiny_pipeline.sh [FIXTURES_DIR]   (default: ../shared/fixtures)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
fixtures=${1:-$repo/../shared/fixtures}
python=${PYTHON:-python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The fixtures may be read-only: convert from a writable copy, without the golden outputs.
cp -r "$fixtures/dallebart-mini-like" "$tmp/text"
cp -r "$fixtures/vqgan-f16-like" "$tmp/vqgan"
chmod -R u+w "$tmp"
rm -rf "$tmp/text/expected" "$tmp/vqgan/expected"
out="$repo/tests/fixtures/tiny-dalle-mini"
rm -rf "$out"
"$python" -m dalle_flax.cli convert "$tmp/text" --vqgan "$tmp/vqgan" --out "$out"
cat >> "$out/README.md" <<'CARD'

## Test fixture

Random tiny weights (16 image tokens from a 64-entry codebook, 64x64 images), converted from
the golden fixtures `dallebart-mini-like` + `vqgan-f16-like` by `scripts/make_tiny_pipeline.sh`.
It exercises the pipeline and is the CLI's default model in a source checkout; its images are
not meaningful.
CARD
du -sh "$out"
