"""A real serving test: llama.cpp's own server (llama-server, from the project's llama.cpp
build) serves the tiny fine-tune's Q4_K_M on localhost, as Ollama would serve it to Continue;
an OpenAI-style chat request (ChatML applied by the server from the GGUF's chat template,
generation ending at <|im_end|>) and a fill-in-the-middle /infill request (what tab completion
sends). Also: the FIM tokens are control tokens in the GGUF, one token each for llama.cpp."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraforge.constants import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, FIM_TOKENS, IM_END, IM_START
from loraforge.llamacpp import llama_tool, llama_tool_env

pytestmark = pytest.mark.slow  # reads the `pipeline` fixture

STARTUP_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 120
MESSAGES = [{"role": "system", "content": "You are a Rails expert."},
            {"role": "user", "content": "Write a Rails controller for posts."}]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    startup_s: float

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None

    def tokenize(self, text: str) -> list[int]:
        return self.post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else ""


@pytest.fixture(scope="module")
def server(pipeline, tmp_path_factory):
    """llama-server on a free localhost port, the tiny Q4_K_M loaded; started and stopped here,
    ready within STARTUP_TIMEOUT_S (GET /health) or killed and failed with its log."""
    gguf = pipeline / "results" / "tiny" / "Q4_K_M.gguf"
    log = tmp_path_factory.mktemp("server") / "llama-server.log"
    port = _free_port()
    cmd = [str(llama_tool("llama-server")), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "-c", "1024", "-np", "1", "-t", "2", "--no-webui", "--seed", "0"]
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=llama_tool_env())
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama-server exited with {proc.returncode}:\n{_log_tail(log)}")
            if time.monotonic() - started > STARTUP_TIMEOUT_S:
                pytest.fail(f"llama-server not ready after {STARTUP_TIMEOUT_S} s:\n{_log_tail(log)}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                    if resp.status == 200 and json.loads(resp.read()).get("status") == "ok":
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while the model loads
            time.sleep(0.5)
        yield Server(url, proc, log, time.monotonic() - started)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def test_fim_tokens_are_control_tokens_in_the_gguf(pipeline):
    """The converter types the tiny tokenizer's FIM tokens CONTROL, and llama.cpp reads each
    one in text as one token (else a FIM prompt would be plain text to the model)."""
    import llama_cpp
    from gguf import GGUFReader

    gguf = pipeline / "results" / "tiny" / "Q4_K_M.gguf"
    reader = GGUFReader(str(gguf))
    tokens_field = reader.get_field("tokenizer.ggml.tokens")
    tokens = [bytes(tokens_field.parts[i]).decode() for i in tokens_field.data]
    types_field = reader.get_field("tokenizer.ggml.token_type")
    types = [int(types_field.parts[i][0]) for i in types_field.data]
    control = int(llama_cpp.LLAMA_TOKEN_TYPE_CONTROL)
    for token in (*FIM_TOKENS, IM_START, IM_END):
        assert types[tokens.index(token)] == control, token
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    for token in FIM_TOKENS:
        assert llm.tokenize(token.encode(), add_bos=False, special=True) == [tokens.index(token)], token
    # without special parsing it is text, several tokens: the distinction is real
    assert len(llm.tokenize(FIM_PREFIX.encode(), add_bos=False, special=False)) > 1
    llm.close()


def test_chat_completion_applies_chatml_and_stops_at_im_end(server, pipeline, record_property):
    from jinja2 import Template

    from loraforge.modelfile import chat_template_of

    # the prompt the server builds from the GGUF's chat template is the HF chat template's
    prompt = server.post("/apply-template", {"messages": MESSAGES})["prompt"]
    hf = Template(chat_template_of(pipeline / "results" / "tiny" / "adapter")).render(
        messages=MESSAGES, add_generation_prompt=True)
    assert prompt == hf
    t0 = time.monotonic()
    reply = server.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 24, "temperature": 0})
    record_property("chat_request_s", round(time.monotonic() - t0, 2))
    choice = reply["choices"][0]
    assert reply["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    assert isinstance(content, str) and IM_END not in content and IM_START not in content
    assert reply["usage"]["prompt_tokens"] == len(server.tokenize(prompt))
    if choice["finish_reason"] == "length":
        assert reply["usage"]["completion_tokens"] == 24
    else:
        assert choice["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] <= 24
    # <|im_end|> made (nearly) certain: the reply ends there, finish_reason stop, the token not in the text
    im_end = server.tokenize(IM_END)
    assert len(im_end) == 1
    forced = server.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 24, "temperature": 0,
                                                  "logit_bias": {str(im_end[0]): 100}})
    choice = forced["choices"][0]
    assert choice["finish_reason"] == "stop" and forced["usage"]["completion_tokens"] < 24
    assert IM_END not in choice["message"]["content"]
    print(f"llama-server ready in {server.startup_s:.1f} s; chat reply: {content!r} "
          f"({reply['choices'][0]['finish_reason']})")


def test_infill_fills_the_middle(server, record_property):
    prefix = "class PostsController < ApplicationController\n  def index\n    "
    suffix = "\n  end\nend\n"
    t0 = time.monotonic()
    reply = server.post("/infill", {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 12,
                                    "temperature": 0, "cache_prompt": False})
    record_property("infill_request_s", round(time.monotonic() - t0, 2))
    assert isinstance(reply["content"], str)
    assert not any(t in reply["content"] for t in (*FIM_TOKENS, IM_END, IM_START))
    assert reply["stop"] is True and reply["tokens_predicted"] <= 12
    assert reply["stop_type"] in ("eos", "limit") and (reply["stop_type"] == "limit") == (reply["tokens_predicted"] == 12)
    # the server built Qwen's FIM prompt from the GGUF's FIM tokens, and evaluated exactly its tokens
    fim_prompt = f"{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"
    assert reply["prompt"] == fim_prompt
    assert reply["tokens_evaluated"] == len(server.tokenize(fim_prompt))
    print(f"infill: {reply['content']!r} ({reply['stop_type']}, {reply['tokens_predicted']} tokens)")
