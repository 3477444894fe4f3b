"""Run many mergekit merges in one process (its import costs seconds): run with the
mergekit venv's python. argv[1]: a JSON list of [config_path, out_dir, seed or null]."""

import json
import sys

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

for config, out, seed in json.loads(open(sys.argv[1]).read()):
    with open(config) as f:
        cfg = MergeConfiguration.model_validate(yaml.safe_load(f))
    run_merge(cfg, out, MergeOptions(random_seed=seed, copy_tokenizer=True, quiet=True, lazy_unpickle=False))
    print("merged", out, flush=True)
