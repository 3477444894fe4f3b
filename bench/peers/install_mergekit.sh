#!/usr/bin/env bash
# mergekit is a benchmark baseline only: its own venv under bench/.peers/ (git-ignored),
# never a dependency of lmexpand. torch is pinned to the CPU build on this machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv bench/.peers/mergekit
echo "torch==2.13.0" > bench/.peers/constraints.txt
bench/.peers/mergekit/bin/pip install -q -c bench/.peers/constraints.txt torch==2.13.0 mergekit==0.1.5
bench/.peers/mergekit/bin/mergekit-yaml --help > /dev/null && echo "mergekit installed"
