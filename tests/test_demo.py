"""The region-chat server (``python -m gpt4roi_sft.demo``) over HTTP, and its page in a real browser.

One server with the tiny model runs for the module on a free port. The browser tests drive Debian's
Chromium through its chromedriver with selenium; they skip, saying what to install, where either is absent.
"""

import base64
import http.client
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
EXAMPLE = REPO / "gpt4roi_sft" / "demo" / "static" / "examples" / "shapes_3.png"
BOX = [2, 24, 74, 96]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """Base URL of a running demo server with the tiny model; its log is in ``server.log`` beside it."""
    log_path = tmp_path_factory.mktemp("demo") / "server.log"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gpt4roi_sft.demo", "--model", tiny_model_dir, "--port", str(port),
                                 "--max-new-tokens", "1500", "--device", "cpu"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the server exited:\n{log_path.read_text()[-3000:]}"
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/api/info")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"the server did not start:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "log": log_path}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def b64(path=EXAMPLE) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def request(server, method, path, body=None, raw=None):
    """(status, headers, parsed JSON or text) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=300)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data is not None else {})
    resp = conn.getresponse()
    text = resp.read().decode("utf-8")
    kind = resp.getheader("Content-Type", "")
    return resp.status, resp, (json.loads(text) if kind.startswith("application/json") else text)


def post(server, path, body=None, raw=None):
    status, _, payload = request(server, "POST", path, body, raw)
    return status, payload


def sse_events(text: str) -> list:
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]


def chat_body(messages, boxes=(BOX,), **extra):
    return {"image": b64(), "boxes": [list(b) for b in boxes], "messages": messages, "max_new_tokens": 12, **extra}


def user(text):
    return {"role": "user", "content": text}


# ---------- HTTP API ----------

def test_page_and_its_assets_come_from_the_server_alone(server):
    status, resp, html = request(server, "GET", "/")
    assert status == 200 and "default-src 'self'" in resp.getheader("Content-Security-Policy")
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "/static/demo.js" in assets and "/static/demo.css" in assets
    for asset in assets:
        if asset.startswith("data:"):
            continue
        assert asset.startswith("/"), f"{asset} would be fetched from elsewhere"
        status, _, text = request(server, "GET", asset)
        assert status == 200, asset
        assert not re.search(r"https?://", text), f"{asset} names an outside address"


def test_bundled_examples_are_served_with_boxes_inside_their_images(server):
    status, _, info = request(server, "GET", "/api/info")
    assert status == 200 and info["examples"]
    for example in info["examples"]:
        conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
        conn.request("GET", f"/static/{example['file']}")
        resp = conn.getresponse()
        assert resp.status == 200
        width, height = Image.open(io.BytesIO(resp.read())).size
        assert all(0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height for x1, y1, x2, y2 in example["boxes"])


def test_chat_answers_a_question_about_a_region(server):
    status, payload = post(server, "/api/chat", chat_body([user("What is <region1>?")]))
    assert status == 200 and set(payload) == {"answer"}
    assert isinstance(payload["answer"], str) and payload["answer"].strip()


def test_streamed_chat_pieces_join_to_the_plain_answer(server):
    body = chat_body([user("What is <region1>?")])
    _, plain = post(server, "/api/chat", body)
    status, text = post(server, "/api/chat", {**body, "stream": True})
    events = sse_events(text)
    assert status == 200 and events[0] == {"started": True} and events[-1]["done"] is True
    deltas = [e["delta"] for e in events if "delta" in e]
    assert len(deltas) > 1 and "".join(deltas) == events[-1]["answer"] == plain["answer"]


def test_multi_turn_chat_that_mentions_a_region_again_is_answered(server):
    messages = [user("What is <region1>?"), {"role": "assistant", "content": "a purple square"},
                user("What is next to <region1>, and is it like <region2>?")]
    status, payload = post(server, "/api/chat", chat_body(messages, boxes=(BOX, [105, 53, 160, 108])))
    assert status == 200 and payload["answer"].strip()


def test_describe_gives_one_caption_per_box(server):
    boxes = [BOX, [105, 53, 160, 108], [219, 31, 274, 86]]
    status, payload = post(server, "/api/describe", {"image": b64(), "boxes": boxes, "max_new_tokens": 10})
    assert status == 200 and len(payload["captions"]) == 3 and all(c.strip() for c in payload["captions"])


def test_streamed_describe_reports_each_region_then_all_captions(server):
    boxes = [BOX, [105, 53, 160, 108]]
    status, text = post(server, "/api/describe", {"image": b64(), "boxes": boxes, "max_new_tokens": 10, "stream": True})
    events = sse_events(text)
    captions = [e for e in events if "caption" in e]
    assert status == 200 and [e["region"] for e in captions] == [0, 1]
    for c in captions:
        assert "".join(e["delta"] for e in events if "delta" in e and e["region"] == c["region"]) == c["caption"]
    assert events[-1] == {"done": True, "captions": [c["caption"] for c in captions]}


def not_an_image():
    return base64.b64encode(b"just some text, not pixels").decode()


BAD_REQUESTS = {
    "not an image": ("/api/chat", lambda: {**chat_body([user("hi")]), "image": not_an_image()}, "image: not an image"),
    "not base64": ("/api/chat", lambda: {**chat_body([user("hi")]), "image": "%%%"}, "image: not valid base64"),
    "box outside the image": ("/api/describe", lambda: {"image": b64(), "boxes": [[200, 20, 300, 90]]},
                              "boxes[0]: [200, 20, 300, 90] is not inside the 296x128 image"),
    "empty box": ("/api/describe", lambda: {"image": b64(), "boxes": [[20, 20, 20, 90]]}, "is empty"),
    "too many boxes": ("/api/describe", lambda: {"image": b64(), "boxes": [BOX] * 16}, "at most 15 regions"),
    "over-long prompt": ("/api/chat", lambda: chat_body([user("tell me " * 2500)]), "exceeds the model's 2048-token context"),
    "region without a box": ("/api/chat", lambda: chat_body([user("<region2>?")]), "<region2> names no box"),
    "unknown field": ("/api/chat", lambda: {**chat_body([user("hi")]), "max_tokens": 5}, "unknown field 'max_tokens'"),
    "missing field": ("/api/chat", lambda: {"image": b64(), "boxes": []}, "missing field 'messages'"),
    "max_new_tokens too large": ("/api/chat", lambda: {**chat_body([user("hi")]), "max_new_tokens": 10**6},
                                 "max_new_tokens: must be an integer from 1 to 1500"),
    "malformed JSON": ("/api/chat", lambda: b'{"image": ', "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_400_with_a_one_line_reason(server, case):
    path, make, reason = BAD_REQUESTS[case]
    body = make()
    status, payload = post(server, path, raw=body) if isinstance(body, bytes) else post(server, path, body)
    assert status == 400
    assert reason in payload["error"] and "\n" not in payload["error"]


def test_server_keeps_answering_after_bad_requests(server):
    for path, make, _ in BAD_REQUESTS.values():
        body = make()
        post(server, path, raw=body) if isinstance(body, bytes) else post(server, path, body)
    status, payload = post(server, "/api/chat", chat_body([user("What is <region1>?")]))
    assert status == 200 and payload["answer"].strip()


def read_event(resp) -> dict:
    """The next server-sent event of a streamed response (skipping keep-alive comments)."""
    while True:
        line = resp.fp.readline().decode("utf-8")
        assert line, "the stream ended"
        if line.startswith("data: "):
            return json.loads(line[6:])


def open_stream(server, body):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=300)
    conn.request("POST", "/api/chat", body=json.dumps({**body, "stream": True}), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def test_requests_queue_behind_a_long_answer_while_the_page_is_still_served(server):
    long_conn, long_resp = open_stream(server, chat_body([user("Describe <region1> at length.")], max_new_tokens=1500))
    assert read_event(long_resp) == {"started": True}
    status, _, html = request(server, "GET", "/")  # served while the model is busy
    assert status == 200 and "<html" in html
    conn, resp = open_stream(server, chat_body([user("What is <region1>?")]))
    assert read_event(resp) == {"queued": 1}
    long_resp.close(), long_conn.close()  # the long request's client goes away: the server cancels it
    events = [read_event(resp)]
    while "done" not in events[-1]:
        events.append(read_event(resp))
    assert events[0] == {"started": True} and events[-1]["answer"].strip()
    conn.close()
    assert "client went away; cancelling its request" in server["log"].read_text()


# ---------- the page in a browser ----------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium (Debian's package) driven by selenium through Debian's chromedriver."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium for the browser test")
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("no Chromium: apt-get install -y chromium chromium-driver for the browser test")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout=120, what="the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=f"waiting for {what}")


def drag(driver, element, start, end, steps=6):
    """Press the mouse at ``start`` (pixels from the element's top-left), move to ``end``, release."""
    from selenium.webdriver.common.action_chains import ActionChains

    rect = element.rect
    sx, sy = start[0] - rect["width"] / 2, start[1] - rect["height"] / 2
    chain = ActionChains(driver).move_to_element_with_offset(element, int(sx), int(sy)).click_and_hold()
    for i in range(1, steps + 1):
        chain = chain.move_by_offset(int((end[0] - start[0]) / steps), int((end[1] - start[1]) / steps))
    chain.release().perform()


def outside_requests(driver, base_url) -> list:
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    return [n for n in names if not (n.startswith(base_url) or n.startswith("data:") or n.startswith("blob:"))]


def synthetic_photo(path: Path) -> Path:
    from data_converters.synthetic import make_scene, render

    rng = np.random.default_rng(7)
    Image.fromarray(render(make_scene(rng), rng).rgb).save(path)
    return path


def test_browser_draw_a_box_and_describe_it(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server["url"] + "/")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#examples option[value='0']"), what="/api/info")
    browser.find_element(By.ID, "file").send_keys(str(synthetic_photo(tmp_path / "upload.png")))
    picture = wait_for(browser, lambda d: d.find_elements(By.ID, "picture"), what="the uploaded image")[0]
    drag(browser, picture, (30, 30), (150, 120))
    boxes = browser.find_elements(By.CSS_SELECTOR, "#stage .box")
    assert [b.find_element(By.CLASS_NAME, "label").text for b in boxes] == ["region1"]
    browser.find_element(By.ID, "describe").click()
    wait_for(browser, lambda d: "Described every region" in d.find_element(By.ID, "status").text, what="the caption")
    caption = browser.find_element(By.CSS_SELECTOR, "#regions li[data-region='1'] .caption:not(.pending)")
    assert caption.text.strip()
    browser.save_screenshot(str(tmp_path / "describe.png"))
    assert outside_requests(browser, server["url"]) == []


def test_browser_click_a_box_ask_twice_and_reset(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server["url"] + "/")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#examples option[value='0']"), what="/api/info")
    Select(browser.find_element(By.ID, "examples")).select_by_value("0")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#stage .box")) == 3, what="the example's boxes")
    browser.find_element(By.ID, "describe").click()
    wait_for(browser, lambda d: "Described every region" in d.find_element(By.ID, "status").text, what="captions")

    box = browser.find_element(By.CSS_SELECTOR, "#stage .box[data-region='1']")
    drag(browser, box, (box.rect["width"] / 2, box.rect["height"] / 2), (box.rect["width"] / 2, box.rect["height"] / 2), 1)
    question = browser.find_element(By.ID, "question")
    assert question.get_attribute("value") == "<region1>"
    question.send_keys(" what is it?")
    browser.find_element(By.ID, "ask").click()
    answers = lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#log .msg.assistant:not(.streaming)")]
    wait_for(browser, lambda d: len(answers(d)) == 1 and answers(d)[0], what="the first answer")
    question.send_keys("And <region2>?")
    browser.find_element(By.ID, "ask").click()
    wait_for(browser, lambda d: len(answers(d)) == 2 and answers(d)[1], what="the second answer")
    assert not browser.find_elements(By.CSS_SELECTOR, "#log .msg.error")
    shot = tmp_path / "chat.png"
    browser.save_screenshot(str(shot))
    if os.environ.get("GPT4ROI_DEMO_SCREENSHOT"):  # e.g. docs/images/demo.png, to refresh the README's picture
        shutil.copyfile(shot, os.environ["GPT4ROI_DEMO_SCREENSHOT"])

    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#log .msg") == []
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe
    assert outside_requests(browser, server["url"]) == []


def box_coords(driver) -> list:
    return driver.execute_script("return [...document.querySelectorAll('#stage .box')].map("
                                 "b => [b.dataset.region, b.offsetLeft, b.offsetTop, b.offsetWidth, b.offsetHeight])")


def test_browser_move_resize_and_delete_boxes(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server["url"] + "/")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#examples option[value='0']"), what="/api/info")
    Select(browser.find_element(By.ID, "examples")).select_by_value("0")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#stage .box")) == 3, what="the example's boxes")
    before = box_coords(browser)

    box = browser.find_element(By.CSS_SELECTOR, "#stage .box[data-region='1']")
    drag(browser, box, (20, 20), (60, 35))  # move
    moved = box_coords(browser)[0]
    assert moved[1] > before[0][1] and moved[2] > before[0][2] and moved[3:] == before[0][3:]

    handle = browser.find_element(By.CSS_SELECTOR, "#stage .box[data-region='3'] .resize")
    drag(browser, handle, (5, 5), (-35, -25))  # shrink by its corner
    resized = box_coords(browser)[2]
    assert resized[1:3] == before[2][1:3] and resized[3] < before[2][3] and resized[4] < before[2][4]
    region3 = browser.find_element(By.CSS_SELECTOR, "#regions li[data-region='3'] .caption").text
    assert region3.startswith("[219, 31, ")

    browser.find_element(By.CSS_SELECTOR, "#stage .box[data-region='2'] .delete").click()
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#stage .box .label")]
    assert labels == ["region1", "region2"]  # renumbered
    assert browser.find_element(By.CSS_SELECTOR, "#regions li[data-region='2'] .caption").text == region3

    drag(browser, browser.find_element(By.ID, "picture"), (150, 10), (190, 60))  # redraw
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#stage .box .label")] == ["region1", "region2",
                                                                                              "region3"]


# ---------- pieces of the server without a model ----------

def test_generation_queue_runs_jobs_one_at_a_time_in_arrival_order():
    import threading

    from gpt4roi_sft.demo.server import GenerationQueue

    running, order, overlap = [], [], []
    release = threading.Event()

    def work(tag):
        def run(captioner, job):
            overlap.append(len(running))
            running.append(tag)
            if tag == 0:
                release.wait(10)
            order.append(tag)
            running.remove(tag)
            job.emit(done=True)
        return run

    q = GenerationQueue(captioner=None, max_waiting=8)
    jobs = [q.submit(work(i)) for i in range(4)]
    assert [j.ahead for j in jobs] == [0, 1, 2, 3]
    release.set()
    for job in jobs:
        while "done" not in job.events.get(timeout=10):
            pass
    assert order == [0, 1, 2, 3] and overlap == [0, 0, 0, 0]


def test_generation_queue_refuses_work_beyond_its_limit():
    import threading

    from gpt4roi_sft.demo.server import BusyError, GenerationQueue

    release = threading.Event()
    q = GenerationQueue(captioner=None, max_waiting=2)
    q.submit(lambda captioner, job: release.wait(10))
    q.submit(lambda captioner, job: None)
    with pytest.raises(BusyError, match="busy"):
        q.submit(lambda captioner, job: None)
    release.set()


def test_a_failing_job_reports_one_line_and_the_queue_goes_on():
    from gpt4roi_sft.demo.server import GenerationQueue

    def broken(captioner, job):
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    q = GenerationQueue(captioner=None)
    failed = q.submit(broken)
    fine = q.submit(lambda captioner, job: job.emit(done=True))
    events = [failed.events.get(timeout=10), failed.events.get(timeout=10)]
    assert events == [{"started": True}, {"error": "generation failed: RuntimeError: CUDA out of memory."}]
    assert fine.events.get(timeout=10) == {"started": True} and fine.events.get(timeout=10) == {"done": True}


def test_image_decoding_applies_the_exif_orientation_the_browser_shows():
    from gpt4roi_sft.demo.server import decode_image

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    Image.new("RGB", (40, 20), (200, 30, 30)).save(buf, format="JPEG", exif=exif)
    image = decode_image(base64.b64encode(buf.getvalue()).decode(), max_pixels=10**6)
    assert image.size == (20, 40) and image.mode == "RGB"


def test_image_decoding_refuses_images_over_the_pixel_limit():
    from gpt4roi_sft.demo.server import decode_image
    from gpt4roi_sft.errors import DataError

    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="PNG")
    with pytest.raises(DataError, match="image: 300x200 is larger than this server accepts"):
        decode_image(base64.b64encode(buf.getvalue()).decode(), max_pixels=50_000)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_server_streams_chat_and_describes_on_cuda_in_bfloat16(tiny_model_dir):
    import threading

    import torch

    from gpt4roi_sft.demo.server import make_server
    from gpt4roi_sft.infer import load_captioner

    captioner = load_captioner(tiny_model_dir, device="cuda", torch_dtype=torch.bfloat16)
    srv = make_server(captioner, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        local = {"port": srv.server_address[1]}
        status, text = post(local, "/api/chat", chat_body([user("What is <region1>?")], stream=True))
        events = sse_events(text)
        assert status == 200 and events[-1]["done"] and "".join(e.get("delta", "") for e in events) == events[-1]["answer"]
        status, payload = post(local, "/api/describe", {"image": b64(), "boxes": [BOX, [105, 53, 160, 108]]})
        assert status == 200 and len(payload["captions"]) == 2
    finally:
        srv.shutdown()
        srv.server_close()
