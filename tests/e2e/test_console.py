"""The web console in headless Chromium (Debian's `chromium`, driven by Playwright; nothing is
downloaded): sign in, generate an image with the tiny model and watch it progress, find it in
the gallery with its parameters and use them again, cancel a running job. Screenshots of each
step are kept under the test's temporary folder."""

import os
import re
import shutil
import uuid
from pathlib import Path

import pytest

from tests.e2e.test_inference import tiny_models, unique, wait_endpoint  # noqa: F401

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):  # .ci/run installs it: missing there is a failure, not a skip
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def console_endpoint(api, tiny_models):  # noqa: F811
    response = api(
        "POST",
        "/endpoints",
        json={
            "endpoint_name": unique("web")[:20],
            "endpoint_type": "Async",
            "instance_type": "cpu",
            "initial_instance_count": 1,
            "autoscaling_enabled": False,
            "assign_to_roles": ["IT Operator"],
        },
    )
    name = response.json()["data"]["endpoint_name"]
    wait_endpoint(api, name)
    yield name
    api("DELETE", "/endpoints", json={"endpoint_name_list": [name]})


class Screens:
    """Numbered screenshots of the page, kept as the test's artifacts."""

    def __init__(self, page, folder: Path) -> None:
        self.page, self.folder, self.count = page, folder, 0

    def __call__(self, name: str) -> None:
        self.count += 1
        self.page.screenshot(path=str(self.folder / f"{self.count:02d}-{name}.png"), full_page=True)


@pytest.fixture
def page(browser, stack, tmp_path):
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(f"{stack.gateway_url}/console")
    opened.screens = Screens(opened, tmp_path)
    yield opened
    opened.screens("last")
    context.close()
    assert not errors, errors  # no script error anywhere along the way


def sign_in(page, key: str, user: str = "admin") -> None:
    page.fill("#api-key", key)
    page.fill("#user", user)
    page.click("#signin-form button[type=submit]")


def choose(page, selector: str, value: str) -> None:
    page.locator(f"{selector} option[value='{value}']").wait_for(state="attached")
    page.select_option(selector, value)


def test_a_wrong_key_or_user_does_not_sign_in(page, stack):
    sign_in(page, "wrong")
    page.locator("#error").wait_for()
    assert "API key is wrong" in page.text_content("#error")
    sign_in(page, stack.api_key, user=f"nobody-{uuid.uuid4().hex[:6]}")
    page.get_by_text("HTTP 401").wait_for()
    assert page.is_visible("#signin") and not page.is_visible("#nav")
    page.screens("refused")


def test_sign_in_generate_see_it_in_the_gallery_and_use_its_settings_again(
    page,
    stack,
    tiny_models,  # noqa: F811
    console_endpoint,
    tmp_path,
):
    sign_in(page, stack.api_key)
    page.locator("#generate").wait_for()
    assert page.text_content("#who") == "signed in as admin"
    choose(page, "#model", tiny_models["model"])
    choose(page, "#endpoint", console_endpoint)
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#negative", "blurry")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "6")
    page.fill("#seed", "4242")
    page.check(f".lora[data-name='{tiny_models['lora']}'] input[type=checkbox]")
    page.click("#generate-button")
    page.locator("#job-status[data-status]").wait_for(timeout=120_000)
    assert page.get_attribute("#job-status", "data-status") == "succeed", page.text_content("#job-status")
    assert page.text_content("#progress-text").startswith("step 6/6")  # the live progress saw every step
    job_id = page.text_content("#job-status").split()[1].rstrip(":")
    page.locator("#results img").first.wait_for()
    assert page.evaluate("document.querySelector('#results img').naturalWidth") == 64  # the PNG loaded
    page.screens("generated")

    page.click("nav button[data-view=gallery]")
    card = page.locator(f".card[data-id='{job_id}']")
    card.locator("img").wait_for()
    assert card.locator(".status").text_content() == "succeed"
    page.screens("gallery")
    card.click()
    parameters = page.locator("#detail-parameters")
    parameters.wait_for()
    text = parameters.text_content()
    assert text.startswith("a lighthouse at dusk")
    assert "Negative prompt: blurry" in text and "Seed: 4242" in text and "Steps: 6" in text
    page.screens("detail")

    page.click("nav button[data-view=generate]")
    page.fill("#prompt", "")  # the form forgets, the gallery remembers
    page.fill("#seed", "-1")
    page.click("nav button[data-view=gallery]")
    card.click()
    page.click("#reuse")
    page.locator("#generate").wait_for()
    assert page.input_value("#prompt") == "a lighthouse at dusk"
    assert (page.input_value("#seed"), page.input_value("#steps"), page.input_value("#width")) == ("4242", "6", "64")
    page.locator(f".lora[data-name='{tiny_models['lora']}'] input:checked").wait_for()
    page.screens("reused")


def test_cancel_a_running_job(page, stack, tiny_models, console_endpoint):  # noqa: F811
    sign_in(page, stack.api_key)
    choose(page, "#model", tiny_models["model"])
    choose(page, "#endpoint", console_endpoint)
    page.fill("#prompt", "a long job")
    page.fill("#width", "256")
    page.fill("#height", "256")
    page.fill("#steps", "150")
    page.click("#generate-button")
    page.get_by_text(re.compile(r"^step \d+/150")).wait_for(timeout=120_000)  # it runs
    page.screens("running")
    page.click("#cancel-button")
    page.locator("#job-status[data-status]").wait_for(timeout=60_000)
    assert page.get_attribute("#job-status", "data-status") == "canceled"
    progress = page.text_content("#job-status")
    assert progress.endswith("canceled")
    page.screens("canceled")


def test_endpoints_and_a_checkpoint_upload(page, stack, console_endpoint, tmp_path):
    sign_in(page, stack.api_key)
    page.locator("#generate").wait_for()
    page.click("nav button[data-view=endpoints]")
    row = page.locator("#endpoint-rows tr", has_text=console_endpoint)
    row.wait_for()
    assert "InService" in row.text_content()

    page.click("nav button[data-view=checkpoints]")
    upload = tmp_path / f"{uuid.uuid4().hex[:6]}-tiny-vae.safetensors"
    shutil.copy(Path(__file__).with_name("conftest.py"), upload)  # any bytes will do for storage
    page.set_input_files("#upload-files", str(upload))
    page.select_option("#upload-type", "VAE")
    page.click("#upload-form button[type=submit]")
    page.get_by_text(f"uploaded {upload.name}").wait_for(timeout=60_000)
    uploaded = page.locator("#checkpoint-rows tr", has_text=upload.name)
    uploaded.wait_for()
    assert "Active" in uploaded.text_content()
    page.screens("checkpoints")
