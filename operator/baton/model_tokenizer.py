"""A model's own tokenizer, for exact prompt lengths: `ModelTokenizer`, loaded from a checkpoint directory
or fetched from the Hugging Face Hub.

What trtllm-serve reads from a checkpoint, read the same way:
- `tokenizer.json` (a Hugging Face fast tokenizer) through the optional `tokenizers` package
  (`pip install 'baton[tokenizer]'`; the Baton image has it), without the truncation and padding it may
  have saved (`transformers` turns both off for an ordinary encode);
- `tokenizer_config.json`, when present: its `chat_template` and its special tokens (`bos_token`,
  `eos_token`, ... as the template's variables);
- `chat_template.jinja`, when present: the chat template (`transformers` >= 4.47 saves it there, and it
  wins over the config's).

The chat template is rendered as `transformers`' `apply_chat_template` renders it (jinja2 in a sandbox with
its settings: `trim_blocks`, `lstrip_blocks`, `{% break %}`/`{% continue %}`, `{% generation %}`, its
`tojson`, `raise_exception` and `strftime_now`), with what trtllm-serve passes it from the request (`tools`,
`documents`, `add_generation_prompt`, default true, and `chat_template_kwargs`, where `continue_final_message`
leaves the last message open as `transformers` does).

A completions prompt is encoded with the tokenizer's special tokens (its post-processor, e.g. a BOS
token), as `tokenizer.encode(prompt)` does; a chat prompt is the rendered template encoded without them
(the template writes its own). A checkpoint without a chat template gets the documented flattening
(`baton.tokens.chat_prompt_text`), encoded like a completions prompt.

Long prompts are encoded off the event loop (`encode_async`): `tokenizers` releases the GIL in
`encode_batch`, not in `encode`, and a 200 KB prompt takes tens of milliseconds.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from baton.tokens import chat_prompt_text

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
OFFLOAD_CHARS = 16 * 1024  # longer texts are encoded in a worker thread
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# What trtllm-serve and `apply_chat_template` pass the template themselves: `chat_template_kwargs` naming one of
# them makes `apply_chat_template` fail ("got multiple values for keyword argument"), and trtllm-serve answer 400.
_RESERVED_KWARGS = frozenset(("messages", "conversation", "conversations", "tools", "documents", "chat_template",
                              "add_generation_prompt", "tokenize", "return_dict"))
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # `transformers`' marker of where the continued message ends


class TokenizerError(Exception):
    """The tokenizer cannot be loaded; the message says what is missing and where."""


def _tokenizers_module() -> Any:
    try:
        import tokenizers
    except ImportError as exc:
        raise TokenizerError("counting with the model's tokenizer needs the 'tokenizers' package "
                             "(pip install 'baton[tokenizer]')") from exc
    return tokenizers


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string, or an AddedToken object."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """`transformers`' `tojson`: json.dumps, non-ASCII and HTML characters as they are (jinja2's own filter
    escapes both and sorts the keys)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _compile_template(source: str, where: str) -> Any:
    """`source` compiled as `transformers`' `_compile_jinja_template` compiles a chat template."""
    from jinja2 import TemplateError, nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (where `transformers` tracks the assistant's tokens): its
        body, as `apply_chat_template` renders it."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise TokenizerError(f"{where} is not a valid jinja2 template: {exc}") from exc


def _template_args(request: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """What trtllm-serve passes the chat template from a chat request besides the messages, checked as its
    request model checks them (ValueError naming the field): the template's variables, and whether the
    last message is continued (`continue_final_message`, which `apply_chat_template` takes from
    `chat_template_kwargs`)."""
    tools = request.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError("`tools` must be a list of tool objects")
    documents = request.get("documents")
    if documents is not None and not (isinstance(documents, list) and all(isinstance(d, dict) for d in documents)):
        raise ValueError("`documents` must be a list of objects")
    generation_prompt = request.get("add_generation_prompt", True)
    if not isinstance(generation_prompt, bool):
        raise ValueError("`add_generation_prompt` must be a boolean")
    kwargs = request.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError("`chat_template_kwargs` must be an object")
    reserved = sorted(_RESERVED_KWARGS.intersection(kwargs))
    if reserved:
        raise ValueError(f"`chat_template_kwargs` must not set {', '.join(reserved)} (passed to the template "
                         "from the request itself)")
    kwargs = dict(kwargs)
    continued = bool(kwargs.pop("continue_final_message", False))
    if continued and generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible: set "
                         "`add_generation_prompt` to false to continue the final message")
    return {**kwargs, "tools": tools, "documents": documents, "add_generation_prompt": generation_prompt}, continued


def _mark_final_message(messages: list[Any]) -> tuple[list[Any], str]:
    """A copy of `messages` whose last text ends in `_CONTINUE_TAG`, and that text (`transformers`' way of
    finding where the continued message ends in the rendered chat)."""
    messages = copy.deepcopy(messages)
    last = messages[-1]
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = content + _CONTINUE_TAG
        return messages, content
    for part in reversed(content if isinstance(content, list) else []):
        if isinstance(part, dict) and isinstance(part.get("text"), str):
            text = part["text"]
            part["text"] = text + _CONTINUE_TAG
            return messages, text
    raise ValueError("continue_final_message is set but the final message has no text to continue")


def _cut_at_final_message(rendered: str, final: str) -> str:
    """The rendered chat up to the end of the continued message (what the template wrote after it, e.g. an
    end-of-turn token, is dropped)."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ValueError("continue_final_message is set but the final message does not appear in the chat after "
                         "applying the chat template")
    at = rendered.rindex(tag)
    if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the message's trailing spacing


class ModelTokenizer:
    def __init__(self, tokenizer_json: str, config: Mapping[str, Any] | None = None, source: str = "",
                 template_file: str | None = None) -> None:
        """`template_file`: the text of chat_template.jinja, which replaces the config's chat_template."""
        tokenizers = _tokenizers_module()
        self.source = source
        try:
            self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # the Rust side raises its own exception type
            raise TokenizerError(f"{source or TOKENIZER_FILE}: not a usable tokenizer.json: {exc}") from exc
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        config = dict(config or {})
        template = config.get("chat_template") if template_file is None else template_file
        where = f"{CONFIG_FILE}: chat_template" if template_file is None else TEMPLATE_FILE
        # several named templates: the default one, and the one `apply_chat_template` takes for a request with tools
        named = ({t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                 if isinstance(template, list) else {"default": template})
        compiled = {name: _compile_template(text, where if name == "default" else f"{where} {name}")
                    for name, text in named.items()
                    if name in ("default", "tool_use") and isinstance(text, str) and text}
        self.chat_template = compiled.get("default")
        self.tool_use_template = compiled.get("tool_use")
        self.special_tokens = {name: text for name in _SPECIAL_TOKENS
                               if (text := _token_text(config.get(name))) is not None}

    def _special_id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self.tokenizer.token_to_id(text)

    @property
    def eos_token_id(self) -> int | None:
        """The id of the tokenizer's end-of-sequence token (tokenizer_config.json eos_token), if it has one."""
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    # ------------------------------------------------------------------ encoding
    def encode_text(self, text: str) -> list[int]:
        """A completions prompt's ids (with the tokenizer's special tokens)."""
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def chat_text(self, messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None,
                  ) -> tuple[str, bool]:
        """(the text a chat prompt is encoded from, whether to add the tokenizer's special tokens). `request`
        is the chat request's body (see `_template_args`). ValueError when the template or the request's
        template fields refuse the messages (trtllm-serve answers any failure to render with 400)."""
        if self.chat_template is None:
            return chat_prompt_text(messages), True
        variables, continued = _template_args(request or {})
        template = self.chat_template
        if variables["tools"] is not None and self.tool_use_template is not None:
            template = self.tool_use_template
        messages = list(messages)
        if continued:
            messages, final = _mark_final_message(messages)
        try:
            text = template.render({**self.special_tokens, **variables, "messages": messages})
        except Exception as exc:  # a template is code over the client's data: any failure is the request's
            raise ValueError(f"the model's chat template refused the messages: {exc}") from None
        if continued:
            text = _cut_at_final_message(text, final)
        return text, False

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None,
                    ) -> list[int]:
        text, special = self.chat_text(messages, request)
        return list(self.tokenizer.encode(text, add_special_tokens=special).ids)

    def count_text(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=True))

    def count_chat(self, messages: Sequence[Mapping[str, Any]], request: Mapping[str, Any] | None = None) -> int:
        text, special = self.chat_text(messages, request)
        return len(self.tokenizer.encode(text, add_special_tokens=special))

    async def encode_async(self, text: str, special: bool = True) -> list[int]:
        """`encode`, in a worker thread for long texts (the event loop keeps running meanwhile)."""
        if len(text) <= OFFLOAD_CHARS:
            return list(self.tokenizer.encode(text, add_special_tokens=special).ids)
        batch = await asyncio.to_thread(self.tokenizer.encode_batch, [text], add_special_tokens=special)
        return list(batch[0].ids)


# ---------------------------------------------------------------------------------------------- loading
def _read_config(text: str, where: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise TokenizerError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise TokenizerError(f"{where}: expected a JSON object")
    return config


def load_tokenizer(path: str | Path) -> ModelTokenizer:
    """From a checkpoint directory holding tokenizer.json (and maybe tokenizer_config.json and
    chat_template.jinja), or from a tokenizer.json file (its directory's other files are read too)."""
    path = Path(path)
    directory, file = (path, path / TOKENIZER_FILE) if path.is_dir() else (path.parent, path)
    try:
        tokenizer_json = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenizerError(f"cannot read {file}: {exc.strerror or exc}") from exc
    config: dict[str, Any] = {}
    config_path, template_path = directory / CONFIG_FILE, directory / TEMPLATE_FILE
    template_file = None
    try:
        if config_path.is_file():
            config = _read_config(config_path.read_text(encoding="utf-8"), str(config_path))
        if template_path.is_file():
            template_file = template_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenizerError(f"cannot read {exc.filename}: {exc.strerror or exc}") from exc
    return ModelTokenizer(tokenizer_json, config, source=str(file), template_file=template_file)


def fetch_tokenizer(repo_id: str, revision: str = "", environ: Mapping[str, str] | None = None,
                    timeout_s: float = 60.0) -> ModelTokenizer:
    """From the Hugging Face Hub (or the mirror `HF_ENDPOINT` names), with `HF_TOKEN` for gated models;
    held in memory, nothing is written to disk."""
    environ = environ or {}
    endpoint = (environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")
    token = environ.get("HF_TOKEN") or environ.get("HUGGING_FACE_HUB_TOKEN") or ""
    ref = urllib.parse.quote(revision or "main", safe="")

    def get(name: str, required: bool) -> str | None:
        url = f"{endpoint}/{repo_id}/resolve/{ref}/{name}"
        headers = {"User-Agent": "baton-scheduler"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as resp:
                return resp.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and not required:
                return None
            hint = {401: " (a gated or private model: set HF_TOKEN)", 403: " (HF_TOKEN has no access to it)",
                    404: " (no such model, revision or file)"}.get(exc.code, "")
            raise TokenizerError(f"GET {url}: HTTP {exc.code}{hint}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TokenizerError(f"GET {url}: {reason}") from None

    tokenizer_json = get(TOKENIZER_FILE, required=True)
    assert tokenizer_json is not None
    config_text = get(CONFIG_FILE, required=False)
    config = _read_config(config_text, f"{repo_id}/{CONFIG_FILE}") if config_text is not None else {}
    return ModelTokenizer(tokenizer_json, config, source=f"{endpoint}/{repo_id}@{revision or 'main'}",
                          template_file=get(TEMPLATE_FILE, required=False))
