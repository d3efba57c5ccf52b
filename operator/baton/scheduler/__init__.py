"""Baton's request scheduler: an OpenAI-compatible router for disaggregated prefill/decode serving.

Module map (each module has one job):
- `config`     the config file schema (pydantic, camelCase keys) and its hot reload;
- `endpoints`  the endpoint model and discovery (static lists, Kubernetes EndpointSlices);
- `routing`    pure: prompt-length classification and the local-vs-disaggregated decision;
- `placement`  pure: prefill placement policies and the prefill -> decode ring pairing;
- `admission`  token buckets, the bounded wait queue, the retry budget and decode backpressure;
- `holds`      degradation holds for finished prefills waiting for a decode slot (memory or redis);
- `engines`    the engine client interface and its trtllm-serve (HTTP) and Triton implementations;
- `relay`      splicing an engine's token stream into the client's connection;
- `metrics`    every Prometheus metric, behind a hooks object the request path calls;
- `service`    the request flow that ties the above together;
- `server`     HTTP wiring only (`baton.http1`); `main` is the `baton scheduler` command line.
"""
