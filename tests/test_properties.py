"""Property tests (hypothesis): random valid plans on tiny models always give a checkpoint
that stock transformers loads, and the promise each method makes holds:
LLaMA-Pro and MoE compute what the source did, SOLAR copies exactly the mapped layers."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from lmexpand.checkpoint import CheckpointReader
from lmexpand.expand import get_method, parse_config
from lmexpand.expand.executor import execute
from tests.test_llama_pro import padded_batch

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LAYERS = 4  # the tiny models' depth


def run(src: Path, method: str, args: dict) -> tuple[Path, tempfile.TemporaryDirectory]:
    m = get_method(method)
    tmp = tempfile.TemporaryDirectory()
    out = execute(m.plan([CheckpointReader(src)], parse_config(m, args, style="key")), Path(tmp.name) / "o")
    return out, tmp


def max_delta(a: Path, b: Path) -> float:
    ma = AutoModelForCausalLM.from_pretrained(a).eval()
    mb = AutoModelForCausalLM.from_pretrained(b).eval()
    ids, mask = padded_batch(320)
    with torch.no_grad():
        return (ma(input_ids=ids, attention_mask=mask).logits - mb(input_ids=ids, attention_mask=mask).logits).abs().max().item()


@SETTINGS
@given(positions=st.lists(st.integers(0, LAYERS - 1), min_size=1, max_size=LAYERS, unique=True),
       per_group=st.integers(1, 2), copy_from=st.sampled_from(["previous", "next"]))
def test_llama_pro_any_positions_is_exact(tiny_model, positions, per_group, copy_from):
    if copy_from == "next" and LAYERS - 1 in positions:
        positions = [p for p in positions if p != LAYERS - 1] or [0]
    out, tmp = run(tiny_model, "llama-pro", {"positions": positions, "per_group": per_group, "copy_from": copy_from})
    with tmp:
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == LAYERS + per_group * len(positions)
        assert max_delta(tiny_model, out) == 0.0


@st.composite
def slices(draw):
    n = draw(st.integers(1, 4))
    out = []
    for _ in range(n):
        start = draw(st.integers(0, LAYERS - 1))
        out.append((start, draw(st.integers(start + 1, LAYERS))))
    return out


@SETTINGS
@given(spec=slices())
def test_upscale_any_slices_copies_the_mapped_layers(tiny_llama, spec):
    text = ",".join(f"{a}-{b}" for a, b in spec)
    out, tmp = run(tiny_llama, "upscale", {"slices": text})
    with tmp:
        expected_map = [k for a, b in spec for k in range(a, b)]
        assert json.loads((out / "lmexpand.json").read_text())["layer_map"] == expected_map
        src, dst = CheckpointReader(tiny_llama), CheckpointReader(out)
        for t in dst:
            split = dst.family.split_layer_name(t.name)
            name = t.name if split is None else dst.family.layer_name(expected_map[split[0]], split[1])
            assert torch.equal(dst.get_tensor(t.name), src.get_tensor(name)), t.name
        assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == len(expected_map)


@SETTINGS
@given(data=st.data())
def test_moe_any_split_is_exact(tiny_llama, data):
    # intermediate size 128: segments must divide it
    if data.draw(st.booleans(), label="fine-grained"):
        m = data.draw(st.sampled_from([2, 4, 8, 16]), label="segments")
        s = data.draw(st.integers(1, m - 1), label="shared")
        r = data.draw(st.integers(1 if m - s >= 2 else 2, 3), label="replicas")  # Glm4Moe needs >= 2 routed
        k = data.draw(st.integers(0, LAYERS - 1), label="first upcycled layer")
        args = {"segments": m, "shared": s, "replicas": r, "layers": ",".join(map(str, range(k, LAYERS)))}
    else:
        e = data.draw(st.integers(2, 6), label="experts")
        args = {"experts": e, "top_k": data.draw(st.integers(1, e), label="top-k"),
                "router_init": data.draw(st.sampled_from(["zero", "random"]), label="router"),
                "layers": data.draw(st.sampled_from(["all", "every:2", "0,3", "1"]), label="layers")}
    out, tmp = run(tiny_llama, "moe", args)
    with tmp:
        assert max_delta(tiny_llama, out) <= 1e-5, args
