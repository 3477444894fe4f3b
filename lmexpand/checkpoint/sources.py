"""Model sources: a local Hugging Face directory, or an embedded model by name.

lmexpand never downloads anything at run time: a Hub id is answered with the command that
downloads it, to be run once by the user.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from lmexpand.checkpoint.reader import CheckpointReader
from lmexpand.errors import SourceError


def _smollm2() -> Path:
    from lmexpand.checkpoint.embedded import smollm2_dir

    return smollm2_dir()


EMBEDDED: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(spec: str | Path) -> Path:
    """The local directory a source spec stands for (converting an embedded model once)."""
    text = str(spec)
    if text in EMBEDDED:
        return EMBEDDED[text]()
    path = Path(text).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(text):
        raise SourceError(
            f"{text!r} is not a local directory. If it is a Hugging Face Hub id: lmexpand never "
            f"downloads at run time, so download it once with `hf download {text} --local-dir "
            f"models/{text.split('/')[-1]}` and pass that directory. Embedded models: "
            f"{', '.join(EMBEDDED)}."
        )
    raise SourceError(
        f"{text}: no such file or directory. Give a local Hugging Face model directory or an "
        f"embedded model name ({', '.join(EMBEDDED)})."
    )


def open_source(spec: str | Path, *, allow_pickle: bool = False, need_family: bool = True) -> CheckpointReader:
    return CheckpointReader(resolve_source(spec), allow_pickle=allow_pickle, need_family=need_family)
