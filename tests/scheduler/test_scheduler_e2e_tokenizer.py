"""Text prompts counted with the model's own tokenizer, end to end: engine simulators whose MODEL_DIR holds
tokenizer.json (as trtllm-serve reads it) and a scheduler started with `--tokenizer` agree on every prompt's
length, and routing follows the real count where the estimate would have routed otherwise."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from scheduler_harness import (
    MODEL,
    MODEL_DIR,
    Proc,
    metric,
    metrics,
    post,
    scheduler_config,
    start_engine,
    start_scheduler,
    wait_all,
)
from tokenizer_fixture import WORDS, model_dir_with_tokenizer

from baton.model_tokenizer import load_tokenizer
from baton.tokens import BYTES_PER_TOKEN

THRESHOLD = 150  # prompts shorter than this are prefilled locally, the others on the prefill tier


@pytest.fixture(scope="module")
def tiers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("tokenizer-e2e")
    model_dir = model_dir_with_tokenizer(tmp / "model", MODEL_DIR / "config.json")
    procs: list[Proc] = []
    try:
        prefill = start_engine(tmp, "prefill", "prefill", 0.2, model_dir=model_dir)
        decode = start_engine(tmp, "decode", "decode", 0.2, model_dir=model_dir)
        procs += [prefill, decode]
        wait_all([prefill, decode], "/health")
        routing = {"routing": {"localPrefillBelowTokens": THRESHOLD, "alwaysPrefillAtOrAboveTokens": THRESHOLD}}
        exact = start_scheduler(tmp, "exact", scheduler_config([prefill], [decode], **routing),
                                ["--tokenizer", str(model_dir)])
        estimate = start_scheduler(tmp, "estimate", scheduler_config([prefill], [decode], **routing))
        procs += [exact, estimate]
        wait_all([exact, estimate], "/readyz")
        yield {"exact": exact, "estimate": estimate, "tokenizer": load_tokenizer(model_dir)}
    finally:
        for proc in procs:
            proc.stop()


def _complete(sched: Proc, **body) -> tuple[dict, dict]:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    status, headers, answer = post(sched.url + path, {"model": MODEL, "max_tokens": 4, **body})
    assert status == 200, answer
    return headers, answer


def test_a_text_prompt_is_routed_by_its_real_length_and_both_sides_count_it_alike(tiers):
    text = " ".join(WORDS * 5)  # 130 words: 131 tokens with the BOS; the estimate says ~205
    real = tiers["tokenizer"].count_text(text)
    assert real < THRESHOLD <= -(-len(text.encode()) // BYTES_PER_TOKEN)
    headers, answer = _complete(tiers["exact"], prompt=text)
    assert headers["X-Baton-Route"] == "local"
    assert answer["usage"]["prompt_tokens"] == real  # what the engine counted, with the same tokenizer
    assert metric(metrics(tiers["exact"].url), "baton_scheduler_prompt_tokens_total", route="local") == real
    # the same prompt through a scheduler without the tokenizer goes to the prefill tier
    headers, answer = _complete(tiers["estimate"], prompt=text)
    assert headers["X-Baton-Route"] == "disaggregated" and answer["usage"]["prompt_tokens"] == real


def test_a_chat_prompt_is_counted_through_the_models_chat_template(tiers):
    messages = [{"role": "system", "content": "oscar papa"}, {"role": "user", "content": " ".join(WORDS * 4)}]
    real = tiers["tokenizer"].count_chat(messages)
    assert real < THRESHOLD
    headers, answer = _complete(tiers["exact"], messages=messages)
    assert headers["X-Baton-Route"] == "local" and answer["usage"]["prompt_tokens"] == real
    status, _, body = post(tiers["exact"].url + "/v1/chat/completions",
                           {"model": MODEL, "max_tokens": 4, "messages": [{"role": "tool", "content": "x"}]})
    assert status == 400 and "unknown role tool" in body["error"]["message"]


def test_a_long_text_prompt_is_counted_exactly_too(tiers):
    text = " ".join(WORDS * 120)  # ~19 KB: counted off the scheduler's event loop
    real = tiers["tokenizer"].count_text(text)
    before = metric(metrics(tiers["exact"].url), "baton_scheduler_prompt_tokens_total", route="disaggregated")
    headers, answer = _complete(tiers["exact"], prompt=text, stream=False)
    assert headers["X-Baton-Route"] == "disaggregated" and answer["usage"]["prompt_tokens"] == real
    after = metric(metrics(tiers["exact"].url), "baton_scheduler_prompt_tokens_total", route="disaggregated")
    assert after - before == real


def test_a_tokenizer_that_cannot_be_read_stops_the_scheduler_at_start(tmp_path):
    proc = start_scheduler(tmp_path, "bad-tokenizer", scheduler_config([], []), ["--tokenizer", str(tmp_path / "none")])
    try:
        assert proc.proc.wait(timeout=30) == 2
        assert f"cannot read {tmp_path / 'none'}" in proc.log()
    finally:
        proc.stop()
