"""A model's own tokenizer, for exact prompt lengths: `ModelTokenizer`, loaded from a checkpoint directory
or fetched from the Hugging Face Hub.

What trtllm-serve reads from a checkpoint, read the same way:
- `tokenizer.json` (a Hugging Face fast tokenizer) through the optional `tokenizers` package
  (`pip install 'baton[tokenizer]'`; the Baton image has it);
- `tokenizer_config.json`, when present: its `chat_template` (rendered with jinja2 in a sandbox, as
  `transformers`' `apply_chat_template` does, with `add_generation_prompt=True`) and its special tokens
  (`bos_token`, `eos_token`, ... as the template's variables).

A completions prompt is encoded with the tokenizer's special tokens (its post-processor, e.g. a BOS
token), as `tokenizer.encode(prompt)` does; a chat prompt is the rendered template encoded without them
(the template writes its own). A checkpoint without a chat template gets the documented flattening
(`baton.tokens.chat_prompt_text`), encoded like a completions prompt.

Long prompts are encoded off the event loop (`encode_async`): `tokenizers` releases the GIL in
`encode_batch`, not in `encode`, and a 200 KB prompt takes tens of milliseconds.
"""

from __future__ import annotations

import asyncio
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
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
OFFLOAD_CHARS = 16 * 1024  # longer texts are encoded in a worker thread
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


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


def _compile_template(source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise TokenizerError(f"{CONFIG_FILE}: chat_template is not a valid jinja2 template: {exc}") from exc


class ModelTokenizer:
    def __init__(self, tokenizer_json: str, config: Mapping[str, Any] | None = None, source: str = "") -> None:
        tokenizers = _tokenizers_module()
        self.source = source
        try:
            self.tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # the Rust side raises its own exception type
            raise TokenizerError(f"{source or TOKENIZER_FILE}: not a usable tokenizer.json: {exc}") from exc
        config = dict(config or {})
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        self.chat_template = _compile_template(template) if isinstance(template, str) and template else None
        self.special_tokens = {name: text for name in _SPECIAL_TOKENS
                               if (text := _token_text(config.get(name))) is not None}

    # ------------------------------------------------------------------ encoding
    def encode_text(self, text: str) -> list[int]:
        """A completions prompt's ids (with the tokenizer's special tokens)."""
        return list(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def chat_text(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, bool]:
        """(the text a chat prompt is encoded from, whether to add the tokenizer's special tokens)."""
        if self.chat_template is None:
            return chat_prompt_text(messages), True
        from jinja2 import TemplateError

        try:
            text = self.chat_template.render(messages=list(messages), add_generation_prompt=True, tools=None,
                                             **self.special_tokens)
        except TemplateError as exc:
            raise ValueError(f"the model's chat template refused the messages: {exc}") from None
        return text, False

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        text, special = self.chat_text(messages)
        return list(self.tokenizer.encode(text, add_special_tokens=special).ids)

    def count_text(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=True))

    def count_chat(self, messages: Sequence[Mapping[str, Any]]) -> int:
        text, special = self.chat_text(messages)
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
    """From a checkpoint directory holding tokenizer.json (and maybe tokenizer_config.json), or from a
    tokenizer.json file (its directory's tokenizer_config.json is read too)."""
    path = Path(path)
    directory, file = (path, path / TOKENIZER_FILE) if path.is_dir() else (path.parent, path)
    try:
        tokenizer_json = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenizerError(f"cannot read {file}: {exc.strerror or exc}") from exc
    config: dict[str, Any] = {}
    config_path = directory / CONFIG_FILE
    if config_path.is_file():
        try:
            config = _read_config(config_path.read_text(encoding="utf-8"), str(config_path))
        except OSError as exc:
            raise TokenizerError(f"cannot read {config_path}: {exc}") from exc
    return ModelTokenizer(tokenizer_json, config, source=str(file))


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
    return ModelTokenizer(tokenizer_json, config, source=f"{endpoint}/{repo_id}@{revision or 'main'}")
