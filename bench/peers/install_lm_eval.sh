#!/usr/bin/env bash
# lm-evaluation-harness is a client of our exports, never a dependency: its own venv under
# bench/.peers/ (git-ignored) that sees the project venv (torch, transformers, lmexpand) through
# a .pth file, so `bench/.peers/lm-eval/bin/python -m lmexpand eval --lm-eval ...` runs the
# bridge with the harness importable. Idempotent. tests/test_clients.py uses it.
set -euo pipefail
cd "$(dirname "$0")/../.."
LE=bench/.peers/lm-eval
VERSION=0.4.13
if [ -x "$LE/bin/python" ] && "$LE/bin/python" -c "import importlib.metadata as m, lmexpand; assert m.version('lm_eval') == '$VERSION'" 2>/dev/null; then
  echo "lm-eval $VERSION already installed"; exit 0
fi
. bench/peers/_venv.sh
venv_over_project "$LE" --repo
# the project venv's versions are kept where they satisfy the harness (pip sees them installed)
"$LE/bin/pip" install -q "lm_eval==$VERSION"
"$LE/bin/python" -c "import lm_eval, lmexpand, transformers; print('lm-eval $VERSION with transformers', transformers.__version__)"
