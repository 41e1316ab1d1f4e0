"""Hub access through huggingface_hub against the local hub endpoint (HF_ENDPOINT)."""

from __future__ import annotations

import pytest

from indicf5 import hub as hub_lib
from indicf5.hub import HubAccessError, TransientHubError
from tasks.resolve import resolve_revision

REPO = "ai4bharat/IndicF5"


@pytest.fixture()
def local_hub(hub, prefect_api, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    repo = hub.repos[REPO]
    saved = dict(repo.refs), repo.token
    hub.failures.clear()
    hub.requests.clear()
    yield hub
    repo.refs, repo.token = saved
    hub.failures.clear()


def api_calls(hub) -> int:
    return sum(1 for _, path, _ in hub.requests if path.startswith("/api/models/") and "/revision/" in path)


def test_resolve_gives_the_commit_sha_and_the_hubs_hashes(local_hub, snapshot):
    ref = hub_lib.resolve_revision(REPO, "main")
    assert ref.sha == local_hub.repos[REPO].refs["main"]
    assert set(ref.files) == {"model.safetensors", "checkpoints/vocab.txt", "config.json"}
    assert ref.files["model.safetensors"].sha256 == hub_lib.sha256_file(snapshot / "model.safetensors")


def test_download_fetches_exactly_that_sha_and_verifies_it(local_hub, snapshot):
    repo = local_hub.repos[REPO]
    ref = hub_lib.resolve_revision(REPO, "main")
    new = dict(repo.commits[ref.sha], **{"config.json": b'{"changed": true}'})
    repo.add_commit(new)  # main moves on after the build resolved its sha
    path = hub_lib.download_snapshot(ref)
    assert (path / "model.safetensors").read_bytes() == (snapshot / "model.safetensors").read_bytes()
    assert (path / "config.json").read_bytes() == (snapshot / "config.json").read_bytes()
    assert all(ref.sha in p for m, p, _ in local_hub.requests if "/resolve/" in p)
    assert not (path / "reference.wav").exists()  # only the files a build needs


def test_a_corrupt_download_is_removed_and_reported_as_transient(local_hub):
    ref = hub_lib.resolve_revision(REPO, "main")
    ref.files["config.json"].blob_id = "0" * 40  # the hub says another content than it serves
    with pytest.raises(TransientHubError, match="do not match"):
        hub_lib.download_snapshot(ref)


def test_gated_repo_without_token_fails_at_once_with_what_to_do(local_hub):
    local_hub.repos[REPO].token = "hf_gatedTokenValue123"
    with pytest.raises(HubAccessError, match="gated.*HF_TOKEN"):
        resolve_revision(REPO, "main")
    assert api_calls(local_hub) == 1  # not retried


def test_gated_repo_with_token_resolves(local_hub, monkeypatch):
    local_hub.repos[REPO].token = "hf_gatedTokenValue123"
    monkeypatch.setenv("HF_TOKEN", "hf_gatedTokenValue123")
    assert hub_lib.resolve_revision(REPO, "main").sha == local_hub.repos[REPO].refs["main"]


@pytest.mark.parametrize(
    "repo_id,revision,message",
    [
        (REPO, "no-such-branch", "revision 'no-such-branch' not found"),
        ("someone/missing", "main", "not found, or private"),
    ],
)
def test_missing_repo_or_revision_fails_at_once(local_hub, repo_id, revision, message):
    with pytest.raises(HubAccessError, match=message):
        resolve_revision(repo_id, revision)
    assert api_calls(local_hub) == 1


def test_forbidden_fails_at_once(local_hub):
    local_hub.failures.append(403)
    with pytest.raises(HubAccessError, match="refused \\(403\\).*HF_TOKEN"):
        resolve_revision(REPO, "main")
    assert api_calls(local_hub) == 1


def test_server_error_then_success_is_retried(local_hub):
    local_hub.failures.append(500)
    assert resolve_revision(REPO, "main").sha == local_hub.repos[REPO].refs["main"]
    assert api_calls(local_hub) == 2


def test_unreachable_hub_is_transient(monkeypatch):
    from huggingface_hub import constants

    with socket_closed() as url:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        with pytest.raises(TransientHubError, match="cannot reach the hub"):
            hub_lib.resolve_revision(REPO, "main")


def test_an_unreachable_hub_fails_after_the_retries_with_a_final_message(prefect_api, monkeypatch):
    from huggingface_hub import constants

    with socket_closed() as url:
        monkeypatch.setattr(constants, "ENDPOINT", url)
        with pytest.raises(TransientHubError) as failed:
            resolve_revision.with_options(retry_delay_seconds=0)(REPO, "main")
    message = str(failed.value)
    assert "cannot reach the hub" in message and "gave up after 4 attempts" in message
    assert "will retry" not in message


def socket_closed():
    """A loopback address where nothing listens."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def closed():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        yield f"http://127.0.0.1:{port}"

    return closed()
