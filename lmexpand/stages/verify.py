"""Checking a model directory (``lmexpand verify``): shard hashes, structure, values."""

from __future__ import annotations

from pathlib import Path


def verify_model(source: str, *, values: str = "written", allow_pickle: bool = False):
    """(path, report): see :func:`lmexpand.checkpoint.verify.verify`."""
    from lmexpand.checkpoint.sources import open_source
    from lmexpand.checkpoint.verify import verify

    with open_source(source, need_family=False, allow_pickle=allow_pickle) as reader:
        path = reader.path
    return path, verify(path, values=values, allow_pickle=allow_pickle)


def require_ok(path: Path, report) -> None:
    """A failed report as the user's error, saying where the problem most likely came from."""
    from lmexpand.errors import CheckpointError

    if report.ok:
        return
    only_values = all("NaN/Inf values" in p for p in report.problems)
    if only_values and report.hashes == "match":
        # the files are what lmexpand wrote: the values came with them (source or training)
        raise CheckpointError(
            f"{path}: {len(report.problems)} tensor(s) hold NaN/Inf, first: {report.problems[0]}. The files are "
            "exactly as written (their sha256 match), so the values came from the source model or the step that "
            "wrote them: check the source with `lmexpand verify SOURCE --values all` and re-run that step.")
    raise CheckpointError(
        f"{path}: {len(report.problems)} problem(s), first: {report.problems[0]}. The directory is damaged "
        "or was modified after lmexpand wrote it: restore it or re-run the step that wrote it.")
