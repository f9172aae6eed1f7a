"""The official `openai` Python SDK against a running allam-serve (a client nobody here wrote).

Usage: python openai_sdk_check.py BASE_URL   (e.g. http://127.0.0.1:8000/v1)
Exits non-zero with a message on the first failed check; prints one line per check.
"""
import sys

import openai

base_url = sys.argv[1]
client = openai.OpenAI(base_url=base_url, api_key="unused")
model = client.models.list().data[0].id
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1
    print(f"ok: {what}")


for content in ["How do I prepare a cup of tea?", "كيف أجهز كوب شاهي؟"]:
    messages = [{"role": "user", "content": content}]
    full = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16)
    text = full.choices[0].message.content
    check(isinstance(text, str), f"chat returns text for {content!r}")
    check(full.usage.completion_tokens == 16 or full.choices[0].finish_reason == "stop",
          "completion_tokens equals max_tokens unless stopped")
    # usage.prompt_tokens equals the server's own count of the rendered prompt.
    import json
    import urllib.request
    req = urllib.request.Request(base_url.rsplit("/v1", 1)[0] + "/tokenize",
                                 data=json.dumps({"messages": messages}).encode(),
                                 headers={"content-type": "application/json"})
    count = json.load(urllib.request.urlopen(req))["count"]
    check(full.usage.prompt_tokens == count, f"prompt_tokens {full.usage.prompt_tokens} == /tokenize count {count}")

    stream = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    check("".join(pieces) == text, "streamed chat text equals the unary text (greedy)")
    check(usage is not None and usage.completion_tokens == full.usage.completion_tokens, "stream usage")

completion = client.completions.create(model=model, prompt="مرحبا tea", max_tokens=8, temperature=0)
check(isinstance(completion.choices[0].text, str) and completion.usage.completion_tokens >= 1, "completions")
streamed = "".join(c.choices[0].text for c in client.completions.create(
    model=model, prompt="مرحبا tea", max_tokens=8, temperature=0, stream=True) if c.choices)
check(streamed == completion.choices[0].text, "streamed completion equals unary completion")

try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], top_p=1.5)
    check(False, "top_p=1.5 must be rejected")
except openai.BadRequestError as err:
    check("top_p" in str(err), f"BadRequestError names top_p: {err}")

print(f"{checks} passed, 0 failed")
