"""The model's own tokenizer (`baton.model_tokenizer`): loading a checkpoint's tokenizer files, counting as
trtllm-serve does (completions with the special tokens, chat through the chat template), fetching from a
Hugging Face Hub endpoint (a loopback stand-in), and the process-wide switch in `baton.tokens`."""

from __future__ import annotations

import asyncio
import datetime
import http.server
import json
import threading
from pathlib import Path

import pytest
from tokenizer_fixture import BOS, CHAT_TEMPLATE, WORDS, write_tokenizer

from baton import tokens
from baton.model_tokenizer import OFFLOAD_CHARS, TokenizerError, fetch_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def raw(tok_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


def test_a_completions_prompt_is_encoded_with_the_tokenizers_special_tokens(tok_dir, raw):
    t = load_tokenizer(tok_dir)
    text = "alpha bravo charlie delta"
    ids = t.encode_text(text)
    assert ids[0] == raw.token_to_id(BOS)  # the post-processor's BOS, as trtllm-serve's encode adds it
    assert ids == raw.encode(text).ids and t.count_text(text) == len(ids) == 5  # four words, one token each
    assert load_tokenizer(tok_dir / "tokenizer.json").encode_text(text) == ids  # the file itself works too


def test_a_chat_prompt_is_the_rendered_template_without_added_special_tokens(tok_dir, raw):
    t = load_tokenizer(tok_dir)
    messages = [{"role": "system", "content": "kilo lima"}, {"role": "user", "content": "alpha bravo"}]
    text, special = t.chat_text(messages)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nkilo lima<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nalpha bravo<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert special is False
    ids = t.encode_chat(messages)
    assert ids == raw.encode(text, add_special_tokens=False).ids and ids.count(raw.token_to_id(BOS)) == 1
    assert t.count_chat(messages) == len(ids)
    with pytest.raises(ValueError, match="unknown role tool"):
        t.count_chat([{"role": "tool", "content": "x"}])


def test_without_a_chat_template_chat_prompts_are_flattened_as_documented(tmp_path, raw):
    t = load_tokenizer(write_tokenizer(tmp_path, chat_template=False))
    messages = [{"role": "user", "content": "alpha bravo"}]
    assert t.chat_text(messages) == ("<|user|>alpha bravo", True)
    assert t.count_chat(messages) == len(raw.encode("<|user|>alpha bravo").ids)


def test_chat_template_jinja_is_the_template_and_wins_over_the_configs(tmp_path, raw):
    """transformers >= 4.47 saves the template as chat_template.jinja and reads it before tokenizer_config.json."""
    write_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    t = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "alpha bravo"}]
    assert t.chat_text(messages) == ("[user] alpha bravo\n", False)
    assert t.count_chat(messages) == len(raw.encode("[user] alpha bravo\n", add_special_tokens=False).ids)
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(TokenizerError, match="chat_template.jinja is not a valid jinja2 template"):
        load_tokenizer(tmp_path)


def test_templates_render_as_transformers_renders_them(tmp_path):
    """transformers' environment: {% break %}/{% continue %}, {% generation %}, its tojson (non-ASCII and HTML
    characters as they are, keys in their order, indent and separators), strftime_now and raise_exception."""
    template = ("{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
                "{% generation %}{{ m.content }}{% endgeneration %}{% if loop.index > 2 %}{% break %}{% endif %}"
                "{% endfor %}|{{ messages[0] | tojson }}|{{ {'k': 1} | tojson(indent=2) }}"
                "|{{ [1, 2] | tojson(separators=(',', ':')) }}|{{ strftime_now('%Y') }}")
    t = load_tokenizer(write_tokenizer(tmp_path, chat_template=template))
    messages = [{"role": "system", "content": "kilo"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    first = {"role": "system", "content": "été <b> & 'q'"}
    text, _ = t.chat_text([first, *messages[1:]])
    assert text == ('ab|{"role": "system", "content": "été <b> & \'q\'"}|{\n  "k": 1\n}|[1,2]|'
                    f"{datetime.date.today().year}")


def test_the_requests_template_fields_reach_the_template(tmp_path, raw):
    """What trtllm-serve passes apply_chat_template besides the messages: tools, documents,
    add_generation_prompt (default true) and chat_template_kwargs (continue_final_message among them)."""
    template = ("{{ bos_token }}{% if tools %}tools={{ tools | tojson }}\n{% endif %}"
                "{% for d in documents or [] %}doc={{ d.title }}\n{% endfor %}"
                "{% if enable_thinking %}think\n{% endif %}" + CHAT_TEMPLATE.replace("{{ bos_token }}", ""))
    t = load_tokenizer(write_tokenizer(tmp_path, chat_template=template))
    messages = [{"role": "user", "content": "alpha"}]
    header = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nalpha<|eot_id|>"
    request = {"tools": [{"type": "function", "function": {"name": "golf"}}], "documents": [{"title": "kilo"}],
               "chat_template_kwargs": {"enable_thinking": True}}
    text, _ = t.chat_text(messages, request)
    assert text == ('<|begin_of_text|>tools=[{"type": "function", "function": {"name": "golf"}}]\ndoc=kilo\nthink\n'
                    + header[len(BOS):] + "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert t.count_chat(messages, request) == len(t.encode_chat(messages, request)) == len(
        raw.encode(text, add_special_tokens=False).ids)
    assert t.chat_text(messages, {"add_generation_prompt": False})[0] == header
    # continue_final_message: the last message left open, without its end of turn (as transformers cuts it)
    prefill = [*messages, {"role": "assistant", "content": "bravo "}]
    continued = {"add_generation_prompt": False, "chat_template_kwargs": {"continue_final_message": True}}
    assert t.chat_text(prefill, continued)[0] == header + "<|start_header_id|>assistant<|end_header_id|>\n\nbravo "
    # refused as trtllm-serve refuses them (its request model, or apply_chat_template failing): a 400
    for bad, message in [({"chat_template_kwargs": {"continue_final_message": True}}, "not compatible"),
                         ({"chat_template_kwargs": {"tools": []}}, "must not set tools"),
                         ({"tools": "golf"}, "`tools` must be a list"),
                         ({"add_generation_prompt": "no"}, "`add_generation_prompt` must be a boolean")]:
        with pytest.raises(ValueError, match=message):
            t.count_chat(messages, bad)


def test_a_request_with_tools_takes_the_tool_use_template(tmp_path):
    write_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = load_tokenizer(tmp_path)
    messages = [{"role": "user", "content": "alpha"}]
    assert t.chat_text(messages) == ("plain", False) and t.chat_text(messages, {"tools": []}) == ("tools", False)


def test_truncation_and_padding_saved_in_tokenizer_json_do_not_cut_or_pad_a_prompt(tmp_path, raw):
    """transformers turns both off for an ordinary encode, as trtllm-serve's; tokenizers would apply them."""
    write_tokenizer(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text())
    saved["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    saved["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                        "pad_type_id": 0, "pad_token": BOS}
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved))
    t = load_tokenizer(tmp_path)
    text = " ".join(WORDS)
    assert t.count_text(text) == len(t.encode_text(text)) == len(WORDS) + 1
    assert t.count_text("alpha") == 2
    assert t.count_chat([{"role": "user", "content": text}]) == len(
        raw.encode(t.chat_text([{"role": "user", "content": text}])[0], add_special_tokens=False).ids)
    assert asyncio.run(t.encode_async(text * 100)) == raw.encode(text * 100).ids


def test_long_prompts_are_encoded_off_the_event_loop_with_the_same_result(tok_dir):
    t = load_tokenizer(tok_dir)
    text = " ".join(WORDS * 200)
    assert len(text) > OFFLOAD_CHARS
    assert asyncio.run(t.encode_async(text)) == t.encode_text(text)


def test_unusable_tokenizer_files_are_named(tmp_path):
    with pytest.raises(TokenizerError, match=f"cannot read {tmp_path}/tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a usable tokenizer.json"):
        load_tokenizer(tmp_path)
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{% for %}"}')
    with pytest.raises(TokenizerError, match="chat_template is not a valid jinja2 template"):
        load_tokenizer(tmp_path)


class _Hub:
    """A loopback stand-in for the Hugging Face Hub's resolve endpoint: /{repo}/resolve/{rev}/{file}."""

    def __init__(self, files: dict[str, bytes], token: str) -> None:
        self.files, self.token, self.paths = files, token, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hub.paths.append(self.path)
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self.send_response(401)
                    self.end_headers()
                    return
                body = hub.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_gated_model_tokenizer_is_fetched_from_the_hub_endpoint_with_the_token(tok_dir):
    files = {"/org/gated/resolve/v2/tokenizer.json": (tok_dir / "tokenizer.json").read_bytes(),
             "/org/gated/resolve/v2/tokenizer_config.json": (tok_dir / "tokenizer_config.json").read_bytes()}
    hub = _Hub(files, token="t0k")
    try:
        t = fetch_tokenizer("org/gated", "v2", {"HF_ENDPOINT": hub.url, "HF_TOKEN": "t0k"})
        assert t.encode_text("alpha bravo") == load_tokenizer(tok_dir).encode_text("alpha bravo")
        assert t.chat_template is not None and t.source == f"{hub.url}/org/gated@v2"
        with pytest.raises(TokenizerError, match="HTTP 401 .a gated or private model: set HF_TOKEN"):
            fetch_tokenizer("org/gated", "v2", {"HF_ENDPOINT": hub.url})
        with pytest.raises(TokenizerError, match="HTTP 404"):
            fetch_tokenizer("org/gated", "main", {"HF_ENDPOINT": hub.url, "HF_TOKEN": "t0k"})
    finally:
        hub.close()


def test_a_hub_models_chat_template_jinja_is_fetched_and_used(tok_dir):
    files = {"/org/new/resolve/main/tokenizer.json": (tok_dir / "tokenizer.json").read_bytes(),
             "/org/new/resolve/main/tokenizer_config.json": (tok_dir / "tokenizer_config.json").read_bytes(),
             "/org/new/resolve/main/chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}"}
    hub = _Hub(files, token="")
    try:
        t = fetch_tokenizer("org/new", "", {"HF_ENDPOINT": hub.url})
        assert t.chat_text([{"role": "user", "content": "alpha"}]) == ("alpha", False)
    finally:
        hub.close()


def test_a_hub_model_without_tokenizer_config_still_loads(tok_dir):
    hub = _Hub({"/org/open/resolve/main/tokenizer.json": (tok_dir / "tokenizer.json").read_bytes()}, token="")
    try:
        t = fetch_tokenizer("org/open", "", {"HF_ENDPOINT": hub.url})
        assert t.chat_template is None and t.count_text("alpha") == 2
        assert hub.paths == ["/org/open/resolve/main/tokenizer.json", "/org/open/resolve/main/tokenizer_config.json",
                             "/org/open/resolve/main/chat_template.jinja"]
    finally:
        hub.close()


def test_the_process_counts_with_the_tokenizer_it_is_given_and_the_estimate_otherwise(tok_dir):
    text = " ".join(WORDS)
    assert tokens.count_text_tokens(text) == -(-len(text) // tokens.BYTES_PER_TOKEN)
    t = load_tokenizer(tok_dir)
    tokens.set_tokenizer(t)
    try:
        assert tokens.count_text_tokens(text) == len(WORDS) + 1
        assert tokens.tokenize(text) == t.encode_text(text)
        messages = [{"role": "user", "content": text}]
        assert tokens.count_chat_tokens(messages) == len(tokens.tokenize_chat(messages)) == t.count_chat(messages)
        assert tokens.chat_text(messages) == t.chat_text(messages)[0]
        assert asyncio.run(tokens.tokenize_async("", messages)) == t.encode_chat(messages)
    finally:
        tokens.set_tokenizer(None)
    assert tokens.chat_text([{"role": "user", "content": "hi"}]) == "<|user|>hi"
