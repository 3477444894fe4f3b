"""Training data: chat rendering and its loss mask, every file format, weighted mixtures,
document masking inside packed blocks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmexpand.errors import ConfigError
from lmexpand.train.config import DataSource
from tests.conftest import GSM8K_TRAIN

TEMPLATE = "Question: {question}\nAnswer: {answer}"

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4, because 2 + 2 = 4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "Six.\nThat is all."},
]


def targets_text(tokenizer, ids: list[int]) -> list[str]:
    """The decoded runs of consecutive target tokens (stored >= 0) of one document."""
    runs, run = [], []
    for t in ids:
        if t >= 0:
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode(r) for r in runs]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load(tokenizer, *sources: DataSource, seq_len: int = 32, **kw):
    from lmexpand.train.data import load_packed_data

    kw.setdefault("val_fraction", 0.0)
    kw.setdefault("seed", 0)
    return load_packed_data(list(sources), tokenizer, seq_len=seq_len, **kw)


@pytest.fixture(scope="module")
def tiny_tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


# -- chat --------------------------------------------------------------------------------

@pytest.mark.slow
def test_chat_mask_is_exactly_the_assistant_turns_on_smollm2(smollm2, tmp_path):
    """SmolLM2's own template: the targets are each assistant answer with its <|im_end|>,
    every one of them (multi-turn), and nothing else; the ids are the template's own."""
    from transformers import AutoTokenizer

    from lmexpand.train.chat import encode_conversation, resolve_chat_template

    tok = AutoTokenizer.from_pretrained(smollm2)
    template = resolve_chat_template(tok, None, "smollm2")
    assert template == tok.chat_template
    for turns in (CONVERSATION, CONVERSATION[1:]):  # with a system turn, and with the template's default one
        ids = encode_conversation(tok, template, turns, "test")
        assert [t if t >= 0 else -t - 1 for t in ids] == tok.apply_chat_template(turns, tokenize=True,
                                                                                  return_dict=False)
        assert targets_text(tok, ids) == ["4, because 2 + 2 = 4.<|im_end|>", "Six.\nThat is all.<|im_end|>"]

    # the three layouts give the same conversation, through the whole data path (one per block)
    data = tmp_path / "chat"
    data.mkdir()
    q, a = "Name a prime.", "Seven."
    files = {
        "messages": write_jsonl(data / "m.jsonl", [{"messages": [{"role": "user", "content": q},
                                                                 {"role": "assistant", "content": a}]}]),
        "sharegpt": write_jsonl(data / "s.jsonl", [{"conversations": [{"from": "human", "value": q},
                                                                      {"from": "gpt", "value": a}]}]),
        "alpaca": write_jsonl(data / "a.jsonl", [{"instruction": q, "input": "", "output": a}]),
    }
    blocks = {}
    for style, path in files.items():
        for chat in (style, "auto"):
            packed = load(tok, DataSource(path=path, chat=chat), seq_len=64, pack=False)
            blocks[(style, chat)] = packed.train_blocks[0].tolist()
    assert len({json.dumps(b) for b in blocks.values()}) == 1
    block = blocks[("messages", "messages")]
    assert targets_text(tok, block) == ["Seven.<|im_end|>"]  # the separator and padding are context


def test_chat_needs_a_template_or_chatml(tiny_tok, tmp_path):
    from lmexpand.train.chat import CHATML

    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}] * 4)
    src = DataSource(path=path, chat="messages")
    with pytest.raises(ConfigError, match="no chat template.*--chat-template chatml"):
        load(tiny_tok, src)
    packed = load(tiny_tok, src, chat_template="chatml", pack=False, seq_len=256)
    row = packed.train_blocks[0].tolist()
    assert targets_text(tiny_tok, row) == ["4, because 2 + 2 = 4.<|im_end|>", "Six.\nThat is all.<|im_end|>"]
    jinja = tmp_path / "t.jinja"
    jinja.write_text(CHATML)
    assert load(tiny_tok, src, chat_template=str(jinja), pack=False, seq_len=256).train_blocks[0].tolist() == row


@pytest.mark.parametrize("record, needle", [
    ({"text": "x"}, "no 'messages' list"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "turn 1 is 'assistant' where 'user'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "empty assistant"),
    ({"messages": [{"role": "user", "content": "q"}]}, "does not end with an assistant turn"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "roles are system, user and assistant"),
])
def test_bad_conversations_name_the_record(tiny_tok, tmp_path, record, needle):
    good = {"messages": CONVERSATION}
    path = write_jsonl(tmp_path / "c.jsonl", [good, good, record])
    with pytest.raises(ConfigError) as e:
        load(tiny_tok, DataSource(path=path, chat="messages"), chat_template="chatml")
    assert needle in str(e.value) and "record 3" in str(e.value) and str(path) in str(e.value)


def test_template_rendering_nothing_to_learn(tiny_tok, tmp_path):
    silent = tmp_path / "silent.jinja"  # prints the user turns only
    silent.write_text("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% endif %}{% endfor %}")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(ConfigError, match="renders nothing to learn"):
        load(tiny_tok, DataSource(path=path, chat="messages"), chat_template=str(silent))


# -- formats -----------------------------------------------------------------------------

def test_every_format_gives_the_same_blocks(tiny_tok, tmp_path):
    """JSONL, parquet, arrow, CSV and a save_to_disk directory of the same records pack into
    the same blocks, in memory and streamed; a template and a text field work on each."""
    import shutil

    from datasets import Dataset

    records = [json.loads(line) for line in GSM8K_TRAIN.read_text().splitlines()[:40]]
    for r in records:
        r["text"] = TEMPLATE.format(**r)
    ds = Dataset.from_list(records)
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", records), "parquet": tmp_path / "d.parquet",
             "csv": tmp_path / "d.csv", "disk": tmp_path / "saved"}
    ds.to_parquet(str(paths["parquet"]))
    ds.to_csv(str(paths["csv"]), index=False)
    ds.save_to_disk(str(paths["disk"]))
    paths["arrow"] = tmp_path / "d.arrow"
    shutil.copy(next(paths["disk"].glob("*.arrow")), paths["arrow"])
    reference = load(tiny_tok, DataSource(path=paths["jsonl"], template=TEMPLATE)).train_blocks
    assert len(reference) > 10
    for kind, path in paths.items():
        for how in ({"template": TEMPLATE}, {"field": "text"}):
            got = load(tiny_tok, DataSource(path=path, **how)).train_blocks
            assert np.array_equal(got, reference), (kind, how)
        streamed = load(tiny_tok, DataSource(path=path, template=TEMPLATE), streaming=True)
        first = [b for _, b in zip(range(len(reference)), streamed.train_block_iter(0))]
        assert np.array_equal(np.stack(first), reference), kind  # streaming reads in file order


def test_hub_id_is_not_downloaded(tiny_tok):
    with pytest.raises(ConfigError, match="never downloads.*hf download openai/gsm8k --repo-type dataset"):
        load(tiny_tok, DataSource(path=Path("openai/gsm8k")))


def test_wrong_column_types_are_named(tiny_tok, tmp_path):
    from datasets import Dataset

    path = tmp_path / "bad.parquet"
    Dataset.from_list([{"text": 5, "tags": ["a", "b"], "messages": "hi"}] * 3).to_parquet(str(path))
    with pytest.raises(ConfigError, match="column 'text' holds int64, not text"):
        load(tiny_tok, DataSource(path=path))
    with pytest.raises(ConfigError, match="column 'tags' holds list"):
        load(tiny_tok, DataSource(path=path, template="{tags}"))
    with pytest.raises(ConfigError, match="column 'messages' holds .* not a list of"):
        load(tiny_tok, DataSource(path=path, chat="messages"), chat_template="chatml")
    assert load(tiny_tok, DataSource(path=path, template="n={text}"), seq_len=4).train_blocks is not None


# -- mixtures ----------------------------------------------------------------------------

def test_mixture_draws_by_weight_and_any_start_continues_exactly(tiny_tok, tmp_path):
    from lmexpand.train.mixture import CHUNK, Mixture

    m = Mixture([0.7, 0.3], seed=3)
    choices = m.choices(0, 3 * CHUNK + 17)
    assert abs((choices == 0).mean() - 0.7) < 0.02
    for k in (0, 5, CHUNK - 1, CHUNK, 2 * CHUNK + 9):
        assert np.array_equal(m.counts_before(k), np.bincount(choices[:k], minlength=2))
        assert np.array_equal(m.choices(k, 40), choices[k:k + 40])
    assert not np.array_equal(Mixture([0.7, 0.3], seed=4).choices(0, 100), choices[:100])

    math = DataSource(path=write_jsonl(tmp_path / "m.jsonl", [json.loads(x) for x in
                                                            GSM8K_TRAIN.read_text().splitlines()[:30]]),
                      template=TEMPLATE, weight=0.7, name="math")
    general = DataSource(path=Path(__file__).parents[1] / "recipes/data/openstax-sample/valid.txt", weight=0.3)
    data = load(tiny_tok, math, general, val_fraction=0.1)
    assert [p.name for p in data.parts] == ["math", "valid.txt"] and all(len(p.val) for p in data.parts)
    # more blocks than either source holds: both wrap into their next epoch
    run = [b for _, b in zip(range(600), data.train_block_iter(0))]
    for k in (1, 37, 250, 599):
        resumed = [b for _, b in zip(range(len(run) - k), data.train_block_iter(k))]
        assert all(np.array_equal(a, b) for a, b in zip(run[k:], resumed)), k
    share = data.blocks_per_source(0, 600)
    assert sum(share) == 600 and abs(share[0] / 600 - 0.7) < 0.06
    # each block comes from the source the mixture chose for it
    math_rows = {r.tobytes() for r in data.parts[0].train}
    assert [run[k].tobytes() in math_rows for k in range(600)] == list(Mixture([0.7, 0.3], 0).choices(0, 600) == 0)


@pytest.mark.parametrize("spec, needle", [
    ([0.7, None], "give every source a weight"),
    ([0.0, 1.0], "positive finite"),
    ([-1.0, 1.0], "positive finite"),
])
def test_bad_weights(tmp_path, spec, needle):
    from lmexpand.train.config import parse_train_config

    f = tmp_path / "a.txt"
    f.write_text("x")
    data = [{"path": str(f), **({"weight": w} if w is not None else {})} for w in spec]
    with pytest.raises(ConfigError, match=needle):
        parse_train_config({"model": "m", "out": "o", "data": data})


# -- document masking --------------------------------------------------------------------

def test_packed_documents_see_only_themselves(tiny_llama, tiny_tok):
    """With position ids restarting at each document, a packed block's logits for each
    document equal the logits of that document run alone."""
    from transformers import AutoModelForCausalLM

    from lmexpand.train.data import _pack_documents
    from lmexpand.train.loss import CausalLMLoss

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    docs = [list(range(10, 17)), list(range(40, 52)), list(range(80, 89)), list(range(100, 140))]
    blocks = list(_pack_documents(((d, 2) for d in docs), 32, positions=True))
    ids, pos = (torch.tensor(x) for x in blocks[0])
    assert pos.tolist()[:30] == list(range(8)) + list(range(13)) + list(range(9))
    with torch.no_grad():
        packed = model(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits[0]
        plain = model(input_ids=ids[None]).logits[0]
        start = 0
        for d in docs[:3]:
            alone = model(input_ids=torch.tensor([d + [2]])).logits[0]
            torch.testing.assert_close(packed[start:start + len(d) + 1], alone, rtol=1e-5, atol=1e-5)
            start += len(d) + 1
        assert (packed[8:21] - plain[8:21]).abs().max() > 1e-3  # without the positions, documents mix
        # the continuation of the cut document starts again at position 0 in the next block
        ids2, pos2 = (torch.tensor(x) for x in blocks[1])
        assert pos2[0] == 0
        # the loss takes [batch, 2, seq] blocks (ids and positions)
        loss3d, _ = CausalLMLoss(model)(torch.tensor(np.array(blocks[:1])))
        labels = ids[1:]
        expect = torch.nn.functional.cross_entropy(packed[:-1], labels)
        torch.testing.assert_close(loss3d, expect, rtol=1e-5, atol=1e-6)


def test_document_masking_blocks_carry_positions(tiny_tok, gsm8k_small):
    data = load(tiny_tok, DataSource(path=gsm8k_small, template=TEMPLATE), document_masking=True, val_fraction=0.1)
    plain = load(tiny_tok, DataSource(path=gsm8k_small, template=TEMPLATE), val_fraction=0.1)
    assert data.train_blocks.shape[1:] == (2, 32) and data.val_blocks.shape[1:] == (2, 32)
    assert np.array_equal(data.train_blocks[:, 0], plain.train_blocks)
    starts = data.train_blocks[:, 1] == 0
    assert starts[:, 0].all() and starts.sum() > len(starts)  # every block starts at 0; documents restart inside


def test_a_bad_conversation_deep_in_the_file_stops_before_training(tiny_tok, tmp_path):
    """Beyond the records `run --check` looks at, every conversation is still checked while
    the data is read, before the first step, and the error names its record."""
    from lmexpand.train.data import CHAT_CHECKED, check_sources

    good = {"messages": CONVERSATION[1:3]}
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}
    path = write_jsonl(tmp_path / "deep.jsonl", [good] * (CHAT_CHECKED + 5) + [bad])
    src = DataSource(path=path, chat="messages")
    check_sources([src])  # the first records are fine
    with pytest.raises(ConfigError, match=f"deep.jsonl: record {CHAT_CHECKED + 6}: turn 2 is an empty assistant"):
        load(tiny_tok, src, chat_template="chatml", seq_len=64)
