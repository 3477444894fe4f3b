"""What a merge writes besides the weights: the tokenizer of ``tokenizer_source`` (default:
the base model, else the first), the ``chat_template`` and a model card."""

from __future__ import annotations

import json
from collections import Counter
from typing import Optional

from lmexpand.errors import ConfigError, SourceError
from lmexpand.expand.plan import Plan
from lmexpand.jsonio import read_json

# mergekit ships named templates; the one nearly every merge uses is written here.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
NAMED_TEMPLATES = {"chatml": CHATML}


def _template_of(reader) -> Optional[str]:
    jinja = reader.path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8").strip()
    cfg = reader.path / "tokenizer_config.json"
    if cfg.is_file():
        try:
            value = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, OSError):
            return None
        if isinstance(value, list):  # [{name, template}]
            value = next((v.get("template") for v in value if v.get("name") == "default"), None)
        return value.strip() if isinstance(value, str) else None
    return None


def add_files(plan: Plan, resolved, where: str) -> None:
    file = resolved.file
    refs = resolved.models
    source = file.tokenizer.source if file.tokenizer is not None else file.tokenizer_source
    if source in (None, "base", "union"):
        if source == "base" and resolved.base is None:
            raise ConfigError(f"{where}: tokenizer_source: base needs base_model; name the model whose tokenizer "
                              "to copy instead.")
        plan.carry_from = resolved.base if resolved.base is not None else 0
    else:
        if source not in refs:
            raise ConfigError(f"{where}: tokenizer_source: {source} is not one of the merged models "
                              f"({', '.join(refs)}); give base or one of them.")
        plan.carry_from = refs.index(source)
    template = file.chat_template
    if template:
        if template == "auto":
            found = [t for t in (_template_of(r) for r in resolved.readers) if t]
            template = Counter(found).most_common(1)[0][0] if found else None
        elif template in NAMED_TEMPLATES:
            template = NAMED_TEMPLATES[template]
        elif "{" not in template:
            raise ConfigError(f"{where}: chat_template: {template!r} is neither a Jinja template nor a known name "
                              f"({', '.join(['auto'] + sorted(NAMED_TEMPLATES))}); paste the template itself.")
        if template:
            plan.files["chat_template.jinja"] = (template + "\n").encode()
            cfg = resolved.readers[plan.carry_from].path / "tokenizer_config.json"
            own = plan.files.get("tokenizer_config.json")  # a built vocabulary's own tokenizer
            if own is not None or (plan.carry_tokenizer and cfg.is_file()):
                doc = json.loads(own) if own is not None else read_json(
                    cfg, what="the tokenizer config", expect=dict, error=SourceError,
                    fix="Fix or re-download the model's tokenizer_config.json.")
                if "chat_template" in doc:
                    doc["chat_template"] = template
                    plan.files["tokenizer_config.json"] = (json.dumps(doc, indent=2) + "\n").encode()
    merge = plan.extra_lineage["merge"]
    lines = [
        "---", "tags: [merge, lmexpand]", "---", "",
        f"# {merge['method']} merge", "",
        f"Merged by lmexpand with `{merge['method']}` ({merge['paper']}).", "",
        "| model | role |", "|---|---|",
    ]
    for i, ref in enumerate(refs):
        lines.append(f"| `{ref}` | {'base' if i == resolved.base else 'input'} |")
    if merge["seed"] is not None:
        lines += ["", f"Random seed: {merge['seed']} (`lmexpand merge --seed {merge['seed']}` repeats it)."]
    lines += ["", "## Configuration", "", "```yaml", merge["config_text"].rstrip(), "```", "",
              "The resolved configuration and every source's fingerprint are in `lmexpand.json`.", ""]
    plan.files["README.md"] = "\n".join(lines).encode()
