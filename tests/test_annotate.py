"""data_converters.annotate: Set-of-Mark captioning against a fake OpenAI-compatible VLM on 127.0.0.1.

The fake server reads which numbers it is asked for from the prompt (or the re-ask) and answers in the
format, or misbehaves as scripted: numbers left out, garbage, HTTP errors, 429 with Retry-After, answers
slower than the client's timeout. The CLI runs as a real subprocess with tiny backoffs.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from data_converters.annotate.marks import MarkStyle, render_marks
from data_converters.annotate.prompt import parse_reply, prompt_text, reask_text
from data_converters.annotate.run import balanced_chunks
from gpt4roi_sft.chat_api import ChatAPISettings, ChatCompletionsClient, redact, retry_after_seconds

SECRET = "sk-annotate-SECRET-0123456789abcdef"
ASKED = re.compile(r"The image has (\d+) numbered regions")
REASKED = re.compile(r"usable description for regions? ([\d, and]+)\.")


def description(n: int) -> str:
    return f"A small red circle number {n} sits in the upper left of the picture, on the green grass beside a blue square."


class FakeVLM:
    """Answers each POST with the next scripted action, then with ``default``.

    Actions: ``("answer", omit)`` answers every asked number except those in ``omit`` (first asks only);
    ``("garbage",)``; ``("status", code, headers, body)``; ``("sleep", seconds)`` answers late.
    ``requests`` records each request's headers, JSON body and the numbers it asked for.
    """

    def __init__(self, script=(), default=("answer", ())):
        self.script = list(script)
        self.default = default
        self.requests = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                last = body["messages"][-1]["content"]
                text = last if isinstance(last, str) else next(p["text"] for p in last if p["type"] == "text")
                first = ASKED.search(text)
                if first:
                    asked = list(range(1, int(first.group(1)) + 1))
                else:
                    asked = [int(x) for x in re.findall(r"\d+", REASKED.search(text).group(1))]
                with outer._lock:
                    outer.requests.append({"headers": dict(self.headers), "body": body, "asked": asked,
                                           "reask": not first})
                    action = outer.script.pop(0) if outer.script else outer.default
                kind = action[0]
                if kind == "sleep":
                    time.sleep(action[1])
                    kind, action = "answer", ("answer", ())
                if kind == "status":
                    _, code, headers, payload = (action + ({}, b""))[:4] if len(action) < 4 else action
                    payload = payload.encode() if isinstance(payload, str) else payload
                    self.send_response(code)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if kind == "garbage":
                    content = "I am sorry, I cannot see any numbers in this picture."
                else:
                    omit = set(action[1]) if first else set()
                    content = "\n".join(f"{n}: {description(n)}" for n in asked if n not in omit)
                payload = json.dumps({"model": "fake-vlm-1", "choices": [{"index": 0, "message": {
                    "role": "assistant", "content": content}}], "usage": {"prompt_tokens": 1000, "completion_tokens": 40}}).encode()
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


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small synthetic Pix2Cap-format dataset (5 train images, 2-3 things + 2 stuff each)."""
    root = tmp_path_factory.mktemp("annotate_data")
    subprocess.run([sys.executable, "-m", "data_converters.synthetic", "--out", str(root), "--train-images", "5",
                    "--val-images", "0", "--seed", "1"], check=True, cwd=REPO, capture_output=True)
    return root


def segment_count(root: Path) -> int:
    data = json.loads((root / "annotations" / "pix2cap_coco_train.json").read_text())
    return sum(len(a["segments_info"]) for a in data["annotations"])


def annotate(root: Path, out: Path, server=None, *extra: str, key: str = SECRET, timeout: int = 120):
    cmd = [sys.executable, "-m", "data_converters.annotate", "--images", str(root / "train2017"),
           "--panoptic-json", str(root / "annotations" / "pix2cap_coco_train.json"),
           "--panoptic-dir", str(root / "panoptic_train2017"), "--out", str(out),
           "--backoff", "0.01", "--max-backoff", "0.05", "--timeout", "2", "--max-retries", "3"]
    if server is not None:
        cmd += ["--base-url", server.base_url, "--model", "fake-vlm"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "VLM_API_KEY": key}
    return subprocess.run(cmd + list(extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def summary(out: Path) -> dict:
    return json.loads((out.parent / f"{out.stem}_annotate" / "summary.json").read_text())


def descriptions(out: Path) -> dict:
    data = json.loads(out.read_text())
    return {(a["image_id"], s["id"]): s["description"] for a in data["annotations"] for s in a["segments_info"]}


# --- the reply format -------------------------------------------------------------------------------------

def test_reply_lines_become_descriptions_by_number():
    reply = "```\n1: A red car parked by the kerb.\n- 2: A tall tree behind it.\n**3**: The grey sky.\n```"
    parsed = parse_reply(reply, [1, 2, 3])
    assert parsed.descriptions == {1: "A red car parked by the kerb.", 2: "A tall tree behind it.", 3: "The grey sky."}
    assert parsed.missing == []


def test_repeated_unknown_empty_and_malformed_numbers_are_not_kept():
    reply = "1: A dog.\n1: A cat on a mat.\n2: N/A\n4: A number that was never drawn.\nThree: the sky\n3 the sky"
    parsed = parse_reply(reply, [1, 2, 3])
    assert parsed.descriptions == {}
    assert parsed.missing == [1, 2, 3]
    assert any("4 was not asked" in p for p in parsed.problems) and any("given 2 times" in p for p in parsed.problems)


def test_the_last_line_of_a_reply_cut_at_the_token_limit_is_not_kept():
    parsed = parse_reply("1: A red car parked by the kerb.\n2: A tall tree with", [1, 2], truncated=True)
    assert parsed.descriptions == {1: "A red car parked by the kerb."} and parsed.missing == [2]


def test_prompt_names_the_count_the_language_and_the_class_hints():
    text = prompt_text(3, ["person", "sky", "dining table"], "German")
    assert "The image has 3 numbered regions" in text and "in German" in text
    assert "1 person; 2 sky; 3 dining table" in text
    assert reask_text([2, 5, 7]).startswith("Your answer did not give a usable description for regions 2, 5 and 7.")


def test_chunks_are_balanced_and_keep_the_order():
    assert balanced_chunks(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert balanced_chunks([], 3) == []


# --- the marks --------------------------------------------------------------------------------------------

def scene(width=200, height=120):
    ids = np.full((height, width), 7, dtype=np.int64)  # background
    ids[20:100, 20:100] = 8  # a large square
    ids[50:56, 150:156] = 9  # a tiny square
    image = Image.new("RGB", (width, height), (128, 128, 128))
    return image, ids


def test_number_sits_inside_a_large_segment_and_beside_a_tiny_one():
    image, ids = scene()
    marked = render_marks(image, ids, [(1, 7), (2, 8), (3, 9)])
    labels = {label.number: label for label in marked.labels}
    x1, y1, x2, y2 = labels[2].box
    assert labels[2].inside and (ids[y1:y2, x1:x2] == 8).all()
    x1, y1, x2, y2 = labels[3].box
    assert not labels[3].inside and not (ids[y1:y2, x1:x2] == 9).any()  # the tiny square stays visible


def test_numbers_never_overlap():
    image, ids = scene()
    boxes = [label.box for label in render_marks(image, ids, [(1, 7), (2, 8), (3, 9)]).labels]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_only_the_requested_segments_are_outlined():
    image, ids = scene()
    marked = np.asarray(render_marks(image, ids, [(1, 9)]).image)
    changed = (marked != np.asarray(image)).any(axis=2)
    assert not changed[ids == 8].any()
    assert changed[ids == 9].any()


def test_large_images_are_downscaled_before_marking():
    image, ids = scene(400, 240)
    marked = render_marks(image, ids, [(1, 8)], MarkStyle(max_side=200))
    assert marked.image.size == (200, 120) and marked.scale == 0.5


# --- the HTTP client --------------------------------------------------------------------------------------

def test_retry_after_is_honoured_up_to_the_cap():
    waits = []
    with FakeVLM([("status", 429, {"Retry-After": "0.3"}, b""), ("status", 429, {"Retry-After": "999"}, b"")],
                 default=("answer", ())) as server:
        client = ChatCompletionsClient(ChatAPISettings(server.base_url, "m", timeout_s=2, backoff_s=0.01,
                                                       max_backoff_s=5.0), sleep=waits.append)
        client.create([{"role": "user", "content": "The image has 1 numbered regions"}])
    assert waits == [0.3, 5.0]
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def test_key_and_its_fragments_are_redacted():
    assert redact(f"bad key {SECRET}, starts sk-annotate-SECR...", SECRET) == "bad key ***, starts ***..."


# --- the command line against the fake VLM ----------------------------------------------------------------

def test_every_segment_gets_a_description_in_pix2cap_format(dataset, tmp_path):
    out = tmp_path / "pix2cap_new.json"
    with FakeVLM() as server:
        proc = annotate(dataset, out, server, "--max-segments-per-request", "3")
    assert proc.returncode == 0, proc.stderr
    src = json.loads((dataset / "annotations" / "pix2cap_coco_train.json").read_text())
    new = json.loads(out.read_text())
    assert [i["id"] for i in new["images"]] == [i["id"] for i in src["images"]]
    assert new["categories"] == src["categories"]
    texts = descriptions(out)
    assert len(texts) == segment_count(dataset) and all(t.startswith("A small red circle") for t in texts.values())
    s = summary(out)
    assert (s["images"], s["described"], s["failed"]) == (5, len(texts), 0)
    assert s["requests_sent"] == len(server.requests) and s["prompt_tokens"] == 1000 * len(server.requests)


def test_request_carries_the_marked_image_and_the_key_as_bearer(dataset, tmp_path):
    out = tmp_path / "o.json"
    with FakeVLM() as server:
        annotate(dataset, out, server, "--limit", "1")
    req = server.requests[0]
    assert req["headers"]["Authorization"] == f"Bearer {SECRET}"
    parts = req["body"]["messages"][0]["content"]
    assert parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert req["body"]["model"] == "fake-vlm" and req["body"]["temperature"] == 0.0
    marks = sorted((tmp_path / "o_annotate" / "marks").iterdir())
    assert [p.suffix for p in marks] == [".png", ".txt"]
    assert marks[1].read_text().strip() == parts[1]["text"].strip()


def test_rerun_asks_nothing_already_answered(dataset, tmp_path):
    out = tmp_path / "o.json"
    with FakeVLM() as server:
        annotate(dataset, out, server, "--max-segments-per-request", "2")
        first, before = descriptions(out), len(server.requests)
        proc = annotate(dataset, out, server, "--max-segments-per-request", "2")
    assert proc.returncode == 0
    assert len(server.requests) == before and descriptions(out) == first
    assert summary(out)["requests_sent"] == 0 and summary(out)["requests_cached"] > 0


def test_missing_numbers_are_reasked_once_for_just_those(dataset, tmp_path):
    out = tmp_path / "o.json"
    with FakeVLM([("answer", (2, 3))]) as server:
        proc = annotate(dataset, out, server, "--limit", "1", "--concurrency", "1")
    assert proc.returncode == 0, proc.stderr
    assert len(server.requests) == 2 and len(server.requests[0]["asked"]) >= 3
    assert server.requests[1]["reask"] and server.requests[1]["asked"] == [2, 3]
    assert summary(out)["failed"] == 0


def test_numbers_missing_after_the_reask_fail_and_are_retried_only_on_request(dataset, tmp_path):
    out = tmp_path / "o.json"
    with FakeVLM([("answer", (2,)), ("garbage",)]) as server:  # the re-ask gets nothing usable either
        proc = annotate(dataset, out, server, "--limit", "1", "--concurrency", "1")
        assert proc.returncode == 0, proc.stderr
        s = summary(out)
        assert s["failed_by_reason"] == {"no_usable_description": 1} and len(server.requests) == 2
        assert sum(1 for t in descriptions(out).values() if t == "") == 1
        annotate(dataset, out, server, "--limit", "1", "--concurrency", "1")
        assert len(server.requests) == 2  # a plain rerun does not ask again
        proc = annotate(dataset, out, server, "--limit", "1", "--concurrency", "1", "--retry-failed")
    assert proc.returncode == 0
    assert len(server.requests) == 3 and server.requests[2]["asked"] == [1]  # one request for that segment alone
    assert summary(out)["failed"] == 0 and all(descriptions(out).values())


def test_a_reask_lost_to_api_errors_is_sent_on_the_next_run_without_repeating_the_first(dataset, tmp_path):
    out = tmp_path / "o.json"
    with FakeVLM([("answer", (2,))] + [("status", 500, {}, b"")] * 4) as server:
        proc = annotate(dataset, out, server, "--limit", "1")
        assert proc.returncode == 1 and summary(out)["failed_by_reason"] == {"api_error": 1}
        assert len(server.requests) == 5
        proc = annotate(dataset, out, server, "--limit", "1")
    assert proc.returncode == 0
    assert len(server.requests) == 6 and server.requests[5]["asked"] == [1]
    assert summary(out)["failed"] == 0 and all(descriptions(out).values())


def test_garbage_replies_leave_empty_descriptions_that_the_converter_drops(dataset, tmp_path):
    out = tmp_path / "o.json"
    with FakeVLM(default=("garbage",)) as server:
        proc = annotate(dataset, out, server, "--limit", "2")
    assert proc.returncode == 0
    s = summary(out)
    assert s["described"] == 0 and s["failed"] == s["segments"] > 0
    assert len(server.requests) == s["requests_sent"] == 4  # one request per image, and its re-ask
    conv = subprocess.run([sys.executable, "-m", "data_converters.pix2cap", "--annotations", str(out), "--split", "train",
                           "--out", str(tmp_path / "c.jsonl"), "--stats", str(tmp_path / "st.json")],
                          cwd=REPO, capture_output=True, text=True)
    assert conv.returncode == 0, conv.stderr
    assert json.loads((tmp_path / "st.json").read_text())["dropped"] == {"empty_description": s["segments"]}


def test_server_errors_and_timeouts_are_retried(dataset, tmp_path):
    out = tmp_path / "o.json"
    script = [("status", 500, {}, b""), ("status", 503, {}, b""), ("sleep", 1.5), ("status", 429, {"Retry-After": "0"}, b"")]
    with FakeVLM(script) as server:
        proc = annotate(dataset, out, server, "--limit", "1", "--concurrency", "1", "--max-retries", "4", "--timeout", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert len(server.requests) == 5 and summary(out)["failed"] == 0
    assert "retry 4/4" in proc.stderr


def test_failures_past_the_retries_lose_nothing_and_the_rerun_asks_only_those(dataset, tmp_path):
    out = tmp_path / "o.json"
    with FakeVLM([("answer", ())] * 2, default=("status", 502, {}, b"")) as server:
        proc = annotate(dataset, out, server, "--concurrency", "1", "--max-segments-per-request", "50")
    assert proc.returncode == 1 and "rerun the same command" in proc.stderr
    s = summary(out)
    assert s["described"] > 0 and set(s["failed_by_reason"]) == {"api_error"}
    kept = {k: v for k, v in descriptions(out).items() if v}
    with FakeVLM() as server:
        proc = annotate(dataset, out, server, "--concurrency", "1", "--max-segments-per-request", "50")
    assert proc.returncode == 0
    assert len(server.requests) == 5 - 2  # one request per image; two were answered before
    assert all(descriptions(out)[k] == v for k, v in kept.items()) and all(descriptions(out).values())


def test_a_rejected_key_stops_the_run_and_leaves_the_rest_for_the_next_one(dataset, tmp_path):
    out = tmp_path / "o.json"
    refusal = json.dumps({"error": {"message": f"Incorrect API key provided: {SECRET[:12]}...{SECRET[-4:]} or {SECRET}"}})
    with FakeVLM(default=("status", 401, {}, refusal)) as server:
        proc = annotate(dataset, out, server, "--concurrency", "1")
    assert proc.returncode == 1
    assert len(server.requests) == 1 and "HTTP 401" in proc.stderr and "Incorrect API key" in proc.stderr
    assert set(summary(out)["failed_by_reason"]) == {"api_error", "not_attempted"}


def test_the_key_is_in_no_output_log_or_cache_file(dataset, tmp_path):
    out = tmp_path / "o.json"
    echo = json.dumps({"error": {"message": f"bad request for key {SECRET}"}})
    script = [("status", 500, {}, echo), ("status", 400, {}, echo), ("answer", (1,)), ("garbage",)]
    with FakeVLM(script) as server:
        runs = [annotate(dataset, out, server, "--concurrency", "1", "--limit", "3")]
        runs.append(annotate(dataset, out, server, "--concurrency", "1", "--retry-failed"))
    assert "Bearer " + SECRET in json.dumps(server.requests[0]["headers"])  # it was really sent
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    for proc in runs:
        assert SECRET not in proc.stdout + proc.stderr and SECRET[:16] not in proc.stderr


def test_dry_run_writes_marks_and_prompts_and_sends_nothing(dataset, tmp_path):
    out = tmp_path / "o.json"
    proc = annotate(dataset, out, None, "--dry-run", "--limit", "2", "--max-segments-per-request", "3")
    assert proc.returncode == 0, proc.stderr
    assert not out.exists()
    marks = sorted(p.name for p in (tmp_path / "o_annotate" / "marks").iterdir())
    assert marks[:4] == ["000000000001_0.png", "000000000001_0.txt", "000000000001_1.png", "000000000001_1.txt"]
    assert "requests to send" in proc.stdout


def test_missing_image_is_one_line_naming_the_file(dataset, tmp_path):
    (tmp_path / "imgs").mkdir()
    proc = subprocess.run([sys.executable, "-m", "data_converters.annotate", "--images", str(tmp_path / "imgs"),
                           "--panoptic-json", str(dataset / "annotations" / "pix2cap_coco_train.json"),
                           "--panoptic-dir", str(dataset / "panoptic_train2017"), "--out", str(tmp_path / "o.json"),
                           "--dry-run"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {tmp_path / 'imgs' / '000000000001.jpg'}: no such file "
                                   f"(and 4 more missing files); check --images and --panoptic-dir")


def test_panoptic_png_of_another_size_is_one_line_naming_it(dataset, tmp_path):
    data = json.loads((dataset / "annotations" / "pix2cap_coco_train.json").read_text())
    image = data["images"][0]
    image["width"] += 8
    broken = tmp_path / "panoptic.json"
    broken.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "data_converters.annotate", "--images", str(dataset / "train2017"),
                           "--panoptic-json", str(broken), "--panoptic-dir", str(dataset / "panoptic_train2017"),
                           "--out", str(tmp_path / "o.json"), "--dry-run", "--limit", "1"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    png = dataset / "panoptic_train2017" / "000000000001.png"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {png}: {image['width'] - 8}x{image['height']} but images[] says {image['width']}x{image['height']} for image 1")


# --- review ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def annotated(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("annotated") / "pix2cap_new.json"
    with FakeVLM() as server:
        assert annotate(dataset, out, server).returncode == 0
    return out


def review(*args: str):
    return subprocess.run([sys.executable, "-m", "data_converters.annotate", "review", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_review_page_shows_each_sampled_mask_beside_its_description_offline(annotated, tmp_path):
    proc = review("--in", str(annotated), "--sample", "4", "--out", str(tmp_path / "rev"))
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "rev" / "index.html").read_text()
    assert page.count('src="data:image/jpeg;base64,') == 4 and page.count("<tr data-key=") == 4
    assert "http://" not in page and "https://" not in page
    keys = [line.rsplit(" ", 1)[0] for line in (tmp_path / "rev" / "decisions.txt").read_text().splitlines()[1:]]
    texts = descriptions(annotated)
    for key in keys:
        image_id, segment_id = map(int, key.split())
        assert f'data-key="{key}"' in page and texts[(image_id, segment_id)] in page


def test_decisions_fold_back_rejections_emptied_flagged_and_kept(annotated, tmp_path):
    (a_img, a_seg), (r_img, r_seg) = list(descriptions(annotated))[:2]
    decisions = tmp_path / "decisions.txt"
    decisions.write_text(f"# reviewed\n{a_img} {a_seg} accept\n{r_img} {r_seg} reject\n5 1 ?\n")
    out = tmp_path / "reviewed.json"
    proc = review("--in", str(annotated), "--decisions", str(decisions), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    segs = {(a["image_id"], s["id"]): s for a in json.loads(out.read_text())["annotations"] for s in a["segments_info"]}
    assert segs[(a_img, a_seg)]["review"] == "accepted" and segs[(a_img, a_seg)]["description"]
    rejected = segs[(r_img, r_seg)]
    assert (rejected["review"], rejected["description"]) == ("rejected", "")
    assert rejected["rejected_description"] == descriptions(annotated)[(r_img, r_seg)]
    assert json.loads(out.read_text())["info"]["pix2cap_review"] == {"accepted": 1, "rejected": 1, "acceptance_rate": 0.5}


def test_a_bad_decision_line_names_the_file_and_line(annotated, tmp_path):
    decisions = tmp_path / "decisions.txt"
    decisions.write_text("1 2 accept\n3 4 maybe\n")
    proc = review("--in", str(annotated), "--decisions", str(decisions), "--out", str(tmp_path / "r.json"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {decisions}:2: expected '<image_id> <segment_id> accept|reject|?', got '3 4 maybe'"


# --- the whole chain --------------------------------------------------------------------------------------

def test_annotations_convert_and_train(dataset, annotated, tiny_model_dir, tmp_path):
    """annotate (fake VLM) -> data_converters.pix2cap -> train_sft.py --check -> one training step on the records."""
    import torch

    from gpt4roi_sft import load_model
    from gpt4roi_sft.data.collator import PaddingCollator
    from gpt4roi_sft.data.dataset import ConversationDataset

    train = tmp_path / "train.jsonl"
    conv = subprocess.run([sys.executable, "-m", "data_converters.pix2cap", "--annotations", str(annotated),
                           "--split", "train", "--out", str(train)], cwd=REPO, capture_output=True, text=True)
    assert conv.returncode == 0, conv.stderr
    records = [json.loads(line) for line in train.read_text().splitlines()]
    answers = [t["value"] for r in records for t in r["conversations"] if t["from"] == "gpt"]
    assert len(answers) == segment_count(dataset) and set(answers) <= set(descriptions(annotated).values())
    check = subprocess.run([sys.executable, "train_sft.py", "--config", "configs/quickstart.yaml", "--check",
                            f"model.path={tiny_model_dir}", f"data.train={train}", f"data.image_root={dataset}",
                            f"train.output_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    model, processor = load_model(tiny_model_dir)
    ds = ConversationDataset(str(train), str(dataset), processor.tokenizer, processor.image_transform,
                             model.config.image_token_id, processor.num_image_tokens)
    assert ds.validate_all(tokenize=True) == []
    batch = PaddingCollator(pad_token_id=processor.tokenizer.pad_token_id or 0)([ds[0], ds[1]])
    loss = model(**{k: v for k, v in batch.items() if k not in ("num_tokens", "num_label_tokens")}).loss
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
