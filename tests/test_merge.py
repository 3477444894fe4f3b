"""Weight merging: bitwise equality with mergekit 0.1.5 (when installed under bench/.peers),
exact properties of the methods, and the checks before any value is read."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lmexpand.cli import main

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_PY = ROOT / "bench" / ".peers" / "mergekit" / "bin" / "python"
FAMILIES = ["llama", "qwen2", "llama-tied"]  # untied head; q/k/v biases; tied embeddings
DTYPES = ["bfloat16", "float32"]
# every other supported family, in bf16 (the dtype whose rounding is least forgiving)
MORE_FAMILIES = [("mistral", "bfloat16"), ("qwen3", "bfloat16")]


def _variants(root: Path, family: str, dtype: str, src: Path | None = None) -> dict[str, Path]:
    """base + three fine-tune-like variants (base + small seeded noise), saved in ``dtype``;
    from a tiny model of ``family``, or from ``src``."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny import build_tiny_model

    src = src or build_tiny_model(family, root / f"{family}-src")
    out = {}
    for i, name in enumerate(["base", "a", "b", "c"]):
        path = root / f"{family}-{dtype}-{name}"
        out[name] = path
        if path.exists():
            continue
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        if name != "base":
            g = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g) * p.abs().mean())
        model.to(getattr(torch, dtype)).save_pretrained(path)
        for f in src.iterdir():
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, path / f.name)
    return out


def _configs(m: dict[str, Path]) -> dict[str, tuple[dict, int | None]]:
    """One configuration per method, with filters, gradients and per-model parameters."""
    base, a, b, c = (str(m[k]) for k in ("base", "a", "b", "c"))
    grad_weight = [{"filter": "self_attn", "value": 0.7}, {"value": [0.2, 0.5, 0.9]}]
    cfg = {
        "linear": ({"merge_method": "linear", "models": [
            {"model": a, "parameters": {"weight": [0.2, 0.8]}},
            {"model": b, "parameters": {"weight": grad_weight}},
            {"model": c, "parameters": {"weight": 0.35}}]}, None),
        "linear-slices": ({"merge_method": "linear", "parameters": {"weight": 0.5, "normalize": False},
                           "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [1, 3]}]},
            {"sources": [{"model": a, "layer_range": [2, 4], "parameters": {"weight": [1.0, 0.0]}},
                         {"model": b, "layer_range": [2, 4]}], "parameters": {"weight": 0.25}}]}, None),
        "task_arithmetic": ({"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": [1.0, 0.2]}}],
            "parameters": {"lambda": 0.9}}, None),
        "slerp": ({"merge_method": "slerp", "base_model": base, "models": [{"model": base}, {"model": a}],
                   "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}}, None),
        "nuslerp": ({"merge_method": "nuslerp", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": [0.7, 0.4]}}]}, None),
        "nuslerp-rows": ({"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                          "models": [{"model": a, "parameters": {"weight": 0.3}},
                                     {"model": b, "parameters": {"weight": 0.6}}]}, None),
        "ties": ({"merge_method": "ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
            {"model": b, "parameters": {"weight": grad_weight, "density": [0.3, 0.9]}}]}, None),
        "dare_ties": ({"merge_method": "dare_ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.5, "density": 0.6}},
            {"model": b, "parameters": {"weight": [0.3, 0.7], "density": [0.3, 0.8]}}]}, 7),
        "dare_linear": ({"merge_method": "dare_linear", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.5, "density": 0.7}},
            {"model": b, "parameters": {"weight": 0.5, "density": 0.4}}]}, 11),
        "breadcrumbs": ({"merge_method": "breadcrumbs", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
            {"model": b, "parameters": {"weight": 0.5, "density": 0.6}}]}, None),
        "breadcrumbs_ties": ({"merge_method": "breadcrumbs_ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
            {"model": b, "parameters": {"weight": 0.5, "density": 0.6}}]}, None),
        "della": ({"merge_method": "della", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}},
            {"model": b, "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.2}}]}, 3),
        "della_linear": ({"merge_method": "della_linear", "base_model": base, "parameters": {"lambda": 1.1},
                          "models": [{"model": a, "parameters": {"weight": 0.4, "density": 0.5}},
                                     {"model": b, "parameters": {"weight": 0.6, "density": 0.5}}]}, 5),
        "model_stock": ({"merge_method": "model_stock", "base_model": base,
                         "models": [{"model": a}, {"model": b}, {"model": c}]}, None),
        "multislerp": ({"merge_method": "multislerp", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": [0.2, 0.8]}}, {"model": b, "parameters": {"weight": grad_weight}},
            {"model": c, "parameters": {"weight": 0.4}}]}, None),
        "multislerp-nobase": ({"merge_method": "multislerp", "parameters": {"normalize_weights": False},
                               "models": [{"model": a, "parameters": {"weight": 0.3}},
                                          {"model": b, "parameters": {"weight": 0.7}}]}, None),
        "karcher": ({"merge_method": "karcher", "parameters": {"max_iter": 6},
                     "models": [{"model": a}, {"model": b}, {"model": c}]}, None),
        "sce": ({"merge_method": "sce", "base_model": base, "parameters": {"select_topk": [0.3, 0.9]},
                 "models": [{"model": a}, {"model": b}, {"model": c}]}, None),
        "nearswap": ({"merge_method": "nearswap", "base_model": base, "models": [{"model": base}, {"model": a}],
                      "parameters": {"t": [{"filter": "mlp", "value": [0.0001, 0.001]}, {"value": 0.0005}]}}, None),
        "arcee_fusion": ({"merge_method": "arcee_fusion", "base_model": base,
                          "models": [{"model": base}, {"model": a}]}, 13),
        "ram": ({"merge_method": "ram", "base_model": base, "models": [{"model": a}, {"model": b}],
                 "parameters": {"epsilon": 0.0005}}, None),
        "ramplus_tl": ({"merge_method": "ramplus_tl", "base_model": base,
                        "parameters": {"r": 0.5, "alpha": 0.3, "epsilon": 0.001},
                        "models": [{"model": a}, {"model": b}, {"model": c}]}, None),
        # 4 layers out: with another count mergekit 0.1.5 cannot save a Qwen2 config (it does not
        # extend layer_types; lmexpand does)
        "passthrough": ({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": b, "layer_range": [1, 3],
                          "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]}]}, None),
    }
    return cfg


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _bits(t):
    return t.contiguous().view(-1).view(__import__("torch").uint8)


def _assert_bitwise(ours: Path, theirs: Path, what: str) -> None:
    import torch

    a, b = _tensors(ours), _tensors(theirs)
    assert sorted(a) == sorted(b), f"{what}: tensor names differ: {sorted(set(a) ^ set(b))[:4]}"
    worst = 0.0
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k} dtype/shape"
        worst = max(worst, (a[k].double() - b[k].double()).abs().max().item())
        if not torch.equal(_bits(a[k]), _bits(b[k])):
            raise AssertionError(f"{what}: {k} differs from mergekit (max |d| {worst:.3g})")
    print(f"{what}: {len(a)} tensors bitwise equal to mergekit (max |d| {worst:.3g})")


@pytest.fixture(scope="module")
def merge_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("merge")


NEEDS_MERGEKIT = pytest.mark.skipif(not MERGEKIT_PY.exists(),
                                    reason="mergekit is not installed (bash bench/peers/install_mergekit.sh)")


# methods whose result mergekit leaves undefined where equal magnitudes tie at the trimming
# threshold (its non-stable argsort): lmexpand's default selection is compared tie by tie, and
# `--match-mergekit` bitwise
TIE_DEFINED = ("ties",)


def _assert_differs_only_at_ties(ours: Path, theirs: Path, config: Path, what: str) -> None:
    """Per ties tensor and model: lmexpand's kept set has mergekit's count (k), and differs
    from the argsort's kept set only at magnitudes equal to the threshold; the outputs differ
    only where some model's task vector holds such a tie."""
    import torch

    from lmexpand.expand.merging import plan_from
    from lmexpand.expand.merging.methods.sparsify import top_k_mask
    from lmexpand.expand.plan import _torch_dtype

    a, b = _tensors(ours), _tensors(theirs)
    assert sorted(a) == sorted(b), f"{what}: tensor names differ"
    plan = plan_from(str(config))
    differing = ties_seen = 0
    for t in plan.tensors:
        op = t.op
        if not hasattr(op, "per_model"):
            assert torch.equal(_bits(a[t.name]), _bits(b[t.name])), f"{what}: {t.name} (not merged) differs"
            continue
        work = _torch_dtype(op.work_dtype)
        xs = [plan.readers[r.model].get_tensor(r.name).to(work) for r in op.inputs]
        tie_positions = torch.zeros(xs[0].numel(), dtype=torch.bool)
        for x, density in zip(xs[1:], dict(op.per_model)["density"]):
            w = (x - xs[0]).abs().reshape(-1)
            n = w.numel()
            if not 0 < density < 1:
                continue
            k = max(1, int(density * n))
            threshold = torch.kthvalue(w.float(), n - k + 1).values
            ours_kept = top_k_mask(w, k)
            argsort_kept = torch.zeros(n, dtype=torch.bool)
            argsort_kept[torch.argsort(w.float(), descending=True)[:k]] = True
            assert int(ours_kept.sum()) == int(argsort_kept.sum()) == k, f"{what}: {t.name}: kept count"
            assert bool((w[ours_kept ^ argsort_kept].float() == threshold).all()), \
                f"{what}: {t.name}: the kept sets differ away from the threshold"
            tie_positions |= w.float() == threshold
        ta, tb = a[t.name], b[t.name]
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, f"{what}: {t.name} dtype/shape"
        diff = (_bits(ta).reshape(ta.numel(), -1) != _bits(tb).reshape(tb.numel(), -1)).any(dim=1)
        assert not bool((diff & ~tie_positions).any()), \
            f"{what}: {t.name}: {int((diff & ~tie_positions).sum())} elements differ from mergekit away from a tie"
        differing += int(diff.sum())
        ties_seen += int(tie_positions.sum())
    for r in plan.readers:
        r.close()
    print(f"{what}: {len(a)} tensors; {differing} elements differ from mergekit, all at threshold ties "
          f"({ties_seen} elements at a model's threshold)")


def run_mergekit(configs: dict[str, tuple[dict, int | None]], work: Path) -> list[tuple[str, str, int | None]]:
    """Each ``name -> (configuration, seed)`` written to ``work/name.yaml`` and merged by mergekit
    0.1.5 into ``work/mk-name``, all in one process of its venv; returns (config path, mergekit
    output, seed) per configuration."""
    jobs = []
    for name, (cfg, seed) in configs.items():
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        jobs.append((str(path), str(work / f"mk-{name}"), seed))
    (work / "jobs.json").write_text(json.dumps(jobs))
    run = subprocess.run([str(MERGEKIT_PY), str(ROOT / "tests" / "peers" / "mergekit_runner.py"), str(work / "jobs.json")],
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    return jobs


def _compare_with_mergekit(m: dict[str, Path], work: Path, what: str, only: tuple[str, ...] = ()) -> None:
    """Every configuration of :func:`_configs` (or ``only`` those) through both tools; the
    methods of ``TIE_DEFINED`` once by default (ties only may differ) and once with
    ``--match-mergekit`` (bitwise)."""
    work.mkdir()
    jobs = run_mergekit({name: job for name, job in _configs(m).items() if not only or name in only}, work)
    for config, mk_out, seed in jobs:
        name = Path(config).stem
        ours = work / f"lx-{name}"
        args = ["merge", config, str(ours), "--threads", "2"] + (["--seed", str(seed)] if seed is not None else [])
        assert main(args) == 0, name
        if name in TIE_DEFINED:
            _assert_differs_only_at_ties(ours, Path(mk_out), Path(config), f"{what}/{name}")
            assert main(args[:2] + [str(ours) + "-match"] + args[3:] + ["--match-mergekit"]) == 0, name
            _assert_bitwise(Path(str(ours) + "-match"), Path(mk_out), f"{what}/{name} --match-mergekit")
        else:
            _assert_bitwise(ours, Path(mk_out), f"{what}/{name}")


@NEEDS_MERGEKIT
@pytest.mark.parametrize("family,dtype", [(f, d) for d in DTYPES for f in FAMILIES] + MORE_FAMILIES)
def test_bitwise_equal_to_mergekit(merge_root, family, dtype):
    """Every method both tools have, same configuration file, same seed: same bytes."""
    _compare_with_mergekit(_variants(merge_root, family, dtype), merge_root / f"cmp-{family}-{dtype}",
                           f"{family}/{dtype}")


def test_every_merge_method_is_compared_with_mergekit():
    """A new method (one file in expand/merging/methods/) is covered by adding its configuration
    to _configs: this fails until it is."""
    from lmexpand.expand.merging.methods import METHODS

    compared = {cfg["merge_method"] for cfg, _ in _configs({k: Path(k) for k in ("base", "a", "b", "c")}).values()}
    assert not set(METHODS) - compared, f"add a configuration for {sorted(set(METHODS) - compared)} to _configs"


@NEEDS_MERGEKIT
def test_arcee_fusion_sampled_quantiles_equal_mergekit(tmp_path):
    """arcee_fusion takes its quantiles from 10^6 random indices in tensors larger than that:
    one draw per such tensor from the seeded generator, in mergekit's order."""
    from tests.tiny import build_tiny_model

    src = build_tiny_model("llama", tmp_path / "wide-src", intermediate_size=16400, num_hidden_layers=2)
    m = _variants(tmp_path, "wide", "bfloat16", src=src)
    _compare_with_mergekit(m, tmp_path / "cmp", "wide/bfloat16", only=("arcee_fusion",))


# SmolLM2's layers kept for the real-model comparison: both ends and two from the middle
SMOLLM2_LAYERS = (0, 1, 10, 19, 28, 29)


def _real_layers(src: Path, dst: Path, layers: tuple[int, ...]) -> Path:
    """``src`` with only ``layers`` (renumbered 0..n-1): its real weights, shapes, tied
    embeddings, norms and tokenizer, and ``num_hidden_layers`` n."""
    import re

    from safetensors.torch import save_file

    tensors, keep = {}, {old: new for new, old in enumerate(layers)}
    for name, t in _tensors(src).items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m is None:
            tensors[name] = t
        elif int(m[1]) in keep:
            tensors[f"model.layers.{keep[int(m[1])]}.{m[2]}"] = t
    dst.mkdir(parents=True)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = len(layers)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.slow
@NEEDS_MERGEKIT
def test_bitwise_equal_to_mergekit_on_smollm2(smollm2, tmp_path):
    """The same on the embedded SmolLM2 (tied embeddings, real weights) in bf16, for the
    methods users run most: deterministic, sorting and random ones. Six of its 30 layers
    (SMOLLM2_LAYERS): every tensor shape and the tied 49,152-row embedding, real values from
    both ends and the middle of the stack, at a fifth of the layers' bytes (the other layers
    are more tensors of the same shapes through the same code)."""
    src = _real_layers(smollm2, tmp_path / "smollm2-src", SMOLLM2_LAYERS)
    m = _variants(tmp_path, "smollm2", "bfloat16", src=src)
    _compare_with_mergekit(m, tmp_path / "cmp", "smollm2/bfloat16",
                           only=("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "model_stock"))


def _write(tmp: Path, cfg: dict, name: str = "merge.yaml") -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _vocab_variants(root: Path, m: dict[str, Path]) -> dict[str, Path]:
    """Two fine-tunes whose vocabularies differ from the base's: ``chat`` (from a) adds two
    special tokens, ``tool`` (from b) two plain ones; their new embedding and head rows are
    seeded noise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for name, src, add, special in (("chat", m["a"], ["<|im_start|>", "<|im_end|>"], True),
                                    ("tool", m["b"], ["photosynthesis", "<tool>"], False)):
        path = src.parent / f"{src.name}-{name}"
        out[name] = path
        if path.exists():
            continue
        tok = AutoTokenizer.from_pretrained(src)
        if special:
            tok.add_special_tokens({"additional_special_tokens": add})
        else:
            tok.add_tokens(add)
        model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        g = torch.Generator().manual_seed(17)
        with torch.no_grad():
            for w in {id(x): x for x in (model.get_input_embeddings().weight,
                                         model.get_output_embeddings().weight)}.values():
                w[old:] = (0.05 * torch.randn(w[old:].shape, generator=g)).to(w.dtype)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return out


def _assert_rows_equal_by_token(ours: Path, theirs: Path, what: str) -> None:
    """Both outputs have one vocabulary (as sets of tokens); every tensor is bitwise equal,
    the vocabulary tensors row by row matched by token string (mergekit numbers the tokens it
    adds in an order that changes from run to run), padding rows by position (bitwise when
    both number the tokens alike; else to rounding, as their mean sums rows in another order)."""
    import torch
    from transformers import AutoTokenizer

    vo = AutoTokenizer.from_pretrained(ours).get_vocab()
    vt = AutoTokenizer.from_pretrained(theirs).get_vocab()
    assert set(vo) == set(vt), f"{what}: vocabularies differ: {sorted(set(vo) ^ set(vt))[:5]}"
    co, ct = (json.loads((p / "config.json").read_text()) for p in (ours, theirs))
    assert co["vocab_size"] == ct["vocab_size"], f"{what}: vocab_size {co['vocab_size']} vs {ct['vocab_size']}"
    a, b = _tensors(ours), _tensors(theirs)
    assert sorted(a) == sorted(b), f"{what}: tensor names differ: {sorted(set(a) ^ set(b))[:4]}"
    n, rows = len(vo), 0
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k} dtype/shape"
        if "embed_tokens" in k or k == "lm_head.weight":
            order_o = torch.tensor([vo[t] for t in sorted(vo)])
            order_t = torch.tensor([vt[t] for t in sorted(vo)])
            assert torch.equal(_bits(a[k][order_o]), _bits(b[k][order_t])), f"{what}: {k}: a token's row differs"
            if vo == vt:  # same numbering: the padding rows (a mean over the rows) are bitwise too
                assert torch.equal(_bits(a[k][n:]), _bits(b[k][n:])), f"{what}: {k}: padding rows differ"
            else:  # the mean sums the rows in another order
                torch.testing.assert_close(a[k][n:], b[k][n:], rtol=1e-2 if a[k].dtype == torch.bfloat16 else 1e-5,
                                           atol=1e-6, msg=f"{what}: {k}: padding rows differ")
            rows += a[k].shape[0]
        else:
            assert torch.equal(_bits(a[k]), _bits(b[k])), f"{what}: {k} differs from mergekit"
    print(f"{what}: {len(a)} tensors bitwise equal to mergekit ({rows} vocabulary rows matched by token; "
          f"{n} tokens, vocab_size {co['vocab_size']})")


@NEEDS_MERGEKIT
@pytest.mark.parametrize("family,dtype", [("llama", "bfloat16"), ("llama-tied", "float32")])
def test_vocabulary_union_equals_mergekit(merge_root, tmp_path, family, dtype):
    """tokenizer_source union / base / a model and the tokenizer: section (per-token sources,
    padding) over fine-tunes with different added tokens: mergekit's rows, token by token."""
    m = _variants(merge_root, family, dtype)
    v = _vocab_variants(merge_root, m)
    base, chat, tool = str(m["base"]), str(v["chat"]), str(v["tool"])
    configs = {
        "union-linear": {"merge_method": "linear", "tokenizer_source": "union", "models": [
            {"model": chat, "parameters": {"weight": 0.6}}, {"model": tool, "parameters": {"weight": 0.4}}]},
        "union-tokens": {"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": chat, "parameters": {"weight": 0.7}}, {"model": tool, "parameters": {"weight": 0.5}}],
            "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
                "<|im_start|>": {"source": {"kind": "model_token", "model": tool, "token": "</s>"}, "force": True},
                "<|im_end|>": {"source": base},
                "<new>": {"source": {"kind": "zero"}}}}},
        "base-source": {"merge_method": "task_arithmetic", "base_model": base, "tokenizer_source": "base",
                        "models": [{"model": chat, "parameters": {"weight": 0.5}},
                                   {"model": tool, "parameters": {"weight": 0.5}}]},
        "model-source": {"merge_method": "slerp", "base_model": base, "tokenizer_source": chat,
                         "parameters": {"t": 0.3}, "models": [{"model": base}, {"model": chat}]},
    }
    configs["union-tokens"]["tokenizer"]["tokens"]["<|im_end|>"] = {"source": chat}  # base lacks it
    for config, mk_out, _ in run_mergekit({name: (cfg, None) for name, cfg in configs.items()}, tmp_path):
        name = Path(config).stem
        ours = tmp_path / f"lx-{name}"
        assert main(["merge", config, str(ours), "--threads", "2"]) == 0, name
        _assert_rows_equal_by_token(ours, Path(mk_out), f"{family}/{dtype}/{name}")


def test_vocabulary_union_output_loads_and_keeps_each_models_tokens(merge_root, tmp_path):
    """Without a peer: the union output loads in transformers with every model's tokens; a
    token only one model has keeps that model's rows exactly (passthrough of the tokens it
    owns); identical tokenizers under tokenizer_source: base give the bytes of a plain merge."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = _variants(merge_root, "llama", "float32")
    v = _vocab_variants(merge_root, m)
    chat, tool = str(v["chat"]), str(v["tool"])
    cfg = {"merge_method": "linear", "tokenizer_source": "union", "models": [
        {"model": chat, "parameters": {"weight": 0.5}}, {"model": tool, "parameters": {"weight": 0.5}}]}
    out = tmp_path / "union"
    assert main(["merge", str(_write(tmp_path, cfg)), str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    vocab = tok.get_vocab()
    for t in ("<|im_start|>", "<|im_end|>", "photosynthesis", "<tool>"):
        assert t in vocab, t
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(vocab) == model.config.vocab_size
    merged = _tensors(out)["model.embed_tokens.weight"]
    for path, t in ((chat, "<|im_start|>"), (tool, "photosynthesis")):
        src_vocab = AutoTokenizer.from_pretrained(path).get_vocab()
        src = _tensors(Path(path))["model.embed_tokens.weight"]
        # both inputs take the one owner's row; 0.5*x + 0.5*x == x exactly
        assert torch.equal(merged[vocab[t]], src[src_vocab[t]]), t
    ids = tok("photosynthesis <|im_start|>", return_tensors="pt").input_ids
    assert bool(torch.isfinite(model(ids).logits).all())

    plain = {"merge_method": "linear", "models": [{"model": str(m["a"]), "parameters": {"weight": 0.5}},
                                                  {"model": str(m["b"]), "parameters": {"weight": 0.5}}]}
    based = dict(plain, base_model=str(m["a"]), tokenizer_source="base")
    assert main(["merge", str(_write(tmp_path, plain, "plain.yaml")), str(tmp_path / "plain")]) == 0
    assert main(["merge", str(_write(tmp_path, based, "based.yaml")), str(tmp_path / "based")]) == 0
    for k, t in _tensors(tmp_path / "plain").items():
        assert torch.equal(_bits(t), _bits(_tensors(tmp_path / "based")[k])), k


@pytest.mark.parametrize("dtype", DTYPES)
def test_self_merge_returns_the_model(merge_root, tmp_path, dtype):
    """A model merged with (a copy of) itself, weights summing to 1, is returned bitwise by
    linear, slerp, task arithmetic, ties and model_stock."""
    import torch

    m = _variants(merge_root, "llama", dtype)
    a = m["a"]
    copies = []
    for i in range(3):
        c = tmp_path / f"copy{i}"
        shutil.copytree(a, c)
        copies.append(str(c))
    w = (0.3, 0.7) if dtype == "bfloat16" else (0.25, 0.75)  # fp32: weights whose sum is exact
    cases = {
        "linear": {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": w[0]}},
                                                        {"model": copies[0], "parameters": {"weight": w[1]}}]},
        "slerp": {"merge_method": "slerp", "base_model": str(a), "parameters": {"t": 0.5},
                  "models": [{"model": str(a)}, {"model": copies[0]}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(a),
                            "models": [{"model": c, "parameters": {"weight": 0.5}} for c in copies[:2]]},
        "ties": {"merge_method": "ties", "base_model": str(a),
                 "models": [{"model": c, "parameters": {"weight": 0.5, "density": 0.5}} for c in copies[:2]]},
        "model_stock": {"merge_method": "model_stock", "base_model": str(a),
                        "models": [{"model": c} for c in copies]},
    }
    want = _tensors(a)
    for name, cfg in cases.items():
        out = tmp_path / f"out-{name}"
        assert main(["merge", str(_write(tmp_path, cfg, f"{name}.yaml")), str(out)]) == 0
        got = _tensors(out)
        for k, v in want.items():
            assert torch.equal(_bits(got[k]), _bits(v)), f"{name}: {k} changed"


def test_weight_one_returns_that_model_and_loads_in_transformers(merge_root, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    m = _variants(merge_root, "qwen2", "bfloat16")
    cfg = {"merge_method": "linear", "models": [{"model": str(m["a"]), "parameters": {"weight": 0.0}},
                                                 {"model": str(m["b"]), "parameters": {"weight": 1.0}},
                                                 {"model": str(m["c"]), "parameters": {"weight": 0.0}}]}
    out = tmp_path / "out"
    assert main(["merge", str(_write(tmp_path, cfg)), str(out)]) == 0
    got, want = _tensors(out), _tensors(m["b"])
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(_bits(got[k]), _bits(want[k])), k
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(m["b"])
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    assert torch.equal(model(ids).logits, ref(ids).logits)
    lineage = json.loads((out / "lmexpand.json").read_text())
    assert lineage["method"] == "merge" and lineage["merge"]["method"] == "linear"
    assert len(lineage["sources"]) == 3 and all(s["sha256"] for s in lineage["sources"])
    assert "linear" in (out / "README.md").read_text()
    assert (out / "tokenizer.json").is_file()


def test_threads_and_seed_reproduce(merge_root, tmp_path):
    """The random methods give the same bytes with 1 or 4 worker threads for one seed, and
    other bytes for another seed."""
    import torch

    m = _variants(merge_root, "llama", "bfloat16")
    cfg, _ = _configs(m)["dare_ties"]
    path = _write(tmp_path, cfg)
    outs = {}
    for label, extra in (("t1", ["--threads", "1", "--seed", "5"]), ("t4", ["--threads", "4", "--seed", "5"]),
                         ("other", ["--threads", "4", "--seed", "6"])):
        outs[label] = tmp_path / label
        assert main(["merge", str(path), str(outs[label]), *extra]) == 0
    a, b, c = (_tensors(outs[k]) for k in ("t1", "t4", "other"))
    assert all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)
    assert not all(torch.equal(_bits(a[k]), _bits(c[k])) for k in a)
    assert json.loads((outs["t1"] / "lmexpand.json").read_text())["merge"]["seed"] == 5


def test_dry_run_reports_groups_and_memory(merge_root, tmp_path, capsys):
    m = _variants(merge_root, "llama", "bfloat16")
    cfg, _ = _configs(m)["ties"]
    out = tmp_path / "out"
    assert main(["merge", str(_write(tmp_path, cfg)), str(out), "--dry-run", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["merge_method"] == "ties" and s["tensors"] == 39 and s["memory_estimate_bytes"] > 0
    assert any("density=[0.5, 0.3]" in d for g in s["groups"].values() for d in g["ops"])
    assert not out.exists()


def test_recipe_surgery_merge(merge_root, tmp_path):
    """The same merge as a recipe's surgery, so merge -> eval is one job; the command's
    options are the surgery's arguments."""
    m = _variants(merge_root, "llama", "bfloat16")
    cfg, _ = _configs(m)["ties"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "surgery": {
        "method": "merge", "args": {"config": cfg, "match_mergekit": True, "device": "auto"}}}))
    assert main(["run", str(recipe)]) == 0
    ref = tmp_path / "ref"
    assert main(["merge", str(_write(tmp_path, cfg)), str(ref), "--match-mergekit"]) == 0
    a, b = _tensors(tmp_path / "w" / "expanded"), _tensors(ref)
    import torch

    assert all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def test_device_auto_and_cpu_give_the_same_bytes(merge_root, tmp_path):
    """--device auto is CUDA only when torch sees a GPU; on this CPU it is the CPU path, bitwise
    (a random method too: its generator lives on the device); the device is recorded."""
    import torch

    m = _variants(merge_root, "llama", "bfloat16")
    cfg, seed = _configs(m)["dare_ties"]
    path = _write(tmp_path, cfg)
    outs = {}
    for device in ("cpu", "auto"):
        outs[device] = tmp_path / device
        assert main(["merge", str(path), str(outs[device]), "--device", device, "--seed", str(seed)]) == 0
    lineage = json.loads((outs["auto"] / "lmexpand.json").read_text())
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert lineage["arguments"]["device"] == want and lineage["arguments"]["match_mergekit"] is False
    if want == "cpu":
        a, b = _tensors(outs["cpu"]), _tensors(outs["auto"])
        assert all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def test_magnitude_selection_is_exact_off_ties():
    """The O(n) selection keeps exactly k elements: all above the k-th largest magnitude, and
    of those equal to it the lowest indices; it differs from an argsort only at the threshold."""
    import torch

    from lmexpand.expand.merging.methods.sparsify import kth_largest, magnitude, top_k_mask

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        t = (torch.randn(300, 70, generator=g) * 1e-3).to(dtype)
        t[0, :40] = 0  # zeros: ties at the bottom
        t[1, :30] = t[2, 5]  # a block of equal magnitudes
        w = t.abs().reshape(-1)
        n = w.numel()
        for k in (1, 2, 29, n // 3, n // 2, n - 45, n - 1, n):
            value, above, equal = kth_largest(w, k) if k < n else (w.min(), 0, 0)
            if k < n:
                assert value == torch.kthvalue(w, n - k + 1).values, (dtype, k)
                assert above == int((w > value).sum()) and equal == int((w == value).sum())
            mask = top_k_mask(w, k)
            assert int(mask.sum()) == k, (dtype, k)
            if k < n:
                assert bool((w[mask] >= value).all()) and bool((w[~mask] <= value).all())
                ties = torch.nonzero(w == value).reshape(-1)
                kept = mask[ties]
                assert bool(kept[:int(kept.sum())].all()), "ties are kept by lowest index"
        a = magnitude(t, 0.4, False, match_mergekit=True)
        b = magnitude(t, 0.4, False)
        value = kth_largest(w, int(0.4 * n))[0]
        assert bool((w[(a != b).reshape(-1)] == value).all())


def test_replayed_bernoulli_draws_are_torchs_bits():
    """DARE's masks: the vectorized MT19937 replay gives torch.bernoulli(full_like(p))'s bits
    (fp32 and bf16, probabilities at 0, 1 and a hair from either, a seed past 2**32, draws in a
    row), and a draw of another kind afterwards continues the same stream."""
    import torch

    from lmexpand.expand.merging.methods.rng import RandomSource, replay_matches_torch

    assert replay_matches_torch()
    for seed in (0, 7, 2**40 + 3):
        g = torch.Generator().manual_seed(seed)
        src = RandomSource(seed)
        assert src._replay is not None
        for shape, p, dtype in (((1000, 33), 0.3, torch.float32), ((777,), 0.9, torch.bfloat16),
                                ((4, 5, 6), 0.0, torch.float32), ((300,), 1.0, torch.bfloat16),
                                ((5000,), 2**-24, torch.float32), ((5000,), 1 - 2**-24, torch.float32),
                                ((999,), 0.123456789, torch.bfloat16)):
            like = torch.empty(shape)
            ours = src.bernoulli_full(like, p, dtype)
            assert ours.dtype == dtype and ours.shape == like.shape
            assert torch.equal(ours, torch.bernoulli(torch.full_like(like, p, dtype=dtype), generator=g)), (seed, p)
        assert torch.equal(torch.randint(10**6, (50,), generator=src.torch), torch.randint(10**6, (50,), generator=g))
        p = torch.rand(64, generator=torch.Generator().manual_seed(1))
        assert torch.equal(src.bernoulli(p), torch.bernoulli(p, generator=g))


def test_streamed_task_arithmetic_is_chunk_invariant(monkeypatch):
    """ties and task_arithmetic run over chunks once the thresholds are known: any chunk size
    gives the same bytes (bf16, fp16, fp32; int8 masks, lambda, a model trimmed to nothing,
    rows equal to the base)."""
    import torch

    import lmexpand.expand.merging.methods.generalized_task_arithmetic as gta
    from lmexpand.expand.merging.methods import METHODS, Inputs

    g = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        base = (torch.randn(300, 129, generator=g) * 0.02).to(dtype)
        others = [base + (torch.randn(300, 129, generator=g) * 1e-3).to(dtype) for _ in range(3)]
        others[1][:5] = base[:5]
        for name, shared in (("ties", {"normalize": True, "rescale": False, "int8_mask": False, "lambda": 1.0}),
                             ("ties", {"normalize": True, "rescale": False, "int8_mask": True, "lambda": 0.7}),
                             ("task_arithmetic", {"normalize": False, "rescale": False, "int8_mask": False,
                                                  "lambda": 1.3})):
            per_model = {"weight": [0.3, 0.5, 0.4], "density": [0.5, 0.0, 0.9]}
            outs = []
            for chunk in (1 << 20, 4099, 1000):
                monkeypatch.setattr(gta, "CHUNK", chunk)
                outs.append(METHODS[name].fn(Inputs([base] + others, 0, per_model), **shared))
            assert all(torch.equal(_bits(outs[0]), _bits(o)) for o in outs[1:]), (dtype, name)


# -- bad inputs: exit 2, one paragraph, nothing written ---------------------------------------
def _bad_cases(m: dict[str, Path], tmp: Path) -> dict[str, tuple[dict, str]]:
    base, a, b = str(m["base"]), str(m["a"]), str(m["b"])
    return {
        "unknown method": ({"merge_method": "tiess", "models": [{"model": a}]}, "Available: "),
        "unknown parameter": ({"merge_method": "ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 1, "densty": 0.5}}]}, "'densty' is not a parameter of ties"),
        "missing weight": ({"merge_method": "linear", "models": [{"model": a}, {"model": b}]}, "weight of"),
        "density range": ({"merge_method": "ties", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 1, "density": 1.5}}]}, "outside [0, 1]"),
        "della epsilon": ({"merge_method": "della", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 1, "density": 0.9, "epsilon": 0.2}}]}, "epsilon"),
        "slerp three": ({"merge_method": "slerp", "base_model": base, "parameters": {"t": 0.5},
                         "models": [{"model": base}, {"model": a}, {"model": b}]}, "exactly 2 models"),
        "no base": ({"merge_method": "ties", "models": [{"model": a, "parameters": {"weight": 1}}]}, "base_model"),
        "duplicate": ({"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1}},
                                                            {"model": a, "parameters": {"weight": 1}}]},
                      "listed 2 times"),
        "weights sum to zero": ({"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1}},
                                                                      {"model": b, "parameters": {"weight": -1}}]},
                                "sum to 0"),
        "token source": ({"merge_method": "linear", "tokenizer": {"tokens": {"<t>": {"source": base}}},
                          "models": [{"model": a, "parameters": {"weight": 1}}]}, "not one of the merged models"),
        "both sources": ({"merge_method": "linear", "tokenizer_source": "base", "tokenizer": {"source": "union"},
                          "models": [{"model": a, "parameters": {"weight": 1}}]}, "disagree"),
        "missing model": ({"merge_method": "linear", "models": [{"model": str(tmp / "nope"),
                                                                 "parameters": {"weight": 1}}]}, "no such file"),
        "hub id": ({"merge_method": "linear", "models": [{"model": "org/some-model", "parameters": {"weight": 1}}]},
                   "never downloads"),
        "bad dtype": ({"merge_method": "linear", "dtype": "float8", "models": [{"model": a,
                                                                                "parameters": {"weight": 1}}]},
                      "not a dtype"),
        "nan weight": ({"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": float("nan")}}]},
                       "finite"),
        "both layouts": ({"merge_method": "linear", "models": [{"model": a}],
                          "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]}]}, "exactly one of"),
        "nearswap three": ({"merge_method": "nearswap", "base_model": base, "parameters": {"t": 0.001},
                            "models": [{"model": base}, {"model": a}, {"model": b}]}, "the base and one other"),
        "multislerp no weight": ({"merge_method": "multislerp", "models": [{"model": a}, {"model": b}]}, "weight of"),
        "arcee_fusion no base": ({"merge_method": "arcee_fusion", "models": [{"model": a}, {"model": b}]},
                                 "base_model"),
        "karcher max_iter": ({"merge_method": "karcher", "parameters": {"max_iter": -1},
                              "models": [{"model": a}, {"model": b}]}, "max_iter -1 is negative"),
        "sce weight": ({"merge_method": "sce", "base_model": base, "models": [
            {"model": a, "parameters": {"weight": 0.5}}]}, "'weight' is not a parameter of sce"),
        "layer range": ({"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [0, 9]}]}]},
                        "past it"),
    }


def test_bad_configs_exit_2_and_write_nothing(merge_root, tmp_path, capsys):
    m = _variants(merge_root, "llama", "bfloat16")
    for label, (cfg, needle) in _bad_cases(m, tmp_path).items():
        out = tmp_path / f"out-{label.replace(' ', '-')}"
        rc = main(["merge", str(_write(tmp_path, cfg, f"{label.replace(' ', '-')}.yaml")), str(out)])
        err = capsys.readouterr().err
        assert rc == 2, f"{label}: exit {rc}: {err}"
        assert needle in err, f"{label}: {err}"
        assert "Traceback" not in err and err.count("\n") <= 2, f"{label}: {err}"
        assert not out.exists(), label


def test_models_that_differ_are_refused_before_reading(merge_root, tmp_path, capsys):
    """Different families, sizes or vocabularies: exit 2 naming the tensor and both shapes."""
    from tests.tiny import build_tiny_model

    m = _variants(merge_root, "llama", "float32")
    wide = build_tiny_model("llama", tmp_path / "wide", intermediate_size=192)
    vocab = build_tiny_model("llama", tmp_path / "vocab", vocab_size=384)
    qwen = build_tiny_model("qwen2", tmp_path / "qwen")
    for other, needle in ((wide, "mlp.down_proj.weight: [64, 128]"), (vocab, "vocabularies differ"),
                          (qwen, "is a qwen2 model")):
        cfg = {"merge_method": "linear", "models": [{"model": str(m["a"]), "parameters": {"weight": 1}},
                                                     {"model": str(other), "parameters": {"weight": 1}}]}
        out = tmp_path / "out"
        assert main(["merge", str(_write(tmp_path, cfg)), str(out)]) == 2
        err = capsys.readouterr().err
        assert needle in err, err
        assert not out.exists()


def test_non_finite_result_is_an_error_naming_the_tensor(merge_root, tmp_path, capsys):
    """fp16 overflow (mergekit PR #704): a merge whose result is Inf stops, nothing written."""
    import torch
    from safetensors.torch import load_file, save_file

    m = _variants(merge_root, "llama", "float32")
    hot = tmp_path / "hot"
    shutil.copytree(m["a"], hot)
    sd = load_file(hot / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.full_like(sd["model.layers.1.mlp.up_proj.weight"], 70000.0)
    save_file(sd, hot / "model.safetensors", metadata={"format": "pt"})
    cfg = {"merge_method": "linear", "out_dtype": "float16", "parameters": {"normalize": False},
           "models": [{"model": str(hot), "parameters": {"weight": 1.0}},
                      {"model": str(m["b"]), "parameters": {"weight": 1.0}}]}
    out = tmp_path / "out"
    assert main(["merge", str(_write(tmp_path, cfg)), str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight" in err and "non-finite" in err
    assert not out.exists()


def test_greedy_soup_keeps_only_what_helps(merge_root, tmp_path):
    """Candidates: two mild fine-tunes and one broken (heavily noised) model. The soup ranks
    them alone, keeps an addition only when held-out perplexity does not rise, records every
    score, and writes exactly the uniform average it scored."""
    import torch
    from transformers import AutoModelForCausalLM

    m = _variants(merge_root, "llama", "float32")
    broken = tmp_path / "broken"
    model = AutoModelForCausalLM.from_pretrained(m["c"], dtype=torch.float32)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(3.0 * torch.randn(p.shape, generator=g) * p.abs().mean())
    model.save_pretrained(broken)
    for f in m["c"].glob("tokenizer*"):
        shutil.copy(f, broken / f.name)
    cfg = {"merge_method": "greedy_soup", "models": [{"model": str(m["a"])}, {"model": str(broken)},
                                                      {"model": str(m["b"])}]}
    data = ROOT / "recipes" / "data" / "openstax-sample" / "valid.txt"
    out = tmp_path / "soup"
    assert main(["merge", str(_write(tmp_path, cfg)), str(out), "--eval-data", str(data), "--eval-tokens", "512"]) == 0
    rec = json.loads((out / "lmexpand.json").read_text())["merge"]["greedy_soup"]
    assert rec["ranking"][-1] == str(broken) and str(broken) not in rec["kept"]
    alone = rec["candidates_alone"]
    assert len(alone) == 3 and all(v > 1 for v in alone.values())
    assert rec["soup_perplexity"] <= min(alone.values())
    # the output is the uniform linear merge of the kept set, bitwise
    ref_cfg = {"merge_method": "linear", "models": [{"model": k, "parameters": {"weight": 1.0}} for k in rec["kept"]]}
    ref = tmp_path / "ref"
    assert main(["merge", str(_write(tmp_path, ref_cfg, "ref.yaml")), str(ref)]) == 0
    a, b = _tensors(out), _tensors(ref)
    assert all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)
    # without --eval-data: a usage error, nothing written
    assert main(["merge", str(_write(tmp_path, cfg, "again.yaml")), str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


def test_recipe_greedy_soup(merge_root, tmp_path, capsys):
    """A recipe runs the greedy soup through the same merge stage as `lmexpand merge
    --eval-data`: the same bytes and record; surgery.eval_data is checked with the recipe,
    before anything is scored."""
    import torch

    m = _variants(merge_root, "llama", "float32")
    data = ROOT / "recipes" / "data" / "openstax-sample" / "valid.txt"
    cfg = {"merge_method": "greedy_soup", "models": [{"model": str(m["a"])}, {"model": str(m["b"])}]}
    recipe = tmp_path / "soup.yaml"
    section = {"method": "merge", "args": {"config": cfg}, "eval_data": str(data), "eval_tokens": 256}
    recipe.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "surgery": section}))
    assert main(["run", str(recipe)]) == 0, capsys.readouterr().err
    assert "greedy soup: " in capsys.readouterr().err
    ref = tmp_path / "ref"
    assert main(["merge", str(_write(tmp_path, cfg)), str(ref), "--eval-data", str(data), "--eval-tokens", "256"]) == 0
    out = tmp_path / "w" / "expanded"
    rec = json.loads((out / "lmexpand.json").read_text())["merge"]["greedy_soup"]
    assert rec == json.loads((ref / "lmexpand.json").read_text())["merge"]["greedy_soup"]
    a, b = _tensors(out), _tensors(ref)
    assert a.keys() == b.keys() and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)
    assert main(["run", str(recipe)]) == 0 and "surgery: up to date" in capsys.readouterr().err
    # without held-out text, or with it for another method: refused, naming the key
    for name, bad in [("no-data", {k: v for k, v in section.items() if k != "eval_data"}),
                      ("pro", {"method": "llama-pro", "source": str(m["a"]), "args": {"add": 1},
                               "eval_data": str(data)})]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"workdir": str(tmp_path / name), "surgery": bad}))
        assert main(["run", str(path), "--check"]) == 2
        assert "surgery.eval_data" in capsys.readouterr().err


def test_recipe_plans_a_merge_once(merge_root, tmp_path, monkeypatch):
    """`lmexpand run` plans its merge once, when the recipe is loaded (the plan names the
    eval base and the output's tensors), and the run writes from that plan."""
    from lmexpand.expand.merging import planner

    m = _variants(merge_root, "llama", "bfloat16")
    cfg, _ = _configs(m)["linear"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"workdir": str(tmp_path / "w"), "surgery": {"method": "merge",
                                                                                   "args": {"config": cfg}}}))
    calls = []
    real = planner.plan_merge
    monkeypatch.setattr(planner, "plan_merge", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["run", str(recipe)]) == 0
    assert len(calls) == 1 and (tmp_path / "w" / "expanded" / "lmexpand.json").is_file()


# -- LoRA extraction ---------------------------------------------------------------------------
def _low_rank_fine_tune(base: Path, out: Path, rank: int) -> Path:
    """BASE + a random rank-``rank`` change on every linear projection of the layers, a
    changed q/k/v bias and a changed final norm (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                rows, cols = module.weight.shape
                module.weight += (torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)) * 0.01
                if module.bias is not None:
                    module.bias += 0.01 * torch.randn(module.bias.shape, generator=g)
        model.model.norm.weight.mul_(1.1)
    model.save_pretrained(out)
    return out


def test_extract_lora_recovers_a_low_rank_fine_tune(tmp_path):
    """A model built as BASE + a rank-3 change: the rank-3 adapter recovers every projection
    (relative error at fp32 precision), stock peft loads it onto BASE and reproduces the tuned
    logits; rank 1 reports the error it leaves; mergekit's extractor gives the same factors."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.tiny import build_tiny_model

    base = build_tiny_model("qwen2", tmp_path / "base")  # q/k/v biases
    tuned = _low_rank_fine_tune(base, tmp_path / "tuned", 3)
    out = tmp_path / "lora"
    assert main(["extract-lora", str(tuned), str(base), str(out), "--rank", "3"]) == 0
    report = json.loads((out / "extract_lora.json").read_text())
    assert report["modules"] == 4 * 7 and report["max_relative_error"] < 1e-5, report["max_relative_error"]
    assert report["stored_whole"] == ["model.norm.weight"]
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["model.norm"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["lora_alpha"] == 3 and config["lora_bias"] is True
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out).eval()
    ref = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 33, 70, 101, 7]])
    with torch.no_grad():
        got, want, before = model(ids).logits, ref(ids).logits, plain(ids).logits
    gap = (got - want).abs().max().item()
    print(f"extract-lora rank 3: logits within {gap:.2g} of the tuned model (base was {(before - want).abs().max():.2g} away)")
    assert gap < 1e-4 and (before - want).abs().max().item() > 1e-2
    low = tmp_path / "lora1"
    assert main(["extract-lora", str(tuned), str(base), str(low), "--rank", "1"]) == 0
    assert json.loads((low / "extract_lora.json").read_text())["max_relative_error"] > 0.1
    if MERGEKIT_PY.exists():
        from safetensors.torch import load_file

        mk = tmp_path / "mk"
        run = subprocess.run([str(MERGEKIT_PY.parent / "mergekit-extract-lora"), "--model", str(tuned), "--base-model",
                              str(base), "--out-path", str(mk), "--max-rank", "3"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(mk / "adapter_model.safetensors")
        factors = [k for k in theirs if ".lora_A." in k or ".lora_B.weight" in k]
        assert factors and all(k in ours for k in factors)
        worst = max((ours[k] - theirs[k]).abs().max().item() for k in factors)
        print(f"extract-lora vs mergekit-extract-lora: {len(factors)} factors, max |d| {worst:.2g}")
        assert worst < 1e-6


def test_extract_lora_refuses_models_that_differ(tmp_path, capsys):
    from tests.tiny import build_tiny_model

    base = build_tiny_model("llama", tmp_path / "base")
    for other, needle in ((build_tiny_model("llama", tmp_path / "vocab", vocab_size=384), "vocabularies differ"),
                          (build_tiny_model("qwen2", tmp_path / "qwen"), "is a qwen2 model")):
        out = tmp_path / "out"
        assert main(["extract-lora", str(other), str(base), str(out), "--rank", "2"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
        assert not out.exists()
