"""
The project's own tiny chat dataset: templated synthetic conversations whose answers follow from the question by
a rule a small char-level model can learn in a few minutes on a CPU, so that it answers questions it never saw.

    python data/make_sample_chat.py            # writes data/sample_chat.jsonl and data/sample_chat_heldout.jsonl

Both files are OpenAI chat records ({"messages": [{"role", "content"}, ...]}), plain ASCII, and deterministic
(fixed seed): re-running the script rewrites them byte for byte. The tasks:
    greet      "Say hello to Maria."                 -> "Hello, Maria!"            (copy a name)
    introduce  "My name is Omar." / "What is my name?" -> "Your name is Omar."     (two turns: recall the name)
    botname    system "Your name is Pip." + "What is your name?" -> "My name is Pip."  (read the system prompt)
    repeat     "Repeat after me: blue fish"          -> "blue fish"                (copy a phrase)
    count      "What number comes after 41?"         -> "42."                      (and before)
    capital    "Name the capital of Peru."           -> "Lima."                    (small fact tables, asked in
    sound      "What does a cow say?"                -> "Moo."                      several phrasings; the answer
                                                                                    is the fact alone)
Copying (greet, introduce, botname, repeat) needs attention heads that find and copy earlier text; a small model
grows them only after some hundreds of steps, so copy tasks are the bulk of the data. Fact answers are short so
the model spends its few steps on the association, not on wording.
Some conversations have a short system prompt, some chain two questions. The held-out file holds ~50
conversations that the training file never contains: names, phrases and numbers kept out of training, and
fact/phrasing pairs whose fact is taught only in the other phrasings. Its "task" key (ignored by
prepare_dataset.py) names the task; the last assistant message is the expected answer.

Every conversation, rendered with the chat template (role markers, end-of-text token), fits in 128 characters,
so a model with block_size 128 sees whole conversations.
"""

import argparse
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the project root, for tokenizer.ROLE_MARKERS (plain python, no deps)
from tokenizer import ROLE_MARKERS  # noqa: E402

SEED = 1337
NUM_TRAIN = 5000
MAX_RENDERED = 128  # characters of a rendered conversation, end-of-text token included

NAMES = ["Maria", "Omar", "Lena", "Ravi", "Sofia", "Ken", "Aisha", "Tom", "Yuki", "Pablo", "Nina", "Ivan", "Chen",
         "Zara", "Leo", "Mia", "Hugo", "Ada", "Sam", "Eva", "Noah", "Lucy", "Amir", "Kofi", "Olga", "Raj", "Ines",
         "Finn", "Maya", "Dan", "Rosa", "Tariq", "Elif", "Jonas", "Priya", "Luca", "Hana", "Oscar", "Vera", "Milo",
         "Sara", "Felix", "Nora", "Emil", "Alma", "Kai", "Lars", "Iris", "Bruno", "Jade", "Theo", "Cleo", "Arjun",
         "Freya", "Diego", "Ruth", "Pip", "Zed", "Nova", "Bolt", "Wanda", "Quinn", "Xavier", "Yara", "Gus", "Uma"]
HELDOUT_NAMES = ["Greta", "Mateo", "Leila", "Boris", "Anouk", "Dario", "Selma", "Wendy"]
# Half the names and words to copy are made up from these syllables (thousands of them, most seen once): a model
# cannot memorize them, so it must learn to copy, and copying is what answers questions about unseen names.
SYLLABLES = ["ba", "be", "bo", "ca", "da", "di", "do", "fa", "fi", "ga", "go", "ha", "he", "ja", "jo", "ka", "ki",
             "ko", "la", "li", "lu", "ma", "me", "mi", "na", "ne", "no", "pa", "pe", "qui", "ra", "ri", "ro", "sa",
             "se", "su", "ta", "te", "to", "va", "vi", "wa", "we", "xa", "ya", "yo", "za", "zu", "a", "e", "i", "o",
             "u", "n", "r", "l", "s", "k"]

ADJECTIVES = ["red", "blue", "green", "big", "small", "happy", "quiet", "fast", "old", "tiny", "warm", "soft",
              "brave", "shiny", "lazy", "wild", "cold", "sweet", "dark", "funny"]
NOUNS = ["fish", "cat", "tree", "boat", "moon", "hat", "dog", "cake", "bird", "lamp", "door", "cup", "rock", "star",
         "frog", "sock", "ship", "bell", "kite", "drum"]

NUMBERS = list(range(1, 100))
HELDOUT_NUMBERS = [17, 28, 34, 46, 53, 61, 75, 89]

# small tables: every fact must be seen many times within a few hundred training steps
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
            ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Germany", "Berlin"), ("Norway", "Oslo"),
            ("Cuba", "Havana"), ("Ireland", "Dublin")]
SOUNDS = [("a cow", "moo"), ("a dog", "woof"), ("a cat", "meow"), ("a duck", "quack"), ("a sheep", "baa"),
          ("a pig", "oink"), ("a horse", "neigh"), ("a lion", "roar"), ("a frog", "ribbit"), ("a bee", "buzz"),
          ("a snake", "hiss"), ("an owl", "hoot")]

GREET_Q = ["Say hello to {}.", "Greet {}.", "Please say hi to {}.", "Can you greet {}?"]
REPEAT_Q = ["Repeat after me: {}", "Say this back: {}", "Echo: {}"]
CAPITAL_Q = ["What is the capital of {}?", "Name the capital of {}.", "Which city is the capital of {}?",
             "Tell me the capital of {}."]
SOUND_Q = ["What sound does {} make?", "What does {} say?", "How does {} sound?"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Be brief.", "Answer briefly.", "You are a friendly bot."]


def cap(s):
    return s[0].upper() + s[1:]


def rendered_length(turns):
    """Characters of the conversation as tokenizer.render_chat writes it: marker + content + "\\n" (or the single
    end-of-text token after an assistant turn), plus the end-of-text token that precedes every conversation."""
    return 1 + sum(len(ROLE_MARKERS[role]) + len(content) + 1 for role, content in turns)


# ----------------------------------------------------------------------------------------------------------------
# one function per task: (rng, held_out) -> [(role, content), ...]. held_out=False draws only from the training
# pools; held_out=True builds a question from the held-out pools.

def _made_up(rng):
    word = rng.choice(SYLLABLES[:-10])  # starts with a consonant-vowel syllable...
    for _ in range(rng.randint(1, 2)):
        word += rng.choice(SYLLABLES)  # ...then one or two more, vowel or single consonant syllables included
    return word


def _name(rng):
    name = rng.choice(NAMES) if rng.random() < 0.5 else _made_up(rng).capitalize()
    return name if name not in HELDOUT_NAMES else _name(rng)


def greet(rng, held_out):
    name = rng.choice(HELDOUT_NAMES) if held_out else _name(rng)
    return [("user", rng.choice(GREET_Q).format(name)), ("assistant", f"Hello, {name}!")]


def introduce(rng, held_out):
    name = rng.choice(HELDOUT_NAMES) if held_out else _name(rng)
    hello = rng.choice(["My name is {}.", "I am {}.", "Hi, I am {}."]).format(name)
    turns = [("user", hello), ("assistant", f"Nice to meet you, {name}!")]
    if held_out or rng.random() < 0.7:  # most introductions go on to the question that needs the name
        turns += [("user", rng.choice(["What is my name?", "Who am I?"])), ("assistant", f"Your name is {name}.")]
    return turns


def botname(rng, held_out):
    name = rng.choice(HELDOUT_NAMES) if held_out else _name(rng)
    question, answer = rng.choice([("What is your name?", "My name is {}."), ("Who are you?", "I am {}.")])
    return [("system", f"Your name is {name}."), ("user", question), ("assistant", answer.format(name))]


def _phrase(rng, held_out, heldout_phrases):
    if not held_out and rng.random() < 0.5:
        return f"{_made_up(rng)} {_made_up(rng)}"
    while True:
        phrase = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
        if (phrase in heldout_phrases) == held_out:
            return phrase


def repeat(rng, held_out):
    phrase = _phrase(rng, held_out, HELDOUT_PHRASES)
    return [("user", rng.choice(REPEAT_Q).format(phrase)), ("assistant", phrase)]


def count(rng, held_out):
    n = rng.choice(HELDOUT_NUMBERS if held_out else [k for k in NUMBERS if k not in HELDOUT_NUMBERS])
    if rng.random() < 0.5:
        q = rng.choice(["What number comes after {}?", "What comes after {}?", "Which number follows {}?"])
        return [("user", q.format(n)), ("assistant", f"{n + 1}.")]
    q = rng.choice(["What number comes before {}?", "What comes before {}?", "Which number is one less than {}?"])
    return [("user", q.format(n)), ("assistant", f"{n - 1}.")]


def _fact(rng, held_out, table, phrasings, heldout_pairs):
    """A (fact, phrasing) pair: training never asks a held-out pair, but asks its fact in the other phrasings."""
    while True:
        i, j = rng.randrange(len(table)), rng.randrange(len(phrasings))
        if ((i, j) in heldout_pairs) == held_out:
            key, value = table[i]
            return [("user", phrasings[j].format(key)), ("assistant", f"{cap(value)}.")]


def capital(rng, held_out):
    return _fact(rng, held_out, CAPITALS, CAPITAL_Q, HELDOUT_CAPITALS)


def sound(rng, held_out):
    return _fact(rng, held_out, SOUNDS, SOUND_Q, HELDOUT_SOUNDS)


TASKS = {"greet": greet, "introduce": introduce, "botname": botname, "repeat": repeat, "count": count,
         "capital": capital, "sound": sound}
TRAIN_WEIGHTS = {"greet": 22, "introduce": 12, "botname": 8, "repeat": 22, "count": 12, "capital": 12, "sound": 12}
HELDOUT_COUNTS = {"greet": 8, "introduce": 6, "botname": 6, "repeat": 8, "count": 8, "capital": 7, "sound": 7}

# held-out combinations, drawn once from their own seeded RNG (fixed sets; order does not matter)
_pick = random.Random(SEED + 1)
HELDOUT_PHRASES = {f"{a} {n}" for a, n in _pick.sample([(a, n) for a in ADJECTIVES for n in NOUNS], 10)}


def _pairs(table, phrasings, k):
    # k different facts, each held out in one phrasing only: the fact itself is still taught in the others
    return {(i, _pick.randrange(len(phrasings))) for i in _pick.sample(range(len(table)), k)}


HELDOUT_CAPITALS = _pairs(CAPITALS, CAPITAL_Q, 7)
HELDOUT_SOUNDS = _pairs(SOUNDS, SOUND_Q, 7)


def training_conversation(rng):
    task = rng.choices(list(TRAIN_WEIGHTS), weights=list(TRAIN_WEIGHTS.values()))[0]
    turns = TASKS[task](rng, False)
    r = rng.random()
    if r < 0.12 and turns[0][0] != "system":  # a short system prompt that does not change the answer
        turns = [("system", rng.choice(SYSTEM_PROMPTS))] + turns
    elif r < 0.20 and len(turns) == 2:  # two unrelated questions in one conversation
        turns = turns + TASKS[rng.choice(["greet", "repeat", "count", "capital", "sound"])](rng, False)
    return turns


def make(seed=SEED, num_train=NUM_TRAIN):
    """(training records, held-out records), deterministic for a seed."""
    rng = random.Random(seed)
    train = []
    while len(train) < num_train:
        turns = training_conversation(rng)
        if rendered_length(turns) <= MAX_RENDERED:  # a chained pair may be too long: draw again
            train.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    heldout = []
    seen = {json.dumps(rec["messages"][:-1]) for rec in train}  # every training prompt, for the check below
    train_users = {m["content"] for rec in train for m in rec["messages"] if m["role"] != "assistant"}
    for task, n in HELDOUT_COUNTS.items():
        prompts = set()
        while len(prompts) < n:
            turns = TASKS[task](rng, True)
            msgs = [{"role": r, "content": c} for r, c in turns]
            key = json.dumps(msgs[:-1])
            if key in prompts:
                continue
            # the check that makes it held out: no training conversation asks this, and (first turns aside, which
            # name a held-out entity) the question text itself never occurs in training
            assert key not in seen and msgs[0]["content"] not in train_users, (task, turns)
            assert rendered_length(turns) <= MAX_RENDERED, turns
            prompts.add(key)
            heldout.append({"task": task, "messages": msgs})
    train_chars = {ch for rec in train for m in rec["messages"] for ch in m["content"]}
    for rec in heldout:  # a char-level model can only read characters it was trained on
        for m in rec["messages"]:
            assert set(m["content"]) <= train_chars and m["content"].isascii(), m
    return train, heldout


def write_jsonl(records, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write the sample chat dataset (training + held-out questions).")
    p.add_argument("--out_dir", default=HERE, help="folder for sample_chat.jsonl and sample_chat_heldout.jsonl")
    a = p.parse_args(argv)
    train, heldout = make()
    write_jsonl(train, os.path.join(a.out_dir, "sample_chat.jsonl"))
    write_jsonl(heldout, os.path.join(a.out_dir, "sample_chat_heldout.jsonl"))
    lengths = [rendered_length([(m["role"], m["content"]) for m in rec["messages"]]) for rec in train]
    print(f"wrote {len(train)} training conversations (rendered length {min(lengths)}-{max(lengths)} chars, mean "
          f"{sum(lengths) / len(lengths):.0f}) and {len(heldout)} held-out ones to {a.out_dir}")


if __name__ == "__main__":
    main()
