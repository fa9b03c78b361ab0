"""The browser playground (vlm.playground), served on 127.0.0.1 with tiny random models built here.

One test drives the page in headless Chromium (Debian's chromium + chromium-driver, through selenium):
prompt → previews → images, and a bad upload → a message in the page while the server keeps serving. The
other goes through gradio_client: the page's generation is `vlm.generate t2i`'s (same token ids, same JSON
record, same PNGs), and bad settings / a mismatched model pair come back as messages.

Off CI, the tests skip (with the reason) when gradio, selenium or chromium is missing; with CI set they fail.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from rl_testutil import make_artifacts
from vlm_testutil import free_port

MISSING = [m for m in ("gradio", "gradio_client", "selenium") if importlib.util.find_spec(m) is None]
CHROMIUM = shutil.which("chromium")
DEBIAN_DRIVER = "/usr/bin/chromedriver"
CHROMEDRIVER = shutil.which("chromedriver") or (DEBIAN_DRIVER if Path(DEBIAN_DRIVER).exists() else None)


def require(what: list[str], how: str) -> None:
    """Skip with the reason off CI; fail in CI, where .ci/run installs everything these tests need."""
    if what:
        message = f"the playground tests need {', '.join(what)} ({how})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


PROMPT = "a photo of a red circle"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("pair"), decoder=True)  # K = 16, 32-px, renderer + decoder


@pytest.fixture(scope="module")
def url(pair, tmp_path_factory):
    require(MISSING, 'pip install -e ".[playground]"')
    from vlm.playground.app import Playground, ServerSettings, build_app
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pg = Playground(*pair, ServerSettings(out=str(tmp_path_factory.mktemp("served"))))
    app = build_app(pg)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=True,
               quiet=True)
    yield f"http://127.0.0.1:{port}/"
    app.close()
    torch.set_num_threads(threads)


@pytest.fixture
def browser():
    require([n for n, p in (("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER)) if p is None],
            "apt-get install chromium chromium-driver")
    require(MISSING, 'pip install -e ".[playground]"')
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # no Selenium Manager download
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout: float = 30):
    """Wait for `condition`; on a timeout, fail with a screenshot of the page next to the test's files."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        shot = Path(driver.screenshot_dir) / "timeout.png"
        driver.save_screenshot(str(shot))
        pytest.fail(f"the page did not get there in {timeout} s; screenshot: {shot}")


def test_the_page_streams_previews_then_images_and_reports_a_bad_upload(url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    browser.screenshot_dir = tmp_path

    def images_in(elem_id: str):
        return browser.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")

    browser.get(url)
    prompt = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#t2i-prompt textarea"))
    prompt.send_keys(PROMPT)
    browser.find_element(By.ID, "t2i-generate").click()
    wait_for(browser, lambda d: len(images_in("t2i-gallery")) >= 4)
    note = browser.find_element(By.ID, "t2i-preview-note").text
    assert "Preview after 12/16 tokens" in note and "filled in greedily" in note  # K = 16, every 4 tokens
    assert images_in("t2i-preview"), "the last preview is still shown"
    status = browser.find_element(By.ID, "t2i-status").text
    assert "4 images of 16 tokens" in status and "first preview after" in status
    assert "python -m vlm.generate t2i" in browser.find_element(By.CSS_SELECTOR, "#t2i-command textarea") \
        .get_attribute("value")
    browser.save_screenshot(str(tmp_path / "t2i.png"))

    browser.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Reconstruct')]").click()
    bad = tmp_path / "holiday.png"
    bad.write_text("not a picture")
    upload = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#rec-upload input[type=file]"))
    upload.send_keys(str(bad))
    wait_for(browser, lambda d: "holiday" in d.find_element(By.ID, "rec-upload").get_attribute("textContent"))
    browser.find_element(By.ID, "rec-run").click()
    wait_for(browser, lambda d: any("holiday.png is not an image" in e.text
                                    for e in d.find_elements(By.CSS_SELECTOR, ".toast-body")))
    browser.save_screenshot(str(tmp_path / "bad_upload.png"))
    assert "Traceback" not in browser.page_source

    from selftok.shapes import make_example  # the server keeps serving: a real image is reconstructed
    good = tmp_path / "scene.png"
    make_example("heldout", 1, size=32).image.save(good)
    browser.find_element(By.CSS_SELECTOR, "#rec-upload button[aria-label='Clear']").click()
    upload = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#rec-upload input[type=file]"))
    upload.send_keys(str(good))
    wait_for(browser, lambda d: "scene" in d.find_element(By.ID, "rec-upload").get_attribute("textContent"))
    browser.find_element(By.ID, "rec-run").click()
    wait_for(browser, lambda d: len(images_in("rec-gallery")) >= 5)  # renderer, diffusion, 3+ prefixes
    browser.save_screenshot(str(tmp_path / "reconstruct.png"))


T2I_SETTINGS = {"prompt": PROMPT, "n": 3, "seed": 7, "cfg_scale": 2.5, "cfg_schedule": "linear",
                "cfg_scale_end": 1.0, "negative_prompt": "", "temperature": 0.9, "top_k": 30, "top_p": 0.95,
                "decoder": "renderer", "steps": 50, "every": 3}


def test_the_page_generates_what_vlm_generate_t2i_generates(url, pair, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from vlm.generate import autocast, main
    from vlm.pipeline import load_pipeline, t2i_seeds
    from vlm.sampler import generate_image_tokens
    from vlm.sampling import SamplingPolicy

    client = Client(url, verbose=False)
    job = client.submit(*T2I_SETTINGS.values(), api_name="/t2i")
    _, _, gallery, record, record_file, command, ids, status = job.result(timeout=60)
    previews = [o for o in job.outputs() if isinstance(o[1], str) and o[1].startswith("**Preview after")]
    assert [p[1].split("/")[0] for p in previews] == [f"**Preview after {n}" for n in (3, 6, 9, 12, 15)]
    assert "3 images of 16 tokens" in status and "first preview after" in status

    # the same token ids as the library call with the CLI's seeds and default autocast
    pipe = load_pipeline(*pair)
    policy = SamplingPolicy(cfg_scale=2.5, cfg_schedule="linear", cfg_scale_end=1.0, temperature=0.9,
                            top_k=30, top_p=0.95)
    with autocast("cpu", "bf16"):
        tokens = generate_image_tokens(pipe.model, pipe.vocab, pipe.text_tokenizer, [PROMPT] * 3, policy,
                                       t2i_seeds([{"prompt": PROMPT}], 3, 7))
    assert ids["token_ids"] == pipe.vocab.ids_to_codes(tokens.token_ids[:, :pipe.vocab.K]).tolist()

    # the shown command line writes the same record and the same PNGs
    argv = shlex.split(command)[3:]
    argv[argv.index("--out") + 1] = str(tmp_path / "cli")
    assert main(argv) == 0
    cli_record = json.loads((tmp_path / "cli" / "generation.json").read_text())
    assert json.loads(Path(record_file).read_text()) == record == cli_record
    import numpy as np
    from PIL import Image
    cli_images = sorted((tmp_path / "cli" / "images").glob("*.png"))
    assert len(gallery) == len(cli_images) == 3
    for shown, written in zip(gallery, cli_images):
        assert np.array_equal(np.asarray(Image.open(shown["image"])), np.asarray(Image.open(written)))

    # bad settings: the CLI's message, in the page; an empty prompt is the unconditional prompt
    with pytest.raises(AppError, match=r"top_p must be in \(0, 1\], got 1.5"):
        client.predict(*{**T2I_SETTINGS, "top_p": 1.5}.values(), api_name="/t2i")
    with pytest.raises(AppError, match="cfg_scale_end is required by cfg_schedule='cosine'"):
        client.predict(*{**T2I_SETTINGS, "cfg_schedule": "cosine", "cfg_scale_end": None}.values(),
                       api_name="/t2i")
    with pytest.raises(AppError, match="images: at most 16"):
        client.predict(*{**T2I_SETTINGS, "n": 17}.values(), api_name="/t2i")

    # a model pair that disagrees is refused, and the page keeps serving the loaded pair
    from selftok.model.presets import get_preset
    from selftok.model.tokenizer import SelftokTokenizer
    other = get_preset("tiny")
    other.quantizer.codebook_size = 32
    SelftokTokenizer(other).save_pretrained(tmp_path / "tok32")
    with pytest.raises(AppError, match="codebook_size: model 64, tokenizer 32"):
        client.predict(str(pair[0]), str(tmp_path / "tok32"), api_name="/load")
    uncond = client.predict(*{**T2I_SETTINGS, "prompt": "", "n": 1, "every": 0}.values(), api_name="/t2i")
    assert len(uncond[2]) == 1 and "no previews" in uncond[7]

    # image → text on a held-out scene: a caption and the evaluator's verdict
    _, caption, verdict = client.predict("held-out shapes scene", 2, None, "", 4, api_name="/i2t")
    assert isinstance(caption, str) and verdict["scene"] and isinstance(verdict["correct"], bool)
