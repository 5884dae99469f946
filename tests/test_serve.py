"""serve.py end to end: the real server started as a subprocess on a free port, called over HTTP with the official
`openai` client (and raw HTTP for malformed input): replies, streaming, concurrency, errors, disconnects, API key,
signals, and the chat page in headless Chromium."""

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import http.client
import urllib.error
import urllib.parse
import urllib.request

import openai
import pytest
import torch

from config import load_config
from conftest import ROOT, run_cli
from train import train

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=128, batch_size=16, eval_iters=2, log_interval=50,
            warmup_iters=5, learning_rate=3e-3, min_lr=3e-4)
PROMPTS = ["Say hello to Ada.", "What is the capital of Kenya?", "Echo: soft kite", "Which number follows 57?",
           "Who are you?", "Tell me the capital of Peru.", "Echo: blue moon", "Say hello to Bob."]
KEY = "test-key-123"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny model; 2 threads stall badly when other jobs hold the cores


def trained(tmp_path_factory, dataset, name, iters, **extra):
    out = tmp_path_factory.mktemp(name) / "ckpt"
    cfg = load_config(None, {**TINY, "out_dir": str(out), "dataset_dir": dataset, "model_name": name,
                             "max_iters": iters, "eval_interval": iters, **extra})
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is as fast, and does not stall on a busy machine
    try:
        train(cfg, log=lambda *a: None)
    finally:
        torch.set_num_threads(n)
    return str(out)


class Reply:
    def __init__(self, status, headers, text):
        self.status, self.headers, self.text = status, headers, text

    def json(self):
        return json.loads(self.text)


def call(url, method="GET", body=None, key=None, raw=None):
    """A plain HTTP call (urllib): Reply(status, headers, text), error statuses included."""
    data = raw.encode() if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return Reply(r.status, r.headers, r.read().decode())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.headers, e.read().decode())


def post(server, path, body, key=None, raw=None):
    return call(server.url + path, "POST", body, key, raw)


def health(server):
    return call(server.url + "/health").json()


def open_stream(server, path, body, key=None):
    """POST with stream: true on a raw connection: (connection, response); read lines with response.readline()
    and close the connection to disconnect mid-stream."""
    u = urllib.parse.urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    conn.request("POST", path, json.dumps(body), headers)
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


class Server:
    """`python serve.py ... --port 0` as a subprocess; the URL is read from the line it prints."""

    def __init__(self, out_dir, name, *extra):
        cmd = [sys.executable, "serve.py", "--out_dir", out_dir, "--model_name", name, "--port", "0",
               "--dtype", "float32", *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", **ONE_THREAD))
        line = self.proc.stdout.readline()
        if "http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line}{self.proc.stderr.read()}")
        self.url = line.split(" at ")[1].split()[0]
        self.stderr = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()

    def client(self, key="unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, sample_chat):
    """A tiny char-level chat model (masked SFT on the shipped sample conversations) trained with BOS zero, so
    every reply below also checks that the server scales position 0 as sample.py does: its out_dir."""
    return trained(tmp_path_factory, sample_chat, "chat", 120, use_loss_mask=True, use_bos_zero_training=True,
                   bos_scaling_factor=0.1)


@pytest.fixture(scope="module")
def chat_server(chat_model):
    out = chat_model
    s = Server(out, "chat", "--max_batch_size", "16")
    s.out_dir = out
    yield s
    s.stop()


@pytest.fixture(scope="module")
def text_server(tmp_path_factory, shakespeare_char):
    """A tiny char-level text model (Shakespeare), served with an API key."""
    out = trained(tmp_path_factory, shakespeare_char, "text", 30)
    s = Server(out, "text", "--api_key", KEY)
    yield s
    s.stop()


def chat(client, prompt, stream=False, **kw):
    """(text, finish_reason, usage) of one chat reply, streamed or not."""
    kw = {"model": "chat", "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 40, **kw}
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.model_dump()
    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage:
            usage = chunk.usage.model_dump()
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish, usage


@pytest.fixture(scope="module")
def alone(chat_server):
    """Each prompt's greedy reply, asked alone (one request at a time)."""
    c = chat_server.client()
    return {p: chat(c, p)[0] for p in PROMPTS}


def test_models_health_and_the_page(chat_server):
    c = chat_server.client()
    assert [m.id for m in c.models.list().data] == ["chat"]
    assert health(chat_server)["status"] == "ok"
    page = call(chat_server.url + "/")
    assert page.status == 200 and "text/html" in page.headers["content-type"]
    assert "<title>chat - gptlab chat</title>" in page.text and "/v1/chat/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere


def test_chat_streamed_deltas_join_to_the_whole_reply(chat_server, alone):
    c = chat_server.client()
    text, finish, usage = chat(c, PROMPTS[0])
    assert text == alone[PROMPTS[0]] and text.strip() and finish in ("stop", "length")
    s_text, s_finish, s_usage = chat(c, PROMPTS[0], stream=True)
    assert (s_text, s_finish, s_usage) == (text, finish, usage)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    # the limit: finish_reason "length" and exactly max_tokens tokens
    text3, finish3, usage3 = chat(c, PROMPTS[0], max_tokens=3)
    assert finish3 == "length" and usage3["completion_tokens"] == 3 and text.startswith(text3)
    # a stop string: the reply ends just before it
    cut = text[2:4]
    text4, finish4, _ = chat(c, PROMPTS[0], stop=[cut])
    assert finish4 == "stop" and text4 == text[:text.index(cut)]


def test_the_same_greedy_reply_as_sample_py(chat_server, alone):
    for p in PROMPTS[:1]:
        r = run_cli("sample.py", "--out_dir", chat_server.out_dir, "--model_name", "chat", "--prompt", p,
                    "--temperature", "0", "--dtype", "float32", "--max_new_tokens", "40", env=ONE_THREAD)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == alone[p].strip()


def test_sample_py_num_samples_decodes_one_batch_with_a_seed_per_sample(chat_server):
    r = run_cli("sample.py", "--out_dir", chat_server.out_dir, "--model_name", "chat", "--prompt", PROMPTS[2],
                "--num_samples", "3", "--temperature", "1.5", "--seed", "5", "--dtype", "float32",
                "--max_new_tokens", "30", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr
    rule = "-" * 40
    samples = r.stdout.split(rule + "\n")
    assert len(samples) == 4 and samples[-1] == "" and len(set(samples[:3])) == 3, r.stdout  # seeds 5, 6, 7


def test_completions_stream_and_whole(text_server):
    c = text_server.client(KEY)
    kw = dict(model="text", prompt="ROMEO:", temperature=0, max_tokens=30)
    r = c.completions.create(**kw)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length" and len(r.choices[0].text) == 30
    assert r.usage.prompt_tokens == 7 and r.usage.completion_tokens == 30  # BOS + 6 characters
    streamed = [ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices]
    assert len(streamed) > 5 and "".join(streamed) == r.choices[0].text


def test_eight_concurrent_clients_each_get_their_alone_reply(chat_server, alone):
    peak = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak.append(health(chat_server)["running"])
            time.sleep(0.01)
    threading.Thread(target=watch, daemon=True).start()
    c = chat_server.client()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: chat(c, PROMPTS[i], stream=i % 2 == 0)[0], range(8)))
    done.set()
    assert got == [alone[p] for p in PROMPTS]
    assert max(peak) >= 2  # they really were decoded together


def assert_error(r, status, param=None, words=()):
    assert r.status == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert param is None or err["param"] == param, err
    for w in words:
        assert w in err["message"], err["message"]


def test_every_bad_input_is_a_4xx_in_openai_shape_and_the_server_keeps_serving(chat_server, alone):
    msgs = [{"role": "user", "content": "Hi"}]
    cases = [
        (None, "{not json", 400, None, ["not valid JSON"]),
        ([1, 2], None, 400, None, ["JSON object"]),
        ({}, None, 400, "messages", ["required"]),
        ({"messages": "Hi"}, None, 400, "messages", ["list"]),
        ({"messages": []}, None, 400, "messages", ["non-empty"]),
        ({"messages": ["Hi"]}, None, 400, "messages[0]", []),
        ({"messages": [{"content": "Hi"}]}, None, 400, "messages[0].role", []),
        ({"messages": [{"role": "wizard", "content": "Hi"}]}, None, 400, "messages[0].role", ["wizard"]),
        ({"messages": [{"role": "user", "content": 5}]}, None, 400, "messages[0].content", []),
        ({"messages": msgs, "temperature": "hot"}, None, 400, "temperature", ["number"]),
        ({"messages": msgs, "temperature": -0.5}, None, 400, "temperature", ["-0.5"]),
        (None, '{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', 400, "temperature", []),
        ({"messages": msgs, "top_p": 0}, None, 400, "top_p", []),
        ({"messages": msgs, "top_p": 1.5}, None, 400, "top_p", []),
        ({"messages": msgs, "max_tokens": 0}, None, 400, "max_tokens", []),
        ({"messages": msgs, "max_tokens": "10"}, None, 400, "max_tokens", ["integer"]),
        ({"messages": msgs, "max_completion_tokens": -3}, None, 400, "max_completion_tokens", []),
        ({"messages": msgs, "stream": "yes"}, None, 400, "stream", []),
        ({"messages": msgs, "stop": 5}, None, 400, "stop", []),
        ({"messages": msgs, "seed": 1.5}, None, 400, "seed", []),
        ({"messages": msgs, "seed": 2 ** 70}, None, 400, "seed", []),
        ({"messages": msgs, "n": 2}, None, 400, "n", []),
        ({"messages": [{"role": "user", "content": "Hi\u65e5"}]}, None, 400, "messages", ["\u65e5"]),
        ({"messages": [{"role": "user", "content": "a" * 200}]}, None, 400, "messages", ["128", "225"]),
        ({"messages": msgs, "model": "gpt-4o"}, None, 404, "model", ["gpt-4o", "chat"]),
    ]
    for body, raw, status, param, words in cases:
        assert_error(post(chat_server, "/v1/chat/completions", body, raw=raw), status, param, words)
    assert_error(post(chat_server, "/v1/completions", {"max_tokens": 5}), 400, "prompt", ["required"])
    assert_error(post(chat_server, "/v1/completions", {"prompt": 7}), 400, "prompt")
    assert_error(call(chat_server.url + "/v1/nothing"), 404)
    assert_error(call(chat_server.url + "/v1/chat/completions"), 405)
    # the official client surfaces the same errors as exceptions with the body parsed
    c = chat_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="chat", messages=msgs, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=msgs)
    assert chat(c, PROMPTS[1])[0] == alone[PROMPTS[1]]  # still serving, same answers


def test_api_key_and_chat_on_a_text_model(text_server):
    body = {"prompt": "ROMEO:", "max_tokens": 3}
    assert_error(post(text_server, "/v1/completions", body), 401, words=["Authorization: Bearer"])
    assert_error(post(text_server, "/v1/completions", body, key="wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        text_server.client("wrong").models.list()
    assert post(text_server, "/v1/completions", body, key=KEY).status == 200
    r = post(text_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}, key=KEY)
    assert_error(r, 400, words=["/v1/completions", "not chat"])
    assert call(text_server.url + "/health").status == 200  # health and the page need no key


def test_a_client_that_disconnects_mid_stream_frees_its_row(text_server):
    # greedy: the 30-iteration text model falls into a loop without its end token, so the reply runs until the
    # client leaves (sampled, it could draw the end token before the health check, and did once in CI)
    body = {"prompt": "ROMEO:", "max_tokens": 100000, "stream": True, "temperature": 0}
    conn, resp = open_stream(text_server, "/v1/completions", body, KEY)
    got = [resp.readline() for _ in range(6)]
    assert any(line.startswith(b"data: {") for line in got) and health(text_server)["running"] == 1
    conn.close()  # the client goes away mid-stream
    t = time.time()
    while health(text_server)["running"] and time.time() - t < 5:
        time.sleep(0.02)
    assert health(text_server)["running"] == 0 and health(text_server)["waiting"] == 0
    # the same for a client that gives up waiting for a whole (not streamed) reply
    u = urllib.parse.urlparse(text_server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": False}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    t = time.time()
    while not health(text_server)["running"] and time.time() - t < 5:
        time.sleep(0.02)
    assert health(text_server)["running"] == 1
    conn.close()
    t = time.time()
    while health(text_server)["running"] and time.time() - t < 5:
        time.sleep(0.02)
    assert health(text_server)["running"] == 0
    c = text_server.client(KEY)
    assert len(c.completions.create(model="text", prompt="ROMEO:", max_tokens=5, temperature=0).choices[0].text) == 5


def test_200_requests_from_16_concurrent_clients(chat_server, alone):
    c = chat_server.client()

    def one(i):
        p = PROMPTS[i % len(PROMPTS)]
        try:
            return p, chat(c, p, stream=i % 3 == 0)[0]
        except openai.APIStatusError as e:
            return p, f"HTTP {e.status_code}"
    t = time.time()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    wrong = [(p, got) for p, got in results if got != alone[p]]
    assert not wrong, f"{len(wrong)} of 200 wrong, e.g. {wrong[:3]} ({time.time() - t:.1f} s)"


def test_bad_command_lines_are_one_line_errors(chat_model, tmp_path):
    for args, words in ((["--model_name", "nope"], "no checkpoint for model 'nope'"),
                        (["--model_name", "chat", "--max_batch_size", "0"], "--max_batch_size must be >= 1"),
                        (["--model_name", "chat", "--host", "256.1.1.1"], "cannot listen on 256.1.1.1:8000")):
        r = run_cli("serve.py", "--out_dir", chat_model, *args, env=ONE_THREAD, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_sigint_and_sigterm_shut_down_cleanly(chat_server, text_server):
    # a stream is open on the text server when it is told to stop: it ends, and so does the server, with status 0
    body = {"prompt": "ROMEO:", "max_tokens": 100000, "stream": True}
    conn, resp = open_stream(text_server, "/v1/completions", body, KEY)
    resp.readline()
    assert text_server.stop(signal.SIGTERM) == 0
    assert b"shutting down" in resp.read()
    conn.close()
    assert chat_server.stop(signal.SIGINT) == 0
    for s, name in ((text_server, "SIGTERM"), (chat_server, "SIGINT")):
        err = "".join(s.stderr)
        assert f"[{name}: shutting down]" in err and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------------------------
# the chat page in a real browser

def chromium():
    """(chromium, chromedriver) paths, or a reason to skip."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        return None, "Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, "selenium is not installed (pip install -r requirements-test.txt)"
    return (browser, driver), None


def test_the_chat_page_in_headless_chromium(tmp_path_factory, chat_model):
    found, reason = chromium()
    if not found:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    server = Server(chat_model, "chat")
    opts = webdriver.ChromeOptions()
    opts.binary_location = found[0]
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1000,700",
              f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=found[1]))
    shot = tmp_path_factory.getbasetemp() / "chat_page.png"
    try:
        driver.get(server.url + "/")
        for field, value in (("temperature", "0"), ("max_tokens", "20")):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(value)
        wait = WebDriverWait(driver, 30)
        for k, text in enumerate(PROMPTS[:2], start=1):
            driver.find_element(By.ID, "input").send_keys(text)
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant:not(.pending)")) == k)
        users = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.user")]
        replies = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")]
        assert users == PROMPTS[:2] and all(r.strip() for r in replies)
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
        # what the API answers for the same conversation: the second reply had the first exchange as history
        c = server.client()
        msgs = [{"role": "user", "content": PROMPTS[0]}]
        first = chat(c, PROMPTS[0], max_tokens=20)[0]
        msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": PROMPTS[1]}]
        second = c.chat.completions.create(model="chat", messages=msgs, temperature=0, max_tokens=20)
        assert replies == [first.strip(), second.choices[0].message.content.strip()]
        driver.save_screenshot(str(shot))
        # an error is shown plainly: a temperature the server refuses
        driver.execute_script("document.getElementById('temperature').value = '-1'")
        driver.find_element(By.ID, "input").send_keys("Hi")
        driver.find_element(By.ID, "send").click()
        err = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        assert "temperature" in err[0].text
        driver.find_element(By.ID, "new").click()
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg")
    except Exception:
        driver.save_screenshot(str(shot))
        print("screenshot at", shot, driver.get_log("browser"))
        raise
    finally:
        driver.quit()
        server.stop()
