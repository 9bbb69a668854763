"""The web app in a real headless Chromium (Playwright driving /usr/bin/chromium).

Loads the page, runs the agent on a bundled-style example, clicks the image to add points and checks that the mask
changes, checks the overlay in a screenshot, undoes, lets the agent continue from the user's clicks and exports. Set ``IBISAGENT_SCREENSHOT_DIR`` to keep the
screenshots. Skips only when Chromium or the ``playwright`` package is missing.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app_fixtures import BLOB_CENTER, BLOB_RADIUS, write_blob_case

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ibisagent.ui.app import AppConfig, build_app, bundled_examples

    data = tmp_path_factory.mktemp("bundled")
    write_blob_case(data)
    # the synthetic case first, then the package's real bundled cases (when present)
    cfg = AppConfig(segmenters=["fake"], segmenter="fake", policies=["oracle", "center-click"], policy="oracle",
                    volume_policies=["oracle-3d", "compact-3d"], volume_policy="oracle-3d",
                    examples=bundled_examples(data) + bundled_examples())
    demo = build_app(cfg)
    port = _free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                        share=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def _status(page) -> str:
    return page.inner_text("#status")


def _mask_px(text: str) -> int:
    m = re.search(r"mask (\d+) px", text)
    assert m, text
    return int(m.group(1))


def _iou(text: str) -> float:
    m = re.search(r"IoU ([0-9.]+)", text)
    assert m, text
    return float(m.group(1))


def _wait_status(page, text: str, timeout: int = 20000) -> str:
    """Wait until the status line contains ``text`` (Gradio shows a progress timer in between)."""
    page.wait_for_function("(t) => { const e = document.querySelector('#status'); return e && e.innerText.includes(t); }",
                           arg=text, timeout=timeout)
    return _status(page)


def _click_image_pixel(page, x: float, y: float, width: int = 240) -> None:
    """Click the canvas at pixel (x, y) of the ``width``-wide source image (the app may show it enlarged, and the
    browser letterboxes it with object-fit)."""
    info = page.evaluate(
        """() => { const i = document.querySelector('#canvas img'); const r = i.getBoundingClientRect();
                   return [r.left, r.top, r.width, r.height, i.naturalWidth, i.naturalHeight,
                           getComputedStyle(i).objectFit]; }"""
    )
    left, top, bw, bh, nw, nh, fit = info
    scale = min(bw / nw, bh / nh)
    if fit == "scale-down":
        scale = min(1.0, scale)
    elif fit not in ("contain",):
        scale = bw / nw  # fill / none-style layouts: the element is the image
    ox, oy = left + (bw - nw * scale) / 2, top + (bh - nh * scale) / 2
    k = nw / width  # display enlargement
    page.mouse.click(ox + (x + 0.5) * k * scale, oy + (y + 0.5) * k * scale)


def _green_fraction(png: Path) -> float:
    """Fraction of the image content (pixels that are not the white page around the letterboxed image) where green
    clearly dominates (the forest-green mask overlay)."""
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    content = ~((r > 235) & (g > 235) & (b > 235))
    return float(((g > r + 25) & (g > b + 25)).sum() / max(1, content.sum()))


def test_app_in_headless_chromium(app_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    shots = Path(os.environ.get("IBISAGENT_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # 1. the page loads
            page.goto(app_url, timeout=30000)
            page.wait_for_selector("#example input", timeout=30000)
            assert "ibisagent" in page.title()
            # 2. a bundled example opens ...
            page.click("#example input")
            page.get_by_role("option", name=re.compile("segment the bright lesion")).click()
            page.wait_for_selector("#canvas img", timeout=20000)
            page.wait_for_function("document.querySelector('#status').innerText.includes('blob.png')", timeout=20000)
            assert page.input_value("#query textarea, #query input") == "segment the bright lesion"
            before = _status(page)
            assert _mask_px(before) == 0
            page.locator("#canvas img").screenshot(path=str(shots / "app_0_loaded.png"))
            assert _green_fraction(shots / "app_0_loaded.png") < 0.005
            # ... and the agent runs on it
            page.click("#run")
            page.wait_for_function("document.querySelector('#status').innerText.includes('agent stopped')",
                                   timeout=30000)
            after = _status(page)
            assert "terminate" in after
            assert _iou(after) > 0.9
            log = page.input_value("#log textarea")
            assert "[agent] Positive Point" in log and "Terminate" in log
            # 3. the screenshot shows the overlay: a green disk about the lesion's size
            page.locator("#canvas img").screenshot(path=str(shots / "app_1_agent.png"))
            page.screenshot(path=str(shots / "app_1_page.png"))
            # the disk covers 13 % of the image; contour/markers aside, most of it is green
            assert 0.08 < _green_fraction(shots / "app_1_agent.png") < 0.2
            # 4. a user click adds a point and changes the mask: positive click on the background
            px_agent = _mask_px(after)
            _click_image_pixel(page, 12, 12)
            s1 = _wait_status(page, "2 positive, 0 negative")
            assert _mask_px(s1) > px_agent
            assert "[user] Positive click (12, 12)" in page.input_value("#log textarea")
            # a negative click inside the lesion removes part of it
            page.get_by_label("Negative (remove)").check()
            cx, cy = BLOB_CENTER
            _click_image_pixel(page, cx + BLOB_RADIUS // 2, cy)
            s2 = _wait_status(page, "2 positive, 1 negative")
            assert _mask_px(s2) < _mask_px(s1)
            page.locator("#canvas img").screenshot(path=str(shots / "app_2_clicks.png"))
            # 5. undo brings back the previous mask
            page.click("#undo")
            s3 = _wait_status(page, "2 positive, 0 negative")
            assert _mask_px(s3) == _mask_px(s1)
            # 6. the agent continues from the user's state (it removes the wrong background region)
            page.click("#continue")
            s4 = _wait_status(page, "agent stopped", timeout=30000)
            assert "2 positive, 1 negative" in s4 and _iou(s4) > 0.9
            # 7. export: a PNG mask file is offered for download
            page.click("#export")
            link = page.locator("#download a").first
            link.wait_for(timeout=20000)
            assert "_mask.png" in (link.get_attribute("href") or "") + link.inner_text()
        finally:
            browser.close()


def test_upload_volume_in_headless_chromium(app_url, tmp_path):
    """Uploading a NIfTI volume through the page shows a slice and the slice slider."""
    from app_fixtures import write_blob_volume

    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    vol, _, _ = write_blob_volume(tmp_path)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url, timeout=30000)
            page.wait_for_selector("#upload input[type=file]", state="attached", timeout=30000)
            _wait_status(page, "blob.png", timeout=30000)  # the first example opens with the page: let it finish
            assert not page.locator("#slice").is_visible()
            page.set_input_files("#upload input[type=file]", str(vol))
            status = _wait_status(page, "vol.nii.gz", timeout=30000)
            assert "80x64" in status and "slice 2 / 4" in status
            page.wait_for_selector("#slice", state="visible", timeout=10000)
            page.wait_for_selector("#canvas img", timeout=20000)
        finally:
            browser.close()


def test_real_bundled_example_in_headless_chromium(app_url):
    """A real bundled case (the package's demo data): the agent plays a whole episode in the page."""
    from ibisagent.ui.app import bundled_examples

    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    real = [e for e in bundled_examples() if not e.is_3d]
    if not real:
        pytest.skip("no bundled demo cases in this checkout")
    ex = real[0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url, timeout=30000)
            page.wait_for_selector("#example input", timeout=30000)
            page.click("#example input")
            page.get_by_role("option", name=ex.label).click()
            _wait_status(page, ex.image.name, timeout=30000)
            page.click("#run")
            status = _wait_status(page, "agent stopped", timeout=60000)
            assert _mask_px(status) > 0 and "IoU" in status
            assert "Step 1 [agent] Positive Point" in page.input_value("#log textarea")
            shots = os.environ.get("IBISAGENT_SCREENSHOT_DIR")
            if shots:
                page.screenshot(path=str(Path(shots) / "app_3_bundled.png"))
        finally:
            browser.close()


def _slide_to(page, index: int) -> None:
    """Move the slice slider to ``index`` as a user does: its number box, then Enter (Gradio's release event)."""
    box = page.locator("#slice input[type=number]")
    box.fill(str(index))
    box.press("Enter")
    box.blur()


def _shown_gt(vol: Path, lab: Path) -> np.ndarray:
    """The label map as the app shows it, ``[slice, row, column]`` of the displayed slices."""
    from ibisagent.io import load_volume
    from ibisagent.io.volume_masks import load_volume_mask
    from ibisagent.volume import SliceStack

    volume = load_volume(vol)
    return SliceStack.from_volume(volume).from_stored(load_volume_mask(lab, volume))


def test_volume_3d_flow_in_headless_chromium(app_url, tmp_path):
    """The 3D flow: upload a NIfTI volume and its label map, slide, run the 3D agent, see its mask on another slice,
    click there (the mask re-propagates), download the label volume and read it back with nibabel; a 4D upload
    gives a message."""
    import nibabel as nib

    from app_fixtures import write_blob_volume

    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
    vol, lab, affine = write_blob_volume(tmp_path, depth=7)
    shots = Path(os.environ.get("IBISAGENT_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url, timeout=30000)
            page.wait_for_selector("#upload input[type=file]", state="attached", timeout=30000)
            _wait_status(page, "blob.png", timeout=30000)  # the first example opens with the page: let it finish
            # 1. upload: the volume opens in 3D with the slider, then its label map (3D IoU in the status)
            page.set_input_files("#upload input[type=file]", str(vol))
            status = _wait_status(page, "volume in 3D", timeout=30000)
            assert "80x64x7" in status and "mask 0 voxels" in status
            page.wait_for_selector("#slice", state="visible", timeout=10000)
            page.set_input_files("#mask-upload input[type=file]", str(lab))
            _wait_status(page, "3D IoU 0.000")
            # 2. slide to the first slice (no object there)
            _slide_to(page, 0)
            _wait_status(page, "slice 0 / 6")
            # 3. the 3D agent (a volume policy in the dropdown) segments the whole volume
            assert page.input_value("#policy input") == "oracle-3d"
            page.fill("#query textarea, #query input", "segment the bright lesion")
            page.click("#run")
            status = _wait_status(page, "agent stopped", timeout=30000)
            assert "3D IoU 1.000" in status and "on slices 1-5" in status
            assert "[agent] Box" in page.input_value("#log textarea")
            page.wait_for_selector("#projection img", timeout=10000)
            page.locator("#projection img").screenshot(path=str(shots / "app3d_projection.png"))
            assert _green_fraction(shots / "app3d_projection.png") > 0.05
            # 4. another slice shows its part of the 3D result
            _slide_to(page, 1)
            status = _wait_status(page, "slice 1 / 6")
            assert not re.search(r"this slice 0 px", status)
            page.locator("#canvas img").screenshot(path=str(shots / "app3d_slice1.png"))
            assert _green_fraction(shots / "app3d_slice1.png") > 0.05
            voxels = int(re.search(r"mask (\d+) voxels", status).group(1))
            on_slice = int(re.search(r"this slice (\d+) px", status).group(1))
            # 5. a negative click inside the lesion on that slice changes the 3D mask from there
            cy, cx = (int(v) for v in np.argwhere(_shown_gt(vol, lab)[1]).mean(axis=0))
            page.get_by_label("Negative (remove)").check()
            _click_image_pixel(page, cx, cy, width=80)
            status = _wait_status(page, "2 prompts on 2 slices")
            assert int(re.search(r"mask (\d+) voxels", status).group(1)) < voxels
            assert int(re.search(r"this slice (\d+) px", status).group(1)) < on_slice
            assert f"Negative click ({cx}, {cy}) on slice 1" in page.input_value("#log textarea")
            # 6. download the label volume: NIfTI with the source's shape and affine
            page.get_by_label("NIfTI (.nii.gz)").check()
            page.click("#export")
            link = page.locator("#download a").first
            link.wait_for(timeout=20000)
            href = link.get_attribute("href") or ""
            assert href.endswith("_mask.nii.gz"), href
            body = page.request.get(href if href.startswith("http") else app_url.rstrip("/") + href).body()
            out = tmp_path / "downloaded.nii.gz"
            out.write_bytes(body)
            img = nib.load(str(out))
            assert img.shape == (80, 64, 7)
            np.testing.assert_allclose(img.affine, affine, atol=1e-5)
            data = np.asarray(img.dataobj)
            assert 0 < int((data > 0).sum()) < voxels and data[..., 0].sum() == 0
            # 7. a 4D upload is refused with a message (no traceback)
            four_d = tmp_path / "four_d.nii.gz"
            nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.float32), np.eye(4)), str(four_d))
            page.goto(app_url, timeout=30000)  # a fresh page: the upload box holds the volume
            _wait_status(page, "blob.png", timeout=30000)
            page.set_input_files("#upload input[type=file]", str(four_d))
            page.get_by_text(re.compile("is 4D: 3 volumes")).first.wait_for(timeout=20000)
        finally:
            browser.close()
