"""Screenshots of the playground's three tabs (docs/playground_*.png) and its text → image timings at batch 4.

    python scripts/playground_screenshots.py --model runs/demo/rl/final --tokenizer runs/demo/tokenizer/model

Serves the pair on 127.0.0.1, drives the page in headless Chromium (Debian's chromium + chromium-driver), and
times `--repeats` generations of 4 images through gradio_client (the server's own clock: button → first
preview, button → final images), printing the median.
"""
from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

from gradio_client import Client
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from selftok.shapes import make_example
from vlm.playground.app import Playground, build_app

PROMPT = "a photo of a red circle left of a blue square"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1500"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def shoot(driver: webdriver.Chrome, url: str, out: Path, image: Path) -> None:
    wait = WebDriverWait(driver, 120, poll_frequency=0.2)
    driver.get(url)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#t2i-prompt textarea")).send_keys(PROMPT)
    driver.find_element(By.ID, "t2i-generate").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#t2i-gallery img")) >= 4)
    driver.save_screenshot(str(out / "playground_t2i.png"))
    driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Image → text')]").click()
    wait.until(lambda d: d.find_element(By.ID, "i2t-run")).click()
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#i2t-answer textarea").get_attribute("value"))
    time.sleep(1)
    driver.save_screenshot(str(out / "playground_i2t.png"))
    driver.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Reconstruct')]").click()
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#rec-upload input[type=file]"))
    upload.send_keys(str(image))
    wait.until(lambda d: image.stem in d.find_element(By.ID, "rec-upload").get_attribute("textContent"))
    driver.find_element(By.ID, "rec-run").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rec-gallery img")) >= 3)
    time.sleep(1)
    driver.save_screenshot(str(out / "playground_reconstruct.png"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", default="docs")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--every", type=int, default=None,
                   help="preview interval for the timings (default: the page's, K // 4)")
    args = p.parse_args()
    pg = Playground(args.model, args.tokenizer)
    app = build_app(pg)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    out = Path(args.out)
    image = Path(pg.out) / "heldout_scene_5.png"
    make_example("heldout", 5, size=pg.pipe.image_tokenizer.cfg.image_size).image.save(image)
    driver = browser()
    try:
        shoot(driver, url, out, image)
    finally:
        driver.quit()
    every = args.every or max(1, pg.K // 4)
    for label, interval in (("no previews", 0), (f"previews every {every} tokens", every)):
        first, total = timings_with(url, args.repeats, interval)
        print(f"batch 4, K={pg.K}, {label}: first preview {first:.2f} s, final images {total:.2f} s "
              f"(median of {args.repeats})")
    app.close()
    return 0


def timings_with(url: str, repeats: int, every: int) -> tuple[float, float]:
    client = Client(url, verbose=False)
    first, total = [], []
    for seed in range(repeats):
        settings = (PROMPT, 4, seed, 3.0, "constant", None, "", 1.0, 0, 1.0, "renderer", 50, every)
        status = client.predict(*settings, api_name="/t2i")[-1]
        parts = status.split(" · ")
        total.append(float(parts[0].split(" in ")[1].rstrip(" s")))
        has_preview = "after" in parts[1]
        first.append(float(parts[1].split(" after ")[1].rstrip(" s")) if has_preview else float("nan"))
    return statistics.median(first), statistics.median(total)


if __name__ == "__main__":
    sys.exit(main())
