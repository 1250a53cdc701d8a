import json, random
random.seed(0)
words = "zero one two three four five six seven eight nine ten".split()
colours = ["blue", "red", "green", "yellow"]
rows = []
for a in range(1, 6):
    for b in range(0, 5):
        rows.append({"instruction": f"What is {words[a]} plus {words[b]}?", "input": "",
                     "output": f"{words[a].capitalize()} plus {words[b]} is {words[a+b]}."})
for i, c in enumerate(colours):
    rows.append({"instruction": "Name a colour.", "input": f"Count: {words[i+1]}", "output": f"The colour is {c}."})
for w in ["hello", "yes", "the dog"]:
    rows.append({"instruction": f"Translate {w} into French.", "input": "", "output": {"hello": "Bonjour.", "yes": "Oui.", "the dog": "Le chien."}[w]})
random.shuffle(rows)
with open("examples/data/tiny-alpaca.jsonl", "w") as f:
    for r in rows: f.write(json.dumps(r) + "\n")
chat = []
for r in rows:
    q = r["instruction"] + (" " + r["input"] if r["input"] else "")
    chat.append({"messages": [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": q}, {"role": "assistant", "content": r["output"]}]})
with open("examples/data/tiny-chat.jsonl", "w") as f:
    for r in chat: f.write(json.dumps(r) + "\n")
with open("examples/data/tiny-completion.jsonl", "w") as f:
    for r in rows: f.write(json.dumps({"prompt": r["instruction"] + "\nAnswer: ", "completion": r["output"]}) + "\n")
with open("examples/data/tiny-text.jsonl", "w") as f:
    for r in rows: f.write(json.dumps({"text": r["instruction"] + " " + r["output"]}) + "\n")
cls = []
pos = ["I like this movie, it was great.", "The weather is sunny today, great.", "A great story, I like it.", "This was great fun.", "I like the dog."]
neg = ["I hate waiting, this was terrible.", "A terrible movie, I hate it.", "The story was terrible.", "I hate this weather.", "This was a terrible day."]
for t in pos: cls.append({"text": t, "label": "positive"})
for t in neg: cls.append({"text": t, "label": "negative"})
random.shuffle(cls)
with open("examples/data/tiny-sentiment.jsonl", "w") as f:
    for r in cls: f.write(json.dumps(r) + "\n")
    # Ten more, distinct (duplicates are a data-doctor warning), after the shuffled first ten.
    more = [("What a great day, I like it.", "positive"), ("The movie was terrible, I hate the end.", "negative"),
            ("The dog was great fun today.", "positive"), ("I hate this day, it was terrible.", "negative"),
            ("I like the sunny weather.", "positive"), ("Terrible weather, I hate the rain.", "negative"),
            ("A great movie, a great story.", "positive"), ("The dog was terrible today.", "negative"),
            ("This story is great, I like the end.", "positive"), ("A terrible story, this was no fun.", "negative")]
    for t, label in more: f.write(json.dumps({"text": t, "label": label}) + "\n")
print(len(rows))
