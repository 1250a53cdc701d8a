"""`lorafit serve` as a program uses it: one real server process on a free port, the official `openai` client,
tiny chat adapters trained to different answers ('a' → "Paris.", 'b' → "Blue." with its own chat template,
'd' → "Four.", a DoRA adapter), each answer compared with what `lorafit generate` says with the same adapter
(or --no-adapter), and every answer decoded in a mixed batch with the same request decoded alone."""

from __future__ import annotations

import json
import random
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import run_cli
from tests.e2e.conftest import CHAT_BASE, CHAT_PROMPTS, CHAT_SYSTEM
from tests.e2e.serve_helpers import Server

KEY = "test-key-123"
ASK = CHAT_PROMPTS[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory, chat_runs):
    """--adapter-root: a copy of run 'a' inside it (loadable at run time), and ways out of it: a link to a folder
    outside, a link to a weights file outside, a run whose recipe is a link outside; the root is itself an adapter
    whose run (recipe.yaml) is the folder above it."""
    outer = tmp_path_factory.mktemp("adapter_root")
    root = outer / "root"
    shutil.copytree(chat_runs["a"] / "adapter", root)
    shutil.copy(chat_runs["a"] / "recipe.yaml", outer / "recipe.yaml")
    shutil.copytree(chat_runs["a"] / "adapter", root / "c")
    (root / "escape").symlink_to(chat_runs["b"] / "adapter")  # inside by name, outside in fact
    shutil.copytree(chat_runs["a"] / "adapter", root / "linked")
    (root / "linked" / "adapter_model.safetensors").unlink()
    (root / "linked" / "adapter_model.safetensors").symlink_to(chat_runs["b"] / "adapter" / "adapter_model.safetensors")
    shutil.copytree(chat_runs["a"] / "adapter", root / "run" / "adapter")
    (root / "run" / "recipe.yaml").symlink_to(chat_runs["b"] / "recipe.yaml")
    return root


@pytest.fixture(scope="module")
def broken(tmp_path_factory, chat_runs):
    """An adapter served from the start whose weights file turns out unreadable when it is first used."""
    out = tmp_path_factory.mktemp("broken") / "broken"
    shutil.copytree(chat_runs["a"] / "adapter", out)
    (out / "adapter_model.safetensors").write_bytes(b"not a safetensors file" * 4)
    return out


@pytest.fixture(scope="module")
def server(chat_runs, root, broken, tmp_path_factory):
    srv = Server(["--adapter", f"a={chat_runs['a']}", "--adapter", f"b={chat_runs['b'] / 'adapter'}",
                  "--adapter", f"d={chat_runs['d']}", "--adapter", f"broken={broken}", "--api-key", KEY,
                  "--max-loaded", "3", "--max-batch", "8", "--allow-runtime-adapters", "--adapter-root", root],
                 cwd=tmp_path_factory.mktemp("serve"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client(KEY)


@pytest.fixture(scope="module")
def generated(chat_runs):
    """`lorafit generate --compare` (a, b, and the base asked as 'a' was trained) and `--no-adapter`, --json."""
    adapters = ["--adapter", f"a={chat_runs['a']}", "--adapter", f"b={chat_runs['b']}"]

    def run(*args) -> dict:
        proc = run_cli("generate", *adapters, "--prompt", ASK, "--max-new-tokens", "16", "--json", *args)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    compare = {a["adapter"]: a for a in run("--compare")["answers"]}
    return {"a": compare["a"], "b": compare["b"], "base": run("--no-adapter")["answers"][0],
            "b_system": run("--use", "b", "--system", CHAT_SYSTEM)["answers"][0]}


def _chat(client, model, prompt=ASK, system=None, **kw):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return client.chat.completions.create(model=model, messages=messages, **{"max_tokens": 16, "temperature": 0, **kw})


FINISH = {"end": "stop", "max_new_tokens": "length"}


def test_banner_and_models(server, client, chat_runs):
    banner = "".join(server.stdout)
    assert "adapters  a, b, d, broken" in banner and "curl " + server.url + "/v1/chat/completions" in banner
    assert "Authorization: Bearer $LORAFIT_API_KEY" in banner and KEY not in banner  # the key itself is never shown
    models = {m.id: m for m in client.models.list().data}
    base = str(CHAT_BASE)
    assert list(models) == [base, "a", "b", "d", "broken"]
    assert models["a"].parent == models["b"].parent == base and models[base].parent is None
    assert models["a"].root == "a" and models["b"].root == "b"  # no path on the server's disk is shown


@pytest.mark.parametrize("model", ["a", "b", "base"])
def test_greedy_chat_equals_lorafit_generate(client, generated, model):
    reply = _chat(client, model)
    expected = generated[model]
    assert reply.choices[0].message.content == expected["text"]
    assert reply.usage.completion_tokens == expected["new_tokens"]
    assert reply.usage.prompt_tokens == expected["prompt_tokens"]
    assert reply.choices[0].finish_reason == FINISH[expected["stopped"]]
    if model != "base":
        assert expected["text"] == {"a": "Paris.", "b": "Blue."}[model]  # routed: each adapter its own answer


def test_system_prompt_is_rendered_as_generate_renders_it(client, generated):
    reply = _chat(client, "b", system=CHAT_SYSTEM)
    assert reply.choices[0].message.content == generated["b_system"]["text"] == "Blue."
    assert reply.usage.prompt_tokens == generated["b_system"]["prompt_tokens"]


@pytest.mark.parametrize("model", ["a", "b"])
def test_completions_on_the_rendered_prompt_give_the_same_tokens(client, generated, model):
    expected = generated[model]
    out = client.completions.create(model=model, prompt=expected["rendered_prompt"], max_tokens=16, temperature=0)
    assert out.usage.prompt_tokens == expected["prompt_tokens"]
    assert out.usage.completion_tokens == expected["new_tokens"]
    assert out.choices[0].text.strip() == expected["text"]


def test_streaming_yields_the_same_text(client, generated):
    for model in ("b", "base"):
        pieces, finish, usage = [], None, None
        for chunk in _chat(client, model, stream=True, stream_options={"include_usage": True}):
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(pieces) == generated[model]["text"]
        assert finish == FINISH[generated[model]["stopped"]] and usage.completion_tokens == generated[model]["new_tokens"]
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="a", prompt=generated["a"]["rendered_prompt"], max_tokens=16, temperature=0, stream=True) if c.choices)
    assert text.strip() == "Paris."


def test_sampling_is_seeded_and_stops_at_stop_strings(client, generated):
    draws = [_chat(client, "base", temperature=1.0, top_p=0.9, seed=seed, max_tokens=12).choices[0].message.content
             for seed in (7, 7, 8)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    greedy = generated["base"]["text"]
    cut = greedy[3:6]  # a stop string from the middle of the base's greedy answer
    reply = _chat(client, "base", stop=[cut])
    assert reply.choices[0].finish_reason == "stop" and greedy.startswith(reply.choices[0].message.content)
    assert cut not in reply.choices[0].message.content


def test_48_concurrent_requests_each_equal_its_sequential_answer(client):
    models = ["a", "b", "base"]
    sequential = {(m, p): _chat(client, m, p, max_tokens=8).choices[0].message.content
                  for m in models for p in CHAT_PROMPTS}
    rng = random.Random(0)
    asks = [(rng.choice(models), rng.choice(CHAT_PROMPTS)) for _ in range(48)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda ask: _chat(client, *ask, max_tokens=8).choices[0].message.content, asks))
    assert answers == [sequential[ask] for ask in asks]
    assert {sequential[("a", p)] for p in CHAT_PROMPTS} == {"Paris."}


def test_a_mixed_batch_answers_each_request_as_it_is_answered_alone(server, client):
    """Different adapters (a DoRA one in its own sub-batch), the base, different max_tokens and stop strings,
    one seeded sampled request, one streamed: decoded together, each equals its answer decoded alone."""
    asks = [dict(model="a", prompt=CHAT_PROMPTS[1], max_tokens=16),
            dict(model="b", prompt=CHAT_PROMPTS[2], max_tokens=16, system=CHAT_SYSTEM),
            dict(model="d", prompt=CHAT_PROMPTS[3], max_tokens=16),
            dict(model="base", prompt=CHAT_PROMPTS[0], max_tokens=30),
            dict(model="base", prompt=CHAT_PROMPTS[1], max_tokens=7),
            dict(model="base", prompt=CHAT_PROMPTS[2], max_tokens=24, stop=["e", "o"]),
            dict(model="base", prompt=CHAT_PROMPTS[3], max_tokens=20, temperature=1.0, top_p=0.9, seed=11),
            dict(model="a", prompt=CHAT_PROMPTS[0], max_tokens=12, stream=True)]

    def ask(kw):
        kw = dict(kw)
        if kw.pop("stream", False):
            chunks = list(_chat(client, kw.pop("model"), kw.pop("prompt"), stream=True,
                                stream_options={"include_usage": True}, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return text, [c.usage.completion_tokens for c in chunks if c.usage][0]
        reply = _chat(client, kw.pop("model"), kw.pop("prompt"), **kw)
        return reply.choices[0].message.content, reply.usage.completion_tokens

    def batches(lines):
        return [int(b) for b in re.findall(r" batch (\d+) ", "\n".join(lines))]

    logged = len(batches(server.stderr_text().splitlines()))
    alone = [ask(kw) for kw in asks]
    logged = len(server.wait_for_log(batches, logged + len(asks)))
    start = threading.Barrier(len(asks))
    with ThreadPoolExecutor(len(asks)) as pool:
        together = list(pool.map(lambda kw: (start.wait(timeout=60), ask(kw))[1], asks))
    assert together == alone
    assert [text for text, _ in alone[:3]] == ["Paris.", "Blue.", "Four."]
    together_batches = server.wait_for_log(batches, logged + len(asks))[logged:]
    assert max(together_batches) >= 4, together_batches  # decoded together, not in turn


def test_adapters_load_lazily_and_the_least_recently_used_is_evicted(server, client):
    status, body = server.post("/v1/load_lora_adapter", {"lora_name": "lru", "lora_path": "c"}, key=KEY)
    assert status == 200, body
    for model in ("a", "b", "d", "lru"):  # --max-loaded 3: the fourth evicts the least recently used, a
        _chat(client, model)
    loaded = {m.id: m.model_extra["loaded"] for m in client.models.list().data}
    assert {name for name, is_loaded in loaded.items() if is_loaded} == {str(CHAT_BASE), "b", "d", "lru"}
    assert _chat(client, "a").choices[0].message.content == "Paris."  # reloaded on demand
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "lru"}, key=KEY)[0] == 200


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, root, chat_runs):
    import openai

    with pytest.raises(openai.NotFoundError) as e:
        _chat(client, "nope")
    assert "served: " in str(e.value) and "a, b" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "a", max_tokens=10**9)
    assert "context is 512 tokens" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "a", prompt="word " * 600)
    assert "context is 512 tokens" in str(e.value)
    with pytest.raises(openai.AuthenticationError):
        _chat(server.client("wrong-key"), "a")
    status, body = server.post("/v1/chat/completions", None, key=KEY, raw=b'{"model": "a", "messages": [')
    assert status == 400 and "malformed JSON" in body["error"]["message"]
    status, body = server.post("/v1/chat/completions", {"model": "a"}, key=KEY)
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = server.post("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "x"}],
                                                        "n": 3}, key=KEY)
    assert status == 400 and "'n'" in body["error"]["message"]
    status, body = server.post("/v1/completions", {"model": "a", "prompt": "x" * (5 * 1024 * 1024)}, key=KEY)
    assert status == 413
    for path in ("../", str(chat_runs["b"]), "escape", "missing"):
        status, body = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path}, key=KEY)
        assert status == (400 if path == "missing" else 403), (path, body)
    status, body = server.get("/v1/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert _chat(client, "a").choices[0].message.content == "Paris."  # still serving
    log = server.stderr_text()
    assert "Traceback" not in log
    assert "POST /v1/chat/completions 404 model=nope" in log
    assert "POST /v1/chat/completions 200 model=a tokens in=" in log


def test_adapters_load_and_unload_at_run_time(server, client):
    status, body = server.post("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "c"}, key=KEY)
    assert status == 200, body
    assert "c" in [m.id for m in client.models.list().data]
    assert _chat(client, "c").choices[0].message.content == "Paris."  # c is a copy of a
    status, body = server.post("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "c"}, key=KEY)
    assert status == 400 and "already served" in body["error"]["message"]
    status, _ = server.post("/v1/unload_lora_adapter", {"lora_name": "c"}, key=KEY)
    assert status == 200
    import openai

    with pytest.raises(openai.NotFoundError):
        _chat(client, "c")


def test_an_adapter_that_fails_to_load_is_its_requests_error_and_the_server_goes_on(server):
    import openai

    impatient = server.client(KEY).with_options(timeout=30)  # a dead engine would leave this request waiting
    with pytest.raises(openai.InternalServerError) as e:
        _chat(impatient, "broken")
    assert "adapter 'broken' does not load" in str(e.value)
    assert _chat(impatient, "a").choices[0].message.content == "Paris."
    status, body = server.get("/health")
    assert status == 200 and body["engine_alive"] is True and body["status"] == "ok"


def test_runtime_adapters_never_read_a_file_outside_the_root(server):
    for path in (".", "linked", "run"):  # a run outside the root, a weights file linked out, a recipe linked out
        status, body = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path}, key=KEY)
        assert status == 403 and body["error"]["code"] == "path_outside_adapter_root", (path, body)


def test_concurrent_loads_and_unloads_of_one_name_agree(server):
    def post(path):
        return lambda _: server.post(path, {"lora_name": "twin", "lora_path": "c"}, key=KEY)[0]

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(post("/v1/load_lora_adapter"), range(4))) == [200, 400, 400, 400]
    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(post("/v1/unload_lora_adapter"), range(4))) == [200, 404, 404, 404]


def test_the_guard_answers_before_the_body_is_read(server):
    """A chunked body over the cap is a 413 (not FastAPI's 400); without the key a malformed body is a 401."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    chunks = (b"x" * 65536 for _ in range(80))  # 5 MiB, no Content-Length: sent chunked
    conn.request("POST", "/v1/completions", body=chunks, headers={"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()
    status, body = server.post("/v1/chat/completions", None, raw=b'{"model": "a", "messages": [')
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_extreme_sampling_values_never_give_a_500(server, client):
    status, body = server.post("/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": ASK}],
                                                        "temperature": 1.0, "seed": 2**70}, key=KEY)
    assert status == 400 and body["error"]["param"] == "seed", body
    reply = _chat(client, "a", temperature=1e-40, seed=3)  # below 1e-5: greedy
    assert reply.choices[0].message.content == "Paris."


def test_the_log_line_shows_a_hostile_model_name_escaped(server):
    status, _ = server.post("/v1/chat/completions", {"model": "evil\nPOST /v1/forged 200 model=x\x1b[2J",
                                                     "messages": [{"role": "user", "content": "x"}]}, key=KEY)
    assert status == 404
    lines = server.wait_for_log(lambda lines: [x for x in lines if "evil" in x], 1)
    log = server.stderr_text()
    assert "\x1b" not in log and not any(x.startswith("POST /v1/forged") for x in log.splitlines()), lines


# ----------------------------------------------------------------------------------------------
# Refused at start (in-process: nothing loads)


def _variant(chat_runs, tmp_path, **config) -> str:
    out = tmp_path / "variant"
    shutil.copytree(chat_runs["a"] / "adapter", out)
    path = out / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return str(out)


@pytest.mark.parametrize("config, reason", [
    ({"base_model_name_or_path": "gpt2"}, "trained on gpt2"),
    ({"task_type": "SEQ_CLS"}, "is a seq_cls adapter"),
])
def test_adapters_that_cannot_share_the_base_are_refused_at_start(chat_runs, tmp_path, config, reason):
    proc = run_cli("serve", "--adapter", f"a={chat_runs['a']}", "--adapter", f"x={_variant(chat_runs, tmp_path, **config)}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --adapter x: ") and reason in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, where", [
    ([], "MODEL"),
    (["--adapter-root", "."], "--adapter-root"),
    (["--allow-runtime-adapters"], "--allow-runtime-adapters"),
    (["--adapter", "base=x"], "--adapter"),
])
def test_option_mistakes_are_refused(chat_runs, args, where):
    extra = [] if args[:1] in ([], ["--adapter"]) else [str(chat_runs["a"])]
    proc = run_cli("serve", *extra, *args)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {where}: "), proc.stderr


def test_a_directory_name_that_cannot_be_served_is_refused(chat_runs, tmp_path):
    import socket

    (tmp_path / "base").symlink_to(chat_runs["a"])  # "base" is the model without adapter: never reachable
    with socket.socket() as taken:  # without the check the server would start: the port in use stops it
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        proc = run_cli("serve", tmp_path / "base", "--port", taken.getsockname()[1])
    assert proc.returncode == 2 and proc.stderr.startswith("error: RUN_DIR: ") and "--adapter NAME=" in proc.stderr, \
        proc.stderr


def test_runtime_adapters_on_a_public_address_need_an_api_key(chat_runs, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen(1)
        proc = run_cli("serve", chat_runs["a"], "--host", "0.0.0.0", "--port", taken.getsockname()[1],
                       "--allow-runtime-adapters", "--adapter-root", tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --allow-runtime-adapters: "), proc.stderr
    assert "--api-key" in proc.stderr


def test_a_port_in_use_is_refused_before_loading(chat_runs):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        proc = run_cli("serve", chat_runs["a"], "--port", taken.getsockname()[1])
    assert proc.returncode == 2 and proc.stderr.startswith("error: --port: cannot listen"), proc.stderr


# ----------------------------------------------------------------------------------------------
# Last in this module: it stops the module's server (one process start fewer for the suite).


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(server, client):
    stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": ASK}], max_tokens=120,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = iter(stream)
    next(chunks)  # the request is in flight
    server.proc.send_signal(15)
    rest = list(chunks)
    assert server.proc.wait(timeout=120) == 0
    usage = [c.usage for c in rest if c.usage][0]
    assert usage.completion_tokens == 120 and [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
    assert "".join(server.stdout).splitlines()[-1].startswith("stopped (SIGTERM): ")
