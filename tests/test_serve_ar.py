"""AR mode through the real SGLang runtime on CPU: /generate, OpenAI API, frontend, Engine."""

import pytest
import requests

from conftest import generate, generate_many
from sglang_nemodiff.reference import ar_generate

pytestmark = pytest.mark.slow


def test_generate_equals_reference_sequential_and_concurrent(ar_server, reference, prompts):
    expected = [ar_generate(reference, ids, 24, eos_id=11).tokens for ids in prompts]
    assert [generate(ar_server, ids)["output_ids"] for ids in prompts] == expected
    assert [r["output_ids"] for r in generate_many(ar_server, prompts)] == expected


def test_openai_completions_and_chat(ar_server, reference, tokenizer):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=ar_server.url + "/v1", api_key="none")
    model = client.models.list().data[0].id
    prompt = "def add(a, b):"
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0)
    expected = ar_generate(reference, tokenizer(prompt).input_ids, 16, eos_id=11).tokens
    assert completion.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert completion.usage.completion_tokens == len(expected)

    messages = [{"role": "user", "content": "Say hi"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=16,
                                          temperature=0)
    chat_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = tokenizer(chat_text, add_special_tokens=False).input_ids
    expected = ar_generate(reference, chat_ids, 16, eos_id=11).tokens
    assert chat.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)


def test_frontend_gen_and_select(ar_server):
    import sglang as sgl

    @sgl.function
    def program(s):
        s += "def add(a, b):"
        s += sgl.gen("body", max_tokens=12, temperature=0)
        s += "\nThe answer is "
        s += sgl.select("choice", choices=["yes", "no", "maybe"])

    backend = sgl.RuntimeEndpoint(ar_server.url)
    state = program.run(backend=backend)
    assert isinstance(state["body"], str) and state["choice"] in ("yes", "no", "maybe")
    direct = requests.post(ar_server.url + "/generate", json={
        "text": "def add(a, b):", "sampling_params": {"temperature": 0, "max_new_tokens": 12}}).json()
    assert state["body"] == direct["text"]
