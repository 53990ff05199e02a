"""Serve a bundled model in each mode and show it answering (README's first command).

`--model smol` (default): SmolLM2-135M-Instruct converted to NLD form (sglang_nemodiff/bundled/
smol.py) answers chat questions through the OpenAI chat endpoint in every mode. `--model
nld-tiny`: the small NLD model trained by this project, on its code prompts (it cannot chat).

For each of ar, fastdiffuser, linearspec, quadratic: start stock `python -m sglang.launch_server
--algorithm MODE` on the checkpoint (FastDiffuser with `denoise_lora: true`: its denoise
passes use the bundled self-distilled draft adapter; quadratic at b = 8 with draft groups after
the first two block tokens, the variant that costs a CPU least; `MODE@key=value` entries as in speedbench), send the same prompts through /generate and the
OpenAI completions API, print the answers with tokens per forward, stop the server; then a table of
each mode's tokens per forward and tokens/s relative to AR. Each server is fresh: LinearSpec's
`block_size: auto` policy times every block size once during the first request and learns the
acceptance from these requests, so its first answer pays for that."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import requests

from sglang_nemodiff.bundled import MODEL_NAMES, model_path
from sglang_nemodiff.servers import ManagedServer
from sglang_nemodiff.speedbench import meta_scalar
from sglang_nemodiff.speedbench.modes import parse_entries, write_algorithm_config

# The bundled model writes standard-library-style Python and answers copy/edit requests in its chat
# format; these greedy answers run to >= 48 tokens, LinearSpec output identical to AR.
PROMPTS = [
    "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    parser.add_argument(",
    "<|im_start|>user\nRename `count` to `total`.\n```python\nclass Counter:\n    def __init__(self):\n"
    "        self.count = 0\n\n    def increment(self):\n        self.count += 1\n        return self.count\n"
    "```<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nFix the typo in this code.\n```python\ndef fibonacci(n):\n    a, b = 0, 1\n"
    "    for i in rnage(n):\n        a, b = b, a + b\n    return a\n```<|im_end|>\n<|im_start|>assistant\n",
]


CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for better sleep.",
    "Write a Python function that reverses a string.",
]


def chat_prompts(path: str) -> list[str]:
    """The chat questions as the server's chat template renders them (for /generate's stats)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in CHAT_QUESTIONS]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=MODEL_NAMES, default="smol")
    parser.add_argument("--model-path", default=None, help="a checkpoint directory (overrides --model)")
    parser.add_argument("--algorithms", default="ar,fastdiffuser@denoise_lora=true,linearspec,"
                                                "quadratic@block_size=8@quadratic_groups=2")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=30123)
    args = parser.parse_args()
    path = args.model_path or model_path(args.model)
    chat = args.model_path is None and args.model == "smol"
    prompts = chat_prompts(path) if chat else PROMPTS
    outputs, totals = {}, {}
    config_dir = tempfile.mkdtemp(prefix="nemodiff-demo-")
    for entry in parse_entries(args.algorithms):
        config = write_algorithm_config(entry, config_dir)
        server_args = ["--skip-server-warmup"] + (["--algorithm-config", config] if config else [])
        server = ManagedServer(path, entry.algorithm, server_args, port=args.port,
                               log_path=f"/tmp/nemodiff-demo-{entry.file_stem}.log")
        print(f"\n=== {entry.label}: starting {' '.join(server.cmd)}", flush=True)
        with server:
            server.wait_ready(timeout=900)
            tokens = forwards = seconds = 0.0
            for i, prompt in enumerate(prompts):
                started = time.perf_counter()
                response = requests.post(server.url + "/generate", timeout=600, json={
                    "text": prompt,
                    "sampling_params": {"temperature": 0, "max_new_tokens": args.max_new_tokens}}).json()
                seconds += time.perf_counter() - started
                info = response["meta_info"]
                tpf = meta_scalar(info, "nemodiff_tokens_per_forward") or 1.0
                tokens += info["completion_tokens"]
                forwards += info["completion_tokens"] / tpf
                outputs.setdefault(prompt, {})[entry.algorithm] = response["output_ids"]
                stats = f"[{info['completion_tokens']} tokens, {tpf:.2f} tokens/forward]"
                if chat:  # the answer as an OpenAI client gets it (same tokens as /generate's)
                    answer = requests.post(server.url + "/v1/chat/completions", timeout=600, json={
                        "model": "default", "temperature": 0, "max_tokens": args.max_new_tokens,
                        "messages": [{"role": "user", "content": CHAT_QUESTIONS[i]}]}).json()
                    print(f"--- user: {CHAT_QUESTIONS[i]}\n{answer['choices'][0]['message']['content']}\n"
                          f"{stats}", flush=True)
                else:
                    print(f"--- prompt {prompt!r}\n{response['text']}\n{stats}", flush=True)
            totals[entry.label] = (tokens, forwards, seconds)
            if not chat:  # nld-tiny writes code, it cannot chat: the OpenAI completions endpoint
                completion = requests.post(server.url + "/v1/completions", timeout=600, json={
                    "model": "default", "temperature": 0, "max_tokens": 48,
                    "prompt": PROMPTS[0]}).json()
                print(f"--- OpenAI completions: {completion['choices'][0]['text']!r}", flush=True)
    print("\n| mode | tokens | forwards | tokens/forward | tok/s | tok/s vs AR |\n|---|---|---|---|---|---|")
    ar_rate = totals["ar"][0] / totals["ar"][2] if "ar" in totals else None
    for algorithm, (tokens, forwards, seconds) in totals.items():
        rate = tokens / seconds
        versus = f"{rate / ar_rate:.2f}x" if ar_rate else "n/a"
        print(f"| {algorithm} | {tokens:.0f} | {forwards:.0f} | {tokens / forwards:.2f} | {rate:.1f} | {versus} |")
    print("(one request at a time, greedy; wall clock of this machine, noisy on a shared CPU)")
    status = 0
    for mode, name in (("linearspec", "LinearSpec"), ("quadratic", "Quadratic")):
        if "ar" in totals and any(mode in v for v in outputs.values()):
            same = all(v["ar"] == v.get(mode) for v in outputs.values())
            print(f"{name} output identical to AR: {same}")
            status |= 0 if same else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
