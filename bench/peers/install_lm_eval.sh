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
[ -x .venv/bin/python ] || { echo "run make setup first (.venv is reused)" >&2; exit 1; }
rm -rf "$LE"
python3 -m venv "$LE"
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
own=$("$LE/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
{ pwd; (cd "$site" && pwd); } > "$own/lmexpand-venv.pth"
# the project venv's versions are kept where they satisfy the harness (pip sees them installed)
"$LE/bin/pip" install -q "lm_eval==$VERSION"
"$LE/bin/python" -c "import lm_eval, lmexpand, transformers; print('lm-eval $VERSION with transformers', transformers.__version__)"
