"""prepare_dataset.py: shards, masks and metadata read back with numpy; bad input refused with nothing written;
the shipped sample chat data regenerates byte for byte."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
sys.path.insert(0, ROOT)

import prepare_dataset  # noqa: E402
from prepare_dataset import prepare  # noqa: E402
from tokenizer import EOT_TEXT, ROLE_MARKERS, Tokenizer  # noqa: E402

SHAKESPEARE = os.path.join(SHARED, "corpora", "tinyshakespeare.txt")

# one record per schema, with the turns the template must render and the assistant texts that must be trained
CHAT_CASES = {
    "openai": (
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi to Ana."},
                      {"role": "assistant", "content": "Hi, Ana!"}, {"role": "user", "content": "And Bo?"},
                      {"role": "assistant", "content": "Hi, Bo!"}]},
        [("system", "Be brief."), ("user", "Say hi to Ana."), ("assistant", "Hi, Ana!"), ("user", "And Bo?"),
         ("assistant", "Hi, Bo!")]),
    "sharegpt": (
        {"conversations": [{"from": "system", "value": "You are kind."}, {"from": "human", "value": "2+2?"},
                           {"from": "gpt", "value": "4."}]},
        [("system", "You are kind."), ("user", "2+2?"), ("assistant", "4.")]),
    "alpaca": (
        {"instruction": "Add the numbers.", "input": "3 and 4", "output": "7", "system": "Math bot.",
         "history": [["Hello", "Hi there."]]},
        [("system", "Math bot."), ("user", "Hello"), ("assistant", "Hi there."), ("user", "Add the numbers.\n\n3 and 4"),
         ("assistant", "7")]),
    "prompt_completion": (
        {"prompt": "Capital of Peru?", "completion": "Lima."},
        [("user", "Capital of Peru?"), ("assistant", "Lima.")]),
    "sharegpt_tools": (
        {"conversations": [{"from": "human", "value": "Weather in Oslo?"},
                           {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
                           {"from": "observation", "value": '{"temp": -3}'},
                           {"from": "gpt", "value": "It is -3 degrees."}],
         "tools": '[{"name": "weather"}]'},
        [("system", 'Tools: [{"name": "weather"}]'), ("user", "Weather in Oslo?"),
         ("assistant", '{"name": "weather", "arguments": {"city": "Oslo"}}'), ("tool", '{"temp": -3}'),
         ("assistant", "It is -3 degrees.")]),
    "openai_tool_calls": (
        {"messages": [{"role": "user", "content": "Time in Rome?"},
                      {"role": "assistant", "content": None, "tool_calls": [
                          {"id": "c1", "type": "function",
                           "function": {"name": "clock", "arguments": '{"tz": "Europe/Rome"}'}}]},
                      {"role": "tool", "tool_call_id": "c1", "content": "14:05"},
                      {"role": "assistant", "content": "It is 14:05 in Rome."}]},
        [("user", "Time in Rome?"), ("assistant", '{"name": "clock", "arguments": {"tz": "Europe/Rome"}}'),
         ("tool", "14:05"), ("assistant", "It is 14:05 in Rome.")]),
}


def rendered(turns):
    return "".join(ROLE_MARKERS[r] + c + (EOT_TEXT if r == "assistant" else "\n") for r, c in turns)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for rec in records:
            f.write((rec if isinstance(rec, str) else json.dumps(rec)) + "\n")
    return str(path)


def read_split(out_dir, split, with_mask=False):
    meta = json.load(open(os.path.join(out_dir, "dataset_metadata.json")))
    toks, masks = [], []
    for shard in meta["splits"][split]["shards"]:
        path = os.path.join(out_dir, split, shard["file"])
        toks.append(np.fromfile(path, dtype=meta["token_dtype"]))
        if with_mask:
            masks.append(np.fromfile(path[:-4] + "_mask.bin", dtype=np.uint8))
    empty = np.zeros(0, dtype=meta["token_dtype"])
    tokens = np.concatenate(toks) if toks else empty
    if not with_mask:
        return tokens
    return tokens, (np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8))


def runs(mask):
    """[(start, end)] of the maximal runs of mask 1."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare_dataset.py"), *args], capture_output=True,
                          text=True, timeout=120)


# ----------------------------------------------------------------------------------------------------------------
# chat

@pytest.mark.parametrize("tokenization", ["char", "gpt2"])
@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_chat_mask_covers_exactly_the_assistant_texts(tmp_path, case, tokenization):
    record, turns = CHAT_CASES[case]
    src = write_jsonl(tmp_path / "chat.jsonl", [record, record])
    out = str(tmp_path / "ds")
    meta = prepare([src], out, tokenization, "chat", val_fraction=0.0)
    tok = Tokenizer.load(os.path.join(out, "tokenizer_state.json"))
    tokens, mask = read_split(out, "train", with_mask=True)
    assert meta["splits"]["train"]["conversations"] == 2 and meta["splits"]["val"]["tokens"] == 0
    assert meta["has_mask"] and meta["token_dtype"] == "uint16" and meta["splits"]["train"]["tokens"] == len(tokens)
    # the whole stream: one leading end-of-text token, then each conversation as the template renders it
    assert tokens[0] == tok.eot_token and mask[0] == 0
    assert tok.decode(tokens) == EOT_TEXT + rendered(turns) * 2
    # each run of mask-1 tokens is exactly one assistant text and its end-of-turn token, in order
    answers = [c for r, c in turns if r == "assistant"] * 2
    assert [tok.decode(tokens[a:b]) for a, b in runs(mask)] == [a + EOT_TEXT for a in answers]
    assert int(mask.sum()) == meta["splits"]["train"]["mask_tokens"]
    # and everything at mask 0 is the markers and the system / user / tool text
    assert tok.decode(tokens[mask == 0]) == EOT_TEXT + "".join(
        ROLE_MARKERS[r] + ("" if r == "assistant" else c + "\n") for r, c in turns) * 2


@pytest.mark.parametrize("tokenization", ["char", "gpt2"])
def test_train_on_prompt_and_mask_history(tmp_path, tokenization):
    names = ["openai", "alpaca", "sharegpt_tools", "openai_tool_calls"]
    src = write_jsonl(tmp_path / "chat.jsonl", [CHAT_CASES[n][0] for n in names])
    out = str(tmp_path / "all")
    prepare([src], out, tokenization, "chat", val_fraction=0.0, train_on_prompt=True)
    tokens, mask = read_split(out, "train", with_mask=True)
    assert mask[0] == 0 and mask[1:].all()  # everything but the leading end-of-text token

    out = str(tmp_path / "last")
    prepare([src], out, tokenization, "chat", val_fraction=0.0, mask_history=True)
    tok = Tokenizer.load(os.path.join(out, "tokenizer_state.json"))
    tokens, mask = read_split(out, "train", with_mask=True)
    last_answers = [[c for r, c in CHAT_CASES[n][1] if r == "assistant"][-1] for n in names]
    assert [tok.decode(tokens[a:b]) for a, b in runs(mask)] == [a + EOT_TEXT for a in last_answers]


def test_chat_skips_are_counted_by_reason_and_splits_are_seeded(tmp_path):
    good = CHAT_CASES["prompt_completion"][0]
    bad = [
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": "not a list"},
        [1, 2, 3],
        {"something": "else"},
    ]
    # trailing user turn after the last answer is dropped, not a reason to skip
    trailing = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                             {"role": "user", "content": "dangling"}]}
    src = write_jsonl(tmp_path / "chat.jsonl", [good] * 30 + bad + [trailing])
    out = str(tmp_path / "ds")
    meta = prepare([src], out, "char", "chat", val_fraction=0.2, seed=7)
    assert meta["skipped"] == {"no assistant turn": 1, "empty content": 1, "unknown role 'wizard'": 1,
                               "'messages' is not a list": 1, "not a JSON object": 1,
                               "unknown schema (no messages/conversations/instruction/prompt+completion)": 1}
    s = meta["splits"]
    assert s["train"]["conversations"] + s["val"]["conversations"] == meta["conversations"] == 31
    assert 1 <= s["val"]["conversations"] < 31
    tok = Tokenizer.load(os.path.join(out, "tokenizer_state.json"))
    text = "".join(tok.decode(read_split(out, split)) for split in ("train", "val"))
    assert "dangling" not in text and text.count(EOT_TEXT) == 31 + 2  # one per answer + one leading per split
    assert prepare([src], str(tmp_path / "again"), "char", "chat", val_fraction=0.2, seed=7)["splits"] == s


@pytest.mark.parametrize("val_fraction, expect_val", [(0.001, 1), (0.99, 1)])
def test_at_least_one_conversation_on_each_side(tmp_path, val_fraction, expect_val):
    src = write_jsonl(tmp_path / "chat.jsonl", [CHAT_CASES["prompt_completion"][0]] * 2)
    meta = prepare([src], str(tmp_path / "ds"), "char", "chat", val_fraction=val_fraction)
    assert meta["splits"]["val"]["conversations"] == expect_val
    assert meta["splits"]["train"]["conversations"] == 2 - expect_val


def test_chat_json_list_file_and_forced_schema(tmp_path):
    src = tmp_path / "chat.json"
    src.write_text(json.dumps([CHAT_CASES["alpaca"][0], CHAT_CASES["openai"][0]]))
    meta = prepare([str(src)], str(tmp_path / "ds"), "char", "chat", val_fraction=0.0, chat_schema="alpaca")
    assert meta["conversations"] == 1 and meta["skipped"] == {"no 'instruction' field": 1}


def test_one_table_of_schemas_drives_detection_and_forcing():
    """Every schema in prepare_dataset.CHAT_SCHEMAS is detected from its own record and can be forced on it; a
    forced schema on another schema's record names the key it lacks."""
    assert prepare_dataset.SCHEMA_CHOICES == ("auto", *prepare_dataset.CHAT_SCHEMAS)
    for name, schema in prepare_dataset.CHAT_SCHEMAS.items():
        record, turns = CHAT_CASES[name]
        assert prepare_dataset.detect_schema(record) == name
        assert prepare_dataset.conversation_turns(record, name) == prepare_dataset.conversation_turns(record) == (turns, None)
        other = CHAT_CASES["openai" if name != "openai" else "sharegpt"][0]
        assert prepare_dataset.conversation_turns(other, name) == (None, f"no '{schema.keys[0]}' field")
    # prompt without completion: not detected as prompt/completion, but forcing it says what is wrong
    assert prepare_dataset.conversation_turns({"prompt": "x"})[1].startswith("unknown schema (no messages/")
    assert prepare_dataset.conversation_turns({"prompt": "x"}, "prompt_completion") == (None, "content is not text")


# ----------------------------------------------------------------------------------------------------------------
# text

@pytest.mark.parametrize("tokenization", ["char", "gpt2"])
def test_plain_text_round_trip(tmp_path, tokenization):
    text = open(SHAKESPEARE, encoding="utf-8").read()[:60_000]
    src = tmp_path / "shakespeare.txt"
    src.write_text(text)
    out = str(tmp_path / "ds")
    meta = prepare([str(src)], out, tokenization, "text", val_fraction=0.1, block_bytes=4096)  # many blocks
    tok = Tokenizer.load(os.path.join(out, "tokenizer_state.json"))
    assert meta["token_dtype"] == "uint16" and not meta["has_mask"] and meta["eot_token"] == tok.eot_token
    for split in ("train", "val"):
        shards = meta["splits"][split]["shards"]
        for shard in shards:
            assert os.path.getsize(os.path.join(out, split, shard["file"])) == shard["tokens"] * 2
        assert meta["splits"][split]["tokens"] == sum(s["tokens"] for s in shards)
        assert not glob.glob(os.path.join(out, split, "*_mask.bin"))
    train, val = tok.decode(read_split(out, "train")), tok.decode(read_split(out, "val"))
    assert train.endswith(EOT_TEXT) and val.endswith(EOT_TEXT)
    assert train[:-len(EOT_TEXT)] + val[:-len(EOT_TEXT)] == text
    assert train[:-len(EOT_TEXT)].endswith("\n") and 0.08 < len(val) / len(text) < 0.12  # cut at a line end
    if tokenization == "gpt2":  # blocks are cut where GPT-2's pre-tokenizer splits anyway: same ids as one piece
        cut = len(train) - len(EOT_TEXT)
        assert read_split(out, "train").tolist() == tok.encode(text[:cut]) + [tok.eot_token]


def test_jsonl_text_documents(tmp_path):
    docs = [f"Document {i}: " + "to be or not to be " * (i % 5 + 1) for i in range(40)]
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)] + [{"text": ""}])
    out = str(tmp_path / "ds")
    meta = prepare([src], out, "gpt2", "text", val_fraction=0.2, seed=3)
    tok = Tokenizer.load(os.path.join(out, "tokenizer_state.json"))
    got = {split: tok.decode(read_split(out, split)).split(EOT_TEXT)[:-1] for split in ("train", "val")}
    assert sorted(got["train"] + got["val"]) == sorted(docs)  # every document once, as written
    assert [d for d in docs if d in got["train"]] == got["train"]  # order kept within a split
    assert meta["splits"]["val"]["documents"] == len(got["val"]) >= 1 and meta["skipped"] == {"empty text": 1}
    assert meta["token_dtype"] == "uint16" and meta["documents"] == 40


def test_two_workers_write_identical_shards(tmp_path):
    text = open(SHAKESPEARE, encoding="utf-8").read()[:40_000]
    (tmp_path / "a.txt").write_text(text)
    write_jsonl(tmp_path / "b.jsonl", [{"text": line} for line in text.splitlines() if line])
    write_jsonl(tmp_path / "c.jsonl", [rec for rec, _ in CHAT_CASES.values()] * 40)
    jobs = [([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], "text", "gpt2"),
            ([str(tmp_path / "c.jsonl")], "chat", "char")]
    for inputs, fmt, tokenization in jobs:
        metas = []
        for workers in (1, 2):
            out = str(tmp_path / f"{fmt}{workers}")
            metas.append(prepare(inputs, out, tokenization, fmt, num_workers=workers, block_bytes=2048))
        assert metas[0]["splits"] == metas[1]["splits"]
        files = sorted(os.path.relpath(p, str(tmp_path / f"{fmt}1"))
                       for p in glob.glob(str(tmp_path / f"{fmt}1" / "*" / "*.bin")))
        assert files
        for rel in files:
            assert open(tmp_path / f"{fmt}1" / rel, "rb").read() == open(tmp_path / f"{fmt}2" / rel, "rb").read()


def test_shards_roll_over(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [rec for rec, _ in CHAT_CASES.values()] * 10)
    one = prepare([src], str(tmp_path / "one"), "char", "chat", val_fraction=0.0)
    many = prepare([src], str(tmp_path / "many"), "char", "chat", val_fraction=0.0, tokens_per_shard=500)
    shards = many["splits"]["train"]["shards"]
    assert len(shards) == -(-one["splits"]["train"]["tokens"] // 500) > 2
    assert [s["file"] for s in shards[:2]] == ["shard_00000.bin", "shard_00001.bin"]
    assert all(s["tokens"] == 500 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 500
    for s in shards:
        path = tmp_path / "many" / "train" / s["file"]
        assert os.path.getsize(path) == 2 * s["tokens"] == 2 * os.path.getsize(str(path)[:-4] + "_mask.bin")
    a, b = read_split(str(tmp_path / "one"), "train", True), read_split(str(tmp_path / "many"), "train", True)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# ----------------------------------------------------------------------------------------------------------------
# bad input: one clear line, non-zero exit, nothing written and an existing dataset untouched

def _existing_dataset(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "dataset_metadata.json").write_text('{"old": true}')
    return out


def _untouched(out):
    assert os.listdir(out) == ["dataset_metadata.json"]
    assert json.loads((out / "dataset_metadata.json").read_text()) == {"old": True}
    assert not glob.glob(str(out) + ".*")  # no temp or old folder left beside it


@pytest.mark.parametrize("case", ["missing", "empty", "not_json", "no_text", "format", "no_usable"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, case):
    fmt = "chat" if case == "no_usable" else "text"
    good = write_jsonl(tmp_path / "good.jsonl", [CHAT_CASES["openai"][0] if fmt == "chat" else {"text": "fine"}])
    if case == "missing":
        src, expect = str(tmp_path / "nope.txt"), "nope.txt: input file not found"
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        src, expect = str(tmp_path / "empty.txt"), "empty.txt: input file is empty"
    elif case == "not_json":
        src, expect = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, "{oops"]), "bad.jsonl:3: not valid JSON"
    elif case == "no_text":
        src, expect = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"body": "b"}]), 'bad.jsonl:2: no "text"'
    elif case == "format":
        src, fmt, expect = good, "markdown", "unknown --format 'markdown'"
    else:
        src = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}, {"prompt": "x", "completion": ""}])
        expect = "bad.jsonl: no usable record (no assistant turn: 1, empty content: 1)"
    out = _existing_dataset(tmp_path)
    r = run_cli("--input_files", good, src, "--out_dir", str(out), "--tokenization", "char", "--format", fmt)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()  # the error, after any "skipped file:line: reason" reports
    assert lines[-1].startswith("error: ") and expect in lines[-1], r.stderr
    assert all(line.startswith("skipped ") for line in lines[:-1]), r.stderr
    _untouched(out)
    # the same through the function: an exception, and no dataset folder at a new path
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        prepare([good, src], str(tmp_path / "new"), "char", fmt)
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert not glob.glob(str(tmp_path / "new*"))


def test_tokenizer_from_reuses_a_base_vocabulary(tmp_path):
    """Char-level two-phase training: the SFT set is prepared with the pretraining set's vocabulary, so the base
    model fits it; a character outside that vocabulary is an error naming the file, with nothing written."""
    base_txt = tmp_path / "base.txt"
    base_txt.write_text("Hello there, Maria! What is your name? My name is Omar.\n" * 20)
    prepare([str(base_txt)], str(tmp_path / "base"), "char", "text")
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": "What is my name?"}, {"role": "assistant", "content": "Maria."}]}] * 4)
    r = run_cli("--input_files", chats, "--out_dir", str(tmp_path / "sft"), "--format", "chat",
                "--tokenizer_from", str(tmp_path / "base"))
    assert r.returncode == 0, r.stderr
    base_tok = Tokenizer.load(str(tmp_path / "base" / "tokenizer_state.json"))
    assert Tokenizer.load(str(tmp_path / "sft" / "tokenizer_state.json")).state_dict() == base_tok.state_dict()
    tokens = read_split(str(tmp_path / "sft"), "train")
    assert base_tok.decode(tokens).count(ROLE_MARKERS["assistant"] + "Maria." + EOT_TEXT) >= 1
    # characters the base never saw ('Z', 'b', 'q') cannot be encoded with its vocabulary
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "Zebra?"}, {"role": "assistant", "content": "quiet"}]}])
    out = _existing_dataset(tmp_path)
    r = run_cli("--input_files", bad, "--out_dir", str(out), "--format", "chat", "--tokenizer_from", str(tmp_path / "base"))
    assert r.returncode == 1 and "bad.jsonl: 3 character(s) 'Zbq' are not in the vocabulary of" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    _untouched(out)


def test_os_level_bad_paths_are_one_line_errors(tmp_path):
    """Paths the operating system refuses (a file where a folder should be) are named in one line, as other bad
    input is; nothing is written."""
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "one"}, {"text": "two"}])
    cases = [(["--out_dir", str(tmp_path / "docs.jsonl" / "ds")], "docs.jsonl/ds: cannot create"),
             (["--out_dir", str(tmp_path / "ds"), "--tokenizer_from", src], "tokenizer_state.json not found")]
    for extra, expect in cases:
        r = run_cli("--input_files", src, "--tokenization", "char", *extra)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and expect in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl"]


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    """Only the project's own errors become one line: anything else (a bug, a library's failure) propagates."""
    def broken(*args, **kwargs):
        raise RuntimeError("a bug somewhere inside")
    monkeypatch.setattr(prepare_dataset, "prepare", broken)
    with pytest.raises(RuntimeError, match="a bug somewhere inside"):
        prepare_dataset.main(["--input_files", "x.txt", "--out_dir", str(tmp_path / "ds")])


def test_a_folder_that_is_not_a_dataset_is_never_replaced(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "one"}, {"text": "two"}])
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    r = run_cli("--input_files", src, "--out_dir", str(tmp_path / "project"), "--tokenization", "char")
    assert r.returncode == 1 and "is not a dataset folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path / "project") == ["notes.txt"]


def test_success_replaces_an_existing_dataset(tmp_path):
    out = _existing_dataset(tmp_path)
    src = write_jsonl(tmp_path / "docs.jsonl", [{"text": "one"}, {"text": "two"}])
    r = run_cli("--input_files", src, "--out_dir", str(out), "--tokenization", "char", "--format", "text")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["dataset_metadata.json", "tokenizer_state.json", "train", "val"]
    assert not glob.glob(str(out) + ".*")
    assert "train" in r.stdout and "tokens/s" in r.stdout


# ----------------------------------------------------------------------------------------------------------------
# the shipped sample chat data

def test_sample_chat_regenerates_and_prepares(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "data"))
    import make_sample_chat
    make_sample_chat.main(["--out_dir", str(tmp_path)])
    for name in ("sample_chat.jsonl", "sample_chat_heldout.jsonl"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(ROOT, "data", name), "rb").read(), \
            f"data/{name} is stale: run python data/make_sample_chat.py"
    assert os.path.getsize(tmp_path / "sample_chat.jsonl") < 1_000_000
    meta = prepare([str(tmp_path / "sample_chat.jsonl")], str(tmp_path / "ds"), "char", "chat")
    assert meta["skipped"] == {} and 3000 <= meta["conversations"] <= 6000
    assert meta["splits"]["val"]["conversations"] > 100
    train_prompts = set()
    for line in open(tmp_path / "sample_chat.jsonl"):
        msgs = json.loads(line)["messages"]
        assert make_sample_chat.rendered_length([(m["role"], m["content"]) for m in msgs]) <= 128
        train_prompts.add(json.dumps(msgs[:-1]))
    tok = Tokenizer.load(str(tmp_path / "ds" / "tokenizer_state.json"))
    heldout = [json.loads(line) for line in open(tmp_path / "sample_chat_heldout.jsonl")]
    assert 40 <= len(heldout) <= 60
    for rec in heldout:
        assert json.dumps(rec["messages"][:-1]) not in train_prompts and rec["messages"][-1]["role"] == "assistant"
        for m in rec["messages"]:
            tok.encode(m["content"])  # every held-out character is in the vocabulary


# ----------------------------------------------------------------------------------------------------------------
# Parquet: the same records as JSONL give the same bytes

def write_parquet(path, records, row_group_size=7):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    # pa.array infers one schema from every record (Table.from_pylist would take the first row's keys only)
    pq.write_table(pa.Table.from_struct_array(pa.array(records)), str(path), row_group_size=row_group_size)
    return str(path)


def parquet_and_jsonl_records(fmt):
    """chat: every schema of CHAT_CASES mixed in one file (so each Parquet row has nulls in the other schemas'
    columns), numbered so the records differ; text: Shakespeare paragraphs in a "body" field."""
    if fmt == "chat":
        records = []
        for i in range(12):
            for record, _ in CHAT_CASES.values():
                rec = json.loads(json.dumps(record).replace("?", f" #{i}?"))
                records.append(rec)
        return records
    with open(SHAKESPEARE) as f:
        paragraphs = [p for p in f.read()[:60_000].split("\n\n") if p.strip()]
    return [{"id": i, "body": p} for i, p in enumerate(paragraphs)]


def dataset_files(out):
    """{relative path: bytes} of a dataset folder, dataset_metadata.json without what names the inputs."""
    files = {}
    for path in sorted(glob.glob(os.path.join(out, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            files[os.path.relpath(path, out)] = open(path, "rb").read()
    meta = json.loads(files.pop("dataset_metadata.json"))
    for key in ("input_files", "created"):
        meta.pop(key)
    for key in ("input_files", "out_dir"):
        meta["args"].pop(key)
    return files, meta


@pytest.mark.parametrize("fmt", ["chat", "text"])
def test_parquet_gives_the_bytes_jsonl_gives(tmp_path, fmt):
    records = parquet_and_jsonl_records(fmt)
    src_jsonl = write_jsonl(tmp_path / "set.jsonl", records)
    src_parquet = write_parquet(tmp_path / "set.parquet", records)
    field = [] if fmt == "chat" else ["--text_field", "body"]
    outs = []
    for src in (src_jsonl, src_parquet):  # block_bytes small: JSONL and Parquet chunks end at different records
        out = str(tmp_path / f"ds_{os.path.basename(src)}")
        meta = prepare([src], out, "gpt2", fmt, val_fraction=0.2, block_bytes=3000,
                       text_field="body" if fmt == "text" else "text")
        outs.append(dataset_files(out))
    assert outs[0] == outs[1]
    doc_key = "conversations" if fmt == "chat" else "documents"
    assert meta[doc_key] == len(records) and meta["splits"]["val"][doc_key] > 0 and meta["skipped"] == {}
    # the command line, reading both at once (and two workers)
    r = run_cli("--input_files", src_parquet, src_jsonl, "--out_dir", str(tmp_path / "both"), "--format", fmt,
                "--num_workers", "2", *field)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "both" / "dataset_metadata.json").read_text())[doc_key] == 2 * len(records)


def test_parquet_is_read_a_row_group_at_a_time(tmp_path):
    records = parquet_and_jsonl_records("text")
    src = write_parquet(tmp_path / "set.parquet", records, row_group_size=50)
    opts = {"format": "text", "text_field": "body", "chat_schema": "auto"}
    chunks = list(prepare_dataset.iter_chunks([(src, "parquet")], 0.1, block_bytes=4000, opts=opts))
    assert len(chunks) > len(records) // 50  # several chunks per row group, never the whole file at once
    rows = [where for chunk in chunks for where, _ in chunk["items"]]
    assert rows == [f"{src}: row {i + 1}" for i in range(len(records))]
    assert [rec["body"] for chunk in chunks for _, rec in chunk["items"]] == [r["body"] for r in records]
    assert all(len(chunk["items"]) < 50 for chunk in chunks)
    assert abs(sum(c["nbytes"] for c in chunks) - os.path.getsize(src)) < len(chunks)


@pytest.mark.parametrize("case", ["no_column", "no_chat_column", "not_parquet", "truncated"])
def test_bad_parquet_is_one_line_and_writes_nothing(tmp_path, case):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "fine"}])
    fmt = "text"
    if case == "no_column":
        src = write_parquet(tmp_path / "set.parquet", [{"body": "a", "id": 1}])
        expect = "set.parquet: no column 'text' (columns: body, id); pass --text_field NAME"
    elif case == "no_chat_column":
        src, fmt = write_parquet(tmp_path / "set.parquet", [{"question": "a", "answer": "b"}]), "chat"
        good = write_jsonl(tmp_path / "good.jsonl", [CHAT_CASES["openai"][0]])
        expect = "set.parquet: no chat column (columns: question, answer)"
    elif case == "not_parquet":
        src = write_jsonl(tmp_path / "set.parquet", [{"text": "a"}])
        expect = "set.parquet: not a Parquet file"
    else:
        whole = open(write_parquet(tmp_path / "whole.parquet", [{"text": "a"}] * 50), "rb").read()
        src = str(tmp_path / "set.parquet")
        open(src, "wb").write(whole[:len(whole) // 2])
        expect = "set.parquet: not a Parquet file"
    out = _existing_dataset(tmp_path)
    r = run_cli("--input_files", good, src, "--out_dir", str(out), "--tokenization", "char", "--format", fmt)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1 and expect in r.stderr, r.stderr
    _untouched(out)
    with pytest.raises(ValueError) as e:
        prepare([good, src], str(tmp_path / "new"), "char", fmt)
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert not glob.glob(str(tmp_path / "new*"))
