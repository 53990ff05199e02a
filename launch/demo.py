"""Serve the bundled NLD model in each mode and show it answering (README's first command).

For each of ar, fastdiffuser, linearspec: start stock `python -m sglang.launch_server
--algorithm MODE` on the bundled checkpoint, send the same prompts through /generate and the
OpenAI API, print the answers with tokens per forward, stop the server."""

from __future__ import annotations

import argparse
import sys

import requests

from sglang_nemodiff.bundled import bundled_model_path
from sglang_nemodiff.servers import ManagedServer
from sglang_nemodiff.speedbench import meta_scalar

# The bundled model writes standard-library-style Python and answers copy/edit requests in its chat
# format; these greedy answers run to >= 48 tokens (reference: LinearSpec 1.92, 2.78 and 5.82 tokens
# per forward at 64 new tokens, output identical to AR).
PROMPTS = [
    "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    parser.add_argument(",
    "<|im_start|>user\nRename `count` to `total`.\n```python\nclass Counter:\n    def __init__(self):\n"
    "        self.count = 0\n\n    def increment(self):\n        self.count += 1\n        return self.count\n"
    "```<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nFix the typo in this code.\n```python\ndef fibonacci(n):\n    a, b = 0, 1\n"
    "    for i in rnage(n):\n        a, b = b, a + b\n    return a\n```<|im_end|>\n<|im_start|>assistant\n",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", default=bundled_model_path())
    parser.add_argument("--algorithms", default="ar,fastdiffuser,linearspec")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=30123)
    args = parser.parse_args()
    outputs = {}
    for algorithm in args.algorithms.split(","):
        server = ManagedServer(args.model_path, algorithm, ["--skip-server-warmup"], port=args.port,
                               log_path=f"/tmp/nemodiff-demo-{algorithm}.log")
        print(f"\n=== --algorithm {algorithm}: starting {' '.join(server.cmd)}", flush=True)
        with server:
            server.wait_ready(timeout=900)
            for prompt in PROMPTS:
                response = requests.post(server.url + "/generate", timeout=600, json={
                    "text": prompt,
                    "sampling_params": {"temperature": 0, "max_new_tokens": args.max_new_tokens}}).json()
                info = response["meta_info"]
                tpf = meta_scalar(info, "nemodiff_tokens_per_forward") or 1.0
                outputs.setdefault(prompt, {})[algorithm] = response["output_ids"]
                print(f"--- prompt {prompt!r}\n{response['text']}\n"
                      f"[{info['completion_tokens']} tokens, {tpf:.2f} tokens/forward]", flush=True)
            chat = requests.post(server.url + "/v1/chat/completions", timeout=600, json={
                "model": "default", "temperature": 0, "max_tokens": 32,
                "messages": [{"role": "user", "content": "Write a Python function that adds two numbers."}]}).json()
            print(f"--- OpenAI chat: {chat['choices'][0]['message']['content']!r}", flush=True)
    if "ar" in args.algorithms and "linearspec" in args.algorithms:
        same = all(v["ar"] == v["linearspec"] for v in outputs.values())
        print(f"\nLinearSpec output identical to AR: {same}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
