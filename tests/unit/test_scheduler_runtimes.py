"""Each engine replica is spoken to in its own runtime: discovery reads it from the pod's engine container,
so a generation switch that changes the runtime (or a PairwiseSwap between runtimes) is followed with the
endpoints themselves, not when the ConfigMap's new `runtime` reaches the scheduler pod."""

from __future__ import annotations

import asyncio
import json

import pytest

from baton.scheduler.config import parse_config
from baton.scheduler.endpoints import Endpoint, PodInfo, endpoints_from_pods, endpoints_from_slices, runtime_of_pod
from baton.scheduler.engines import CLIENT_BUILD_RETRY_S, EngineFailure, EnginesByRuntime
from baton.scheduler.placement import build_rings
from baton.scheduler.service import SchedulerService


def _pod(command, name="engine", ip="127.64.0.5"):
    return {"metadata": {"name": "m-prefill-g2-0", "annotations": {"baton.dev/kv-fingerprint": "fp"}},
            "spec": {"containers": [{"name": "istio-proxy", "command": ["pilot-agent"]},
                                    {"name": name, "command": command}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}


def test_the_runtime_is_read_from_the_pods_engine_container():
    assert runtime_of_pod(_pod(["tritonserver"])) == "triton"
    assert runtime_of_pod(_pod(["/usr/local/bin/trtllm-serve"])) == "trtllm-serve"
    assert runtime_of_pod(_pod(["python3", "serve.py"])) is None  # not one Baton renders: the config decides
    assert runtime_of_pod({"metadata": {}}) is None
    # without a container named engine, the first one
    assert runtime_of_pod({"spec": {"containers": [{"name": "main", "command": ["tritonserver"]}]}}) == "triton"
    [ep] = endpoints_from_pods([_pod(["tritonserver"])], 8000, "prefill")
    assert (ep.address, ep.runtime, ep.fingerprint) == ("127.64.0.5:8000", "triton", "fp")
    one = {"addressType": "IPv4", "endpoints": [{"addresses": ["127.64.0.6"], "conditions": {"ready": True},
                                                 "targetRef": {"kind": "Pod", "name": "p", "uid": "u"}}]}
    [ep] = endpoints_from_slices([one], 8000, "decode", lambda name, uid: PodInfo("fp", "g2", "triton"))
    assert ep.runtime == "triton"


def test_replicas_of_one_kv_format_but_different_runtimes_are_never_paired():
    prefill = [Endpoint("p-http:1", "prefill", "fp", runtime="trtllm-serve"),
               Endpoint("p-triton:1", "prefill", "fp", runtime="triton")]
    decode = [Endpoint("d-http:1", "decode", "fp", runtime="trtllm-serve"),
              Endpoint("d-triton:1", "decode", "fp", runtime="triton")]
    assert build_rings(prefill, decode) == {"p-http:1": ("d-http:1",), "p-triton:1": ("d-triton:1",)}


class Engine:
    """A scripted engine client of one runtime: records the calls it gets."""

    def __init__(self, runtime: str, log: list) -> None:
        self.runtime = runtime
        self.log = log
        self.closed = False

    async def post(self, endpoint, path, body, request_id):
        kind = (json.loads(body).get("disaggregated_params") or {}).get("request_type", "context_and_generation")
        self.log.append((self.runtime, endpoint.address, kind))
        if kind == "context_only":
            params = {"request_type": "context_only", "first_gen_tokens": [7], "ctx_request_id": 1,
                      "encoded_opaque_state": "x", "draft_tokens": None}
            answer = {"choices": [{"text": " a", "finish_reason": "length", "disaggregated_params": params}],
                      "prompt_token_ids": [1, 2, 3]}
        else:
            answer = {"choices": [{"text": " a b", "finish_reason": "length"}]}
        return 200, json.dumps(answer).encode(), "application/json"

    async def open(self, endpoint, path, body, request_id):
        raise NotImplementedError

    async def health(self, endpoint, timeout):
        self.log.append((self.runtime, endpoint.address, "health"))
        return True

    async def close(self):
        self.closed = True


def _service(log: list, built: dict) -> SchedulerService:
    def factory(runtime, timeout):
        built[runtime] = Engine(runtime, log)
        return built[runtime]

    config = parse_config("model: m\nruntime: trtllm-serve\n"
                          "routing: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100}\n")
    return SchedulerService(config, discover=False, engine_factory=factory)


def _long():
    return json.dumps({"model": "m", "prompt": list(range(1, 201)), "max_tokens": 2}).encode()


def test_requests_follow_the_endpoints_runtime_before_the_config_names_it():
    async def main():
        log: list = []
        built: dict = {}
        svc = _service(log, built)
        assert list(built) == ["trtllm-serve"]
        # the operator switched traffic to a triton generation; the ConfigMap still says trtllm-serve
        svc.update_endpoints([Endpoint("p2:1", "prefill", "fp", runtime="triton")],
                             [Endpoint("d2:1", "decode", "fp", runtime="triton")])
        reply = await svc.complete("completions", _long(), {})
        assert reply.status == 200, reply.body
        calls = [c for c in log if c[2] != "health"]
        assert calls == [("triton", "p2:1", "context_only"), ("triton", "d2:1", "generation_only")]
        assert set(built) == {"trtllm-serve", "triton"}
        await asyncio.sleep(0.05)
        assert ("triton", "p2:1", "health") in log  # its replicas are probed in their runtime too
        # an endpoint that does not say (static lists) goes through the config's runtime
        svc.update_endpoints([Endpoint("p1:1", "prefill")], [Endpoint("d1:1", "decode")])
        log.clear()
        assert (await svc.complete("completions", _long(), {})).status == 200
        assert [c for c in log if c[2] != "health"] == [("trtllm-serve", "p1:1", "context_only"),
                                                         ("trtllm-serve", "d1:1", "generation_only")]
        await svc.stop()
        assert built["triton"].closed and built["trtllm-serve"].closed

    asyncio.run(main())


def test_a_runtime_whose_client_cannot_be_built_fails_its_replicas_not_the_others():
    async def main():
        log: list = []

        def factory(runtime, timeout):
            if runtime == "triton":
                raise RuntimeError("the triton runtime needs the tritonclient package")
            return Engine(runtime, log)

        config = parse_config("model: m\nrouting: {localPrefillBelowTokens: 10, alwaysPrefillAtOrAboveTokens: 100}\n")
        svc = SchedulerService(config, discover=False, engine_factory=factory)
        svc.update_endpoints([Endpoint("p2:1", "prefill", "fp", runtime="triton"), Endpoint("p1:1", "prefill", "fp")],
                             [Endpoint("d2:1", "decode", "fp", runtime="triton"), Endpoint("d1:1", "decode", "fp")])
        await asyncio.sleep(0.05)  # health probes: the triton replicas cannot be reached
        for _ in range(3):
            reply = await svc.complete("completions", _long(), {})
            assert reply.status == 200, reply.body
        assert {c[1] for c in log if c[2] != "health"} == {"p1:1", "d1:1"}
        await svc.stop()

    asyncio.run(main())


def test_a_client_that_cannot_be_built_is_not_tried_again_for_a_while():
    """A missing tritonclient is an import attempt (a file system search) per call otherwise: each request to a
    triton replica, and each health check, would pay it."""
    now = [1000.0]
    attempts: list[str] = []
    fixed = [False]

    def build(runtime):
        attempts.append(runtime)
        if runtime == "triton" and not fixed[0]:
            raise ModuleNotFoundError("No module named 'tritonclient'")
        return Engine(runtime, [])

    engines = EnginesByRuntime("trtllm-serve", build, clock=lambda: now[0])
    p2, d2 = Endpoint("p2:1", "prefill", "fp", runtime="triton"), Endpoint("d2:1", "decode", "fp", runtime="triton")
    failures = []
    for endpoint in (p2, d2, p2):
        with pytest.raises(EngineFailure) as info:
            engines.client_for(endpoint)
        failures.append(info.value)
    assert attempts == ["trtllm-serve", "triton"]  # built once; the failure answered the later calls
    assert [f.endpoint for f in failures] == [p2, d2, p2]
    assert {(f.kind, f.message) for f in failures} == {
        ("connection", "no triton engine client: ModuleNotFoundError: No module named 'tritonclient'")}
    assert not asyncio.run(engines.health(d2, 1.0)) and attempts == ["trtllm-serve", "triton"]
    assert engines.client_for(Endpoint("d1:1", "decode", "fp")) is engines.primary  # the others are not affected

    now[0] += CLIENT_BUILD_RETRY_S - 1
    with pytest.raises(EngineFailure):
        engines.client_for(p2)
    assert len(attempts) == 2
    now[0] += 1  # then it is tried again (the package may have been installed meanwhile)
    with pytest.raises(EngineFailure):
        engines.client_for(p2)
    assert attempts == ["trtllm-serve", "triton", "triton"]
    now[0] += CLIENT_BUILD_RETRY_S
    fixed[0] = True
    client = engines.client_for(p2)
    assert client.runtime == "triton" and engines.client_for(d2) is client and len(attempts) == 4
