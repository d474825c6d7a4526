"""`icd serve`'s JSON API on the embedded model, through Starlette's TestClient (no sockets): invert once and
edit, the same pixels as `ICDEditPipeline.edit`, the record in the PNG, and a 4xx JSON error for every bad
request (never a 500), the queue bound included."""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icdcli.cli.serve import missing_serve_modules

if missing_serve_modules():
    pytest.skip(f"icd serve needs {', '.join(missing_serve_modules())}: pip install -e '.[serve]'",
                allow_module_level=True)  # fmt: skip
pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx: pip install -e '.[test]'")

from starlette.testclient import TestClient  # noqa: E402

from icdcli import ICDEditPipeline  # noqa: E402
from icdcli.models.sources import DEFAULT_MODEL_DIR  # noqa: E402
from icdcli.serve import Limits, create_app  # noqa: E402

DEFAULT_NAME = json.loads((DEFAULT_MODEL_DIR / "icd.json").read_text())["name"]

EXAMPLE = Path(__file__).parent.parent / "examples" / "red-circle.png"
SRC = "a red circle on a blue background"
YELLOW = "a yellow circle on a blue background"
LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def pipe() -> ICDEditPipeline:
    return ICDEditPipeline.from_pretrained(device="cpu")


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, limits=Limits(max_upload_bytes=LIMIT, max_queue=2))) as client:
        yield client


def post_photo(client: TestClient, data: bytes | None = None, name: str = "red-circle.png", **fields):
    data = EXAMPLE.read_bytes() if data is None else data
    return client.post("/invert", files={"image": (name, data, "image/png")}, data={"src": SRC, **fields})


@pytest.fixture(scope="module")
def inverted(client) -> dict:
    response = post_photo(client)
    assert response.status_code == 200, response.text
    return response.json()


def post_edit(client: TestClient, body: dict):
    return client.post("/edit", content=json.dumps(body), headers={"Content-Type": "application/json"})


def png_of(client: TestClient, url: str) -> Image.Image:
    response = client.get(url)
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


# --- the happy path ---------------------------------------------------------------------------------------------


def test_invert_once_then_two_edits(client, inverted):
    assert inverted["cached"] is False and (inverted["width"], inverted["height"]) == (128, 128)
    assert inverted["seconds"] > 0 and inverted["seed"] == 0
    again = post_photo(client).json()
    assert again["inversion"] == inverted["inversion"] and again["cached"] is True
    first = post_edit(client, {"inversion": inverted["inversion"], "tgt": YELLOW})
    second = post_edit(client, {"inversion": inverted["inversion"], "tgt": "a green circle on a blue background",
                                "method": "swap", "guidance": 6, "tau": 0.7, "unguided_prompt": "target"})  # fmt: skip
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    one, two = first.json(), second.json()
    assert one["id"] != two["id"] and one["image"] == f"/images/{one['id']}.png"
    assert one["seconds"] > 0 and (one["width"], one["height"]) == (128, 128)
    assert one["record"]["method"] == "p2p" and one["record"]["tgt"] == YELLOW
    assert two["record"]["method"] == "swap" and two["record"]["unguided_prompt"] == "target"
    assert two["record"]["guidance"] == 6.0 and two["record"]["tau"] == 0.7
    assert png_of(client, one["image"]).size == (128, 128)


def test_json_base64_upload_is_the_same_inversion(client, inverted):
    encoded = base64.b64encode(EXAMPLE.read_bytes()).decode()
    for image in (encoded, f"data:image/png;base64,{encoded}"):
        response = client.post("/invert", json={"image": image, "src": SRC})
        assert response.status_code == 200, response.text
        assert response.json()["inversion"] == inverted["inversion"] and response.json()["cached"] is True
    other_seed = client.post("/invert", json={"image": encoded, "src": SRC, "seed": 7}).json()
    assert other_seed["inversion"] != inverted["inversion"] and other_seed["seed"] == 7


@pytest.mark.parametrize(
    ("body", "arguments"),
    [
        ({"method": "swap", "guidance": 5, "tau": 0.6}, {"method": "swap", "guidance": 5.0, "tau": 0.6}),
        (
            {"cross_replace": 0.4, "self_replace": 0.2, "blend": "circle", "amplify": {"yellow": 2}, "amplify_new": 1},
            {"p2p": {"cross_replace": 0.4, "self_replace": 0.2, "blend": ("circle",), "amplify": (("yellow", 2.0),),
                     "amplify_new": 1.0}},
        ),
        (
            {"blended_word": "red yellow", "blend_keep": "inversion"},
            {"p2p": {"blend_source": ("red",), "blend_target": ("yellow",), "blend_keep": "inversion"}},
        ),
    ],
    ids=["swap", "p2p-blend-amplify", "p2p-blend-keep-inversion"],
)  # fmt: skip
def test_edit_is_the_pipelines_edit(client, inverted, pipe, body, arguments):
    from icdcli.serve.parts import P2POptions

    response = post_edit(client, {"inversion": inverted["inversion"], "tgt": YELLOW, **body})
    assert response.status_code == 200, response.text
    served = np.asarray(png_of(client, response.json()["image"]).convert("RGB"))
    if "p2p" in arguments:
        arguments = {**arguments, "p2p": P2POptions(**arguments["p2p"])}
    inversion = pipe.invert(Image.open(EXAMPLE).convert("RGB"), SRC)
    expected = np.asarray(pipe.edit(inversion, YELLOW, **arguments)[0])
    assert served.shape == expected.shape and np.array_equal(served, expected)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_mask_holds_the_edit_to_its_region(client, inverted, pipe):
    mask = Image.new("L", (64, 64), 0)  # another resolution than the photo's, the same shape
    mask.paste(255, (32, 0, 64, 64))
    data = _png(mask)
    body = {"inversion": inverted["inversion"], "tgt": YELLOW, "mask": base64.b64encode(data).decode()}
    response = post_edit(client, body)
    assert response.status_code == 200, response.text
    record = response.json()["record"]
    assert record["mask"] == "(uploaded)" and record["mask_sha256"] == f"sha256:{hashlib.sha256(data).hexdigest()}"
    served = np.asarray(png_of(client, response.json()["image"]).convert("RGB"))
    inversion = pipe.invert(Image.open(EXAMPLE).convert("RGB"), SRC)
    assert np.array_equal(served, np.asarray(pipe.edit(inversion, YELLOW, mask_image=mask)[0]))
    photo = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    assert np.array_equal(served[:, :56], photo[:, :56])  # outside the mask (and its feathered edge): the photo


@pytest.mark.parametrize(
    ("mask", "status", "words"),
    [("@@not base64@@", 400, "mask: not base64"), (base64.b64encode(b"no image").decode(), 400, "mask: not an image"),
     (base64.b64encode(_png(Image.new("L", (64, 32), 255))).decode(), 422, "the mask is 64x32, the photo"),
     (base64.b64encode(_png(Image.new("L", (64, 64), 0))).decode(), 422, "black all over")],
)  # fmt: skip
def test_bad_masks_are_4xx(client, inverted, mask, status, words):
    response = post_edit(client, {"inversion": inverted["inversion"], "tgt": YELLOW, "mask": mask})
    assert_error(response, status, words)


def test_served_png_carries_its_record(client, inverted):
    result = post_edit(client, {"inversion": inverted["inversion"], "tgt": YELLOW, "blended_word": "red yellow"}).json()
    response = client.get(result["image"])
    assert response.headers["content-type"] == "image/png"
    disposition = response.headers["content-disposition"]
    assert disposition.startswith("attachment;") and disposition.endswith(f'{result["id"]}.png"')
    png = Image.open(io.BytesIO(response.content))
    record = json.loads(png.text["icd"])
    assert record == result["record"]
    assert record["src"] == SRC and record["tgt"] == YELLOW and record["input"] == "red-circle.png"
    assert record["input_sha256"] == hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()
    assert record["input_size"] == [128, 128] and record["inversion"] == inverted["inversion"]
    assert record["p2p"]["blend_source"] == ["red"] and record["p2p"]["blend_target"] == ["yellow"]
    assert record["model_hash"].startswith("sha256:") and record["seed"] == 0 and record["steps"] == 4
    assert png.text["parameters"].startswith(YELLOW + "\n")


def test_health_and_page(client):
    for path in ("/api", "/health"):
        described = client.get(path).json()
        assert described["ready"] is True and described["model"]["name"] == DEFAULT_NAME
        assert "guidance" in described["endpoints"]["POST /edit"]["fields"]
        assert described["limits"]["max_upload_bytes"] == LIMIT
    page = client.get("/")
    assert page.status_code == 200 and 'id="history"' in page.text and "http" not in page.text.split("<body>")[1]
    assert client.get("/static/app.js").status_code == 200


# --- errors ------------------------------------------------------------------------------------------------------


def assert_error(response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message, message
    return message


def test_bad_images_are_4xx(client):
    assert_error(post_photo(client, b"not an image at all"), 400, "not an image")
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, format="PNG")
    assert_error(post_photo(client, tiny.getvalue()), 400, "too small")
    truncated = EXAMPLE.read_bytes()[:300]
    assert post_photo(client, truncated).status_code == 400
    assert_error(client.post("/invert", json={"image": "@@not base64@@", "src": SRC}), 400, "base64")
    assert_error(client.post("/invert", content=b"x", headers={"Content-Type": "text/plain"}), 415, "multipart")
    assert_error(client.post("/invert", files={"src": (None, SRC)}), 422, "image is needed")  # multipart, no file
    assert_error(client.post("/invert", data={"src": SRC}), 415, "multipart")  # a urlencoded form holds no file
    assert_error(client.post("/invert", content=b"{not json", headers={"Content-Type": "application/json"}), 400)


def test_huge_upload_is_413(client):
    assert_error(post_photo(client, b"\0" * (2 * LIMIT)), 413, "--max-upload-mb")
    encoded = base64.b64encode(b"\0" * (LIMIT + 1024)).decode()  # fits the body bound, not the photo's
    assert_error(client.post("/invert", json={"image": encoded, "src": SRC}), 413, "--max-upload-mb")


def test_unknown_field_is_422_listing_the_fields(client, inverted):
    message = assert_error(post_edit(client, {"inversion": inverted["inversion"], "tgt": YELLOW, "guidanse": 3}), 422,
                           "'guidanse'", "guidance", "cross_replace")  # fmt: skip
    assert "fields:" in message
    assert_error(post_photo(client, steps="4"), 422, "'steps'", "src, seed")


def test_json_nested_too_deep_is_400_and_a_prompt_that_is_not_text_is_422(client, inverted):
    nested = "[" * 100_000 + "]" * 100_000
    deep = json.dumps({"inversion": inverted["inversion"], "tgt": "x", "blend": None}).replace("null", nested)
    for path in ("/edit", "/invert"):
        response = client.post(path, content=deep, headers={"Content-Type": "application/json"})
        assert_error(response, 400, "nested too deep")
    half_pair = json.dumps({"inversion": inverted["inversion"], "tgt": "\ud800 circle"})  # JSON escapes a lone half
    response = client.post("/edit", content=half_pair, headers={"Content-Type": "application/json"})
    assert_error(response, 422, "not UTF-8 text")


@pytest.mark.parametrize("guidance", ["NaN", "Infinity", "-Infinity", '"nan"', "101", "-1", '"x"', "true", "[]"])
def test_bad_guidance_is_422(client, inverted, guidance):
    body = f'{{"inversion": "{inverted["inversion"]}", "tgt": "{YELLOW}", "guidance": {guidance}}}'
    response = client.post("/edit", content=body, headers={"Content-Type": "application/json"})
    assert_error(response, 422, "guidance must be a finite number from 0 to 100")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("tau", 1.5, ["tau must be"]),
        ("cross_replace", "half", ["cross-replace must be"]),
        ("method", "p3p", ["method must be auto, p2p or swap"]),
        ("p2p_mode", "swap", ["p2p_mode must be"]),
        ("unguided_prompt", "both", ["unguided_prompt must be"]),
        ("amplify", ["yellow"], ["WORD=FACTOR"]),
        ("amplify", {"yellow": 1000}, ["amplify must be"]),
        ("amplify_new", float("inf"), ["amplify_new: amplify must be"]),
        ("blend", "dog", ["dog", "in neither prompt"]),
        ("blended_word", "red", ["two words"]),
        ("replace_tail", "sideways", ["replace_tail must be aligned or release"]),
        ("blend_keep", "photo", ["blend_keep must be source or inversion"]),
        ("tgt", "a\nyellow circle", ["newline"]),
        ("tgt", "x" * 1001, ["1,001 characters"]),
    ],
)
def test_bad_settings_are_422(client, inverted, field, value, words):
    body = {"inversion": inverted["inversion"], "tgt": YELLOW, field: value}
    assert_error(post_edit(client, body), 422, *words)


def test_missing_target_source_and_inversion(client, inverted):
    assert_error(post_edit(client, {"inversion": inverted["inversion"]}), 422, "tgt is needed")
    assert_error(post_edit(client, {"inversion": inverted["inversion"], "tgt": "  "}), 422, "tgt is needed")
    assert_error(post_edit(client, {"tgt": YELLOW}), 422, "inversion is needed")
    assert_error(post_photo(client, src=""), 422, "src is needed")
    assert_error(post_edit(client, {"inversion": "0123456789abcdef", "tgt": YELLOW}), 404, "POST /invert")
    assert_error(client.get("/images/0123456789abcdef.png"), 404, "no image")
    assert_error(client.get("/images/../secrets.png"), 404)
    assert_error(client.get("/nowhere"), 404, "GET /api")
    assert_error(client.get("/edit"), 405)
    assert_error(client.post("/edit", content=b"[]", headers={"Content-Type": "application/json"}), 422, "object")
    assert_error(client.post("/edit", data={"tgt": YELLOW}), 415, "application/json")


def test_cross_origin_posts_are_refused(client, inverted):
    body = json.dumps({"inversion": inverted["inversion"], "tgt": YELLOW})
    headers = {"Content-Type": "application/json", "Origin": "https://evil.example"}
    assert_error(client.post("/edit", content=body, headers=headers), 403, "evil.example")
    same = {"Content-Type": "application/json", "Origin": "http://testserver"}
    assert client.post("/edit", content=body, headers=same).status_code == 200


def test_host_check(pipe):
    with TestClient(create_app(pipe, allowed_hosts=("127.0.0.1", "localhost"))) as client:
        assert_error(client.get("/api"), 400, "testserver")
        assert client.get("/api", headers={"Host": "localhost:7860"}).status_code == 200


# --- concurrency and the queue -----------------------------------------------------------------------------------


def test_concurrent_requests_succeed_or_get_the_queue_error(client, inverted):
    statuses: list[int] = []
    errors: list[str] = []

    def one(index: int) -> None:
        if index % 3 == 0:
            response = post_photo(client, seed=str(100 + index))
        else:
            response = post_edit(client, {"inversion": inverted["inversion"], "tgt": f"a circle number {index}"})
        statuses.append(response.status_code)
        if response.status_code != 200:
            errors.append(response.json()["error"])

    threads = [threading.Thread(target=one, args=(index,)) for index in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(statuses) == 9 and set(statuses) <= {200, 503} and 200 in statuses, (statuses, errors)
    assert all(error.startswith("busy") for error in errors)


def test_a_full_queue_is_503_at_once(pipe):
    app = create_app(pipe, limits=Limits(max_queue=0))
    editor = app.state.editor
    with TestClient(app) as client:
        inversion = post_photo(client).json()["inversion"]
        gate = threading.Event()
        editor._worker.submit(gate.wait)  # the model is busy
        first: list = []

        def wait_in_the_queue() -> None:
            first.append(post_edit(client, {"inversion": inversion, "tgt": YELLOW}))

        waiting = threading.Thread(target=wait_in_the_queue)
        waiting.start()
        deadline = time.monotonic() + 30
        while editor.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = post_edit(client, {"inversion": inversion, "tgt": YELLOW})
        gate.set()
        waiting.join()
    assert_error(refused, 503, "busy", "--max-queue 0")
    assert refused.headers["retry-after"] == "1"
    assert first[0].status_code == 200


# --- files ------------------------------------------------------------------------------------------------------


def test_temporary_folder_removed_at_shutdown_and_save_dir(pipe, tmp_path):
    app = create_app(pipe, save_dir=tmp_path)
    with TestClient(app) as client:
        folder = app.state.editor.folder
        inversion = post_photo(client).json()["inversion"]
        result = post_edit(client, {"inversion": inversion, "tgt": YELLOW}).json()
        assert (folder / "images" / f"{result['id']}.png").is_file()
        assert not list((folder / "uploads").iterdir())  # the upload is read and gone
    assert not folder.exists()
    (saved,) = tmp_path.iterdir()
    assert saved.name == f"a-yellow-circle-on-a-blue-background-{result['id']}.png"
    assert json.loads(Image.open(saved).text["icd"]) == result["record"]


def test_a_full_disk_is_507_with_one_log_line(pipe, monkeypatch, caplog):
    from icdcli.serve import engine

    def full(folder, data, name, work_pixels):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "uploads" / "x"))

    monkeypatch.setattr(engine, "read_upload", full)
    with TestClient(create_app(pipe), raise_server_exceptions=False) as client, caplog.at_level("ERROR", "icd"):
        assert_error(post_photo(client), 507, "no space left on the server's disk")
        assert client.get("/api").status_code == 200  # the server goes on
    lines = [record for record in caplog.records if "no space left" in record.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None


def test_large_uploads_stay_in_memory(pipe, monkeypatch):
    """Starlette spools an upload over 1 MB into the system's temporary folder; the server keeps it in memory."""
    import tempfile

    spilled: list = []
    real = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, **k: spilled.append(1) or real(*a, **k))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8))
    photo = io.BytesIO()
    noise.save(photo, format="PNG")
    assert photo.tell() > 1024 * 1024
    with TestClient(create_app(pipe, limits=Limits(max_upload_bytes=4 * 1024 * 1024))) as client:
        response = post_photo(client, photo.getvalue(), name="noise.png")
    assert response.status_code == 200, response.text
    assert (response.json()["width"], response.json()["height"]) == (700, 700)
    assert not spilled


# --- the command --------------------------------------------------------------------------------------------------


def test_command_help_and_missing_extra(monkeypatch):
    from click.testing import CliRunner

    import icdcli.cli.serve as cli_serve

    result = CliRunner().invoke(cli_serve.serve, ["--help"])
    assert result.exit_code == 0 and "--max-upload-mb" in result.output and "127.0.0.1" in result.output
    monkeypatch.setattr(cli_serve, "missing_serve_modules", lambda: ["starlette", "uvicorn"])
    result = CliRunner().invoke(cli_serve.serve, [])
    assert result.exit_code == 1
    assert 'pip install "icd[serve]"' in result.output and 'pip install ".[serve]"' in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_command_port_in_use_is_one_line():
    from click.testing import CliRunner

    from icdcli.cli.serve import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(serve, ["--port", str(port)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output


@pytest.mark.slow
def test_command_serves_then_stops_cleanly(tmp_path):
    """The command itself: the model loaded, the URL printed, the API answering on 127.0.0.1 (and only to its
    names), and after Ctrl-C no temporary folder left."""
    import os
    import queue
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    code = "from icdcli.cli.serve import serve; serve(prog_name='icd serve')"
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", code, "--port", "0", "--backend", "torch", "--device", "cpu"],
                               stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True)
    reader.start()
    try:
        said = ""
        while "http://" not in said:
            said = lines.get(timeout=180)
        url = said.split()[2]
        assert url.startswith("http://127.0.0.1:") and "(model default on torch, cpu" in said
        assert [path.name for path in tmp_path.iterdir() if path.name.startswith("icd-serve-")]
        with urllib.request.urlopen(url + "api", timeout=60) as response:
            assert json.loads(response.read())["model"]["name"] == DEFAULT_NAME
        rebound = urllib.request.Request(url + "api", headers={"Host": "attacker.example"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rebound, timeout=60)
        assert refused.value.code == 400
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    reader.join(timeout=10)
    assert "Traceback" not in "".join(lines.queue)
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith("icd-serve-")]
