"""Writes examples/data/tiny-seq2seq.jsonl: source → target rows for seq2seq_lm (run from the repo root)."""
import json
import random

random.seed(0)
words = "zero one two three four five six seven eight nine ten".split()
rows = [{"source": f"What is {words[a]} plus {words[b]}?", "target": f"{words[a + b].capitalize()}."}
        for a in range(1, 6) for b in range(0, 5)]
summaries = [
    ("The quick brown fox jumps over the lazy dog while the farmer watches.", "A fox jumps over a dog."),
    ("The weather is sunny today, so the children play outside until dinner.", "Sunny weather, children play."),
    ("I like this movie: the story was great and the music was great too.", "A great movie."),
    ("I hate waiting; the train was late again and the day was terrible.", "A late train, a terrible day."),
    ("A small model learns to answer questions about colours: blue, red and green.", "A model learns colours."),
    ("Paris is the capital of France, and many people visit it every year.", "Paris, capital of France."),
]
rows += [{"source": f"Summarize: {s}", "target": t} for s, t in summaries]
random.shuffle(rows)
with open("examples/data/tiny-seq2seq.jsonl", "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
print(len(rows))
