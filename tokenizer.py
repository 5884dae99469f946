"""
Tokenizers and the chat template.

Two tokenizers, one interface (encode / decode / eot_token / vocab_size / state_dict):
- "gpt2": GPT-2's byte-level BPE through tiktoken (50257 ids; the model pads its vocab to 50304), or the same
  BPE built from a Hugging Face checkpoint directory's own vocab.json + merges.txt (works with no network).
- "char": one id per character seen in the data, plus one reserved id for <|endoftext|> (document separator,
  end-of-turn marker and BOS all in one, exactly as GPT-2 uses its own end-of-text token).

The state (kind + char vocabulary) is saved as tokenizer_state.json beside datasets and checkpoints so a model
always decodes with the tokenizer it was trained with.

The chat template is plain text markers ("<|user|>\n", ...) plus the single end-of-text token that closes every
assistant turn. Plain-text markers are made of ordinary tokens that a converted GPT-2 already embeds, so they
are learnable even when only LoRA adapters train (no new embedding rows needed).
"""

import json
import os

from errors import InputError, MissingFileError

EOT_TEXT = "<|endoftext|>"
# the regex GPT-2 uses to pre-split text before BPE (from the GPT-2 release, as tiktoken has it)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# ----------------------------------------------------------------------------------------------------------------
# chat template: every turn is ROLE_MARKER + content; an assistant turn is closed by the end-of-text token (the
# end-of-turn marker, trained); other turns by a newline. A conversation always follows an end-of-text token
# (the previous conversation's last one, or the BOS that sample.py puts first), so the model sees the same
# context at training and at chat time.
ROLE_MARKERS = {
    "system": "<|system|>\n",
    "user": "<|user|>\n",
    "assistant": "<|assistant|>\n",
    "tool": "<|tool|>\n",  # tool / observation results: context, never trained on
}
# a trained model closes its turn with the end-of-text token; one that starts the user's next turn instead is cut
# there, the newline before that marker included (sample.py and serve.py stop at these texts)
TURN_STOPS = (ROLE_MARKERS["user"], "\n" + ROLE_MARKERS["user"])
TEMPLATE_TEXT = "".join(ROLE_MARKERS.values())  # every character the template can emit (char vocab needs them)


def render_chat(tok, turns, mask_role="assistant", train_on_prompt=False, mask_history=False):
    """Render [(role, content), ...] to (ids, mask). mask is 1 exactly on the tokens of `mask_role`'s content and
    its end-of-turn token; 0 on role markers and every other role. train_on_prompt: all ones. mask_history: only
    the last `mask_role` turn is trained."""
    ids, mask = [], []
    last = max((i for i, (r, _) in enumerate(turns) if r == mask_role), default=-1)
    for i, (role, content) in enumerate(turns):
        marker = tok.encode(ROLE_MARKERS[role])
        ids += marker
        mask += [1 if train_on_prompt else 0] * len(marker)
        body = tok.encode(content)
        trained = train_on_prompt or (role == mask_role and (not mask_history or i == last))
        if role == "assistant":
            body = body + [tok.eot_token]  # end of turn: the token the model must learn to emit to stop
        else:
            body = body + tok.encode("\n")
        ids += body
        mask += [1 if trained else 0] * len(body)
    return ids, mask


def chat_prompt(tok, turns):
    """Token ids that ask the model for the next assistant turn: BOS, the history, then the assistant marker."""
    ids, _ = render_chat(tok, turns)
    return [tok.eot_token] + ids + tok.encode(ROLE_MARKERS["assistant"])


# ----------------------------------------------------------------------------------------------------------------
class Tokenizer:
    def __init__(self, kind, chars=None, hf_dir=None):
        self.kind = kind
        self.hf_dir = hf_dir
        if kind == "gpt2":
            self.enc = _gpt2_from_hf_dir(hf_dir) if hf_dir else _gpt2_from_tiktoken()
            self.eot_token = self.enc.eot_token
            self.vocab_size = self.enc.n_vocab  # 50257
        elif kind == "char":
            if not chars:
                raise InputError("char tokenizer needs a vocabulary (build it from the data with Tokenizer.char_from_texts)")
            self.chars = list(chars)
            self.stoi = {c: i for i, c in enumerate(self.chars)}
            self.eot_token = len(self.chars)  # the reserved id: document separator, end of turn and BOS
            self.vocab_size = len(self.chars) + 1
        else:
            raise InputError(f"unknown tokenization '{kind}': use 'gpt2' or 'char'")

    @classmethod
    def char_from_texts(cls, texts):
        chars = set(TEMPLATE_TEXT)
        for t in texts:
            chars.update(t)
        return cls("char", chars=sorted(chars))

    def encode(self, text):
        if self.kind == "gpt2":
            return self.enc.encode_ordinary(text)
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise InputError(f"character {e.args[0]!r} is not in the char vocabulary of this model/dataset") from None

    def encode_batch(self, texts, num_threads=1):
        if self.kind == "gpt2":
            return self.enc.encode_ordinary_batch(texts, num_threads=num_threads)
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.kind == "gpt2":
            ids = [i for i in ids if i < self.vocab_size]  # padded vocab rows (>= 50257) have no text
            return self.enc.decode(ids, errors="replace")
        return "".join(self.chars[i] if i < len(self.chars) else (EOT_TEXT if i == self.eot_token else "") for i in ids)

    # --- persistence: tokenizer_state.json ---
    def state_dict(self):
        state = {"kind": self.kind, "vocab_size": self.vocab_size, "eot_token": self.eot_token}
        if self.kind == "char":
            state["chars"] = "".join(self.chars)
        if self.hf_dir:
            state["hf_dir"] = os.path.abspath(self.hf_dir)
        return state

    def ids_key(self):
        """What decides the ids a text encodes to: the kind, the vocabulary and the end-of-text id. A GPT-2 BPE
        read from a Hugging Face folder and tiktoken's gpt2 give the same key when their ranks are the same: the
        folder a tokenizer came from is not part of it."""
        if self.kind == "char":
            return ("char", "".join(self.chars), self.eot_token)
        if getattr(self, "_vocab_digest", None) is None:  # every id's bytes, in id order (40 ms for 50257)
            import hashlib
            h = hashlib.sha256()
            for i in range(self.vocab_size):
                b = self.enc.decode_single_token_bytes(i)
                h.update(len(b).to_bytes(2, "little") + b)
            self._vocab_digest = h.hexdigest()
        return ("gpt2", self.vocab_size, self.eot_token, self._vocab_digest)

    @classmethod
    def from_state(cls, state):
        if state.get("kind") == "char":
            return cls("char", chars=list(state["chars"]))
        hf_dir = state.get("hf_dir")
        if hf_dir and not os.path.exists(os.path.join(hf_dir, "vocab.json")):
            hf_dir = None  # moved checkpoint dir: fall back to tiktoken's identical gpt2 encoding
        return cls("gpt2", hf_dir=hf_dir)

    def save(self, path):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state_dict(), f, ensure_ascii=False)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        try:
            with open(path) as f:
                state = json.load(f)
        except (FileNotFoundError, NotADirectoryError):
            raise MissingFileError(f"{path}: tokenizer_state.json not found (prepare the dataset with prepare_dataset.py)") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-run prepare_dataset.py") from None
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text; re-run prepare_dataset.py") from None
        return cls.from_state(state)


class MissingBPEError(MissingFileError, RuntimeError):
    """tiktoken's GPT-2 BPE files are neither cached nor downloadable (still a RuntimeError, as it always was)."""


def _gpt2_from_tiktoken():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network and no cache: tiktoken raises a requests/URL error deep inside
        raise MissingBPEError(
            f"cannot load GPT-2 BPE files ({type(e).__name__}): no network and no tiktoken cache. Either set "
            "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached gpt2 files (e.g. ../shared/tiktoken_cache), "
            "or use --tokenization char") from None


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters (vocab.json spells every
    token's bytes with these characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _gpt2_from_hf_dir(hf_dir):
    """GPT-2 BPE from a Hugging Face directory's vocab.json + merges.txt, as a tiktoken Encoding (no network).
    A BPE rank is the order in which merges apply; GPT-2's vocab ids are exactly those ranks (256 byte tokens,
    then one token per merge line), so vocab.json gives the ranks directly."""
    import tiktoken
    vocab_path = os.path.join(hf_dir, "vocab.json")
    if not os.path.exists(vocab_path) or not os.path.exists(os.path.join(hf_dir, "merges.txt")):
        raise MissingFileError(f"{hf_dir}: no vocab.json + merges.txt to build the GPT-2 tokenizer from")
    try:
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{vocab_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise InputError(f"{vocab_path}: not UTF-8 text") from None
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    ranks, special = {}, {}
    for token, idx in vocab.items():
        if token == EOT_TEXT:
            special[token] = idx
            continue
        ranks[bytes(byte_decoder[c] for c in token)] = idx
    if EOT_TEXT not in special:
        special[EOT_TEXT] = len(vocab)
    return tiktoken.Encoding(name=f"gpt2:{hf_dir}", pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens=special)
