"""The server against hostile and careless clients: a real `indicf5 serve` (uvicorn) on loopback,
real HTTP clients. Each case asserts the answer (status, message, the error envelope), that the
next good request still succeeds, and, where memory is the point, the server's peak RSS growth."""

from __future__ import annotations

import json
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from indicf5.backends import engine_from_checkpoint
from indicf5.serve.process import free_port
from test_serve import TEXT, Server

KEY = "test-key-1234"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def engine(snapshot, tmp_path_factory) -> Path:
    return engine_from_checkpoint(snapshot, tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def wav(snapshot) -> bytes:
    return (snapshot / "reference.wav").read_bytes()


def add_voice(url: str, name: str, audio: bytes, filename: str = "r.wav", headers=AUTH) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/voices",
        data={"name": name, "ref_text": "नमस्ते"},
        files={"audio": (filename, audio)},
        headers=headers,
        timeout=60,
    )


@pytest.fixture(scope="module")
def server(engine, wav, tmp_path_factory):
    """Keyed (TTS_API_KEY): every request here sends the key unless the test is about it."""
    with Server(engine, tmp_path_factory.mktemp("home"), "--max-batch", "8", env={"TTS_API_KEY": KEY}) as server:
        assert add_voice(server.url, "test", wav).status_code == 201
        yield server


def speech(server, headers=AUTH, **body) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/audio/speech",
        json={"input": TEXT, "voice": "test", "seed": 5, **body},
        headers=headers,
        timeout=120,
    )


def still_serving(server) -> None:
    r = speech(server)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav", r.text


def error_of(r: httpx.Response, status: int) -> str:
    """The documented envelope {"error": {"message", "type", "code"}}; its message."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["type"] and error["message"]
    return error["message"]


def peak_rss_kb(server) -> int:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


# --- seeds


def test_a_seed_out_of_range_is_422_and_its_batch_mates_succeed(server):
    with ThreadPoolExecutor(8) as pool:
        seeds = [2**70 if i == 3 else 5 for i in range(8)]
        responses = list(pool.map(lambda seed: speech(server, seed=seed), seeds))
    assert [r.status_code for r in responses] == [422 if s == 2**70 else 200 for s in seeds]
    assert "seed" in error_of(responses[3], 422)
    assert "seed" in error_of(speech(server, seed=-1), 422)
    assert speech(server, seed=2**63 - 1).status_code == 200
    form = httpx.post(
        f"{server.url}/v1/synthesize",
        headers=AUTH,
        data={"text": TEXT, "ref_text": "नमस्ते", "seed": str(2**64)},
        files={"ref_audio": ("r.wav", b"RIFF")},
    )
    assert "seed" in error_of(form, 422)


# --- memory and body limits


def long_silent_flac(path: Path, minutes: int = 30, rate: int = 48_000) -> Path:
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(minutes):
            f.write(np.zeros(60 * rate, dtype=np.int16))
    return path


def test_a_small_upload_of_a_long_clip_is_refused_from_its_header(server, tmp_path):
    flac = long_silent_flac(tmp_path / "long.flac").read_bytes()
    assert len(flac) < 2 * 2**20  # small on the wire, 30 minutes of audio
    before = peak_rss_kb(server)
    message = error_of(add_voice(server.url, "long", flac, "long.flac"), 413)
    assert "1800.0 s" in message and "60 s" in message
    by_upload = httpx.post(
        f"{server.url}/v1/synthesize",
        headers=AUTH,
        data={"text": TEXT, "ref_text": "नमस्ते"},
        files={"ref_audio": ("long.flac", flac)},
        timeout=60,
    )
    assert "60 s" in error_of(by_upload, 413)
    growth_mb = (peak_rss_kb(server) - before) / 1024
    assert growth_mb < 50, f"the server's peak RSS grew by {growth_mb:.0f} MB"
    assert "long" not in [v["name"] for v in httpx.get(f"{server.url}/v1/voices", headers=AUTH).json()]
    still_serving(server)


def chunked_post(server, path: str, content_type: str, head: bytes, total: int) -> tuple[int, dict, int]:
    """POSTs `head` then zeros, chunked, up to `total` bytes, 1 MB a chunk, over a raw socket, and stops
    sending when the answer arrives: (status, JSON body, bytes sent by then)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    with sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )
        sent, chunk = 0, head
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
            chunk = bytes(2**20)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        head_part, body = answer.split(b"\r\n\r\n", 1)
        headers = dict(line.lower().split(b": ", 1) for line in head_part.split(b"\r\n")[1:])
        length = int(headers[b"content-length"])
        while len(body) < length:
            body += sock.recv(65536)
    return int(head_part.split()[1]), json.loads(body), sent


@pytest.mark.parametrize("route", ["json", "multipart"])
def test_a_chunked_body_is_refused_once_it_passes_the_limit(server, route):
    before = peak_rss_kb(server)
    if route == "json":
        status, body, sent = chunked_post(
            server, "/v1/audio/speech", "application/json", b'{"input": "' + b"a" * 100, 200 * 2**20
        )
    else:
        head = (
            b'--xx\r\nContent-Disposition: form-data; name="audio"; filename="r.wav"\r\nContent-Type: audio/wav\r\n\r\n'
        )
        status, body, sent = chunked_post(server, "/v1/voices", "multipart/form-data; boundary=xx", head, 200 * 2**20)
    assert status == 413 and body["error"]["code"] == 413 and "the limit is" in body["error"]["message"]
    assert sent < 60 * 2**20, f"the answer came after {sent >> 20} MB of a body over the 10 MB limit"
    growth_mb = (peak_rss_kb(server) - before) / 1024
    assert growth_mb < 60, f"the server's peak RSS grew by {growth_mb:.0f} MB"
    still_serving(server)


# --- voices


def test_concurrent_adds_of_one_name_give_exactly_one_201(server, wav):
    with ThreadPoolExecutor(10) as pool:
        codes = sorted(pool.map(lambda _: add_voice(server.url, "race", wav).status_code, range(10)))
    assert codes == [201] + [409] * 9
    assert [v["name"] for v in httpx.get(f"{server.url}/v1/voices", headers=AUTH).json()].count("race") == 1
    assert httpx.delete(f"{server.url}/v1/voices/race", headers=AUTH).status_code == 204


@pytest.mark.parametrize("filename", ["..", "x" * 300 + ".wav", "../../etc/passwd", "."])
def test_any_upload_file_name_is_taken(server, wav, filename):
    r = add_voice(server.url, "named", wav, filename)
    assert r.status_code == 201, r.text
    assert httpx.delete(f"{server.url}/v1/voices/named", headers=AUTH).status_code == 204
    by_upload = httpx.post(
        f"{server.url}/v1/synthesize",
        headers=AUTH,
        data={"text": TEXT, "ref_text": "नमस्ते", "seed": "5"},
        files={"ref_audio": (filename, wav)},
        timeout=120,
    )
    assert by_upload.status_code == 200, by_upload.text


def test_a_voice_name_with_a_trailing_newline_is_refused(server, wav):
    assert "bad voice name" in error_of(add_voice(server.url, "nl\n", wav), 400)
    assert "nl" not in [v["name"] for v in httpx.get(f"{server.url}/v1/voices", headers=AUTH).json()]


def test_errors_name_the_upload_never_a_temporary_path(server):
    r = httpx.post(
        f"{server.url}/v1/synthesize",
        headers=AUTH,
        data={"text": TEXT, "ref_text": "नमस्ते"},
        files={"ref_audio": ("mine.wav", b"not audio at all" * 100)},
    )
    message = error_of(r, 400)
    assert "mine.wav" in message and tempfile.gettempdir() not in message and "upload" not in message
    still_serving(server)


# --- the protocol's edges answer the documented envelope


def test_media_types_are_case_insensitive(server):
    r = httpx.post(
        f"{server.url}/v1/audio/speech",
        content=json.dumps({"input": TEXT, "voice": "test", "seed": 5}),
        headers={**AUTH, "content-type": "Application/JSON"},
        timeout=120,
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("case", ["404", "405", "invalid utf-8", "deep json", "not json"])
def test_protocol_errors_answer_the_error_envelope(server, case):
    url = f"{server.url}/v1/audio/speech"
    json_type = {**AUTH, "content-type": "application/json"}
    post = lambda body: httpx.post(url, content=body, headers=json_type)
    r, status = {
        "404": lambda: (httpx.get(f"{server.url}/nowhere", headers=AUTH), 404),
        "405": lambda: (httpx.get(url, headers=AUTH), 405),
        "invalid utf-8": lambda: (post(b'{"input": "\xff\xfe", "voice": "test"}'), 400),
        "deep json": lambda: (post(b"[" * 100_000 + b"]" * 100_000), 400),
        "not json": lambda: (post(b"{nope"), 422),
    }[case]()
    error_of(r, status)
    still_serving(server)


def test_docs_render_from_local_assets(server, tmp_path):
    page = httpx.get(f"{server.url}/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and not [a for a in assets if a.startswith(("http:", "https:", "//"))], assets
    for asset in assets:
        assert httpx.get(f"{server.url}{asset}").status_code == 200, asset
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium to render the page")
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            f"{server.url}/docs",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "IndicF5 TTS" in dom and "/v1/audio/speech" in dom  # Swagger UI ran and drew the API


# --- the API key


def test_the_api_key_guards_every_route_but_probes_and_docs(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = speech(server, headers=headers)
        assert "TTS_API_KEY" in error_of(r, 401) and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{server.url}/v1/voices", headers=headers).status_code == 401
        assert httpx.delete(f"{server.url}/v1/voices/test", headers=headers).status_code == 401
        assert httpx.get(f"{server.url}/metrics", headers=headers).status_code == 401
    for open_route in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert httpx.get(f"{server.url}{open_route}").status_code == 200, open_route
    assert httpx.get(f"{server.url}/metrics", headers=AUTH).status_code == 200
    still_serving(server)


# --- quotas


def test_voice_count_and_disk_quotas_answer_507(engine, wav, tmp_path):
    long_clip = np.random.default_rng(0).uniform(-0.3, 0.3, 24_000 * 10).astype(np.float32)
    path = tmp_path / "long.wav"
    sf.write(path, long_clip, 24_000, subtype="PCM_16")
    env = {"TTS_MAX_VOICES": "3", "TTS_MAX_VOICES_BYTES": str(3 * len(wav) + 8192)}
    with Server(engine, tmp_path / "home", env=env) as server:
        assert add_voice(server.url, "a", wav, headers={}).status_code == 201
        assert add_voice(server.url, "b", wav, headers={}).status_code == 201
        assert "TTS_MAX_VOICES_BYTES" in error_of(add_voice(server.url, "big", path.read_bytes(), headers={}), 507)
        assert add_voice(server.url, "c", wav, headers={}).status_code == 201
        assert "TTS_MAX_VOICES" in error_of(add_voice(server.url, "d", wav, headers={}), 507)
        assert httpx.delete(f"{server.url}/v1/voices/a").status_code == 204
        assert add_voice(server.url, "d", wav, headers={}).status_code == 201
        assert {v["name"] for v in httpx.get(f"{server.url}/v1/voices").json()} == {"b", "c", "d"}


# --- starting the server


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "indicf5.cli", "serve", *args], capture_output=True, text=True, timeout=180
    )


def test_serve_on_a_port_in_use_exits_2_with_one_line(engine):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        r = serve("--engine", str(engine), "--port", str(port))
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"indicf5 serve: cannot listen on 127.0.0.1:{port}") and "--port" in last
    assert "Traceback" not in r.stderr and "terminate called" not in r.stderr


def test_serve_on_a_corrupt_engine_exits_with_the_reason(engine, tmp_path):
    corrupt = tmp_path / "engine"
    shutil.copytree(engine, corrupt)
    weights = next(p for p in corrupt.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:1000])
    start = time.monotonic()
    r = serve("--engine", str(corrupt), "--port", str(free_port()), "--voices-dir", str(tmp_path / "voices"))
    assert r.returncode == 1, r.stderr  # a failure, not bad input: the backend's loader reads the weights
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"indicf5 serve: the engine {corrupt} failed to load: SafetensorError"), last
    assert time.monotonic() - start < 120


def test_serve_warns_when_it_binds_beyond_loopback_without_a_key(engine, tmp_path):
    with Server(engine, tmp_path / "home", "--host", "0.0.0.0") as server:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    log = server.log.read_text()
    assert "warning: serving on 0.0.0.0 without an API key" in log and "TTS_API_KEY" in log
