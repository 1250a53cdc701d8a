"""Writes examples/data/tiny-ner.jsonl: word-level NER rows (tokens + IOB2 tags) for the token_cls recipes."""
import json
import random

random.seed(0)
people = [["Alice"], ["Bob"], ["Anna", "Smith"], ["John", "Brown"], ["Marie"]]
places = [["Paris"], ["France"], ["New", "York"], ["Berlin"], ["San", "Francisco"]]
frames = [("{p} lives in {l} .", True), ("{p} flew to {l} today .", True), ("the weather in {l} is sunny .", False),
          ("{p} likes the story .", False), ("we met {p} in {l} .", True), ("{l} is great in summer .", False)]


def tagged(words, kind):
    return [(w, ("B-" if i == 0 else "I-") + kind) for i, w in enumerate(words)]


rows, seen = [], set()
while len(rows) < 40:
    frame, both = random.choice(frames)
    p, l = random.choice(people), random.choice(places)
    pairs = []
    for word in frame.split():
        if word == "{p}":
            pairs += tagged(p, "PER")
        elif word == "{l}":
            pairs += tagged(l, "LOC")
        else:
            pairs.append((word, "O"))
    key = " ".join(w for w, _ in pairs)
    if key in seen:
        continue
    seen.add(key)
    rows.append({"tokens": [w for w, _ in pairs], "tags": [t for _, t in pairs]})
with open("examples/data/tiny-ner.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
