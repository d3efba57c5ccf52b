"""The TensorRT-LLM engine simulator (`baton engine-sim`): a stand-in for one `trtllm-serve` worker.

Module map (each module has one job):
- `config`   the command line (trtllm-serve's flags + `--sim-*`), YAML/config.json loading, startup checks;
- `timing`   the timing table (calibrated on an H200) and the model built on it;
- `handoff`  the opaque state of a context-only response and the KV pull client;
- `engine`   continuous batching, KV-block accounting, held KV, statistics;
- `server`   the HTTP handlers, served with `baton.http1` (OpenAI endpoints, /health, /metrics, /perf_metrics, /_sim/*);
- `logs`     JSON log lines; `main` is the `baton engine-sim` entry point.
See docs/engine-simulator.md.
"""
