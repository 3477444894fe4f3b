#!/usr/bin/env bash
# transformers 4.57 is a client to check our exports against, never a dependency: its own
# venv under bench/.peers/ (git-ignored). It reuses the project venv's torch and numpy (a
# .pth file puts .venv's site-packages after its own, so its transformers, tokenizers and
# huggingface_hub shadow the project's). Idempotent. tests/test_clients.py uses it.
set -euo pipefail
cd "$(dirname "$0")/../.."
T4=bench/.peers/transformers4
if [ -x "$T4/bin/python" ] && "$T4/bin/python" -c "import transformers, torch; assert transformers.__version__.startswith('4.57')" 2>/dev/null; then
  echo "transformers 4.57 already installed"; exit 0
fi
. bench/peers/_venv.sh
venv_over_project "$T4"
"$T4/bin/pip" install -q "transformers==4.57.*" "huggingface_hub<1.0" "tokenizers<0.23" safetensors
"$T4/bin/python" -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
