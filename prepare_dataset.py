"""
Dataset preparation: text or chat files -> token shards (+ loss masks) + metadata, streamed, nothing half-written.

    python prepare_dataset.py --input_files corpus.txt --out_dir data/corpus --tokenization gpt2 --format text
    python prepare_dataset.py --input_files chats.jsonl --out_dir data/chats --tokenization char --format chat
    python prepare_dataset.py --input_files train-00000-of-00002.parquet train-00001-of-00002.parquet \
        --out_dir data/chats --format chat                 # Parquet: the same records, as Hugging Face sets ship them

Output (read by data.py):
    D/train/shard_00000.bin ...       raw token ids, no header; uint16 when vocab_size <= 65536, else uint32
    D/train/shard_00000_mask.bin ...  chat only: uint8 0/1 per token, 1 = the token is trained on
    D/train/starts.bin                uint64 offset of every conversation / document in the split's token stream
                                      (its BOS: the end-of-text token before it), for packed training (data.py)
    D/val/...                         the same for the validation split
    D/tokenizer_state.json            the tokenizer (tokenizer.py), so training and sampling decode alike
    D/dataset_metadata.json           token counts, shards, dtype, skipped records, the arguments (see prepare())

Text format: every document is followed by the end-of-text token. A plain text file is one document whose last
val_fraction of bytes (cut at a line boundary) is a second, validation document; a JSONL file holds one document
per line ({"text": ...}, or the field --text_field names), each sent to val with probability val_fraction.
Parquet files (pyarrow) hold records as rows, read wherever JSONL is: a row is the record, its columns the fields
(a null is a missing field), so a Parquet file and the same records as JSONL give byte-identical shards.
Chat format: every record is one conversation in one of four schemas (OpenAI messages, ShareGPT conversations,
Alpaca instruction/output, prompt/completion), rendered with tokenizer.render_chat, the same template sample.py
uses. Each split's stream starts with one end-of-text token so that every conversation follows one.

Memory stays flat however large the corpus: inputs are read in ~1 MB chunks (text blocks cut at a newline, runs
of JSONL lines, or batches of Parquet rows read one row group at a time), tokenized (optionally by a pool of worker
processes, order preserved), and appended to the open shard files. Everything is written into D.tmp-<pid> and renamed to D only when complete.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter, deque
from contextlib import closing
from datetime import datetime, timezone
from typing import Callable, NamedTuple

import numpy as np
from tqdm import tqdm

from errors import InputError, MissingFileError, one_line_errors
from tokenizer import ROLE_MARKERS, Tokenizer, content_text, render_chat

PARQUET_MAGIC = b"PAR1"
BLOCK_BYTES = 1 << 20  # plain text is read and tokenized in blocks of about this size; JSONL in runs of lines
SHOW_SKIPPED = 5  # the first few skipped records are reported with file:line


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 65536 else np.uint32


# ----------------------------------------------------------------------------------------------------------------
# chat records -> [(role, content), ...]: a parser per schema, then the table of schemas (CHAT_SCHEMAS)

def tool_calls_text(calls):
    """OpenAI assistant "tool_calls" as the assistant's text: the JSON of {"name", "arguments"} (one call) or a
    list of them, the same shape as a ShareGPT/LLaMA-Factory "function_call" value, so both train alike."""
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return None
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends the arguments as a JSON string; show them as JSON, not escaped
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        out.append({"name": fn["name"], "arguments": args})
    return json.dumps(out[0] if len(out) == 1 else out, ensure_ascii=False)


# each schema's roles, mapped onto the template's roles (tokenizer.ROLE_MARKERS)
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "tool", "function": "tool"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant",  # LLaMA-Factory tool data: the model's call, trained like its text
                  "observation": "tool", "tool": "tool"}  # tool results: context the model reads, never trained


def _openai_turns(rec):
    msgs = rec.get("messages")
    if not isinstance(msgs, list):
        return None, "'messages' is not a list"
    turns = []
    for m in msgs:
        if not isinstance(m, dict):
            return None, "message is not an object"
        role = m.get("role")
        if role not in OPENAI_ROLES:
            return None, f"unknown role {role!r}"
        text = content_text(m.get("content"))  # None (images, numbers): the record is skipped
        if text is None:
            return None, "content is not text"
        calls = m.get("tool_calls") or ([m["function_call"]] if m.get("function_call") else None)
        if role == "assistant" and calls:
            calls_text = tool_calls_text(calls) if isinstance(calls, list) else None
            if calls_text is None:
                return None, "malformed tool_calls"
            text = f"{text}\n{calls_text}" if text else calls_text
        turns.append((OPENAI_ROLES[role], text))
    return turns, None


def _sharegpt_turns(rec):
    msgs = rec.get("conversations")
    if not isinstance(msgs, list):
        return None, "'conversations' is not a list"
    turns = []
    system = rec.get("system")
    tools = rec.get("tools")
    if tools:  # LLaMA-Factory's tool descriptions: the model must see them to call them; they go in the system turn
        tools = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
        system = f"{system}\nTools: {tools}" if isinstance(system, str) and system else f"Tools: {tools}"
    if system is not None:
        if not isinstance(system, str):
            return None, "content is not text"
        turns.append(("system", system))
    for m in msgs:
        if not isinstance(m, dict):
            return None, "message is not an object"
        role = m.get("from")
        if role not in SHAREGPT_ROLES:
            return None, f"unknown role {role!r}"
        if not isinstance(m.get("value"), str):
            return None, "content is not text"
        turns.append((SHAREGPT_ROLES[role], m["value"]))
    return turns, None


def _alpaca_turns(rec):
    fields = [rec.get(k) for k in ("instruction", "input", "output", "system")]
    if not isinstance(rec.get("instruction"), str) or not isinstance(rec.get("output"), str) or \
            not all(f is None or isinstance(f, str) for f in fields):
        return None, "content is not text"
    history = rec.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 and all(isinstance(s, str) for s in h)
                                                for h in history):
        return None, "'history' is not a list of [question, answer] pairs"
    turns = [("system", rec["system"])] if rec.get("system") is not None else []
    for q, a in history:
        turns += [("user", q), ("assistant", a)]
    prompt = "\n\n".join(s for s in (rec["instruction"], rec.get("input")) if s)  # empty input: instruction alone
    turns += [("user", prompt), ("assistant", rec["output"])]
    return turns, None


def _prompt_completion_turns(rec):
    if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("completion"), str):
        return None, "content is not text"
    return [("user", rec["prompt"]), ("assistant", rec["completion"])], None


class ChatSchema(NamedTuple):
    keys: tuple  # a record holding all of these is of this schema; a record forced to it must hold keys[0]
    turns: Callable  # record -> ([(role, content), ...], None), or (None, why the record is unusable)
    described: str  # how the "no usable record" hint names it


# The one table of chat schemas, in detection order (a record with both "messages" and "prompt" is OpenAI's).
# --chat_schema's choices and help, detection, the check of a forced schema and the error hint are read from it;
# scaffold.py parses its chat records through it too. A new schema is one parser above and one row here.
CHAT_SCHEMAS = {
    "openai": ChatSchema(("messages",), _openai_turns, "OpenAI 'messages'"),
    "sharegpt": ChatSchema(("conversations",), _sharegpt_turns, "ShareGPT 'conversations'"),
    "alpaca": ChatSchema(("instruction",), _alpaca_turns, "Alpaca 'instruction'/'output'"),
    "prompt_completion": ChatSchema(("prompt", "completion"), _prompt_completion_turns, "'prompt'/'completion'"),
}
SCHEMA_CHOICES = ("auto", *CHAT_SCHEMAS)  # --chat_schema


def detect_schema(rec):
    """The name of the first schema whose keys the record holds, or None."""
    return next((name for name, s in CHAT_SCHEMAS.items() if all(k in rec for k in s.keys)), None)


def conversation_turns(rec, schema="auto"):
    """One chat record -> ([(role, content), ...], None), or (None, reason) when the record cannot be used.
    Trailing turns after the last assistant turn are dropped: nothing would be trained on them."""
    if not isinstance(rec, dict):
        return None, "not a JSON object"
    if schema == "auto":
        schema = detect_schema(rec)
        if schema is None:
            known = "/".join("+".join(s.keys) for s in CHAT_SCHEMAS.values())
            return None, f"unknown schema (no {known})"
    elif CHAT_SCHEMAS[schema].keys[0] not in rec:
        return None, f"no '{CHAT_SCHEMAS[schema].keys[0]}' field"
    turns, reason = CHAT_SCHEMAS[schema].turns(rec)
    if reason:
        return None, reason
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
    if last < 0:
        return None, "no assistant turn"
    turns = turns[:last + 1]
    if any(not content.strip() for _, content in turns):
        return None, "empty content"
    return turns, None


# ----------------------------------------------------------------------------------------------------------------
# reading the inputs as chunks (plain dicts, cheap to send to a worker process)

def input_kind(path, fmt):
    """'text' (plain text), 'jsonl' (one JSON record per line), 'json' (one JSON list of records) or 'parquet'."""
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(0, os.path.getsize(path) - 4))
        tail = f.read(4)
    if head == tail == PARQUET_MAGIC:  # a Parquet file starts and ends with its magic, whatever its name
        return "parquet"
    if ext in (".parquet", ".pq"):
        raise InputError(f"{path}: not a Parquet file (it does not start and end with the Parquet magic bytes "
                         f"'PAR1'); give the file its real extension (.jsonl, .json, .txt) or re-export it")
    if ext == ".json":
        with open(path, "rb") as f:  # a .json file may also be JSONL: look at its first non-blank byte
            head = f.read(4096).lstrip()
        return "json" if head.startswith(b"[") else "jsonl"
    if ext == ".jsonl":
        return "jsonl"
    if fmt == "chat":
        raise InputError(f"{path}: --format chat needs a .jsonl file (one conversation per line), a .json file "
                         f"(a list of conversations) or a .parquet file (one conversation per row)")
    return "text"


def _is_cut(data, i):
    """True when a chunk may end after the newline at data[i] without changing GPT-2's tokenization: with a
    non-whitespace character on both sides, that newline is a pre-tokenizer piece of its own whether or not the
    text is cut there. (A whitespace run like "  \\n" or "\\n\\n" would be split differently at a chunk edge.)"""
    before = data[max(0, i - 4):i].decode("utf-8", "ignore")[-1:]  # the whole character before the newline
    after = data[i + 1:i + 5].decode("utf-8", "ignore")[:1]  # and after it
    return bool(before) and bool(after) and not before.isspace() and not after.isspace()


def _block_cut(data):
    """Where to end a block: after the last newline that is a clean cut, else after the last newline, else at the
    last UTF-8 character boundary (a single line longer than the block: tokens may differ at the seam)."""
    i = data.rfind(b"\n")
    last_newline = i
    while i > 0 and not _is_cut(data, i):
        i = data.rfind(b"\n", 0, i)
    if i > 0:
        return i + 1
    if last_newline >= 0:
        return last_newline + 1
    end = len(data)
    while end > 0 and (data[end - 1] & 0xC0) == 0x80:  # back off continuation bytes to the lead byte...
        end -= 1
    return end - 1 if end > 0 and data[end - 1] >= 0xC0 else end  # ...and leave the incomplete character out


def _find_newline(f, start, stop):
    """Offset of the first b'\\n' in [start, stop) of an open binary file, or -1 (scans in blocks)."""
    f.seek(start)
    pos = start
    while pos < stop:
        data = f.read(min(BLOCK_BYTES, stop - pos))
        i = data.find(b"\n")
        if i >= 0:
            return pos + i
        pos += len(data)
    return -1


def _rfind_newline(f, start, stop):
    """Offset of the last b'\\n' in [start, stop), or -1 (scans backwards in blocks)."""
    while stop > start:
        lo = max(start, stop - BLOCK_BYTES)
        f.seek(lo)
        i = f.read(stop - lo).rfind(b"\n")
        if i >= 0:
            return lo + i
        stop = lo
    return -1


def text_split_offset(path, val_fraction):
    """The byte offset where a plain text file's validation part starts: just after the first line break at or
    after (1 - val_fraction) of its bytes (else the last one before; a file with no line break: that very byte)."""
    size = os.path.getsize(path)
    if val_fraction <= 0:
        return size
    target = int(size * (1 - val_fraction))
    with open(path, "rb") as f:
        i = _find_newline(f, target, size - 1)  # a newline as the very last byte would leave val empty
        if i < 0:
            i = _rfind_newline(f, 0, target)
        if i >= 0:
            return i + 1
        f.seek(target)
        while target < size and (f.read(1)[0] & 0xC0) == 0x80:  # not inside a multi-byte character
            target += 1
        return target


def _text_chunks(file_idx, path, val_fraction, block_bytes):
    split_at = text_split_offset(path, val_fraction)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        for split, start, end in (("train", 0, split_at), ("val", split_at, size)):
            pos = start
            while pos < end:
                f.seek(pos)
                data = f.read(min(block_bytes, end - pos))
                if pos + len(data) < end:
                    data = data[:_block_cut(data) or len(data)]  # 0 only for a block of a few bytes
                yield {"kind": "text", "file": file_idx, "path": path, "offset": pos, "data": data, "split": split,
                       "end_of_doc": pos + len(data) >= end, "nbytes": len(data)}
                pos += len(data)


def _record_chunks(file_idx, path, kind, block_bytes):
    items, nbytes = [], 0
    if kind == "json":
        # a JSON list is loaded whole (a JSON array cannot be streamed with the standard library): for corpora
        # that do not fit in memory, use JSONL
        with open(path, "rb") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .json input must be one JSON list "
                                 f"of records (or use .jsonl, one record per line)") from None
            except UnicodeDecodeError:
                raise InputError(f"{path}: not UTF-8 text; convert the file to UTF-8") from None
        size = os.path.getsize(path)
        for i, rec in enumerate(records):
            items.append((f"{path}: record {i + 1}", rec))
            if len(items) == 1000:
                yield {"kind": "records", "file": file_idx, "parsed": True, "items": items,
                       "nbytes": size * len(items) // max(len(records), 1)}
                items = []
        if items:
            yield {"kind": "records", "file": file_idx, "parsed": True, "items": items,
                   "nbytes": size * len(items) // max(len(records), 1)}
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            nbytes += len(line)
            if line.strip():  # blank lines are allowed and ignored
                items.append((f"{path}:{lineno}", line))
            if nbytes >= block_bytes:
                yield {"kind": "records", "file": file_idx, "parsed": False, "items": items, "nbytes": nbytes}
                items, nbytes = [], 0
    if items or nbytes:
        yield {"kind": "records", "file": file_idx, "parsed": False, "items": items, "nbytes": nbytes}


# ----------------------------------------------------------------------------------------------------------------
# Parquet: rows as records, streamed a batch of rows at a time (pyarrow reads one row group at a time)

def _open_parquet(path):
    import pyarrow.parquet as pq  # only Parquet inputs need pyarrow
    try:
        # pre_buffer=False: with pyarrow's default (True) the reader keeps what it read, and its memory grows with
        # the file (measured: +80 MB over a 120 MB file); without it memory stays at one row group
        return pq.ParquetFile(path, pre_buffer=False)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError (and more) for a damaged file
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: not a readable Parquet file ({first}); re-download or re-export it") from None


def parquet_columns(path, opts):
    """The columns to read from a Parquet file (text: the text field; chat: all), checked against its schema
    before anything is written: a missing column is one error naming the file, not one skipped row per row."""
    names = _open_parquet(path).schema_arrow.names
    shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
    if opts["format"] == "text":
        field = opts["text_field"]
        if field not in names:
            raise InputError(f"{path}: no column '{field}' (columns: {shown}); pass --text_field NAME to read "
                             f"another column, or --format chat for conversations")
        return [field]
    schema = opts["chat_schema"]
    schemas = list(CHAT_SCHEMAS.values()) if schema == "auto" else [CHAT_SCHEMAS[schema]]
    if not any(s.keys[0] in names for s in schemas):
        *most, last = (s.described for s in schemas)
        need = f"{', '.join(most)} or {last}" if most else last
        raise InputError(f"{path}: no chat column (columns: {shown}); chat rows need {need}")
    return None  # every column: a record may use several (system, tools, history, ...)


def _drop_nulls(value):
    """A Parquet row as the JSON record it came from: a column (or struct field) that a record did not have is
    null in Parquet, since all rows share one schema; JSON simply leaves it out. Footgun: an explicit JSON null
    inside a record is dropped too (the record reads as if the field were missing, as for the top-level fields)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _parquet_chunks(file_idx, path, opts, block_bytes):
    pf = _open_parquet(path)
    meta = pf.metadata
    rows, size = meta.num_rows, os.path.getsize(path)
    if rows == 0:
        return
    raw = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    batch = max(1, min(65536, block_bytes * rows // max(raw, 1)))  # rows per chunk: about block_bytes of data
    done = 0
    try:
        for records in pf.iter_batches(batch_size=batch, columns=parquet_columns(path, opts)):
            items = [(f"{path}: row {done + j + 1}", _drop_nulls(rec)) for j, rec in enumerate(records.to_pylist())]
            done += len(items)
            yield {"kind": "records", "file": file_idx, "parsed": True, "items": items,
                   "nbytes": size * len(items) // rows}
    except (OSError, ValueError, TypeError) as e:  # ArrowInvalid is a ValueError; ArrowNotImplementedError too
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise InputError(f"{path}: rows after row {done} are unreadable ({first}); re-download or re-export it") \
            from None


def iter_chunks(files, val_fraction, block_bytes=BLOCK_BYTES, opts=None):
    """All inputs as a stream of chunks, in order. files: [(path, kind)]. A chunk never spans two files.
    opts: prepare()'s options (format, text_field, chat_schema), for the columns of Parquet files."""
    for file_idx, (path, kind) in enumerate(files):
        if kind == "text":
            yield from _text_chunks(file_idx, path, val_fraction, block_bytes)
        elif kind == "parquet":
            yield from _parquet_chunks(file_idx, path, opts, block_bytes)
        else:
            yield from _record_chunks(file_idx, path, kind, block_bytes)


# ----------------------------------------------------------------------------------------------------------------
# work on one chunk; runs in a worker process (or in-process with --num_workers 1)

_WORKER = {}  # this process's tokenizer and options, set by init_worker


def init_worker(tok_state, opts):
    # tiktoken's Encoding may not pickle: every worker rebuilds the tokenizer from its plain-data state
    _WORKER["tok"] = Tokenizer.from_state(tok_state) if tok_state else None
    _WORKER["opts"] = opts


def _decode_block(chunk):
    try:
        return chunk["data"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{chunk['path']}: byte {chunk['offset'] + e.start} is not UTF-8 text; convert the file to "
                         f"UTF-8") from None


def _load_record(where, payload, parsed):
    if parsed:
        return payload
    try:
        return json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise InputError(f"{where}: not valid JSON ({msg}); each line of a JSONL file must be one JSON object") from None


def _text_field(where, rec, field):
    if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
        raise InputError(f'{where}: no "{field}" string field; --format text needs one {{"{field}": ...}} per '
                         f'record (--text_field names another field; --format chat for conversations)')
    return rec[field]


def _usable_records(chunk):
    """(where, text) for text data or (where, turns) for chat data, plus [(where, reason)] of skipped records."""
    fmt, schema = _WORKER["opts"]["format"], _WORKER["opts"]["chat_schema"]
    usable, skipped = [], []
    for where, payload in chunk["items"]:
        rec = _load_record(where, payload, chunk["parsed"])
        if fmt == "text":
            value, reason = _text_field(where, rec, _WORKER["opts"]["text_field"]), None
            if not value:
                reason = "empty text"
        else:
            value, reason = conversation_turns(rec, schema)
        if reason:
            skipped.append((where, reason))
        else:
            usable.append((where, value))
    return usable, skipped


def chars_of_chunk(chunk):
    """First pass of --tokenization char: the set of characters the chunk's text uses."""
    if chunk["kind"] == "text":
        return {"chars": set(_decode_block(chunk)), "nbytes": chunk["nbytes"]}
    usable, _ = _usable_records(chunk)
    chars = set()
    for _, value in usable:
        chars.update(value if isinstance(value, str) else "".join(content for _, content in value))
    return {"chars": chars, "nbytes": chunk["nbytes"]}


def encode_chunk(chunk):
    """Tokenize one chunk. Returns the tokens (one numpy array, every document's or conversation's tokens back
    to back), their loss mask (chat), the length of each record in it, and the skipped records."""
    tok, opts = _WORKER["tok"], _WORKER["opts"]
    dtype = token_dtype(tok.vocab_size)
    out = {"file": chunk["file"], "nbytes": chunk["nbytes"], "mask": None, "skipped": []}
    if chunk["kind"] == "text":
        ids = tok.encode(_decode_block(chunk))
        if chunk["end_of_doc"]:
            ids.append(tok.eot_token)
        out.update(split=chunk["split"], tokens=np.array(ids, dtype=dtype), docs=int(chunk["end_of_doc"]))
        return out
    usable, out["skipped"] = _usable_records(chunk)
    ids, mask, lengths = [], [], []
    for _, value in usable:
        if opts["format"] == "text":
            doc = tok.encode(value)
            doc.append(tok.eot_token)
            ids += doc
            lengths.append(len(doc))
        else:
            conv_ids, conv_mask = render_chat(tok, value, opts["mask_role"], opts["train_on_prompt"], opts["mask_history"])
            ids += conv_ids
            mask += conv_mask
            lengths.append(len(conv_ids))
    out.update(split=None, tokens=np.array(ids, dtype=dtype), lengths=np.array(lengths, dtype=np.int64),
               docs=len(lengths))
    if opts["format"] == "chat":
        out["mask"] = np.array(mask, dtype=np.uint8)
    return out


def run_chunks(fn, chunks, tok_state, opts, num_workers):
    """fn(chunk) for every chunk, results in input order. With num_workers > 1 a process pool works on a bounded
    window of chunks; Pool.imap is not used because its feeder thread would read the whole input into its queue."""
    if num_workers == 1:
        init_worker(tok_state, opts)
        for chunk in chunks:
            yield fn(chunk)
        return
    with multiprocessing.Pool(num_workers, initializer=init_worker, initargs=(tok_state, opts)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(fn, (chunk,)))
            if len(pending) >= 2 * num_workers:  # every worker has one chunk running and one queued
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ----------------------------------------------------------------------------------------------------------------
# writing

class ShardWriter:
    """Appends tokens (and their mask) to split_dir/shard_NNNNN.bin (+ _mask.bin), starting a new shard every
    tokens_per_shard tokens. bos_token: written once before the first record (chat data).
    Also writes split_dir/starts.bin: where each record (conversation or document) begins in the split's token
    stream (the shards back to back), as uint64 offsets; see record_starts below."""

    def __init__(self, split_dir, dtype, tokens_per_shard, has_mask, bos_token=None):
        self.split_dir, self.dtype, self.tokens_per_shard = split_dir, dtype, tokens_per_shard
        self.has_mask, self.bos_token = has_mask, bos_token
        self.shards, self.tokens, self.mask_tokens, self.docs = [], 0, 0, 0
        self._files, self._room = [], 0
        self._starts_file, self._last_end = None, None

    def write(self, tokens, mask=None, docs=0, lengths=None):
        """lengths: the token count of each whole record in `tokens`; None: `tokens` is a block of one document,
        which ends with this block when docs is 1."""
        self.docs += docs
        offset = self.tokens  # where `tokens` begins in the split's stream
        if self.tokens == 0 and self.bos_token is not None and len(tokens):
            tokens = np.concatenate([np.array([self.bos_token], dtype=self.dtype), tokens])
            mask = np.concatenate([np.zeros(1, dtype=np.uint8), mask])
            offset += 1
        if lengths is not None:
            self.record_ends(offset + np.cumsum(lengths) - 1)
        elif docs:
            self.record_ends(np.array([offset + len(tokens) - 1]))
        self.tokens += len(tokens)
        if self.has_mask:
            self.mask_tokens += int(np.count_nonzero(mask))
        while len(tokens):
            if self._room == 0:
                self._next_shard()
            n = min(self._room, len(tokens))
            tokens[:n].tofile(self._files[0])
            if self.has_mask:
                mask[:n].tofile(self._files[1])
                mask = mask[n:]
            tokens = tokens[n:]
            self.shards[-1]["tokens"] += n
            self._room -= n

    def record_ends(self, ends):
        """Every record ends with the end-of-text token, which is also the BOS of the record after it. So record i
        starts at the end of record i-1 (its BOS), and record 0 at offset 0 (chat: the split's leading BOS; text:
        the first document's first token, the only record without a BOS). A record's tokens run from its start up
        to and including the next start (or the split's last token). Streamed: the newest end is held back, as it
        becomes a start only if another record follows."""
        if self._starts_file is None:
            os.makedirs(self.split_dir, exist_ok=True)
            self._starts_file = open(os.path.join(self.split_dir, "starts.bin"), "wb")
            self._last_end = 0
        np.concatenate([[self._last_end], ends[:-1]]).astype(np.uint64).tofile(self._starts_file)
        self._last_end = int(ends[-1])

    def _next_shard(self):
        self._close_shard()
        name = f"shard_{len(self.shards):05d}"
        os.makedirs(self.split_dir, exist_ok=True)
        self._files = [open(os.path.join(self.split_dir, name + ".bin"), "wb")]
        if self.has_mask:
            self._files.append(open(os.path.join(self.split_dir, name + "_mask.bin"), "wb"))
        self.shards.append({"file": name + ".bin", "tokens": 0})
        self._room = self.tokens_per_shard

    def _close_shard(self):
        for f in self._files:
            f.close()
        self._files = []

    def close(self):
        self._close_shard()
        if self._starts_file is not None:
            self._starts_file.close()


def _write_records(result, to_val, writers):
    """Send each record of a result to train or val (to_val: one bool per record)."""
    tokens, mask = result["tokens"], result["mask"]
    per_token = np.repeat(to_val, result["lengths"])
    for split, sel in (("train", ~per_token), ("val", per_token)):
        n_docs = int(np.count_nonzero(to_val if split == "val" else ~to_val))
        if n_docs:
            lengths = result["lengths"][to_val if split == "val" else ~to_val]
            writers[split].write(tokens[sel], None if mask is None else mask[sel], docs=n_docs, lengths=lengths)


def _swap_in(tmp, out_dir):
    """Put the finished tmp folder at out_dir; an existing out_dir is replaced only now, and restored on failure."""
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    old = f"{out_dir}.old-{os.getpid()}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old)


def _make_dir(tmp, out_dir):
    try:
        os.makedirs(tmp)
    except OSError as e:  # a read-only place, or a file where a parent folder should be
        raise InputError(f"--out_dir {out_dir}: cannot create {tmp} beside it ({e.strerror}): choose a writable "
                         f"folder") from None


def _write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------------------

def check_args(input_files, out_dir, tokenization, fmt, val_fraction, tokens_per_shard, num_workers, mask_role,
               chat_schema, text_field="text"):
    """Refuse bad arguments before anything is read or written. Returns [(path, kind)] of the inputs."""
    if fmt not in ("text", "chat"):
        raise InputError(f"unknown --format {fmt!r}: use 'text' (documents) or 'chat' (conversations)")
    if tokenization not in ("gpt2", "char"):
        raise InputError(f"unknown --tokenization {tokenization!r}: use 'gpt2' or 'char'")
    if not 0 <= val_fraction < 1:
        raise InputError(f"--val_fraction {val_fraction} is out of range: use a fraction in [0, 1), e.g. 0.1")
    if tokens_per_shard < 1:
        raise InputError(f"--tokens_per_shard {tokens_per_shard} must be at least 1")
    if num_workers < 1:
        raise InputError(f"--num_workers {num_workers} must be at least 1")
    if mask_role not in ROLE_MARKERS:
        raise InputError(f"unknown --mask_role {mask_role!r}: use one of {', '.join(ROLE_MARKERS)}")
    if chat_schema not in SCHEMA_CHOICES:
        raise InputError(f"unknown --chat_schema {chat_schema!r}: use one of {', '.join(SCHEMA_CHOICES)}")
    if not input_files:
        raise InputError("no --input_files given")
    if not text_field:
        raise InputError("--text_field is empty: name the field (JSONL) or column (Parquet) that holds the text")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out_dir {out_dir} exists and is not a folder: choose another --out_dir")
    # an existing out_dir is replaced whole: refuse anything that is not an earlier dataset (think --out_dir .)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and \
            not os.path.exists(os.path.join(out_dir, "dataset_metadata.json")):
        raise InputError(f"--out_dir {out_dir} exists and is not a dataset folder (no dataset_metadata.json), so it "
                         f"will not be replaced: choose a new folder or remove it")
    files = []
    for path in input_files:
        if not os.path.isfile(path):
            raise MissingFileError(f"{path}: input file not found")
        if os.path.getsize(path) == 0:
            raise InputError(f"{path}: input file is empty")
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: input file is not readable (permission denied)")
        files.append((path, input_kind(path, fmt)))
        if files[-1][1] == "parquet":
            parquet_columns(path, {"format": fmt, "text_field": text_field, "chat_schema": chat_schema})
    return files


def prepare(input_files, out_dir, tokenization="gpt2", fmt="text", val_fraction=0.1, tokens_per_shard=10_000_000,
            seed=1337, num_workers=1, mask_role="assistant", chat_schema="auto", train_on_prompt=False,
            mask_history=False, hf_dir=None, verbose=False, block_bytes=BLOCK_BYTES, tokenizer_from=None,
            text_field="text"):
    """Tokenize input_files into out_dir (layout in the module docstring). Returns the metadata dict it wrote.
    tokenizer_from: a dataset or model folder whose tokenizer_state.json to reuse instead of building one (so a
    char-level SFT set gets its base model's vocabulary); it sets the tokenization. text_field: the JSONL field /
    Parquet column holding a text document.
    Bad input raises errors.InputError / MissingFileError (a ValueError / FileNotFoundError) with a one-line
    message; out_dir is then untouched."""
    t0 = time.time()
    given_tok = None
    if tokenizer_from:
        given_tok = Tokenizer.load(os.path.join(tokenizer_from, "tokenizer_state.json"))
        tokenization, hf_dir = given_tok.kind, given_tok.hf_dir
    args = {"input_files": list(input_files), "out_dir": out_dir, "tokenization": tokenization, "format": fmt,
            "val_fraction": val_fraction, "tokens_per_shard": tokens_per_shard, "seed": seed,
            "num_workers": num_workers, "mask_role": mask_role, "chat_schema": chat_schema,
            "train_on_prompt": train_on_prompt, "mask_history": mask_history, "hf_dir": hf_dir,
            "tokenizer_from": tokenizer_from, "text_field": text_field}
    files = check_args(input_files, out_dir, tokenization, fmt, val_fraction, tokens_per_shard, num_workers,
                       mask_role, chat_schema, text_field)
    opts = {"format": fmt, "chat_schema": chat_schema, "mask_role": mask_role, "train_on_prompt": train_on_prompt,
            "mask_history": mask_history, "text_field": text_field}
    total_bytes = sum(os.path.getsize(p) for p, _ in files)

    def chunk_results(fn, tok_state, desc):
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                   disable=None if verbose else True)  # None: only on a terminal, so logs get no bar debris
        with bar, closing(run_chunks(fn, iter_chunks(files, val_fraction, block_bytes, opts), tok_state, opts,
                                     num_workers)) as results:  # closing: an error here stops the pool at once
            for result in results:
                bar.update(result["nbytes"])
                yield result

    if tokenization == "char":  # the vocabulary comes from the data: a first pass collects its characters
        chars = set()
        for result in chunk_results(chars_of_chunk, None, "collecting characters"):
            chars |= result["chars"]
        tok = given_tok or Tokenizer.char_from_texts(["".join(sorted(chars))])
        missing = "".join(sorted(chars - set(tok.chars)))
        if missing:
            raise InputError(f"{', '.join(p for p, _ in files)}: {len(missing)} character(s) {missing[:30]!r} are not in "
                             f"the vocabulary of {tokenizer_from}: remove them from the data, or prepare without "
                             f"--tokenizer_from (a new vocabulary, so a new model)")
    elif given_tok:
        tok = given_tok
    else:
        tok = Tokenizer("gpt2", hf_dir=hf_dir)
    dtype = token_dtype(tok.vocab_size)

    tmp = f"{os.path.normpath(out_dir)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    writers = {split: ShardWriter(os.path.join(tmp, split), dtype, tokens_per_shard, has_mask=fmt == "chat",
                                  bos_token=tok.eot_token if fmt == "chat" else None) for split in ("train", "val")}
    t_tok = time.time()
    results = chunk_results(encode_chunk, tok.state_dict(), "tokenizing")
    try:
        _make_dir(tmp, out_dir)
        skipped = write_splits(results, writers, files, fmt, val_fraction, seed, verbose)
        seconds = time.time() - t_tok
        meta = metadata(tok, fmt, tokenization, writers, skipped, files, args)
        tok.save(os.path.join(tmp, "tokenizer_state.json"))
        _write_json(meta, os.path.join(tmp, "dataset_metadata.json"))
        _swap_in(tmp, out_dir)
    finally:
        results.close()
        for w in writers.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(summary(meta, out_dir, seconds, time.time() - t0))
    return meta


def write_splits(results, writers, files, fmt, val_fraction, seed, verbose):
    """Route the tokenized chunks to the train / val writers, in input order. Returns {skip reason: count}."""
    rng = np.random.default_rng(seed)
    skipped, skipped_per_file = Counter(), [Counter() for _ in files]
    usable_per_file = [0] * len(files)
    records = 0  # usable JSONL/JSON records so far (they, not plain text files, are split at random)
    files_done = 0  # the files before this one have been read completely
    # The newest records result is held back until the next one arrives: at the very end its last record can
    # still go to an empty split, so that val (and train) get at least one record whenever there are two.
    held = None
    for result in results:
        for where, reason in result["skipped"]:
            if verbose and sum(skipped.values()) < SHOW_SKIPPED:
                tqdm.write(f"skipped {where}: {reason}", file=sys.stderr)
            skipped[reason] += 1
            skipped_per_file[result["file"]][reason] += 1
        usable_per_file[result["file"]] += result["docs"]
        for i in range(files_done, result["file"]):  # fail early, not after hours of a later file
            _check_file_usable(files[i][0], fmt, usable_per_file[i], skipped_per_file[i])
        files_done = result["file"]
        if held is not None:
            _write_records(*held, writers)
            held = None
        if result["split"] is not None:  # a plain text block: its split is known from its byte offset
            writers[result["split"]].write(result["tokens"], docs=result["docs"])
        elif result["docs"]:
            records += result["docs"]
            held = (result, rng.random(result["docs"]) < val_fraction)
    for i in range(files_done, len(files)):
        _check_file_usable(files[i][0], fmt, usable_per_file[i], skipped_per_file[i])
    if held is not None:
        to_val = held[1]
        if records >= 2 and val_fraction > 0 and writers["val"].docs == 0 and not to_val.any():
            to_val[-1] = True
        elif records >= 2 and writers["train"].docs == 0 and to_val.all():
            to_val[-1] = False
        _write_records(*held, writers)
    for w in writers.values():
        w.close()
    return skipped


def metadata(tok, fmt, tokenization, writers, skipped, files, args):
    """dataset_metadata.json, in the order data.py and people read it."""
    doc_key = "conversations" if fmt == "chat" else "documents"
    splits = {}
    for split, w in writers.items():
        splits[split] = {"tokens": w.tokens, "shards": w.shards}
        if fmt == "chat":
            splits[split]["mask_tokens"] = w.mask_tokens
        splits[split][doc_key] = w.docs
        splits[split]["starts"] = {"file": "starts.bin", "dtype": "uint64", "count": w.docs}  # packing: data.py
    meta = {"format": fmt, "tokenization": tokenization, "vocab_size": tok.vocab_size, "eot_token": tok.eot_token,
            "token_dtype": np.dtype(token_dtype(tok.vocab_size)).name, "has_mask": fmt == "chat", "has_starts": True, "splits": splits}
    if fmt == "chat":
        total = sum(w.tokens for w in writers.values())
        meta["mask_fraction"] = sum(w.mask_tokens for w in writers.values()) / max(total, 1)
    meta[doc_key] = sum(w.docs for w in writers.values())
    meta["skipped"] = dict(skipped)
    meta["input_files"] = [os.path.abspath(p) for p, _ in files]
    meta["args"] = args
    meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return meta


def _check_file_usable(path, fmt, usable, skipped):
    if usable:
        return
    if not skipped:
        raise InputError(f"{path}: no usable record (the file holds only blank lines)")
    reasons = ", ".join(f"{r}: {n}" for r, n in skipped.most_common(3))
    *most, last = (s.described for s in CHAT_SCHEMAS.values())
    hint = f"; chat records need {', '.join(most)} or {last}, with an assistant answer" if fmt == "chat" else ""
    raise InputError(f"{path}: no usable record ({reasons}){hint}")


def summary(meta, out_dir, tokenize_seconds, total_seconds):
    doc_key = "conversations" if meta["format"] == "chat" else "documents"
    lines = [f"wrote {out_dir}: {meta['format']} data, {meta['tokenization']} tokenizer (vocab {meta['vocab_size']}), "
             f"{meta['token_dtype']} tokens"]
    for split, s in meta["splits"].items():
        line = (f"  {split:5s} {s['tokens']:>12,} tokens  {len(s['shards']):>3} shard(s)  {s[doc_key]:>9,} {doc_key}")
        if meta["has_mask"]:
            line += f"  {s['mask_tokens'] / max(s['tokens'], 1):6.1%} trained (mask 1)"
        lines.append(line)
    if meta["skipped"]:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(meta["skipped"].items(), key=lambda kv: -kv[1]))
        lines.append(f"  skipped {sum(meta['skipped'].values()):,} record(s): {reasons}")
    if meta["has_mask"]:
        lines.append(f"  mask fraction {meta['mask_fraction']:.3f} over {meta[doc_key]:,} {doc_key}")
    if meta["splits"]["val"]["tokens"] == 0:
        lines.append("  note: val is empty (val_fraction 0, or a single record): train.py needs a val split")
    total = sum(s["tokens"] for s in meta["splits"].values())
    lines.append(f"  {total:,} tokens in {total_seconds:.2f}s ({total / max(tokenize_seconds, 1e-9):,.0f} tokens/s "
                 f"tokenizing)")
    return "\n".join(lines)


@one_line_errors
def main(argv=None):
    p = argparse.ArgumentParser(description="Tokenize text or chat files into shards for train.py.")
    p.add_argument("--input_files", nargs="+", required=True,
                   help=".txt (or any plain text), .jsonl, .json or .parquet files")
    p.add_argument("--out_dir", required=True, help="dataset folder to write (replaced only once complete)")
    p.add_argument("--tokenization", default="gpt2", help="gpt2 (BPE, 50257 ids) | char (vocabulary from the data)")
    p.add_argument("--format", default="text", dest="fmt", metavar="FORMAT", help="text (documents) | chat (conversations)")
    p.add_argument("--val_fraction", type=float, default=0.1,
                   help="the last fraction of each plain text file's bytes, or of the JSONL records at random, for val")
    p.add_argument("--tokens_per_shard", type=int, default=10_000_000, help="start a new shard file after this many")
    p.add_argument("--seed", type=int, default=1337, help="seeds which records go to val")
    p.add_argument("--num_workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--mask_role", default="assistant", help="chat: the role whose text is trained on")
    p.add_argument("--chat_schema", default="auto", help=" | ".join(SCHEMA_CHOICES))
    p.add_argument("--train_on_prompt", action="store_true", help="chat: train on every token, not just answers")
    p.add_argument("--mask_history", action="store_true", help="chat: train only on the last assistant turn")
    p.add_argument("--text_field", default="text", help="text: the JSONL field / Parquet column holding each document")
    p.add_argument("--hf_dir", default=None, help="gpt2: BPE from this Hugging Face folder's vocab.json + merges.txt")
    p.add_argument("--tokenizer_from", default=None,
                   help="reuse the tokenizer of this dataset or model folder (its tokenizer_state.json) instead of "
                        "--tokenization: a char-level SFT set then fits its base model")
    a = p.parse_args(argv)
    try:
        prepare(a.input_files, a.out_dir, a.tokenization, a.fmt, a.val_fraction, a.tokens_per_shard, a.seed,
                a.num_workers, a.mask_role, a.chat_schema, a.train_on_prompt, a.mask_history, a.hf_dir, verbose=True,
                tokenizer_from=a.tokenizer_from, text_field=a.text_field)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
