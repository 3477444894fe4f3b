"""Run llama.cpp's convert_hf_to_gguf.py on many model directories in one process (its
imports of torch, transformers and its model registry cost seconds per interpreter): run
with the transformers4 venv's python, PYTHONPATH holding llama.cpp's gguf-py.

    python convert_many.py JOBS.json RESULTS.json

JOBS.json: a list of [model_dir, out_gguf, outtype]. RESULTS.json: one {"rc", "stderr"} per
job, as the converter's own command would have ended: rc 0, its SystemExit code, or 1 with
the traceback when it raised; stderr holds its log lines (INFO and up, as the command prints
them) and that traceback.
"""

import contextlib
import io
import json
import logging
import sys
import traceback
from pathlib import Path

LC = Path(__file__).resolve().parents[2] / "bench" / ".peers" / "llama-cpp"
sys.path.insert(0, str(LC))

import convert_hf_to_gguf  # noqa: E402

jobs_file, results_file = (Path(a) for a in sys.argv[1:3])
jobs = json.loads(jobs_file.read_text())
# the command's logging.basicConfig(level=INFO) finds this handler and adds none; its stream
# is swapped per job so that each job's log lines are its own
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel(logging.INFO)
results = []
for model, out, outtype in jobs:
    err = io.StringIO()
    handler.setStream(err)
    sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", outtype]
    rc = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(sys.stderr):
        try:
            convert_hf_to_gguf.main()
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=err)
        except BaseException:  # noqa: BLE001 - reported to the test like the command's traceback
            traceback.print_exc(file=err)
            rc = 1
    results.append({"rc": rc, "stderr": err.getvalue()})
    print(f"converted {model}: rc {rc}", flush=True)
handler.setStream(sys.stderr)
results_file.write_text(json.dumps(results))
