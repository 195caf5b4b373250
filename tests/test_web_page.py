"""The page of `clipsearch serve` in a real headless Chromium (Playwright) against a real `clipsearch serve` process
over a store of generated shapes indexed with shapes-mini. What the page shows is compared with what the JSON API
answers for the same search. A failing test leaves `failure.png`, a screenshot of the page, in its tmp dir."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient

from clipsearch.library import Library
from clipsearch.web.app import create_app, start_warm_up
from retrieval.shapes import Attributes, class_folders, generate, read_manifest, render

CHROMIUM = Path("/usr/bin/chromium")
# Flags that keep Chromium from reaching for the network (it stalls on a closed one) or a GPU.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SERVE = [sys.executable, "-m", "clipsearch", "serve"]
WAIT_MS = 60_000  # generous: the machine is shared; conditions are waited for, never fixed sleeps
STARTUP_S = 180


def scene(shape: str, colour: str, seed: int) -> Image.Image:
    """One large object in the middle of a flat grey background."""
    return render(Attributes(shape, colour, "large", "centre", "grey", "flat"), 256, seed=seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three indexed roots: `shapes` (three pictures of each of the eight shapes, in a folder per shape), `scenes`
    (12 random scenes) and `pairs` (one picture of a red circle left of a blue square). Returns the folders, the
    store and each file's shapes (from the generator's manifests)."""
    root = tmp_path_factory.mktemp("page")
    class_folders(root / "shapes", "shape", 3, seed=5, size_range=(96, 160))
    generate(root / "scenes", 12, seed=7, size_range=(96, 160))
    (root / "pairs").mkdir()
    pair = Image.new("RGB", (512, 256))
    pair.paste(scene("circle", "red", 99), (0, 0))
    pair.paste(scene("square", "blue", 98), (256, 0))
    pair.save(root / "pairs" / "pair.png")
    Library(db=root / "db", model="shapes-mini").index(
        [root / "shapes", root / "scenes", root / "pairs"], workers=0, progress=False
    )
    shapes = {"pairs/pair.png": {"circle", "square"}}
    for folder in ("shapes", "scenes"):
        for sample in read_manifest(root / folder / "manifest.jsonl"):
            name = f"{folder}/{sample.path.relative_to(root / folder).as_posix()}"
            shapes[name] = {obj.shape for obj in sample.attributes.objects}
    return {"root": root, "db": root / "db", "shapes": shapes}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def start_server(db: Path, log: Path):
    """`clipsearch serve` on a free loopback port, once it answers /api/status."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [*SERVE, "--db", str(db), "--model", "shapes-mini", "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if get_json(f"{url}/api/status")[0] == 200:
                return process, url
        except OSError:
            time.sleep(0.2)
    stop(process)
    raise AssertionError(f"clipsearch serve did not answer: {log.read_text()}")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    process, url = start_server(world["db"], tmp_path_factory.mktemp("serve") / "serve.log")
    yield url
    stop(process)


# One browser for all the browser tests, which are all in this module: module-scoped rather than session-scoped
# because Playwright's sync API keeps an asyncio loop running on this thread while it is open, and `asyncio.run`
# in any later test module would then fail.
@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium package")
        pytest.skip(f"the browser tests need Debian's Chromium at {CHROMIUM} (`apt-get install chromium`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright gives the browser a fresh temporary user-data dir of its own
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request, tmp_path):
    """A page in a context of its own; on failure its screenshot is saved as tmp_path/failure.png. JavaScript
    errors and Content-Security-Policy violations fail the test."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)  # `expect` waits for its condition this long, not its default 5 s
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"JavaScript error: {error}"))
    page.on(
        "console",
        lambda message: problems.append(message.text) if "Content Security Policy" in message.text else None,
    )
    yield page
    report = getattr(request.node, "report_call", None)
    if report is None or report.failed:
        page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
    context.close()
    assert not problems, problems


def api(server: str, **params) -> list[dict]:
    """The hits `GET /api/search` answers, as the page asks for them (k=50)."""
    params.setdefault("k", "50")
    status, body = get_json(f"{server}/api/search?{urllib.parse.urlencode(params)}")
    assert status == 200, body
    return body["results"]


def ids(hits: list[dict]) -> list[str]:
    return [hit["id"] for hit in hits]


def tiles(page, count: int) -> list[str]:
    """The ids of the page's tiles, once it shows `count` of them."""
    from playwright.sync_api import expect

    expect(page.locator("#results .tile")).to_have_count(count)
    expect(page.locator("#results")).not_to_have_attribute("aria-busy", "true")
    return page.locator("#results .tile").evaluate_all("tiles => tiles.map(tile => tile.dataset.id)")


def params_of(page_or_request) -> dict[str, str]:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(page_or_request.url).query))


def open_page(page, server: str, query: str = "") -> None:
    page.goto(f"{server}/{query}")
    page.wait_for_selector("body[data-ready]")


def test_a_typed_query_shows_the_apis_results_in_order(page, server):
    from playwright.sync_api import expect

    open_page(page, server)
    expect(page.locator("#message")).to_contain_text("Search your photos")
    box = page.locator("#q")
    page.keyboard.press("/")  # focuses the search box
    expect(box).to_be_focused()
    page.keyboard.type("a green heart")  # two scenes show one: the calibrated cutoff keeps them, and only them
    page.keyboard.press("Enter")
    expected = api(server, q="a green heart")
    assert tiles(page, len(expected)) == ids(expected) and len(expected) == 2
    assert params_of(page) == {"q": "a green heart"}
    first = page.locator("#results .tile").first
    expect(first.locator("img")).to_have_attribute("loading", "lazy")
    expect(first.locator(".score")).to_have_text(re.compile(r"-?[0-9]\.[0-9]{3}"))  # three decimals
    assert float(first.locator(".score").text_content()) == pytest.approx(expected[0]["score"], abs=0.0006)

    page.keyboard.press("Escape")  # clears the box
    expect(box).to_have_value("")
    page.locator("#scores").uncheck()  # the score toggle hides the scores
    expect(first.locator(".score")).to_be_hidden()


def files(page, data: bytes, name: str, kind: str):
    """A DataTransfer in the page holding one file, as a drag or a paste carries it."""
    return page.evaluate_handle(
        """([data, name, kind]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: kind }));
            return transfer;
        }""",
        [base64.b64encode(data).decode(), name, kind],
    )


def test_a_dropped_image_finds_its_neighbours(page, server, world):
    open_page(page, server)
    dropped = "shapes/circle/00001"
    [path] = (world["root"] / "shapes" / "circle").glob("00001.*")
    kind = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}[path.suffix]
    transfer = files(page, path.read_bytes(), path.name, kind)
    page.dispatch_event("body", "dragenter", {"dataTransfer": transfer})
    page.locator("#drop").wait_for(state="visible")
    page.dispatch_event("body", "drop", {"dataTransfer": transfer})
    page.wait_for_url("**/?upload=*")
    expected = api(server, upload=params_of(page)["upload"])
    assert tiles(page, len(expected)) == ids(expected)
    assert f"{expected[0]['root']}/{expected[0]['path']}".startswith(dropped)  # the image itself comes first
    assert page.locator("#drop").is_hidden() and page.locator("#query").is_visible()


def test_a_pasted_image_searches_and_a_broken_one_says_why(page, server, world):
    from playwright.sync_api import expect

    open_page(page, server, "?q=a+red+circle&in=shapes")
    [path] = (world["root"] / "shapes" / "square").glob("00002.*")
    buffer = io.BytesIO()
    Image.open(path).save(buffer, "PNG")
    paste = "(transfer) => document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: transfer }))"
    page.evaluate(paste, files(page, buffer.getvalue(), "image.png", "image/png"))
    page.wait_for_url("**/?upload=*&in=shapes")  # the filters stay, the text gives way to the image
    expected = api(server, upload=params_of(page)["upload"], **{"in": "shapes"})
    assert tiles(page, len(expected)) == ids(expected) and expected[0]["path"] == f"square/{path.name}"

    page.evaluate(paste, files(page, b"not a picture", "broken.png", "image/png"))
    message = page.locator("#message")
    expect(message).to_have_attribute("data-state", "error")
    expect(message).to_contain_text("the upload is not an image this server can read")
    assert "upload=" in page.url  # the search in the URL stays as it was


def test_more_like_this_on_a_tile(page, server):
    open_page(page, server, "?q=a+blue+square&threshold=none")
    hits = api(server, q="a blue square", threshold="none")
    tiles(page, len(hits))
    third = page.locator("#results .tile").nth(2)
    third.hover()
    third.locator(".like").click()
    page.wait_for_url(f"**/?like={hits[2]['id']}")
    expected = api(server, like=hits[2]["id"])
    assert tiles(page, len(expected)) == ids(expected)
    assert hits[2]["id"] not in ids(expected)  # the query image is left out of its results


def test_a_box_dragged_in_the_lightbox_searches_for_that_region(page, server, world):
    from playwright.sync_api import expect

    hits = api(server, q="a red circle and a blue square", threshold="none")
    [pair] = [hit["id"] for hit in hits if hit["path"] == "pair.png"]
    for half, shape in ((0, "circle"), (1, "square")):
        open_page(page, server, "?q=a+red+circle+and+a+blue+square&threshold=none")
        tiles(page, len(hits))
        page.locator(f'#results .tile[data-id="{pair}"] .open').click()
        lightbox = page.locator("#lightbox")
        expect(lightbox).to_have_attribute("data-id", pair)
        expect(page.locator("#lb-path")).to_have_text("pairs/pair.png")
        expect(page.locator("#lb-meta")).to_contain_text("512 × 256")
        page.wait_for_function("() => document.getElementById('lb-img').naturalWidth === 512")
        if half == 0:  # the arrow keys move through the results, Esc closes
            index = ids(hits).index(pair)
            page.keyboard.press("ArrowRight" if index + 1 < len(hits) else "ArrowLeft")
            expect(lightbox).not_to_have_attribute("data-id", pair)
            page.keyboard.press("ArrowLeft" if index + 1 < len(hits) else "ArrowRight")
            expect(lightbox).to_have_attribute("data-id", pair)
            page.keyboard.press("Escape")
            expect(lightbox).to_be_hidden()
            page.locator(f'#results .tile[data-id="{pair}"] .open').click()
            page.wait_for_function("() => document.getElementById('lb-img').naturalWidth === 512")
        photo = page.locator("#lb-img").bounding_box()
        x0, x1 = photo["x"] + photo["width"] * (half * 0.5 + 0.04), photo["x"] + photo["width"] * (half * 0.5 + 0.46)
        page.mouse.move(x0, photo["y"] + photo["height"] * 0.06)
        page.mouse.down()
        page.mouse.move((x0 + x1) / 2, photo["y"] + photo["height"] / 2, steps=4)
        page.mouse.move(x1, photo["y"] + photo["height"] * 0.94, steps=4)
        page.mouse.up()
        page.wait_for_url(f"**/?like={pair}&box=*")
        box = [float(v) for v in params_of(page)["box"].split(",")]
        assert box == pytest.approx([half * 0.5 + 0.04, 0.06, half * 0.5 + 0.46, 0.94], abs=0.02)
        expected = api(server, like=pair, box=params_of(page)["box"])
        shown = tiles(page, len(expected))
        assert shown == ids(expected)
        # the boxed shape first: the first hit shows it, and so do most of the top three, which show no other's
        other = {"circle": "square", "square": "circle"}[shape]
        top = [world["shapes"][f"{hit['root']}/{hit['path']}"] for hit in expected[:3]]
        assert shape in top[0] and sum(shape in s for s in top) >= 2 and not any(other in s for s in top), top
        expect(page.locator("#query-box")).to_be_visible()  # the query shows the boxed part of the photo


def test_a_box_drawn_with_the_keyboard_searches_for_that_region(page, server, world):
    from playwright.sync_api import expect

    hits = api(server, q="a red circle and a blue square", threshold="none")
    [pair] = [hit["id"] for hit in hits if hit["path"] == "pair.png"]
    open_page(page, server, "?q=a+red+circle+and+a+blue+square&threshold=none")
    tiles(page, len(hits))
    page.locator(f'#results .tile[data-id="{pair}"] .open').focus()
    page.keyboard.press("Enter")  # opens the lightbox
    lightbox, mark, said = page.locator("#lightbox"), page.locator("#lb-box"), page.locator("#lb-announce")
    expect(lightbox).to_have_attribute("data-id", pair)
    page.keyboard.press("b")
    expect(mark).to_be_visible()
    expect(said).to_contain_text("Arrow keys move it, Shift and arrow keys resize it, Enter searches")
    page.keyboard.press("Escape")  # cancels the box, not the lightbox
    expect(mark).to_be_hidden()
    expect(said).to_have_text("Box cancelled.")
    expect(lightbox).to_be_visible()

    page.keyboard.press("b")  # a box from 35 to 65 % each way, moved to the left half around the circle
    for key, times in (("ArrowLeft", 6), ("ArrowUp", 6), ("Shift+ArrowRight", 2), ("Shift+ArrowDown", 12)):
        for _ in range(times):
            page.keyboard.press(key)
    expect(lightbox).to_have_attribute("data-id", pair)  # the arrows moved the box, not to another photo
    expect(said).to_have_text("Box from 5 to 45 percent across, 5 to 95 percent down.")
    frame, drawn = page.locator("#lb-img").bounding_box(), mark.bounding_box()
    assert (drawn["x"] - frame["x"]) / frame["width"] == pytest.approx(0.05, abs=0.01)
    assert (drawn["y"] + drawn["height"] - frame["y"]) / frame["height"] == pytest.approx(0.95, abs=0.01)
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/?like={pair}&box=*")
    assert [float(v) for v in params_of(page)["box"].split(",")] == pytest.approx([0.05, 0.05, 0.45, 0.95], abs=1e-4)
    expected = api(server, like=pair, box=params_of(page)["box"])
    assert tiles(page, len(expected)) == ids(expected)
    top = [world["shapes"][f"{hit['root']}/{hit['path']}"] for hit in expected[:3]]
    assert "circle" in top[0] and sum("circle" in s for s in top) >= 2 and not any("square" in s for s in top), top


def test_filtering_by_folder(page, server, world):
    open_page(page, server, "?q=a+yellow+star&threshold=none")
    tiles(page, len(api(server, q="a yellow star", threshold="none")))
    page.locator("#in").select_option("scenes")
    page.wait_for_url("**/?q=a+yellow+star&in=scenes&threshold=none")
    expected = api(server, q="a yellow star", threshold="none", **{"in": "scenes"})
    assert tiles(page, len(expected)) == ids(expected) and {hit["root"] for hit in expected} == {"scenes"}

    # a folder of the lightbox's path narrows to that sub-folder
    page.locator("#clear-filters").click()
    page.wait_for_url("**/?q=a+yellow+star&threshold=none")
    hits = api(server, q="a yellow star", threshold="none")
    tiles(page, len(hits))
    first_shape = next(i for i, hit in enumerate(hits) if hit["root"] == "shapes")
    page.locator("#results .tile .open").nth(first_shape).click()
    folder = hits[first_shape]["path"].split("/")[0]
    page.locator("#lb-path .crumb", has_text=folder).click()
    page.wait_for_url(f"**/?q=a+yellow+star&in=shapes%2F{folder}&threshold=none")
    expected = api(server, q="a yellow star", threshold="none", **{"in": f"shapes/{folder}"})
    assert tiles(page, len(expected)) == ids(expected) == ids([h for h in hits if h["path"].startswith(f"{folder}/")])


def test_reload_and_back_give_the_same_results(page, server):
    from playwright.sync_api import expect

    open_page(page, server, "?q=a+blue+square&in=shapes&threshold=none")
    first = tiles(page, len(api(server, q="a blue square", threshold="none", **{"in": "shapes"})))
    page.locator("#q").fill("a green heart")
    page.locator("#q").press("Enter")
    page.wait_for_url("**/?q=a+green+heart&in=shapes")
    second = api(server, q="a green heart", **{"in": "shapes"})
    assert tiles(page, len(second)) == ids(second) != first
    page.go_back()
    assert tiles(page, len(first)) == first
    expect(page.locator("#q")).to_have_value("a blue square")
    expect(page.locator("#in")).to_have_value("shapes")
    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert tiles(page, len(first)) == first
    page.go_forward()
    assert tiles(page, len(second)) == ids(second)


def test_scrolling_down_fetches_the_next_pages(page, server):
    from playwright.sync_api import expect

    everything = api(server, q="a circle", threshold="none")
    offsets = []
    page.on("request", lambda r: offsets.append(params_of(r)["offset"]) if "/api/search?" in r.url else None)
    open_page(page, server, "?q=a+circle&k=8&threshold=none")
    shown = page.locator("#results .tile")
    expect(shown.first).to_be_visible()
    while (count := shown.count()) < len(everything):
        page.mouse.wheel(0, 5000)
        page.wait_for_function(f"() => document.querySelectorAll('#results .tile').length > {count}")
    assert tiles(page, len(everything)) == ids(everything)  # the pages fit together: no gaps, no repeats
    assert offsets == [str(offset) for offset in range(0, len(everything), 8)]
    expect(page.locator("#more")).to_be_hidden()  # the last page says there is no more


def test_no_results_and_bad_input_say_so(page, server):
    from playwright.sync_api import expect

    open_page(page, server, "?q=a+red+circle&after=2100-01-01")
    message = page.locator("#message")
    expect(message).to_have_attribute("data-state", "none")
    expect(message).to_contain_text("No photos found")
    expect(message).to_contain_text("widen the dates")
    assert page.locator("#results .tile").count() == 0
    expect(page.locator("#clear-filters")).to_be_visible()

    open_page(page, server, "?q=a+red+circle&after=2023-02-30")
    expect(message).to_have_attribute("data-state", "error")
    expect(message).to_contain_text("after: '2023-02-30' is not a real date")


def test_a_query_with_no_good_match_says_so_and_shows_the_weak_ones_on_request(page, server):
    from playwright.sync_api import expect

    assert api(server, q="a red circle") == []  # the pictures hold red cut only beside other shapes
    open_page(page, server, "?q=a+red+circle")
    message = page.locator("#message")
    expect(message).to_have_attribute("data-state", "no-match")
    expect(message).to_contain_text("No good match")
    assert page.locator("#results .tile").count() == 0
    show = page.locator("#message-action")
    expect(show).to_have_text("Show the weaker matches")
    show.focus()
    page.keyboard.press("Enter")
    page.wait_for_url("**/?q=a+red+circle&weak=1")
    expected = api(server, q="a red circle", weak="1")
    assert tiles(page, len(expected)) == ids(expected) and all(hit["weak"] for hit in expected)
    expect(message).to_be_hidden()
    expect(page.locator("#results .tile.weak")).to_have_count(len(expected))
    expect(page.locator("#results .tile .weak-mark").first).to_have_text("weak")
    page.reload()  # the state is in the URL
    page.wait_for_selector("body[data-ready]")
    assert tiles(page, len(expected)) == ids(expected)
    hide = page.locator("#weaker")
    expect(hide).to_have_text("Hide the weaker matches")
    hide.click()
    page.wait_for_url("**/?q=a+red+circle")
    expect(message).to_have_attribute("data-state", "no-match")


def test_tiles_selected_by_keyboard_teach_a_concept_whose_chip_searches_it(page, server, world):
    from playwright.sync_api import expect

    open_page(page, server, "?q=a+square&in=shapes%2Fsquare&threshold=none")
    squares = api(server, q="a square", threshold="none", **{"in": "shapes/square"})
    assert tiles(page, len(squares)) == ids(squares) and len(squares) == 3
    selection = page.locator("#selection")
    expect(selection).to_be_hidden()
    for hit in squares:  # a tick on each tile, by keyboard
        page.locator(f'#results .tile[data-id="{hit["id"]}"] .pick').focus()
        page.keyboard.press("Space")
    expect(page.locator("#results .tile.selected")).to_have_count(3)
    expect(page.locator("#selected-count")).to_have_text("3 photos selected")
    name = page.get_by_label("Learn as")
    name.fill("2 squares")  # not a name @ can take: said at once, nothing sent
    name.press("Enter")
    message = page.locator("#concept-message")
    expect(message).to_have_attribute("data-state", "error")
    expect(message).to_contain_text("A name starts with a letter")
    expect(name).to_have_attribute("aria-invalid", "true")
    name.fill("my_squares")
    page.get_by_label("Method").select_option("probe")
    page.locator("#learn").click()
    expect(message).to_contain_text("Learned @my_squares (probe, ")
    expect(selection).to_be_hidden()  # the selection is done with
    (concept,) = [c for c in get_json(f"{server}/api/concepts")[1]["concepts"] if c["name"] == "my_squares"]
    assert concept["examples"] == 3 and concept["method"] == "probe"

    page.locator("#clear-filters").click()
    page.wait_for_url("**/?q=a+square&threshold=none")
    chip = page.locator("#concepts .concept", has_text="@my_squares")
    expect(chip).to_be_visible()
    chip.focus()
    page.keyboard.press("Enter")  # searches @my_squares, the filters as they are
    page.wait_for_url("**/?q=%40my_squares")
    expected = api(server, q="@my_squares")
    assert tiles(page, len(expected)) == ids(expected)
    top = [world["shapes"][f"{hit['root']}/{hit['path']}"] for hit in expected[:3]]
    assert sum("square" in shapes for shapes in top) >= 2, top
    expect(chip).to_have_attribute("aria-pressed", "true")
    page.reload()  # the concept and its search are still there
    page.wait_for_selector("body[data-ready]")
    assert tiles(page, len(expected)) == ids(expected)
    expect(page.locator("#concepts .concept", has_text="@my_squares")).to_be_visible()


def send_json(url: str, method: str, body: dict | None = None) -> tuple[int, dict]:
    """A JSON request other than GET, as a script sends it (no Origin header)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def concept_names(server: str) -> list[str]:
    return [c["name"] for c in get_json(f"{server}/api/concepts")[1]["concepts"]]


def test_a_concept_is_forgotten_from_its_chip_after_a_confirm_step(page, server):
    from playwright.sync_api import expect

    squares = api(server, q="a square", threshold="none", **{"in": "shapes/square"})
    body = {"name": "to_forget", "positives": ids(squares), "method": "probe"}
    assert send_json(f"{server}/api/concepts", "POST", body)[0] == 201
    open_page(page, server, "?q=a+square")
    item = page.locator('#concepts .concept-item[data-name="to_forget"]')
    expect(item.locator(".concept")).to_have_text("@to_forget")
    forget = page.get_by_role("button", name="Forget @to_forget")
    forget.focus()
    page.keyboard.press("Enter")  # asks first: nothing is sent yet
    question = page.get_by_role("group", name="Forget @to_forget?")
    expect(question).to_be_visible()
    expect(question.get_by_role("button", name="Keep")).to_be_focused()
    page.keyboard.press("Escape")  # keeps it, and gives focus back to the control
    expect(question).to_have_count(0)
    expect(forget).to_be_focused()
    assert "to_forget" in concept_names(server)

    forget.click()
    page.get_by_role("group", name="Forget @to_forget?").get_by_role("button", name="Forget").click()
    expect(page.locator("#concepts-message")).to_have_text("Forgot @to_forget.")
    expect(item).to_have_count(0)
    assert "to_forget" not in concept_names(server)
    expect(page.locator("#q")).to_be_focused()
    page.reload()  # it stays forgotten
    page.wait_for_selector("body[data-ready]")
    expect(page.locator('#concepts .concept-item[data-name="to_forget"]')).to_have_count(0)


def test_the_selection_lives_in_the_url_through_reload_back_and_forward(page, server):
    from playwright.sync_api import expect

    open_page(page, server, "?q=a+blue+square&threshold=none")
    first = ids(api(server, q="a blue square", threshold="none"))
    assert tiles(page, len(first)) == first and len(first) > 3
    for picked in first[:2]:
        page.locator(f'#results .tile[data-id="{picked}"] .pick').check()
    assert params_of(page)["sel"] == ",".join(first[:2])
    expect(page.locator("#selected-count")).to_have_text("2 photos selected")

    page.reload()
    page.wait_for_selector("body[data-ready]")
    assert tiles(page, len(first)) == first
    expect(page.locator("#results .tile.selected")).to_have_count(2)
    expect(page.locator(f'#results .tile[data-id="{first[0]}"] .pick')).to_be_checked()
    expect(page.locator("#selected-count")).to_have_text("2 photos selected")

    page.locator("#q").fill("a green heart")  # a new search keeps the selection; the API never sees it
    page.locator("#q").press("Enter")
    page.wait_for_url(re.compile(r"/\?q=a\+green\+heart&sel="))
    second = ids(api(server, q="a green heart"))
    assert tiles(page, len(second)) == second and second
    expect(page.locator("#message")).to_be_hidden()  # no error: the API was not sent `sel`
    assert params_of(page) == {"q": "a green heart", "sel": ",".join(first[:2])}
    expect(page.locator("#selected-count")).to_have_text("2 photos selected")

    page.go_back()  # the search before, with the selection as it is now
    assert tiles(page, len(first)) == first
    assert params_of(page)["sel"] == ",".join(first[:2])
    page.locator(f'#results .tile[data-id="{first[2]}"] .pick').check()
    page.locator(f'#results .tile[data-id="{first[0]}"] .pick').uncheck()
    assert params_of(page)["sel"] == ",".join([first[1], first[2]])
    page.go_forward()  # the selection goes along
    assert tiles(page, len(second)) == second
    assert params_of(page)["sel"] == ",".join([first[1], first[2]])
    expect(page.locator("#selected-count")).to_have_text("2 photos selected")
    page.locator("#unselect").click()
    expect(page.locator("#selection")).to_be_hidden()
    assert "sel" not in params_of(page)


@pytest.fixture(scope="module")
def views_server(tmp_path_factory):
    """A store indexed with --views 5: two copies of a 360x240 scene with a small shape in its top left corner,
    and four plain ones; serves it."""
    root = tmp_path_factory.mktemp("views")
    photos = root / "photos"
    photos.mkdir()
    picture = Image.new("RGB", (360, 240), (128, 128, 128))
    picture.paste(scene("star", "yellow", 3).resize((96, 96)), (20, 16))
    for name in ("first.png", "copy.png"):
        picture.save(photos / name)
    for i in range(4):
        Image.new("RGB", (360, 240), (30 * i, 60, 200 - 30 * i)).save(photos / f"plain{i}.png")
    Library(db=root / "db", model="shapes-mini").index([photos], workers=0, progress=False, views=5)
    process, url = start_server(root / "db", root / "serve.log")
    yield url
    stop(process)


def relative(inner: dict, outer: dict) -> list[float]:
    """A bounding box as fractions of another: x0, y0, x1, y1."""
    return [
        (inner["x"] - outer["x"]) / outer["width"],
        (inner["y"] - outer["y"]) / outer["height"],
        (inner["x"] + inner["width"] - outer["x"]) / outer["width"],
        (inner["y"] + inner["height"] - outer["y"]) / outer["height"],
    ]


def test_the_part_of_a_photo_that_matched_is_outlined_on_its_tile_and_in_the_lightbox(page, views_server):
    from playwright.sync_api import expect

    everything = api(views_server, q="a shape", threshold="none")
    [first] = [hit["id"] for hit in everything if hit["path"] == "first.png"]
    [copy] = [hit["id"] for hit in everything if hit["path"] == "copy.png"]
    box = "0,0,0.6667,0.6667"  # the top left sub-view of the first picture: the copy's same view matches it
    hits = api(views_server, like=first, box=box)
    assert hits[0]["id"] == copy and hits[0]["view"] == pytest.approx([0, 0, 2 / 3, 2 / 3], abs=1e-4)
    open_page(page, views_server, f"?like={first}&box={box}")
    assert tiles(page, len(hits)) == ids(hits)
    outlines = page.locator("#results .tile .view-box")
    expect(outlines).to_have_count(sum("view" in hit for hit in hits))
    tile = page.locator(f'#results .tile[data-id="{copy}"]')
    outline = tile.locator(".view-box")
    expect(outline).to_be_visible()
    shown = relative(outline.bounding_box(), tile.locator("img").bounding_box())
    assert shown == pytest.approx(hits[0]["view"], abs=0.03)

    tile.locator(".open").click()
    marked = page.locator("#lb-view")
    expect(marked).to_be_visible()
    expect(marked).to_contain_text("matched here")
    expect(page.locator("#lb-meta")).to_contain_text("the outlined part of the photo")
    page.wait_for_function("() => document.getElementById('lb-img').naturalWidth === 360")
    assert relative(marked.bounding_box(), page.locator("#lb-img").bounding_box()) == pytest.approx(
        hits[0]["view"], abs=0.02
    )
    without = next((i for i, hit in enumerate(hits) if "view" not in hit), None)
    if without is not None:  # a photo matched as a whole has no outline
        page.keyboard.press("Escape")
        page.locator("#results .tile .open").nth(without).click()
        expect(page.locator("#lightbox")).to_have_attribute("data-id", hits[without]["id"])
        expect(marked).to_be_hidden()


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("empty")
    (root / "photos").mkdir()
    Library(db=root / "db", model="shapes-mini").index([root / "photos"], workers=0, progress=False)
    process, url = start_server(root / "db", root / "serve.log")
    yield url
    stop(process)


def test_an_empty_store_says_how_to_fill_it(page, empty_server):
    from playwright.sync_api import expect

    open_page(page, empty_server)
    message = page.locator("#message")
    expect(message).to_have_attribute("data-state", "empty")
    expect(message).to_contain_text("No photos indexed yet")
    expect(message.locator("code")).to_have_text("clipsearch index DIR")
    expect(page.locator("#status")).to_contain_text("0 photos")


def test_an_empty_store_is_served_and_fills_without_a_restart(tmp_path):
    (tmp_path / "photos").mkdir()
    library = Library(db=tmp_path / "db", model="shapes-mini", row_cache=True)
    library.index([tmp_path / "photos"], workers=0, progress=False)
    app = create_app(library)
    ready = []
    start_warm_up(app, lambda images, error: ready.append((images, error))).join()
    assert ready == [(0, None)]
    client = TestClient(app, base_url="http://127.0.0.1:8765")
    status = client.get("/api/status")
    assert status.status_code == 200 and status.json()["images"] == 0
    empty = client.get("/api/search", params={"q": "a red circle"})
    assert empty.status_code == 503 and "run `clipsearch index FOLDER` first" in empty.json()["error"]

    generate(tmp_path / "photos", 3, seed=1, size_range=(96, 128))
    Library(db=tmp_path / "db", model="shapes-mini").index([tmp_path / "photos"], workers=0, progress=False)
    found = client.get("/api/search", params={"q": "a red circle", "threshold": "none"})
    assert found.status_code == 200 and len(found.json()["results"]) == 3
