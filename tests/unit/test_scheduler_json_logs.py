"""`baton scheduler --log-format json`: every `key=value` field of a log message survives, whatever its text.

The messages are built exactly as the scheduler builds them (`log.info(fmt, *args)` with the format strings of
service.py, `%r` for error texts), so a value holding both quote kinds, backslashes, newlines or ` key=` text
must come back as the exact string, next to the request_id and outcome fields.
"""

from __future__ import annotations

import io
import json
import logging
import random

import pytest

from baton.scheduler import main as scheduler_main
from baton.scheduler.main import _JsonFormatter, _log_fields

# The format of SchedulerService._account (service.py), with its trailing `f" error={error!r}"`.
REQUEST_DONE = ("event=request_done request_id=%s api=%s route=%s reason=%s tokens=%s prefill=%s decode=%s "
                "attempts=%d outcome=%s status=%d queue_ms=%.1f latency_ms=%.1f%s")
RETRY = "event=retry request_id=%s route=%s attempt=%d endpoint=%s error=%r"
STREAM_BROKEN = "event=stream_broken request_id=%s endpoint=%s error=%r%s"
RELOAD_FAILED = "event=config_reload_failed field=tokenizer error=%r detail=%r"
LISTENING = "event=listening url=http://%s:%d model=%s"

NASTY = [
    "",
    " ",
    "plain",
    "it's",
    'say "hi"',
    "both ' and \" quotes",
    # an engine's 400 as the scheduler passes it through: pydantic text inside a JSON string
    '{"object": "error", "message": "1 validation error: Input should be a valid integer, got \'x\'", '
    '"type": "BadRequestError", "param": null, "code": 400}',
    "back\\slash \\' \\\" \\\\ \\n (written, not escapes)",
    "trailing backslash \\",
    "line one\nline two\r\n\ttabbed",
    "key=value inside outcome=completed request_id=fake",
    "  spaces  around  ",
    "unicode: é 中文 😀 \u2028 \u00a0 \x00 \x7f \x1b[31m",
    "'",
    '"',
    "''",
    "'\"'\"",
    "\ud800 lone surrogate",
]


def _json_line(emit) -> dict:
    """What `emit(logger)` logs through the JSON formatter: exactly one line, parsed."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_JsonFormatter())
    logger = logging.getLogger("baton.test.json_logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        emit(logger)
    finally:
        logger.handlers[:] = []
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines  # one JSON line, whatever the message held
    return json.loads(lines[0])


def _formatted(fmt: str, *args: object) -> dict:
    return _json_line(lambda logger: logger.info(fmt, *args))


def _request_done(error: str, rid: str = "0123456789abcdef", outcome: str = "invalid") -> dict:
    return _formatted(REQUEST_DONE, rid, "completions", "disagg", "-", 12, "10.0.0.1:8000", "10.0.0.2:8000", 1,
                      outcome, 400, 0.25, 3.5, f" error={error!r}" if error else "")


@pytest.mark.parametrize("error", [e for e in NASTY if e], ids=range(len([e for e in NASTY if e])))
def test_request_done_keeps_every_field_for_any_error_text(error):
    data = _request_done(error)
    assert data["request_id"] == "0123456789abcdef"
    assert data["outcome"] == "invalid"
    assert data["status"] == "400"
    assert data["error"] == error
    assert data["latency_ms"] == "3.5" and data["decode"] == "10.0.0.2:8000"
    assert data["level"] == "info" and data["logger"] == "baton.test.json_logs"
    assert "msg" not in data  # nothing fell back to one unparsed string


def test_request_done_without_error_has_no_error_field():
    data = _request_done("", outcome="completed")
    assert data["outcome"] == "completed" and "error" not in data and "msg" not in data


def test_engine_400_with_both_quote_kinds_keeps_request_id_and_outcome():
    """The reported case: a pass-through engine 400 whose body holds `'` inside a JSON string."""
    body = json.dumps({"object": "error", "message": "Input should be a valid integer, got 'x'",
                       "type": "BadRequestError", "param": None, "code": 400})
    error = body[:200]
    assert "'" in error and '"' in error and "\\'" in repr(error)  # what broke shlex
    data = _request_done(error)
    assert (data["request_id"], data["outcome"], data["error"]) == ("0123456789abcdef", "invalid", error)
    assert json.loads(data["error"])["message"].endswith("got 'x'")


@pytest.mark.parametrize("error", NASTY, ids=range(len(NASTY)))
def test_other_service_messages_with_repr_values(error):
    retry = _formatted(RETRY, "rid-1", "disagg", 2, "10.0.0.3:8000", error)
    assert (retry["event"], retry["request_id"], retry["attempt"], retry["error"]) == ("retry", "rid-1", "2", error)
    broken = _formatted(STREAM_BROKEN, "rid-2", "10.0.0.4:8000", error, " cause=engine_client_closed")
    assert (broken["request_id"], broken["error"], broken["cause"]) == ("rid-2", error, "engine_client_closed")
    reload = _formatted(RELOAD_FAILED, f"ValueError: {error}", "keeping the running tokenizer")
    assert reload["error"] == f"ValueError: {error}" and reload["detail"] == "keeping the running tokenizer"
    assert "msg" not in retry and "msg" not in broken and "msg" not in reload


@pytest.mark.parametrize("model", ["o'brien/llama", 'say "x"', "it's \"both\"", "with space"])
def test_plain_s_values_with_quotes_or_spaces_stay_whole(model):
    data = _formatted(LISTENING, "127.0.0.1", 8000, model)
    assert (data["event"], data["url"], data["model"]) == ("listening", "http://127.0.0.1:8000", model)


def test_random_strings_round_trip():
    rnd = random.Random(20240601)
    pieces = ["a", " ", "'", '"', "\\", "\n", "\t", "=", " x=1", "\\'", "é", "中", "😀", "\x00", "\u2028", "\ud800"]
    for n in range(3000):
        if n % 5 == 0:
            error = "".join(chr(rnd.randrange(0x110000)) for _ in range(rnd.randint(1, 8)))
        else:
            error = "".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 16)))
        fields, text = _log_fields(f"event=x request_id=r{n} error={error!r} outcome=failed")
        assert dict(fields) == {"event": "x", "request_id": f"r{n}", "error": error, "outcome": "failed"}
        assert text == ""


def test_free_text_messages_go_to_msg():
    assert _formatted("hold store writer failed")["msg"] == "hold store writer failed"
    data = _formatted("event=a detail=%r some words n=%d", "d", 3)
    assert (data["event"], data["detail"], data["n"], data["msg"]) == ("a", "d", "3", "some words")


def test_unclosed_quote_is_kept_as_written():
    data = _formatted("event=x model=%s outcome=ok", "'unclosed")
    assert (data["model"], data["outcome"]) == ("'unclosed", "ok")
    data = _formatted("event=x model=%s", "'closed'trailing")
    assert data["model"] == "'closed'trailing"


def test_exception_text_is_its_own_field():
    def emit(logger):
        try:
            raise ValueError("boom 'x' \"y\"")
        except ValueError:
            logger.exception("event=heartbeat_failed error=%r", "it's \"bad\"")

    data = _json_line(emit)
    assert data["event"] == "heartbeat_failed" and data["error"] == "it's \"bad\"" and data["level"] == "error"
    assert "ValueError: boom 'x' \"y\"" in data["exc"]


def test_setup_logging_json_writes_the_fields_to_stderr(capsys):
    root = logging.getLogger("baton")
    saved = (root.handlers[:], root.level, root.propagate)
    try:
        scheduler_main.setup_logging("info", "json")
        error = '{"message": "got \'x\'"}'
        logging.getLogger("baton.scheduler.service").warning(RETRY, "abc", "disagg", 1, "h:1", error)
        root.handlers[0].flush()
        lines = capsys.readouterr().err.splitlines()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level, root.propagate = saved
    data = json.loads(lines[-1])
    assert (data["request_id"], data["error"], data["level"]) == ("abc", error, "warning")
