"""Optional bridge to lm-evaluation-harness (`pip install lm-eval`; not a dependency).

An lmexpand output is a plain Hugging Face directory, so the harness's own command works:

    lm_eval --model hf --model_args pretrained=runs/pro/model,dtype=float32 --tasks gsm8k --batch_size 8

`lmexpand eval --lm-eval TASKS` runs the same in-process. The harness downloads task data
from the Hub; lmexpand never does, so the data must already be in the local datasets cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmexpand.errors import ConfigError


def check_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401  (only checks it is installed)
    except ImportError:
        raise ConfigError(
            "--lm-eval needs lm-evaluation-harness, which is not installed: `pip install lm-eval`, "
            "then put the task data in the local datasets cache (lmexpand never downloads). "
            "Or run the harness yourself: lm_eval --model hf --model_args pretrained=MODEL_DIR --tasks TASKS"
        ) from None


def run_lm_eval(model_dir: str, tasks: list[str], out: Path) -> dict[str, Any]:
    check_lm_eval()
    import lm_eval

    try:
        res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks)
    except Exception as e:  # the harness raises many kinds when its data is not local
        raise ConfigError(
            f"lm-evaluation-harness could not run {tasks}: {type(e).__name__}: {e}. Its task data must be in "
            "the local datasets cache (no downloads at run time)."
        ) from None
    summary = res.get("results", {})
    (out / "lm_eval.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
