"""Config reload: routing thresholds change without a restart; an invalid file is refused."""

from __future__ import annotations

import yaml
from scheduler_harness import MODEL, metric, metrics, post, prompt_ids, wait_for


def test_reload_changes_routing_thresholds_without_restart(engines, make_scheduler):
    sched = make_scheduler([engines["prefill"]], [engines["decode1"]])
    pid = sched.proc.pid
    body = {"model": MODEL, "prompt": prompt_ids(600), "max_tokens": 2}

    def route() -> str:
        status, headers, _ = post(sched.url + "/v1/completions", body)
        assert status == 200
        return headers["X-Baton-Route"]

    assert route() == "disaggregated"  # 600 >= 256 (in between: throughput-optimized disaggregates)
    cfg = yaml.safe_load(sched.config_path.read_text())
    broken = dict(cfg, routing={**cfg["routing"], "localPrefillBelowTokens": "many"})
    sched.config_path.write_text(yaml.safe_dump(broken))
    wait_for(lambda: metric(metrics(sched.url), "baton_scheduler_config_reloads_total", result="rejected") == 1,
             10, "the invalid config to be rejected")
    assert route() == "disaggregated"
    cfg["routing"] = {**cfg["routing"], "localPrefillBelowTokens": 1000, "alwaysPrefillAtOrAboveTokens": 4000}
    sched.config_path.write_text(yaml.safe_dump(cfg))
    wait_for(lambda: route() == "local", 10, "the new thresholds to apply")
    assert sched.proc.pid == pid and sched.proc.poll() is None
    assert metric(metrics(sched.url), "baton_scheduler_config_reloads_total", result="applied") == 1
