"""The `triton` runtime against models with exactly the tensors of TensorRT-LLM's `tensorrt_llm` model (no
`text_input` / `text_output`, as NVIDIA's disaggregated `context` / `generation` models): a Triton-fronted
simulator started with `--sim-triton-text-io off` behind a real `baton scheduler` that has the model's tokenizer.
The scheduler encodes text prompts and chats itself and decodes the answers' token ids into their text; the
tokens and usage equal what a trtllm-serve-like worker (the HTTP front end, same tokenizer) answers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tokenizer_fixture import model_dir_with_tokenizer
from triton_harness import (
    MODEL,
    MODEL_DIR,
    SCHEDULER_LISTENING,
    get_json,
    http,
    parse_sse,
    post_json,
    start_http_engine,
    start_scheduler,
    start_triton_engine,
    stop_all,
)

pytestmark = pytest.mark.timeout(1500)
START_TIMEOUT_S = 120.0
VOCAB = 600  # the fixture tokenizer's: the engines generate ids it can decode


@pytest.fixture(scope="module")
def layout(pytriton_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("tensorrt-llm-layout")
    config = json.loads((MODEL_DIR / "config.json").read_text())
    weights = tmp / "weights"  # the Triton worker's model directory: no tokenizer (the PyTriton venv has none)
    weights.mkdir()
    (weights / "config.json").write_text(json.dumps({**config, "vocab_size": VOCAB}))
    tokenizer_dir = model_dir_with_tokenizer(tmp / "with-tokenizer", weights / "config.json")
    procs = {}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        procs["triton"] = start_triton_engine(pytriton_python, tmp, "triton", "decode", model_dir=weights,
                                              extra=("--sim-triton-text-io", "off"))
        procs["reference"] = start_http_engine(tmp, "reference", "decode", model_dir=tokenizer_dir)
        procs["triton"].wait_listening(deadline)
        procs["reference"].wait_listening(deadline)
        procs["triton"].wait_http_ok(procs["triton"].url + "/v2/health/ready", deadline)
        procs["reference"].wait_http_ok(procs["reference"].url + "/health", deadline)
        procs["scheduler"] = start_scheduler(tmp, "scheduler", [procs["triton"]], [procs["triton"]],
                                             extra={"tokenizer": {"path": str(tokenizer_dir)}})
        procs["scheduler"].wait_listening(deadline, pattern=SCHEDULER_LISTENING)
        procs["scheduler"].wait_http_ok(procs["scheduler"].url + "/readyz", deadline)
        yield {**procs, "tokenizer_dir": tokenizer_dir}
    finally:
        stop_all(list(procs.values()))


def _decoded(tokenizer_dir: Path, ids: list[int]) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).decode(ids, skip_special_tokens=True)


def test_the_models_have_no_text_tensors(layout):
    for model in ("context", "generation"):
        metadata = get_json(f"{layout['triton'].url}/v2/models/{model}")
        names = {t["name"] for t in metadata["inputs"] + metadata["outputs"]}
        assert {"input_ids", "output_ids", "return_num_input_tokens", "exclude_input_in_output"} <= names
        assert not names & {"text_input", "text_output", "stop_words", "bad_words"}


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "alpha bravo charlie delta", "max_tokens": 12}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "echo foxtrot golf"}], "max_tokens": 12}),
], ids=["completions-text", "chat"])
def test_text_goes_as_the_tokenizers_ids_and_comes_back_decoded(layout, path, body):
    body = {"model": MODEL, **body}
    status, _, reference = post_json(layout["reference"].url + path, body)
    assert status == 200, reference
    rid = f"layout-{path.rsplit('/', 1)[-1]}"
    status, _, routed = post_json(layout["scheduler"].url + path, body, headers={"X-Request-Id": rid})
    assert status == 200, routed
    choice = routed["choices"][0]
    ids = choice["token_ids"]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    # the same prompt tokens (the tokenizer's, BOS and chat template included) and so the same completion
    assert ids == reference["choices"][0]["token_ids"] and routed["usage"] == reference["usage"]
    assert text == _decoded(layout["tokenizer_dir"], ids) and text.strip()
    received = get_json(f"{layout['triton'].sim_url}/_sim/triton/requests?request_id={rid}")
    assert received and "input_ids" in received[-1]["inputs"] and "text_input" not in received[-1]["inputs"]

    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    status, _, raw = http("POST", layout["scheduler"].url + path, streamed)
    events = [e for e in parse_sse(raw) if isinstance(e, dict)]
    pieces = [c["text"] if "text" in c else c["delta"].get("content", "") for e in events for c in e["choices"]]
    assert status == 200 and "".join(pieces) == text
    assert [e["usage"] for e in events if e.get("usage")] == [reference["usage"]]
