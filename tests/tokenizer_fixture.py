"""A small real tokenizer written as a checkpoint would hold it: tokenizer.json (a byte-level BPE trained
here with the `tokenizers` library, with a BOS post-processor as Llama 3's has) and tokenizer_config.json
(special tokens and a Llama-3-style chat template)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
BOS, EOS, START, END, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def write_tokenizer(directory: Path, *, chat_template: bool | str = True) -> Path:
    """tokenizer.json and tokenizer_config.json in `directory` (created); returns `directory`. The config's
    chat template is CHAT_TEMPLATE, or `chat_template` when that is a template, or none when it is False."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[BOS, EOS, START, END, EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": {"content": EOS, "special": True}, "model_max_length": 131072}
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE if chat_template is True else chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def model_dir_with_tokenizer(directory: Path, config_json: Path) -> Path:
    """A model directory as trtllm-serve reads it: `config_json` plus the tokenizer files."""
    write_tokenizer(directory)
    shutil.copy(config_json, directory / "config.json")
    return directory
