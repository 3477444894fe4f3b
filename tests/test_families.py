"""Every supported family through every command: one matrix, family x command.

A row per tiny random model of :data:`tests.tiny.TINY_FAMILIES` (non-zero biases and norm
weights, tied and untied heads), a column per command. Adding a family adds a row: what a
command expects of a family comes from the family's data (``lmexpand/checkpoint/families.py``:
its residual-branch ends and norm zero point, its MoE targets or the reason it has none, its
logit post-processing), never from the family's name. Exactness checks print max |d|.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmexpand.checkpoint import CheckpointReader, detect_family
from lmexpand.checkpoint.families import logit_postprocessing
from lmexpand.cli import main
from lmexpand.compose.loading import load_model
from tests.conftest import GENERAL_TEXT
from tests.test_depth_upscale import assert_layers_follow_map
from tests.test_llama_pro import max_abs_diff, padded_batch
from tests.test_train import TEMPLATE
from tests.tiny import TINY_FAMILIES, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
T4 = ROOT / "bench" / ".peers" / "transformers4" / "bin" / "python"
MERGEKIT_PY = ROOT / "bench" / ".peers" / "mergekit" / "bin" / "python"
MERGE_METHODS = ("linear", "slerp", "ties")  # one per kind: weighted sum, interpolation, sparsified task vectors
MOE_TOL = 1e-5  # experts are copies: only fp32 rounding of the weighted sum differs
VARIANTS = sorted(TINY_FAMILIES)
# the second member of compositions: a plain tiny Llama with the same tokenizer
PARTNER = "llama"


class Case:
    """One cell: a family's tiny model, a scratch directory, the CLI."""

    def __init__(self, variant: str, root: Path, tmp: Path, capsys, cache: dict, data: Path):
        self.variant, self.root, self.tmp, self.capsys, self.cache, self.data = variant, root, tmp, capsys, cache, data
        self.src = build_tiny_model(variant, root / variant)
        self.config = json.loads((self.src / "config.json").read_text())
        self.family = detect_family(self.config)

    def cli(self, *args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *args) -> str:
        code, out, err = self.cli(*args)
        assert code == 0, err
        return out

    def report(self, line: str) -> None:
        """Print a measured value (past capsys, which the CLI calls read)."""
        with self.capsys.disabled():
            print(line)

    def partner(self) -> Path:
        return build_tiny_model(PARTNER, self.root / PARTNER)

    def expanded(self) -> Path:
        """The family's model + 2 LLaMA-Pro blocks (one per family, shared by the cells)."""
        key = (self.variant, "pro")
        if key not in self.cache:
            out = self.root / f"{self.variant}-pro"
            if not out.exists():
                self.ok("surgery", "llama-pro", self.src, out, "--add", 2)
            self.cache[key] = out
        return self.cache[key]

    def trained(self) -> Path:
        key = (self.variant, "trained")
        if key not in self.cache:
            run = self.root / f"{self.variant}-run"
            if not (run / "model").exists():
                self.ok("-q", "train", "--model", self.expanded(), "--data", self.data, "--template", TEMPLATE,
                        "--out", run, "--seq-len", "32", "--batch-size", "2", "--max-steps", "4", "--lr", "1e-2",
                        "--warmup-steps", "0", "--val-every", "0", "--no-tensorboard")
            self.cache[key] = run / "model"
        return self.cache[key]


COMMANDS: dict[str, Callable[[Case], None]] = {}


def command(name: str):
    def register(fn: Callable[[Case], None]) -> Callable[[Case], None]:
        assert name not in COMMANDS, name
        COMMANDS[name] = fn
        return fn
    return register


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def greedy(model, ids, mask, n: int = 12) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                              eos_token_id=None, use_cache=True)


def stock(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


# -- the columns ------------------------------------------------------------------------------
@command("inspect")
def check_inspect(c: Case) -> None:
    s = json.loads(c.ok("inspect", c.src, "--json"))
    assert s["family"] == c.family.name and s["num_layers"] == 4
    assert s["per_layer_parameters"] == [c.family.layer_parameters(c.config)] * 4
    assert s["tie_word_embeddings"] == bool(c.config.get("tie_word_embeddings"))
    assert s["total_parameters"] == sum(p.numel() for p in stock(c.src).state_dict().values()) - (
        c.config["vocab_size"] * c.config["hidden_size"] if s["tie_word_embeddings"] else 0)


@command("llama-pro")
def check_llama_pro(c: Case) -> None:
    out = c.expanded()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg[c.family.num_layers_key] == 6
    layer_map = json.loads((out / "lmexpand.json").read_text())["layer_map"]
    for key in c.family.per_layer_keys:  # per-layer lists follow the layer map
        if isinstance(c.config.get(key), list):
            sources = [e if isinstance(e, int) else int(e.rsplit(" ", 1)[1]) for e in layer_map]
            assert cfg[key] == [c.config[key][k] for k in sources], key
    delta, ga, gb = max_abs_diff(c.src, out)
    c.report(f"{c.variant}: LLaMA-Pro +2 max |dlogit| fp32 = {delta}, cached greedy equal = {torch.equal(ga, gb)}")
    assert delta == 0.0 and torch.equal(ga, gb)
    # the new blocks: the family's branch ends at their zero point, everything else copied
    src, dst = CheckpointReader(c.src), CheckpointReader(out)
    set_to_identity = 0
    for t in dst:
        split = c.family.split_layer_name(t.name)
        if split is None or isinstance(layer_map[split[0]], int):
            continue
        offset = c.family.branch_end_offset(split[1])
        value = dst.get_tensor(t.name)
        if offset is None:
            copied = int(layer_map[split[0]].rsplit(" ", 1)[1])
            assert torch.equal(value, src.get_tensor(c.family.layer_name(copied, split[1]))), t.name
        else:
            assert torch.equal(value, torch.full_like(value, -offset)), t.name
            set_to_identity += 1
    assert set_to_identity >= 2 * 2


@command("upscale")
def check_upscale(c: Case) -> None:
    out = c.tmp / "dus"
    c.ok("surgery", "upscale", c.src, out, "--drop", 1)
    cfg = json.loads((out / "config.json").read_text())
    lineage = json.loads((out / "lmexpand.json").read_text())
    assert cfg[c.family.num_layers_key] == 6 and lineage["layer_map"] == [0, 1, 2, 1, 2, 3]
    for key in c.family.per_layer_keys:
        if isinstance(c.config.get(key), list):
            assert cfg[key] == [c.config[key][k] for k in (0, 1, 2, 1, 2, 3)], key
    assert_layers_follow_map(out, {"source": c.src})  # bitwise
    model = stock(out)
    ids, mask = padded_batch(model.config.vocab_size)
    delta = (logits(model, ids, mask) - logits(stock(c.src), ids, mask)).abs().max().item()
    c.report(f"{c.variant}: SOLAR --drop 1 layer map bitwise; max |dlogit| vs base {delta:.3g} (not function-preserving)")
    assert greedy(model, ids, mask, 4).shape == (3, 20)


@command("moe")
def check_moe(c: Case) -> None:
    out = c.tmp / "moe"
    if not c.family.moe_copies:
        code, _, err = c.cli("surgery", "moe", c.src, out, "--experts", 4)
        c.report(f"{c.variant}: MoE refused: {err.strip()}")
        assert code == 2 and "Traceback" not in err and c.family.moe_refusal in " ".join(err.split())
        assert not out.exists()
        return
    c.ok("surgery", "moe", c.src, out, "--experts", 4, "--top-k", 2)
    target = json.loads((out / "config.json").read_text())["architectures"][0]
    delta, ga, gb = max_abs_diff(c.src, out)
    c.report(f"{c.variant} -> {target} E=4 top-2: max |dlogit| fp32 = {delta:.3g}")
    assert delta <= MOE_TOL and torch.equal(ga, gb)
    assert type(stock(out)).__name__ == target  # a stock class, no remote code
    assert main(["verify", str(out)]) == 0
    fine = c.tmp / "fine"
    if c.family.moe_fine_grained is None:
        code, _, err = c.cli("surgery", "moe", c.src, fine, "--segments", 4)
        assert code == 2 and "--segments" in err and not fine.exists()
        return
    c.ok("surgery", "moe", c.src, fine, "--segments", 4, "--shared", 1, "--replicas", 3)
    delta, ga, gb = max_abs_diff(c.src, fine)
    c.report(f"{c.variant} -> fine-grained M=4 S=1 R=3: max |dlogit| fp32 = {delta:.3g}")
    assert delta <= MOE_TOL and torch.equal(ga, gb)


@command("calm")
def check_calm(c: Case) -> None:
    out = c.tmp / "calm"
    c.ok("surgery", "calm", c.src, c.partner(), out, "--every", 2)
    model, base = load_model(out).eval(), stock(c.src)
    ids, mask = padded_batch(320)
    delta = (logits(model, ids, mask) - logits(base, ids, mask)).abs().max().item()
    c.report(f"{c.variant}: CALM anchor + llama bridges at init max |dlogit| = {delta}")
    assert delta == 0.0 and torch.equal(greedy(model, ids, mask), greedy(base, ids, mask))


@command("logit-compositions")
def check_logit_compositions(c: Case) -> None:
    partner = c.partner()
    ids, mask = padded_batch(320)
    base = stock(c.src)
    c.ok("surgery", "proxy-tune", c.src, partner, partner, c.tmp / "proxy", "--alpha", "0")
    proxy = load_model(c.tmp / "proxy").eval()
    d0 = (logits(proxy, ids, mask) - logits(base, ids, mask)).abs().max().item()
    c.report(f"{c.variant}: proxy-tune alpha 0 vs base max |d| = {d0}")
    assert d0 == 0.0 and torch.equal(greedy(proxy, ids, mask), greedy(base, ids, mask))
    code, _, err = c.cli("surgery", "logit-sum", c.src, partner, c.tmp / "sum")
    if logit_postprocessing(c.config) != (1.0, None):  # a trained plain head would skip it: refused
        assert code == 2 and "post-processed" in err and not (c.tmp / "sum").exists()
        return
    assert code == 0, err
    want = logits(base, ids, mask) + logits(stock(partner), ids, mask)
    d = (logits(load_model(c.tmp / "sum").eval(), ids, mask) - want).abs()[mask.bool()].max().item()
    c.report(f"{c.variant}: logit sum vs own logits z_1 + z_2 max |d| = {d:.3g}")
    assert d <= 1e-5
    c.ok("surgery", "contrastive", c.src, partner, c.tmp / "contrastive", "--beta", "0")
    out = logits(load_model(c.tmp / "contrastive").eval(), ids, mask)
    plausible = torch.isfinite(out) & mask.bool().unsqueeze(-1)
    d = (out - logits(base, ids, mask))[plausible].abs().max().item()
    c.report(f"{c.variant}: contrastive beta 0 vs base on plausible tokens max |d| = {d}")
    assert d == 0.0 and torch.equal(greedy(load_model(c.tmp / "contrastive").eval(), ids, mask), greedy(base, ids, mask))


@command("co-llm")
def check_co_llm(c: Case) -> None:
    out = c.tmp / "co"
    c.ok("surgery", "co-llm", c.src, c.partner(), out, "--threshold", "1")
    model, base = load_model(out).eval(), stock(c.src)
    ids, mask = padded_batch(320)
    with torch.no_grad():
        z_base, _ = model._base(ids, mask, None, None)
    delta = (z_base.float() - logits(base, ids, mask)).abs().max().item()
    c.report(f"{c.variant}: Co-LLM base logits vs the base model max |d| = {delta}; threshold 1 generates the base's")
    assert delta == 0.0 and torch.equal(greedy(model, ids, mask), greedy(base, ids, mask))


@command("deep-fusion")
def check_deep_fusion(c: Case) -> None:
    from tests.test_deep_fusion import no_markers, with_spans

    out = c.tmp / "df"
    c.ok("surgery", "deep-fusion", c.src, out, "--open", "(", "--close", ")")
    model, base = load_model(out).eval(), stock(c.src)
    for what, (ids, mask) in (("with spans", with_spans()), ("no markers", no_markers())):
        delta = (logits(model, ids, mask) - logits(base, ids, mask)).abs().max().item()
        c.report(f"{c.variant}: deep fusion at init, {what}: max |dlogit| = {delta}")
        assert delta == 0.0 and torch.equal(greedy(model, ids, mask), greedy(base, ids, mask))
    names = {t.name for t in CheckpointReader(out, need_family=False)}
    assert {f"experts.0.{p}.weight" for p in c.family.mlp_projections} <= names


def _mergekit_defines(family_class: str) -> bool:
    archs = list((MERGEKIT_PY.parents[1] / "lib").glob("python3*/site-packages/mergekit/_data/architectures/*.json"))
    return any(f'"{family_class}"' in p.read_text() for p in archs)


@command("merge")
def check_merge(c: Case) -> None:
    """Bitwise equal to mergekit 0.1.5 where mergekit defines the family; its definition may
    leave out tensors the config turns on (Gemma-2/OLMo-2 attention biases): it writes a model
    without them, lmexpand merges them too. Elsewhere: a linear merge of a model with itself
    returns the model bitwise."""
    import yaml

    from tests.test_merge import _bits, _configs, _tensors, _variants, run_mergekit

    if not (MERGEKIT_PY.exists() and _mergekit_defines(c.family.causal_lm_class)):
        import shutil

        shutil.copytree(c.src, c.tmp / "copy")
        cfg = {"merge_method": "linear", "dtype": "float32",
               "models": [{"model": str(c.src), "parameters": {"weight": 1.0}},
                          {"model": str(c.tmp / "copy"), "parameters": {"weight": 1.0}}]}
        (c.tmp / "self.yaml").write_text(yaml.safe_dump(cfg))
        c.ok("merge", c.tmp / "self.yaml", c.tmp / "self")
        ours, src = _tensors(c.tmp / "self"), _tensors(c.src)
        assert sorted(ours) == sorted(src) and all(torch.equal(ours[k], src[k]) for k in src)
        c.report(f"{c.variant}: no mergekit definition of {c.family.causal_lm_class} to compare with; a self-merge "
                 "returns the model bitwise")
        return
    models = _variants(c.tmp, c.variant, "bfloat16", src=c.src)
    work = c.tmp / "cmp"
    work.mkdir()
    jobs = run_mergekit({name: job for name, job in _configs(models).items() if name in MERGE_METHODS}, work)
    for config, theirs_dir, seed in jobs:
        name = Path(config).stem
        # (ties: mergekit's argsort for magnitudes that tie at the threshold, --match-mergekit)
        c.ok("merge", config, work / f"lx-{name}", *(["--seed", str(seed)] if seed is not None else []),
             *(["--match-mergekit"] if name == "ties" else []))
        ours, theirs = _tensors(work / f"lx-{name}"), _tensors(Path(theirs_dir))
        assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))[:3]
        extra = sorted(set(ours) - set(theirs))
        # what mergekit leaves out: only tensors the family's config flags turn on
        assert all(c.family.split_layer_name(n) and c.family.split_layer_name(n)[1] in c.family.optional_layer_tensors
                   for n in extra), extra[:3]
        differ = [k for k in theirs if not torch.equal(_bits(ours[k]), _bits(theirs[k]))]
        c.report(f"{c.variant}/bfloat16/{name}: {len(theirs)} tensors, {len(differ)} differ from mergekit"
                 + (f" (first {differ[0]})" if differ else " (bitwise equal)")
                 + (f"; {len(extra)} more that mergekit's definition lacks ({extra[0]}, ...)" if extra else ""))
        assert not differ


@command("train")
def check_train(c: Case) -> None:
    from lmexpand.train.loss import CausalLMLoss

    pro = c.expanded()
    # the fused loss computes the model's own logits (soft-capping and scaling included)
    model = stock(pro)
    ids, mask = padded_batch(model.config.vocab_size)
    fused, _ = CausalLMLoss(model)(ids, mask)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    own = torch.nn.functional.cross_entropy(logits(model, ids, mask)[:, :-1].reshape(-1, model.config.vocab_size),
                                            labels.reshape(-1), ignore_index=-100)
    c.report(f"{c.variant}: fused training loss {fused.item():.6f} vs the model's own logits {own.item():.6f}")
    assert abs(fused.item() - own.item()) <= 1e-5
    new = set(json.loads((pro / "lmexpand.json").read_text())["new_parameters"])
    src, out = CheckpointReader(pro), CheckpointReader(c.trained())
    assert set(src.tensors) == set(out.tensors)
    changed = {n for n in src.tensors if not torch.equal(src.get_tensor(n), out.get_tensor(n))}
    c.report(f"{c.variant}: {len(changed)} of {len(new)} new tensors moved in 4 steps; frozen tensors bitwise equal")
    assert changed and changed <= new


@command("eval")
def check_eval(c: Case) -> None:
    out = c.tmp / "eval"
    c.ok("eval", c.expanded(), "--data", f"general={GENERAL_TEXT}", "--base", c.src, "--out", out,
         "--max-tokens", "256", "--seq-len", "32", "--no-samples")
    results = json.loads((out / "results.json").read_text())
    c.report(f"{c.variant}: eval of LLaMA-Pro vs base: {results['function_preservation']}")
    assert results["function_preservation"]["max_abs_dlogit"] == 0.0
    ppl = [row["general"]["ppl"] for row in results["perplexity"].values()]
    assert len(ppl) == 2 and ppl[0] == ppl[1]  # exact at init: the same perplexity as the base


@command("export")
def check_export(c: Case) -> None:
    trained = c.trained()
    out = c.tmp / "export"
    c.ok("-q", "export", trained, out)
    assert main(["verify", str(out)]) == 0
    ids = torch.arange(3, 3 + 24).remainder(320).unsqueeze(0)
    want = stock(trained)(ids).logits.detach()
    exported = stock(out)
    assert type(exported).__name__ == c.family.causal_lm_class
    d5 = (exported(ids).logits.detach() - want).abs().max().item()
    c.report(f"{c.variant}: export read by transformers 5 max |d| = {d5}")
    assert d5 == 0.0
    if not T4.exists():
        return
    r = subprocess.run([str(T4), str(ROOT / "tests" / "peers" / "transformers4_logits.py"), str(c.tmp), str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((c.tmp / "0.json").read_text())
    d4 = (torch.load(c.tmp / "0.pt") - want).abs().max().item()
    c.report(f"{c.variant}: export read by transformers 4.57 ({info['class']}) max |d| = {d4:.3g}")
    assert info["class"] == c.family.causal_lm_class and d4 <= 1e-5


@command("verify")
def check_verify(c: Case) -> None:
    code, _, err = c.cli("verify", c.expanded())
    assert code == 0, err
    # a tensor of the wrong shape is named
    broken = c.tmp / "broken"
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(c.expanded(), broken)
    state = load_file(broken / "model.safetensors")
    name = c.family.layer_name(1, c.family.layer_tensors[0])
    state[name] = torch.zeros(3)
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    code, out, err = c.cli("verify", broken)
    assert code != 0 and name in out + err


# -- the matrix -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def matrix_cache() -> dict:
    return {}


@pytest.mark.parametrize("name", list(COMMANDS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_family_command(variant, name, tiny_root, tmp_path, capsys, matrix_cache, gsm8k_small):
    COMMANDS[name](Case(variant, tiny_root, tmp_path, capsys, matrix_cache, gsm8k_small))


# checks that cover several registered surgeries
COVERED_BY = {"logit-compositions": ("logit-sum", "proxy-tune", "contrastive")}


def test_every_registered_surgery_and_family_is_in_the_matrix():
    """A new surgery (``@register_method``) or family (``FAMILIES``) is covered by adding its
    check above or its tiny row in tests/tiny.py; this fails until it is."""
    import transformers

    from lmexpand.checkpoint.families import FAMILIES
    from lmexpand.expand.registry import load_methods

    covered = set(COMMANDS) | {m for ms in COVERED_BY.values() for m in ms}
    missing = sorted(set(load_methods()) - covered)
    assert not missing, f"add a @command check for {missing} to tests/test_families.py"
    rows = {getattr(transformers, cls).model_type for cls, _ in TINY_FAMILIES.values()}
    assert set(FAMILIES) <= rows, f"add a tiny model of {sorted(set(FAMILIES) - rows)} to tests/tiny.py"


def test_docs_table_has_a_row_per_family():
    """README and docs/families.md carry the same family x command table, a row per family."""
    from lmexpand.checkpoint.families import FAMILIES

    def table(text: str) -> list[str]:
        start = text.index("| family (`model_type`)")
        return text[start:text.index("\n\n", start)].splitlines()

    doc, readme = table((ROOT / "docs" / "families.md").read_text()), table((ROOT / "README.md").read_text())
    assert doc == readme
    rows = {line.split("|")[1].strip() for line in doc[2:]}
    assert rows == {f"{f.name} (`{f.model_types[0]}`)" for f in FAMILIES.values()}
    assert {v for v in VARIANTS if v in FAMILIES} == set(FAMILIES)  # a tiny model (a matrix row) per family
