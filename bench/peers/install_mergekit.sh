#!/usr/bin/env bash
# mergekit is a baseline only: its own venv under bench/.peers/ (git-ignored), never a
# dependency of lmexpand. torch is pinned to the CPU build on this machine. Idempotent: an
# existing install of the pinned version is kept. tests/test_merge.py compares against it.
set -euo pipefail
cd "$(dirname "$0")/../.."
MK=bench/.peers/mergekit
if [ -x "$MK/bin/mergekit-yaml" ] && "$MK/bin/python" -c "import importlib.metadata as m; assert m.version('mergekit') == '0.1.5'" 2>/dev/null; then
  echo "mergekit 0.1.5 already installed"; exit 0
fi
rm -rf "$MK"
python3 -m venv "$MK"
mkdir -p bench/.peers
echo "torch==2.13.0" > bench/.peers/constraints.txt
"$MK/bin/pip" install -q -c bench/.peers/constraints.txt torch==2.13.0 mergekit==0.1.5
"$MK/bin/mergekit-yaml" --help > /dev/null && echo "mergekit installed"
