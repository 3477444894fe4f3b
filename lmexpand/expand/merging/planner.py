"""A mergekit configuration -> a surgery :class:`Plan` with one merge op per output tensor.

Everything that can be checked is checked here, from config files and tensor headers only,
and reported at once: method, parameters and their ranges, base model, duplicates, families,
layer counts, tensor names and shapes, vocabularies, dtypes. The executor then streams the
plan like any surgery (worker threads compute, tensors are written in order).
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from lmexpand.checkpoint.reader import CheckpointReader, torch_dtype_name
from lmexpand.errors import ConfigError, SourceError
from lmexpand.expand.merging.config import DTYPES, MergeFile, resolve
from lmexpand.expand.merging.methods import METHODS, Inputs, MergeMethod, method_names
from lmexpand.expand.merging.methods.registry import MethodError
from lmexpand.expand.merging.methods.rng import RandomSource
from lmexpand.expand.merging.vocabulary import Vocabulary, build as build_vocabulary, source_of, wanted as builds_vocabulary
from lmexpand.expand.plan import Plan, Read, TensorPlan, _torch_dtype, remap_layers

if TYPE_CHECKING:
    import torch


class RandomStream:
    """One seeded generator handed to the random methods' draws in a fixed order (sorted
    tensor names, then models in configuration order: mergekit's order), whichever worker
    thread computes the tensor."""

    def __init__(self, seed: int, turns: int, device: str = "cpu"):
        self.seed, self.turns, self.device = seed, turns, device
        self._cond = threading.Condition()
        self._next = 0
        self._gen: Optional[RandomSource] = None

    def draw(self, turn: int, fn: Callable[[RandomSource], Any]) -> Any:
        with self._cond:
            if turn == 0 and self._next in (0, self.turns):  # (re)start
                self._gen, self._next = RandomSource(self.seed, self.device), 0
            while self._next != turn:
                if not self._cond.wait(timeout=600):
                    raise RuntimeError(f"random draw {turn} waited 10 minutes for draw {self._next} (a bug)")
            try:
                return fn(self._gen)
            finally:
                self._next += 1
                self._cond.notify_all()

    def release(self, turn: int) -> None:
        """A computation that failed gives up its turn (if it had not drawn yet), so that the
        ones after it are not left waiting."""
        with self._cond:
            while self._next < turn:
                if not self._cond.wait(timeout=600):
                    return
            if self._next == turn:
                self._next += 1
                self._cond.notify_all()


@dataclass(frozen=True)
class MergeTensor:
    """One output tensor merged from one tensor of each input model."""

    method: str
    inputs: tuple[Read, ...]  # in the method's layout (base first for base-aware methods)
    base_index: Optional[int]
    shared: tuple[tuple[str, Any], ...]
    per_model: tuple[tuple[str, tuple[Any, ...]], ...]
    work_dtype: str
    turn: int = -1
    stream: Optional[RandomStream] = field(default=None, compare=False, repr=False)
    match_mergekit: bool = False  # mergekit's argsort for magnitude trimming (its bytes at threshold ties)
    device: str = "cpu"  # where the arithmetic runs; inputs are read on the CPU and the result returns there
    # a vocabulary tensor of models whose vocabularies differ: inputs aligned to the output
    # vocabulary first (:mod:`.vocabulary`); vocab_base: the slice's base model index
    vocab: Optional["Vocabulary"] = field(default=None, compare=False, repr=False)
    vocab_base: Optional[int] = None

    def _compute(self, get, shape, dtype) -> "torch.Tensor":
        import torch

        work = _torch_dtype(self.work_dtype)
        tensors = [get(r.model, r.name) for r in self.inputs]
        if not tensors[0].is_floating_point():  # integer buffers: the first input's, as mergekit
            if self.stream is not None:
                self.stream.release(self.turn)
            return tensors[0]
        tensors = [t.to(device=self.device, dtype=work) for t in tensors]
        if self.vocab is not None:
            tensors = self.vocab.align(tensors, [r.model for r in self.inputs], self.vocab_base)
        draw = None
        if self.stream is not None:
            draw = lambda fn: self.stream.draw(self.turn, fn)  # noqa: E731
        x = Inputs(tensors, self.base_index, {k: list(v) for k, v in self.per_model}, draw, self.match_mergekit)
        with torch.no_grad():
            result = METHODS[self.method].fn(x, **dict(self.shared))
        del x, tensors
        return result.cpu()

    def compute(self, get, shape, dtype) -> "torch.Tensor":
        try:
            return self._compute(get, shape, dtype)
        except BaseException as e:
            if self.stream is not None:
                self.stream.release(self.turn)
            if isinstance(e, MethodError):
                raise ConfigError(f"{self.inputs[0].name}: {e}; nothing was written.") from None
            raise

    def reads(self) -> list[tuple[int, str]]:
        return [(r.model, r.name) for r in self.inputs]

    def describe(self) -> str:
        shared = ", ".join(f"{k}={v}" for k, v in self.shared)
        per = ", ".join(f"{k}={list(v)}" for k, v in self.per_model)
        return f"{self.method}({', '.join(f'm{r.model}' for r in self.inputs)}; {', '.join(x for x in (per, shared) if x)})"


@dataclass
class Resolved:
    """A configuration with its models opened and its references checked."""

    file: MergeFile
    method: Optional[MergeMethod]  # None: greedy_soup (planned by the soup)
    models: list[str]  # distinct references, in configuration order (the base appended)
    readers: list[CheckpointReader]
    base: Optional[int]
    slices: list[dict]  # {"sources": [(model index, start, end, parameters)], "base": int|None, "parameters"}


def open_models(file: MergeFile, where: str, *, allow_pickle: bool = False,
                relative_to: Optional[Path] = None) -> Resolved:
    """Check method and references, open every model (headers only)."""
    from lmexpand.checkpoint.sources import EMBEDDED, resolve_source

    problems: list[str] = []
    method = METHODS.get(file.merge_method)
    if method is None and file.merge_method != "greedy_soup":
        raise ConfigError(f"{where}: merge_method: unknown method {file.merge_method!r}. Available: "
                          f"{', '.join(method_names())}.")
    refs: list[str] = []
    if file.models:
        listed = [m.model for m in file.models]
        dup = sorted({m for m in listed if listed.count(m) > 1})
        if dup:
            problems.append(f"models: {dup[0]} is listed {listed.count(dup[0])} times; list each model once "
                            "(give it a larger weight instead)")
        refs = list(dict.fromkeys(listed))
        if file.base_model and file.base_model not in refs:
            refs.append(file.base_model)
    else:
        for s in file.slices:
            names = [src.model for src in s.sources]
            dup = sorted({m for m in names if names.count(m) > 1})
            if dup and len(s.sources) > 1:
                problems.append(f"slices: one slice lists {dup[0]} twice; list each model once per slice")
            for n in names + [b for b in (s.base_model, file.base_model) if b]:
                if n not in refs:
                    refs.append(n)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems) + ".")

    paths: list[Path] = []
    for ref in refs:
        candidate = ref
        if relative_to is not None and ref not in EMBEDDED and not Path(ref).expanduser().is_absolute() \
                and not Path(ref).exists() and (relative_to / ref).exists():
            candidate = str(relative_to / ref)
        try:
            paths.append(resolve_source(candidate))
        except SourceError as e:  # the message names the path and the fix
            raise SourceError(f"{where}: model {ref}: {e}") from None
    resolved_paths = [p.resolve() for p in paths]
    for i, p in enumerate(resolved_paths):
        if resolved_paths.index(p) != i:
            raise ConfigError(f"{where}: {refs[resolved_paths.index(p)]} and {refs[i]} are the same model directory; "
                              "list each model once.")
    readers = [CheckpointReader(p, allow_pickle=allow_pickle) for p in paths]
    base = refs.index(file.base_model) if file.base_model else None
    slices = []
    if file.models:
        params = {m.model: m.parameters for m in file.models}
        sources = []
        for ref, reader in zip(refs, readers):
            sources.append((refs.index(ref), 0, reader.num_layers, params.get(ref)))
        slices.append({"sources": sources, "base": base, "parameters": None})
    else:
        for s in file.slices:
            sb = s.base_model or file.base_model
            slices.append({"sources": [(refs.index(src.model), src.layer_range[0], src.layer_range[1], src.parameters)
                                       for src in s.sources],
                           "base": refs.index(sb) if sb else None, "parameters": s.parameters})
    return Resolved(file, method, refs, readers, base, slices)


def _tokenizer_problems(r: Resolved) -> list[str]:
    """The inputs' tokenizers map text to the same ids (as compositions require): rows of
    merged embeddings and heads are then the same tokens. A ``tokenizer_source`` the user
    named is their choice of vocabulary, left to them."""
    from lmexpand.checkpoint.tokenizer import has_tokenizer, load_tokenizer

    if builds_vocabulary(r.file) or len({reader.config.get("vocab_size") for reader in r.readers}) > 1:
        return []  # (vocabularies of different sizes are named as such by the shape check)
    with_tokenizer = [(ref, reader.path) for ref, reader in zip(r.models, r.readers) if has_tokenizer(reader.path)]
    if len(with_tokenizer) < 2:
        return []
    ref0, path0 = with_tokenizer[0]
    vocab0 = load_tokenizer(path0, what=f"model {ref0}").get_vocab()
    for ref, path in with_tokenizer[1:]:
        vocab = load_tokenizer(path, what=f"model {ref}").get_vocab()
        if vocab != vocab0:
            differ = sorted(set(vocab.items()) ^ set(vocab0.items()), key=lambda kv: (kv[1], kv[0]))
            return [f"{ref} and {ref0} have different tokenizers ({len(vocab):,} vs {len(vocab0):,} tokens, "
                    f"{len(differ):,} token->id pairs differ, e.g. {differ[0][0]!r} -> {differ[0][1]}): row i of their "
                    "embeddings and heads is not the same token, so merging them mixes unrelated tokens. Give "
                    "tokenizer_source: union (or base, or one model) to merge over one vocabulary, each model's "
                    "rows matched by token"]
    return []


def _check_structure(r: Resolved, where: str) -> list[str]:
    """Families, layer ranges and counts, tokenizers; returns problems."""
    problems = _tokenizer_problems(r)
    donor = r.readers[r.base if r.base is not None else 0]
    fam = donor.family
    for ref, reader in zip(r.models, r.readers):
        if reader.family.name != fam.name:
            problems.append(f"{ref} is a {reader.family.name} model but {r.models[r.readers.index(donor)]} is "
                            f"{fam.name}; merge models of one family")
    for si, s in enumerate(r.slices):
        lengths = set()
        for m, start, end, _ in s["sources"]:
            n = r.readers[m].num_layers
            if end > n:
                problems.append(f"slices[{si}]: {r.models[m]} has {n} layers; layer_range [{start}, {end}] goes "
                                f"past it")
            lengths.add(end - start)
        if len(lengths) > 1:
            what = "models" if r.file.models else f"slices[{si}]"
            problems.append(f"{what}: the inputs have different layer counts ({', '.join(map(str, sorted(lengths)))}); "
                            "every input of a slice must span the same number of layers (use slices: with "
                            "layer_range to pick them)")
    return problems


def _promote(dtypes: list[str]) -> str:
    import torch

    from lmexpand.checkpoint.reader import st_dtype_of

    d = _torch_dtype(dtypes[0])
    for x in dtypes[1:]:
        d = torch.promote_types(d, _torch_dtype(x))
    return st_dtype_of(torch.empty(0, dtype=d))


def plan_merge(r: Resolved, where: str, *, seed: Optional[int] = None, source_text: str = "",
               match_mergekit: bool = False, device: str = "cpu") -> Plan:
    """The plan: every output tensor's inputs, resolved parameters and dtypes. ``device``: a
    resolved torch device (:func:`resolve_device`)."""
    method = r.method
    assert method is not None
    file = r.file
    problems = _check_structure(r, where)
    # method contract
    for si, s in enumerate(r.slices):
        n_inputs = len(s["sources"])
        label = "models" if file.models else f"slices[{si}]"
        base = s["base"]
        in_slice = [m for m, *_ in s["sources"]]
        if method.base == "required" and base is None:
            problems.append(f"{method.name} needs base_model: the model the task vectors are measured from; add "
                            "base_model: PATH")
        if base is not None and method.base != "ignored" and base not in in_slice:
            problems.append(f"{label}: base_model {r.models[base]} is not one of the slice's sources; add it there")
        non_base = n_inputs - (1 if base is not None and base in in_slice and method.base != "ignored" else 0)
        if n_inputs < method.min_inputs or (method.max_inputs and n_inputs > method.max_inputs):
            want = (f"exactly {method.min_inputs}" if method.min_inputs == method.max_inputs else
                    f"at least {method.min_inputs}" if not method.max_inputs else f"at most {method.max_inputs}")
            extra = " (the base and one other)" if method.base == "required" and method.max_inputs == 2 else \
                " (the base and two or more fine-tunes)" if method.name == "model_stock" else ""
            problems.append(f"{label}: {method.name} takes {want} models{extra}; got {n_inputs}")
        if non_base < method.min_non_base or (method.max_non_base and non_base > method.max_non_base):
            problems.append(f"{label}: {method.name} takes exactly {method.min_non_base} models besides the base; "
                            f"got {non_base}")
    known = {p.name for p in method.params}
    scopes = [("parameters", file.parameters)]
    for si, s in enumerate(r.slices):
        scopes.append((f"slices[{si}].parameters", s["parameters"]))
        for m, _, _, p in s["sources"]:
            scopes.append((f"{'models' if file.models else f'slices[{si}].sources'} ({r.models[m]}).parameters", p))
    for label, params in scopes:
        for name in params or {}:
            if name not in known:
                problems.append(f"{label}: {name!r} is not a parameter of {method.name} (its parameters: "
                                f"{', '.join(sorted(known)) or 'none'})")
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(dict.fromkeys(problems)) + ".")

    vocab = build_vocabulary(r, where) if builds_vocabulary(file) else None
    tensors, param_problems, layer_map = _plan_tensors(r, method, where, vocab)
    if param_problems:
        raise ConfigError(f"{where}: " + "; ".join(param_problems) + ".")
    names = sorted(tensors)
    random_turns = 0
    stream = None
    if method.random:
        if seed is None:
            seed = secrets.randbelow(2**31)
        stream = RandomStream(seed, len(names), device)
        random_turns = len(names)
    plans = []
    for turn, name in enumerate(names):
        op, dtype, shape = tensors[name]
        if isinstance(op, MergeTensor):
            op = replace(op, turn=turn if stream is not None else -1, stream=stream, match_mergekit=match_mergekit,
                         device=device)
        plans.append(TensorPlan(name, dtype, shape, op))
    donor_i = r.base if r.base is not None else r.slices[0]["sources"][0][0]
    donor = r.readers[donor_i]
    fam = donor.family
    config = remap_layers(donor.config, fam.num_layers_key, fam.per_layer_keys, layer_map) \
        if layer_map != list(range(donor.num_layers)) else dict(donor.config)
    if vocab is not None:
        config["vocab_size"] = vocab.size
    out_dtype = file.out_dtype or file.dtype
    if out_dtype:
        config["torch_dtype"] = config["dtype"] = torch_dtype_name(DTYPES[out_dtype])
    notes = []
    if fam.lm_head in tensors and config.get("tie_word_embeddings"):
        config["tie_word_embeddings"] = False
        notes.append(f"some inputs have their own {fam.lm_head}: the output has a merged head, so it is untied "
                     "(tie_word_embeddings: false)")
    resolved_cfg = file.model_dump(mode="json", exclude_none=True)
    plan = Plan(
        method="merge",
        arguments={"merge_method": method.name, "seed": seed if method.random else None,
                   "match_mergekit": match_mergekit, "device": device},
        sources=[rd.path for rd in r.readers],
        config=config,
        tensors=plans,
        new_parameters=[],
        function_preserving=False,
        layer_map=[f"m{m}:{layer}" if len(r.models) > 1 else layer for m, layer in _layer_sources(r)],
        notes=notes,
        extra_lineage={"merge": {"method": method.name, "paper": method.paper, "configuration": resolved_cfg,
                                 "models": r.models, "seed": seed if method.random else None,
                                 "random_draws": random_turns, "config_text": source_text}},
        readers=r.readers,
    )
    if vocab is not None:  # the built tokenizer replaces the carried one
        plan.files.update(dict(vocab.files))
        plan.carry_tokenizer = False
        plan.notes.append(f"vocabulary: {len(vocab.tokens):,} tokens ({source_of(file)})"
                          + (f", {vocab.size:,} rows" if vocab.size != len(vocab.tokens) else ""))
    return plan


def _layer_sources(r: Resolved) -> list[tuple[int, int]]:
    out = []
    for s in r.slices:
        m, start, end, _ = s["sources"][0]
        out += [(m, start + k) for k in range(end - start)]
    return out


def _plan_tensors(r: Resolved, method: MergeMethod, where: str, vocab: Optional[Vocabulary] = None):
    """name -> (op, dtype, shape) for every output tensor, and the parameter problems."""
    file = r.file
    problems: dict[str, str] = {}
    out: dict[str, tuple[Any, str, tuple[int, ...]]] = {}
    donor_i = r.base if r.base is not None else r.slices[0]["sources"][0][0]
    fam = r.readers[donor_i].family
    work_fixed = DTYPES[file.dtype] if file.dtype else None
    out_fixed = DTYPES[file.out_dtype] if file.out_dtype else None

    def one(out_name: str, inputs: list[tuple[int, str]], slice_: dict, t: float) -> None:
        # input tensors: a model without its own head contributes its embedding (tied)
        reads = []
        for m, name in inputs:
            reader = r.readers[m]
            if name not in reader and name == fam.lm_head and fam.embed in reader:
                name = fam.embed
            if name not in reader:
                problems.setdefault(f"missing:{name}", f"{r.models[m]} has no tensor {name} (needed for {out_name}); "
                                    "the inputs must be models of one architecture and size")
                return
            reads.append((m, name))
        infos = [r.readers[m].info(n) for m, n in reads]
        aligned = vocab is not None and out_name in (fam.embed, fam.lm_head)
        shapes = {i.shape[1:] if aligned else i.shape for i in infos}
        if len(shapes) > 1:
            a, b = infos[0], next(i for i in infos if i.shape != infos[0].shape)
            ma, mb = r.models[reads[0][0]], r.models[reads[infos.index(b)][0]]
            if out_name in (fam.embed, fam.lm_head):
                problems.setdefault("vocab", f"the vocabularies differ: {out_name} is {list(a.shape)} in {ma} and "
                                    f"{list(b.shape)} in {mb}. Give tokenizer_source: union (or base, or one model) to "
                                    "merge over one output vocabulary, each model's rows matched by token")
            else:
                problems.setdefault("shape", f"{out_name}: {list(a.shape)} in {ma} but {list(b.shape)} in {mb}; "
                                    "the models differ in size (merge models of one architecture and size)")
            return
        base = slice_["base"]
        layout = [(m, n) for m, n in reads]
        base_index = None
        if base is not None and method.base != "ignored":
            order = [i for i, (m, _) in enumerate(reads) if m == base] + [i for i, (m, _) in enumerate(reads) if m != base]
            layout = [reads[i] for i in order]
            base_index = 0
        src_params = {m: p for m, _, _, p in slice_["sources"]}
        shared = []
        for p in method.params:
            if p.scope != "shared":
                continue
            value = _resolve(p, [slice_["parameters"], file.parameters], out_name, t, problems, where=p.name)
            shared.append((p.name, value))
        per_model = []
        for p in method.params:
            if p.scope == "shared":
                continue
            values = []
            for i, (m, name) in enumerate(layout):
                if p.scope == "non_base" and i == base_index:
                    continue
                values.append(_resolve(p, [src_params.get(m), slice_["parameters"], file.parameters], name, t,
                                       problems, where=f"{p.name} of {r.models[m]}"))
            per_model.append((p.name, tuple(values)))
        if method.name in ("linear",):
            for pname, pv in shared:
                if pname == "normalize" and pv:
                    w = dict(per_model)["weight"]
                    if all(isinstance(x, float) for x in w) and sum(w) == 0:
                        problems.setdefault("w0", f"the weights for {out_name} sum to 0 and normalize is on (the "
                                            "merge would divide by zero); change a weight or set normalize: false")
        if method.name == "della" or method.name == "della_linear":
            pm = dict(per_model)
            for d, e in zip(pm["density"], pm["epsilon"]):
                if isinstance(d, float) and isinstance(e, float) and 0 < d < 1 and not (0 < d - e and d + e < 1):
                    problems.setdefault("eps", f"{method.name}: density {d:g} +- epsilon {e:g} must lie inside "
                                        f"(0, 1) (for {out_name}); lower epsilon")
        dtypes = [i.dtype for i in infos]
        work = work_fixed or _promote(dtypes)
        dtype = out_fixed or (_promote([work, method.result_at_least]) if method.result_at_least else work)
        shape = infos[0].shape
        realign = aligned and not vocab.is_identity_for([m for m, _ in layout],
                                                        [r.readers[m].info(n).shape[0] for m, n in layout])
        if realign:
            shape = (vocab.size, *shape[1:])
        if method.name == "passthrough" and dict(per_model)["scale"][0] is None and dtypes[0] == dtype \
                and not realign:
            op: Any = Read(layout[0][1], layout[0][0])
        else:
            op = MergeTensor(method.name, tuple(Read(n, m) for m, n in layout), base_index, tuple(shared),
                             tuple(per_model), work, vocab=vocab if realign else None,
                             vocab_base=slice_["base"] if realign else None)
        out[out_name] = (op, dtype, shape)

    layer_map: list[int] = []
    first, last = r.slices[0], r.slices[-1]
    donor = r.readers[first["sources"][0][0]]
    non_layer = [i.name for i in donor if fam.split_layer_name(i.name) is None]
    has_head = any(fam.lm_head in rd for rd in r.readers)
    if has_head and fam.lm_head not in non_layer:
        non_layer.append(fam.lm_head)
    pre = [n for n in non_layer if "embed" in n]
    post = [n for n in non_layer if n not in pre]
    for name in pre:
        one(name, [(m, name) for m, *_ in first["sources"]], first, 0.0)
    out_layer = 0
    for s in r.slices:
        m0, start0, end0, _ = s["sources"][0]
        n = end0 - start0
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            rels = [rel for (layer, rel) in (fam.split_layer_name(i.name) for i in r.readers[m0]
                                             if fam.split_layer_name(i.name)) if layer == start0 + k]
            for rel in rels:
                one(fam.layer_name(out_layer, rel), [(m, fam.layer_name(start + k, rel)) for m, start, _, _ in s["sources"]],
                    s, t)
            layer_map.append(start0 + k)
            out_layer += 1
    for name in post:
        one(name, [(m, name) for m, *_ in last["sources"]], last, 0.0)
    return out, list(dict.fromkeys(problems.values())), layer_map


def _resolve(p, scopes, tensor_name: str, t: float, problems: dict, *, where: str) -> Any:
    try:
        value = resolve(p.name, scopes, tensor_name, t, p.cast)
    except ValueError as e:
        problems.setdefault(f"bad:{where}", f"parameters: {e}")
        return None
    if value is None:
        if p.required:
            problems.setdefault(f"missing:{where}", f"parameters: {where} is required (for {tensor_name} and any "
                                "other tensor it is not set for); give it at the top, slice or model level")
            return None
        return p.default
    if isinstance(value, float) and value != value or value in (float("inf"), float("-inf")):
        problems.setdefault(f"finite:{where}", f"parameters: {where} is {value}; give a finite number")
        return value
    if p.check is not None and value is not None:
        msg = p.check(value)
        if msg:
            problems.setdefault(f"check:{where}:{msg}", f"parameters: {where}: {msg} (for {tensor_name})")
    return value


def resolve_device(device: str, what: str = "--device") -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when torch sees a GPU, else CPU) -> a
    torch device string; a device that is not there is the user's to fix (exit 2)."""
    import torch

    value = (device or "cpu").strip().lower()
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return "cpu"
    if value == "cuda" or (value.startswith("cuda:") and value[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {device}: torch sees no CUDA device here (torch {torch.__version__}); use "
                              f"{what} cpu, or auto to use a GPU only when there is one.")
        index = int(value[5:]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{what} {device}: there are {torch.cuda.device_count()} CUDA device(s); give cuda:0 to "
                              f"cuda:{torch.cuda.device_count() - 1}, auto, or {what} cpu.")
        return value
    raise ConfigError(f"{what} {device!r} is not a device; use cpu, cuda, cuda:N or auto.")
