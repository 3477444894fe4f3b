"""Weight merging: mergekit's configurations and methods on lmexpand's streaming executor.

Recipe (the methods' papers are in :mod:`lmexpand.expand.merging.methods`):

1. Read a mergekit YAML file unchanged (``models:`` or ``slices:``, ``merge_method``,
   ``base_model``, ``parameters`` with filters and gradients, ``dtype``, ``out_dtype``,
   ``tokenizer_source``, ``chat_template``).
2. Resolve every output tensor's inputs and parameters from headers only, and check all of
   it at once (:mod:`.planner`).
3. Stream: one merge op per output tensor, computed by worker threads, written in order;
   random methods draw from one seeded generator in mergekit's order, so ``--seed N`` gives
   mergekit's ``--random-seed N`` output bit for bit.

``lmexpand merge CONFIG OUT`` runs it; in a recipe it is ``surgery: {method: merge, args:
{config: FILE}}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from pydantic import Field

from lmexpand.expand.registry import MethodConfig, register_method


class MergeConfig(MethodConfig):
    config: Union[str, dict[str, Any]] = Field(description="a mergekit YAML file, or its content inline (recipes)")
    seed: Optional[int] = Field(None, ge=0, description="seed of the random methods (dare_*, della*): mergekit's "
                                "--random-seed; default: a fresh one, recorded in lmexpand.json")
    match_mergekit: bool = Field(False, description="magnitude trimming (ties) by mergekit's argsort, for its exact "
                                 "bytes at threshold ties; default: O(n) selection, ties kept by lowest index")
    device: str = Field("cpu", description="where tensors are computed: cpu, cuda, cuda:N or auto")


def load_config(config: Union[str, Path, dict], *, allow_pickle: bool = False):
    """(MergeFile, where, text, directory) of a path or an inline mapping."""
    from lmexpand.expand.merging.config import parse_merge_file
    from lmexpand.yamlio import load_yaml

    if isinstance(config, dict):
        import yaml

        return parse_merge_file(config, "merge configuration"), "merge configuration", yaml.safe_dump(config), None
    path = Path(config)
    doc = load_yaml(path, "merge configuration")
    return parse_merge_file(doc, str(path)), str(path), path.read_text(encoding="utf-8"), path.resolve().parent


def plan_from(config: Union[str, Path, dict], *, seed: Optional[int] = None, allow_pickle: bool = False,
              match_mergekit: bool = False, device: str = "cpu"):
    from lmexpand.expand.merging.planner import open_models, plan_merge, resolve_device

    device = resolve_device(device, "device:")
    file, where, text, directory = load_config(config)
    resolved = open_models(file, where, allow_pickle=allow_pickle, relative_to=directory)
    if resolved.method is None:
        from lmexpand.errors import ConfigError

        raise ConfigError(f"{where}: merge_method: greedy_soup needs held-out text to rank the candidates: run "
                          "`lmexpand merge CONFIG OUT --eval-data FILE`.")
    from lmexpand.expand.merging.files import add_files

    plan = plan_merge(resolved, where, seed=seed, source_text=text, match_mergekit=match_mergekit, device=device)
    add_files(plan, resolved, where)
    return plan


@register_method(
    "merge",
    config=MergeConfig,
    sources=(),
    summary="Merge models in weight space from a mergekit YAML file (linear, slerp, ties, dare, ...).",
    help="Merge models from a mergekit configuration; `lmexpand merge CONFIG OUT` is the same with more options.",
)
def plan(readers, cfg: MergeConfig):
    return plan_from(cfg.config, seed=cfg.seed, match_mergekit=cfg.match_mergekit, device=cfg.device)
