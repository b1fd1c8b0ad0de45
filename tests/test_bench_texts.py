"""`bench e2e --datasets texts:FILE` for a base target: its prompts are the texts file's
dev split only (as `train data --texts` holds it out), and they go to /v1/completions as
token ids, while the chat benchmarks' messages still go to /v1/chat/completions. The
server is a stdlib HTTP stub that records each request (no engine needed)."""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from coral_vllm.bench.client import run_load
from coral_vllm.bench.e2e import build_parser, dataset_arg, dataset_prompts, warmup_prompt
from coral_vllm.data.splits import DEV_SHARE, HELDOUT_SHARE, split_of
from coral_vllm.data.texts import PROMPT_TOKENS, Passage, TextPrompter, write_passages


@pytest.fixture
def stub_server():
    """(base URL, recorded (path, JSON body) list) of an OpenAI-shaped stub."""
    seen: list[tuple[str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep the test output clean
            pass

        def reply(self, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.reply({"object": "list", "data": [{"id": "stub", "object": "model",
                                                     "created": 0, "owned_by": "t"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body))
            usage = {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
            if self.path.endswith("/chat/completions"):
                choice = {"index": 0, "finish_reason": "length",
                          "message": {"role": "assistant", "content": "abc"}}
                kind = "chat.completion"
            else:
                choice = {"index": 0, "finish_reason": "length", "text": "abc"}
                kind = "text_completion"
            self.reply({"id": "x", "object": kind, "created": 0, "model": "stub",
                        "choices": [choice], "usage": usage})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_token_id_prompts_go_to_completions_and_messages_to_chat(stub_server):
    url, seen = stub_server
    ids = [[2, 651, 6290], [2, 818, 5279, 529]]
    res = run_load(url, ids, concurrency=2, max_tokens=5, temperature=0.0)
    assert res.output_tokens == 6 and res.replies == ["abc", "abc"]
    assert sorted(path for path, _ in seen) == ["/v1/completions"] * 2
    assert sorted(body["prompt"] for _, body in seen) == sorted(ids)
    assert all(body["max_tokens"] == 5 and "messages" not in body for _, body in seen)
    seen.clear()
    run_load(url, ["What is 2 + 2?"], concurrency=1, max_tokens=5, temperature=0.0)
    assert [(p, b["messages"]) for p, b in seen] == [
        ("/v1/chat/completions", [{"role": "user", "content": "What is 2 + 2?"}])]


def test_texts_dataset_sends_the_dev_split_only(gemma_dir, tmp_path):
    from transformers import AutoTokenizer

    passages = [Passage(f"t:doc{i}#0", "t", f"Passage number {i} begins here and goes on.")
                for i in range(1500)]
    path = write_passages(tmp_path / "texts.jsonl.xz", passages, {})
    prompts, about = dataset_prompts(f"texts:{path}", gemma_dir)
    prompt = TextPrompter(AutoTokenizer.from_pretrained(str(gemma_dir)), PROMPT_TOKENS)
    dev = [prompt(p.text) for p in passages
           if split_of(p.id, DEV_SHARE, HELDOUT_SHARE) == "dev"]
    assert prompts == dev and 0 < len(dev) < 30  # ~0.5% of 1,500
    assert all(p[0] == 2 for p in prompts)  # Gemma's <bos>, sent as ids: not added twice
    assert "dev split" in about and "/v1/completions" in about
    assert len(warmup_prompt(prompts)) < 16  # less than a KV block: nothing cached
    assert warmup_prompt(["chat message"]) == "Hello!"


def test_dataset_argument_names_the_fix(tmp_path):
    assert dataset_arg("mtbench") == "mtbench"
    with pytest.raises(argparse.ArgumentTypeError, match="no such file; pass the file"):
        dataset_arg(f"texts:{tmp_path / 'missing.jsonl.xz'}")
    with pytest.raises(argparse.ArgumentTypeError, match="or texts:FILE"):
        dataset_arg("sharegpt")
    (tmp_path / "t.jsonl.xz").write_bytes(b"")
    args = build_parser().parse_args(["--datasets", "gsm8k", f"texts:{tmp_path}/t.jsonl.xz"])
    assert args.datasets == ["gsm8k", f"texts:{tmp_path}/t.jsonl.xz"]
