"""`megawan serve`: the web page in a real (headless) Chromium. A prompt typed on the page and Generate give a video
in the page, written to the output folder; a second click with another seed samples again on the models loaded
by the first (another video); a blank prompt is refused on the page; a text-to-video model shows no image upload.
The page's handler samples what `megawan generate` does. Without gradio the command is one line naming the
extra that installs it.

gradio and selenium come with the test extra; the browser (chromium, chromedriver) is a system package: without it
the browser test skips naming what is missing, and fails instead where tools/run_tests.sh installed it
(MEGAWAN_REQUIRE_BROWSER=1)."""

import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

BROWSER_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")


def _browser_or_skip() -> tuple:
    """(chromium, chromedriver) paths, or skip (fail under MEGAWAN_REQUIRE_BROWSER=1) naming what is missing."""
    missing = []  # gradio and selenium are test dependencies (setup.py's test extra): only the browser may be absent
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver") or shutil.which("chromedriver", path="/usr/lib/chromium:/usr/bin")
    if chromium is None:
        missing.append("chromium (apt-get install chromium)")
    if driver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    if missing:
        why = "the web-page test needs " + ", ".join(missing)
        if os.environ.get("MEGAWAN_REQUIRE_BROWSER") == "1":
            pytest.fail(why + " (MEGAWAN_REQUIRE_BROWSER=1: tools/run_tests.sh installed the browser)")
        pytest.skip(why)
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc, log, deadline: float) -> None:
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"megawan serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    pytest.fail(f"megawan serve did not listen on port {port}:\n{log.read_text()[-3000:]}")


def _video_src(browser, other_than=None):
    """The src of the page's result video once it shows one (other than `other_than`), else None."""
    for video in browser.find_elements("css selector", "#result video"):
        src = video.get_attribute("src")
        if src and src != other_than:
            return src
    return None


@pytest.fixture(scope="session")
def browser_paths():
    return _browser_or_skip()  # session-scoped and listed first: a skip comes before the session's pipeline


def test_a_prompt_on_the_page_becomes_a_video_on_disk(browser_paths, tiny_pipelines, tmp_path):
    chromium, driver_path = browser_paths
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from megawan.utils.media import read_video

    port, out, log = _free_port(), tmp_path / "videos", tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "megawan.cli", "serve", "--ckpt", str(tiny_pipelines / "megawan"), "--device", "cpu",
           "--port", str(port), "--out", str(out), "--steps", "2"]  # the page starts at 2 steps: a fast test
    env = dict(os.environ, OMP_NUM_THREADS="1", GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    with open(log, "w") as log_file:
        server = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    browser = None
    start = time.time()
    try:
        _wait_for_port(port, server, log, start + 60)
        print(f"serving after {time.time() - start:.1f} s")
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in BROWSER_ARGS:
            options.add_argument(arg)
        browser = webdriver.Chrome(service=Service(driver_path), options=options)
        browser.get(f"http://127.0.0.1:{port}")
        # gradio re-renders the result as it arrives: an element found a moment ago may be gone, look again
        wait = WebDriverWait(browser, 45, ignored_exceptions=(StaleElementReferenceException,))
        prompt = wait.until(lambda b: b.find_element("css selector", "#prompt textarea"))
        # a text-to-video model: no image upload on the page
        assert not [e for e in browser.find_elements("css selector", "#first_frame") if e.is_displayed()]

        generate = browser.find_element("css selector", "#generate")
        generate.click()  # a blank prompt: refused on the page, nothing sampled
        wait.until(lambda b: "prompt: write what the video shows" in b.page_source)

        prompt.send_keys("a red circle moves left")
        generate.click()
        first = wait.until(_video_src)
        assert first.endswith(".mp4") and "a_red_circle_moves_left" in first
        settings = " ".join(browser.find_element("css selector", "#settings").text.split())
        assert '"steps" : 2' in settings and '"prompt" : "a red circle moves left"' in settings, settings

        seed = browser.find_element("css selector", "#seed input")
        seed.send_keys(Keys.CONTROL, "a")
        seed.send_keys("1", Keys.TAB)
        generate.click()  # the models stay loaded: only sampling again
        wait.until(lambda b: _video_src(b, other_than=first))
        print(f"two videos after {time.time() - start:.1f} s")
    finally:
        if browser is not None:
            browser.quit()
        server.terminate()
        server.wait(timeout=20)

    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 2, log.read_text()[-3000:]
    a, b = (read_video(str(p)) for p in videos)
    assert a.shape == b.shape == (17, 32, 48, 3)  # the tiny model's defaults: 17 frames of 48 x 32
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1  # seed 0 and seed 1: two samples
    assert "the models load on the first Generate" in log.read_text()


def _serve_twice(rank, pipeline: str, out: str, result: str) -> None:
    """The page's handler twice with the same fields (the second on the models the first loaded), and
    `megawan generate`'s fresh load once: their videos, as arrays, to `result`."""
    from megawan.generation import GenerationRequest, generate
    from megawan.serve import ServeOptions, Session
    from megawan.utils.media import read_video

    session = Session(ServeOptions(ckpt=pipeline, device="cpu", out=out, steps=2))
    assert session.image_input == "none" and session.start_values()["steps"] == 2
    fields = ("a blue square moves down", "", "ignored.png", None, 3, 2, 4.0, None, 5, None, None)
    (video, still, settings), (again, _, _) = session.run(*fields), session.run(*fields)
    assert still is None and video != again and len(session.kept) == 4  # VAE, DiT, umT5, tokenizer
    assert (settings["steps"], settings["frames"], settings["guidance"], settings["image"]) == (2, 5, 4.0, None)
    fresh = generate(GenerationRequest(ckpt=pipeline, prompts=["a blue square moves down"], out=out + "/fresh.mp4",
                                       steps=2, guidance=4.0, frames=5, seed=3, device="cpu", progress=False))
    np.savez(result, kept=read_video(video), again=read_video(again), fresh=read_video(fresh[0]))


def test_the_page_samples_what_generate_samples_on_models_kept_loaded(tiny_pipelines, tmp_path):
    """The page's handler (megawan.serve.Session, one rank) loads the models once and keeps them: the same
    fields give the same video again, and the video `megawan generate` gives from a fresh load."""
    from megawan.parallel.launch import spawn_local

    result = tmp_path / "videos.npz"
    spawn_local(_serve_twice, world_size=1, args=(str(tiny_pipelines / "megawan"), str(tmp_path), str(result)))
    videos = np.load(result)
    assert videos["kept"].shape == (5, 32, 48, 3)
    assert np.array_equal(videos["kept"], videos["again"]) and np.array_equal(videos["kept"], videos["fresh"])


def test_each_model_type_gets_its_image_fields(tiny_pipelines, tmp_path):
    """The page and the request as built for each kind of model (the session's config swapped for the tiny
    presets): T2V shows no upload and drops an image, I2V requires the first frame and sizes the video by it
    (blank height / width), FLF2V also the last frame, TI2V takes one optionally, A14B two guidance scales."""
    from megawan.config import dit_preset
    from megawan.serve import ServeOptions, Session, build_page

    session = Session(ServeOptions(ckpt=str(tiny_pipelines / "megawan"), out=str(tmp_path)))

    def shown():
        return {b.elem_id for b in build_page(session).blocks.values() if getattr(b, "elem_id", None) and b.visible}

    def request(image=None, last=None, guidance=4.0, high=None):
        return session.request("a cat", "", image, last, 0, 2, guidance, high, 5, None, None)

    assert {"prompt", "first_frame"} & shown() == {"prompt"} and request("x.png").image is None
    session.cfg = dit_preset("tiny-i2v")
    assert {"first_frame", "last_frame"} & shown() == {"first_frame"}
    assert session.start_values()["height"] is None and request("first.png").image == "first.png"
    with pytest.raises(ValueError, match="^first frame: tiny-i2v is an image-to-video model"):
        request()
    session.cfg = dit_preset("tiny-i2v", image_pos_len=10)  # FLF2V
    assert {"first_frame", "last_frame"} <= shown() and request("a.png", "b.png").last_image == "b.png"
    with pytest.raises(ValueError, match="^last frame: tiny-i2v is a first-last-frame model"):
        request("a.png")
    session.cfg = dit_preset("tiny-ti2v")
    assert "first_frame" in shown() and request().image is None and request("a.png").image == "a.png"
    session.cfg = dit_preset("tiny-a14b")
    assert "guidance_high" in shown() and request(guidance=3.0, high=4.0).guidance == (3.0, 4.0)


def test_without_gradio_the_command_names_the_extra(monkeypatch, capsys):
    from megawan.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as where it is not installed
    assert main(["serve", "--ckpt", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megawan serve: the web page needs gradio") and err.count("\n") == 1
    assert "pip install megawan[serve]" in err
