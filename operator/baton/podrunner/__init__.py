"""Local pod runner: real processes for Baton pods on the local cluster's fake nodes (see `runner`).

`models/` holds Hugging Face config.json files (architecture only, no weights) for the model ids the
examples use, so a simulated engine can read the same config a real trtllm-serve would download."""
