"""Data that cannot train what is trainable is refused before the first optimizer step
(issue 33, part 4): a zero gradient on every trainable tensor after the first batch stops
training with the reason, for any kind of model; nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmexpand.cli import main
from tests.tiny import build_tiny_model

PLAIN = "The cat sat on the mat and the dog ran in the park. " * 8  # no parenthesis


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unreachable")
    build_tiny_model("llama", root / "a")
    (root / "plain.txt").write_text("\n\n".join(PLAIN for _ in range(40)))
    return root


# kind -> (surgery argv after the method, a word of the reason)
KINDS = {
    # experts run only inside ( ... ) spans; the data has none
    "deep-fusion": (["deep-fusion", "{a}", "{out}", "--open", "(", "--close", ")"], "marker"),
    # base and assistant are the same model: deferring never changes a probability, the gate gets no gradient
    "co-llm": (["co-llm", "{a}", "{a}", "{out}"], "assistant"),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_zero_gradient_on_every_trainable_tensor_is_refused(root, tmp_path, capsys, kind):
    argv, needle = KINDS[kind]
    model = tmp_path / "m"
    assert main(["surgery", *[a.format(a=root / "a", out=model) for a in argv]]) == 0, capsys.readouterr().err
    capsys.readouterr()
    run = tmp_path / "run"
    code = main(["train", "--model", str(model), "--data", str(root / "plain.txt"), "--out", str(run),
                 "--max-steps", "3", "--seq-len", "32", "--batch-size", "2", "--val-every", "0",
                 "--no-tensorboard"])
    err = capsys.readouterr().err
    assert code == 2 and "zero gradient" in err and needle in err and "Traceback" not in err, err
    assert not run.exists()
