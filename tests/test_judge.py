"""eval.judge: the official ViP-Bench grading rule against a real (misbehaving) HTTP server, and the cache."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval.judge import (JUDGE_PROMPT, RETRY_SUFFIX, ChatCompletionsJudge, GradeCache, Judge, JudgeError, JudgeItem,
                        JudgeSettings, build_query, grade, grade_all, parse_score, resolve_api_key)


class ScriptedJudgeServer:
    """Answers each POST with the next scripted action, then with ``default``.

    Actions: ``("reply", text)``, ``("status", code)``, ``("sleep", seconds)`` (answers late, after the
    client's timeout), ``("garbage", None)`` (a body that is not JSON). ``requests`` records every request
    (headers and JSON body).
    """

    def __init__(self, script=(), default=("reply", "1.0"), model_id="judge-test-1"):
        self.script = list(script)
        self.default = default
        self.model_id = model_id
        self.requests = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer._lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    action = outer.script.pop(0) if outer.script else outer.default
                kind, arg = action
                if kind == "sleep":
                    time.sleep(arg)
                    kind, arg = "reply", "0.9"
                if kind == "status":
                    self.send_response(arg)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if kind == "garbage":
                    payload = b"<html>oops</html>"
                else:
                    payload = json.dumps({"model": outer.model_id, "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": arg}}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


SECRET = "sk-test-SECRET-0123456789"
ITEM = JudgeItem("v1_0", question="What colour is the shape within the red rectangle?",
                 retry_question="What colour is <obj>?", answer="red<OR>crimson", prediction="It is red.")


def make_judge(server, **kw):
    settings = JudgeSettings(base_url=server.base_url, model="judge-x", backoff_s=0.01, max_backoff_s=0.02,
                             timeout_s=kw.pop("timeout_s", 5.0), **kw)
    return ChatCompletionsJudge(settings, api_key=SECRET)


def grade_item(judge, item=ITEM):
    return grade(judge, item.question, item.retry_question, item.answer, item.prediction)


def test_query_is_prompt_newline_pipe_joined_fields_ending_with_a_pipe():
    q = build_query("Q?", "a<AND>b<OR>c", "pred")
    assert q == JUDGE_PROMPT + "\n" + "Q? | a <AND> b <OR> c | pred | "
    assert build_query("Q?", "a", "p", retry=True).endswith(" | p | " + RETRY_SUFFIX)


def test_prompt_is_the_official_few_shot_table():
    assert JUDGE_PROMPT.startswith("Compare the ground truth and prediction from AI models")
    assert "What is x in the equation within the orange rectangle? | -1 <AND> -5 | x = -1 or x = -5 | 1.0" in JUDGE_PROMPT
    assert JUDGE_PROMPT.count("\n") == 11


@pytest.mark.parametrize("reply,score", [("0.7", 0.7), ("1.0 because", 1.0), ("0", 0.0), (" 0.5", None),
                                         ("1.5", None), ("-0.1", None), ("nan", None), ("good", None), ("", None)])
def test_score_is_first_space_separated_token_in_unit_interval(reply, score):
    assert parse_score(reply) == score


def test_request_follows_the_official_settings_and_sends_the_key_as_bearer():
    with ScriptedJudgeServer([("reply", "0.8")]) as server:
        g = grade_item(make_judge(server))
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert req["body"]["max_tokens"] == 3 and req["body"]["temperature"] == 0.0
    assert req["body"]["messages"] == [{"role": "user", "content": build_query(ITEM.question, ITEM.answer, ITEM.prediction)}]
    assert (g.score, g.tries, g.model) == (0.8, 1, "judge-test-1")


def test_http_500_then_ok_is_retried_and_graded():
    with ScriptedJudgeServer([("status", 500), ("status", 503), ("reply", "0.6")]) as server:
        g = grade_item(make_judge(server))
    assert g.score == 0.6 and len(server.requests) == 3


def test_timeout_then_ok_is_retried():
    with ScriptedJudgeServer([("sleep", 0.6), ("reply", "0.3")]) as server:
        g = grade_item(make_judge(server, timeout_s=0.2))
    assert g.score == 0.3 and len(server.requests) == 2


def test_api_errors_beyond_the_bound_raise_judge_error():
    with ScriptedJudgeServer(default=("status", 500)) as server:
        with pytest.raises(JudgeError, match="failed 3 times"):
            grade_item(make_judge(server, max_api_retries=2))
    assert len(server.requests) == 3


def test_client_error_is_not_retried():
    with ScriptedJudgeServer(default=("status", 401)) as server:
        with pytest.raises(JudgeError, match="HTTP 401"):
            grade_item(make_judge(server))
    assert len(server.requests) == 1


def test_non_numeric_reply_is_reasked_with_meta_question_and_rising_temperature():
    with ScriptedJudgeServer([("reply", "The answer"), ("reply", "Correct"), ("reply", "0.4")]) as server:
        g = grade_item(make_judge(server))
    assert (g.score, g.tries) == (0.4, 3)
    bodies = [r["body"] for r in server.requests]
    assert [b["temperature"] for b in bodies] == [0.0, 0.0, 0.5]
    retry = build_query(ITEM.retry_question, ITEM.answer, ITEM.prediction, retry=True)
    assert [b["messages"][0]["content"] for b in bodies[1:]] == [retry, retry]


def test_out_of_range_replies_five_times_score_zero():
    with ScriptedJudgeServer(default=("reply", "7")) as server:
        g = grade_item(make_judge(server))
    assert (g.score, g.tries, g.content) == (0.0, 5, "7")
    assert [r["body"]["temperature"] for r in server.requests] == [0.0, 0.0, 0.5, 1.0, 1.5]


def test_malformed_body_counts_as_an_api_error():
    with ScriptedJudgeServer([("garbage", None), ("reply", "0.2")]) as server:
        assert grade_item(make_judge(server)).score == 0.2


def items(n):
    return [JudgeItem(f"v1_{i}", f"q{i} in the red rectangle", f"q{i} <obj>", "a", f"p{i}") for i in range(n)]


def test_every_grade_is_cached_and_a_rerun_sends_no_request(tmp_path):
    cache_path = tmp_path / "grades.json"
    with ScriptedJudgeServer(default=("reply", "0.5")) as server:
        first = grade_all(items(6), make_judge(server, concurrency=3), GradeCache(cache_path), runs=2)
        assert len(server.requests) == 12
        second = grade_all(items(6), make_judge(server), GradeCache(cache_path), runs=2)
        assert len(server.requests) == 12
    assert second.attempted == 0 and second.scores == first.scores
    assert second.scores["v1_3"] == {0: 0.5, 1: 0.5}


def test_a_changed_prediction_is_regraded(tmp_path):
    cache_path = tmp_path / "grades.json"
    with ScriptedJudgeServer(default=("reply", "0.5")) as server:
        grade_all(items(2), make_judge(server), GradeCache(cache_path))
        changed = [items(2)[0], JudgeItem("v1_1", "q1 in the red rectangle", "q1 <obj>", "a", "new answer")]
        grade_all(changed, make_judge(server), GradeCache(cache_path))
    assert len(server.requests) == 3


def test_judge_failure_keeps_grades_already_made_and_leaves_the_rest_ungraded(tmp_path):
    cache_path = tmp_path / "grades.json"
    script = [("reply", "1.0"), ("reply", "0.0")]
    with ScriptedJudgeServer(script, default=("status", 500)) as server:
        out = grade_all(items(4), make_judge(server, concurrency=1, max_api_retries=1), GradeCache(cache_path))
    assert out.error and "failed 2 times" in out.error
    assert out.scores == {"v1_0": {0: 1.0}, "v1_1": {0: 0.0}}
    assert set(json.loads(cache_path.read_text())["grades"]) == {"v1_0", "v1_1"}


def test_api_key_never_appears_in_logs_errors_or_files(tmp_path, caplog, capsys):
    cache_path = tmp_path / "grades.json"
    with caplog.at_level(logging.DEBUG):
        with ScriptedJudgeServer([("status", 500), ("reply", "0.5")], default=("status", 500)) as server:
            judge = make_judge(server, concurrency=1, max_api_retries=1)
            out = grade_all(items(2), judge, GradeCache(cache_path))
    captured = capsys.readouterr()
    assert "retry 1/1" in caplog.text and out.error
    assert SECRET not in caplog.text + captured.out + captured.err + repr(judge) + out.error
    assert SECRET not in cache_path.read_text()


def test_key_comes_from_judge_api_key_before_openai_api_key():
    assert resolve_api_key({"OPENAI_API_KEY": "b", "JUDGE_API_KEY": "a"}) == "a"
    assert resolve_api_key({"OPENAI_API_KEY": "b"}) == "b"
    assert resolve_api_key({}) is None


class ScriptedBackend:
    """A judge backend that is not HTTP: the members of the Judge protocol and nothing else."""

    model = "scripted"
    concurrency = 1

    def __init__(self, replies):
        self.replies = list(replies)
        self.temperatures = []

    def complete(self, content, temperature):
        self.temperatures.append(temperature)
        return self.replies.pop(0), "scripted-1"


def test_any_class_with_the_judge_members_grades_under_the_official_rule(tmp_path):
    backend = ScriptedBackend(["no idea", "0.4"])
    assert isinstance(backend, Judge) and isinstance(ChatCompletionsJudge(JudgeSettings("http://127.0.0.1:9/v1", "m")), Judge)
    out = grade_all(items(1), backend, GradeCache(tmp_path / "grades.json"))
    assert out.scores == {"v1_0": {0: 0.4}} and out.judge_model == "scripted-1"
    assert backend.temperatures == [0.0, 0.0]
