"""Tests for `dalle_flax.testing.LocalHubServer` and the `local_hub` fixture, using the real clients.

Example: ``python -m pytest tests/unit/test_hub_server.py -q``
"""

from __future__ import annotations

import json
import logging
import os
import random
import urllib.error
import urllib.request
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
  EntryNotFoundError,
  HfHubHTTPError,
  LocalEntryNotFoundError,
  OfflineModeIsEnabled,
  RepositoryNotFoundError,
  RevisionNotFoundError,
)

from dalle_flax.testing import LocalHubServer

BIG_SIZE = 3 * 1024 * 1024 + 17  # ~3 MB, not a multiple of any chunk size


def _make_folder(root: Path) -> dict[str, bytes]:
  files = {
    "config.json": b'{"version": 1}',
    "tokenizer/vocab.json": b'{"a": 0, "b": 1}',
    "tokenizer/nested/deeper/merges.txt": b"#version: 0.2\na b\n",
    "flax_model.msgpack": random.Random(0).randbytes(BIG_SIZE),
  }
  for rel, data in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
  return files


def _raw_request(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
  request = urllib.request.Request(url, method=method)
  try:
    with urllib.request.urlopen(request) as response:
      return response.status, dict(response.headers), response.read()
  except urllib.error.HTTPError as err:
    return err.code, dict(err.headers), err.read()


def test_fixture_patches_hub_constants(local_hub):
  assert local_hub.endpoint.startswith("http://127.0.0.1:")
  assert constants.ENDPOINT == local_hub.endpoint
  assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(local_hub.endpoint + "/")
  assert Path(constants.HF_HUB_CACHE) == local_hub.cache_dir
  assert huggingface_hub.hf_api.api.endpoint == local_hub.endpoint
  assert os.environ["HF_ENDPOINT"] == local_hub.endpoint
  assert os.environ["HF_TOKEN"] == local_hub.token
  assert constants.is_offline_mode() is False
  assert local_hub.api.whoami()["name"] == local_hub.username


def test_create_repo_exist_ok_and_default_namespace(local_hub):
  url = local_hub.api.create_repo("alice/tiny")
  assert url.repo_id == "alice/tiny"
  assert url.endpoint == local_hub.endpoint

  with pytest.raises(HfHubHTTPError) as excinfo:
    local_hub.api.create_repo("alice/tiny")
  assert excinfo.value.response.status_code == 409
  assert local_hub.api.create_repo("alice/tiny", exist_ok=True).repo_id == "alice/tiny"

  # No namespace: the server uses the authenticated user's, like the Hub.
  assert HfApi().create_repo("bare").repo_id == f"{local_hub.username}/bare"

  assert local_hub.api.repo_exists("alice/tiny")
  assert not local_hub.api.repo_exists("alice/missing")
  # A new repo has an initial commit, like on the Hub.
  info = local_hub.api.model_info("alice/tiny")
  assert len(info.sha) == 40
  assert [s.rfilename for s in info.siblings] == [".gitattributes"]


def test_upload_folder_then_download_by_branch_and_by_sha(local_hub, tmp_path):
  repo_id = "alice/model"
  files = _make_folder(tmp_path / "folder")
  local_hub.api.create_repo(repo_id)
  first = local_hub.api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "folder")
  assert len(first.oid) == 40
  for rel, data in files.items():
    assert Path(hf_hub_download(repo_id, rel)).read_bytes() == data

  second = local_hub.api.upload_file(path_or_fileobj=b'{"version": 2}', path_in_repo="config.json",
                                     repo_id=repo_id)
  assert second.oid != first.oid
  assert Path(hf_hub_download(repo_id, "config.json")).read_bytes() == b'{"version": 2}'
  assert Path(hf_hub_download(repo_id, "config.json", revision=second.oid)).read_bytes() == b'{"version": 2}'
  assert Path(hf_hub_download(repo_id, "config.json", revision=first.oid)).read_bytes() == b'{"version": 1}'

  # Resolve headers are what huggingface_hub relies on.
  meta = huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo_id, "flax_model.msgpack"))
  assert meta.commit_hash == second.oid
  assert meta.size == BIG_SIZE
  assert meta.etag and len(meta.etag) == 40

  info = local_hub.api.model_info(repo_id, files_metadata=True)
  assert info.sha == second.oid
  sizes = {s.rfilename: s.size for s in info.siblings}
  assert sizes == {".gitattributes": sizes[".gitattributes"], **{k: len(v) for k, v in files.items()}} | {
    "config.json": len(b'{"version": 2}')
  }
  assert local_hub.api.model_info(repo_id, revision=first.oid).sha == first.oid

  assert sorted(local_hub.api.list_repo_files(repo_id)) == sorted([".gitattributes", *files])
  tree = list(local_hub.api.list_repo_tree(repo_id, recursive=True))
  assert {e.path for e in tree} >= {"tokenizer", "tokenizer/nested", "tokenizer/nested/deeper"}
  top = {e.path: type(e).__name__ for e in local_hub.api.list_repo_tree(repo_id)}
  assert top == {
    ".gitattributes": "RepoFile",
    "config.json": "RepoFile",
    "flax_model.msgpack": "RepoFile",
    "tokenizer": "RepoFolder",
  }
  sub = [e.path for e in local_hub.api.list_repo_tree(repo_id, path_in_repo="tokenizer/nested")]
  assert sub == ["tokenizer/nested/deeper"]
  paths = local_hub.api.get_paths_info(repo_id, ["config.json", "tokenizer", "nope.json"])
  assert [(type(e).__name__, e.path) for e in paths] == [("RepoFile", "config.json"),
                                                         ("RepoFolder", "tokenizer")]
  assert local_hub.api.file_exists(repo_id, "tokenizer/vocab.json")
  assert not local_hub.api.file_exists(repo_id, "nope.json")


def test_unchanged_files_are_skipped_and_deletions_apply(local_hub, tmp_path):
  repo_id = "alice/dedup"
  files = _make_folder(tmp_path / "folder")
  local_hub.api.create_repo(repo_id)
  first = local_hub.api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "folder")
  # Preupload reports the remote oid of existing files: re-uploading the same folder commits nothing.
  again = local_hub.api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "folder")
  assert again.oid == first.oid

  local_hub.api.delete_file("config.json", repo_id=repo_id)
  local_hub.api.delete_folder("tokenizer", repo_id=repo_id)
  assert local_hub.api.list_repo_files(repo_id) == [".gitattributes", "flax_model.msgpack"]
  assert set(local_hub.api.list_repo_files(repo_id, revision=first.oid)) == {".gitattributes", *files}


def test_upload_folder_without_xet_uses_single_commit_path(local_hub, tmp_path, monkeypatch):
  # Without hf_xet, upload_folder goes through create_commit (and validate-yaml for README.md).
  monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
  folder = tmp_path / "folder"
  files = _make_folder(folder)
  (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Tiny\n")
  local_hub.api.create_repo("alice/no-xet")
  info = local_hub.api.upload_folder(repo_id="alice/no-xet", folder_path=folder)
  assert sorted(local_hub.api.list_repo_files("alice/no-xet", revision=info.oid)) == sorted(
    [".gitattributes", "README.md", *files]
  )
  assert Path(hf_hub_download("alice/no-xet", "flax_model.msgpack")).read_bytes() == files["flax_model.msgpack"]


def test_patch_hub_environment_is_undone(tmp_path):
  from dalle_flax.testing.pytest_plugin import patch_hub_environment, set_hub_offline

  before = (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, huggingface_hub.hf_api.api.endpoint)
  with LocalHubServer() as server, pytest.MonkeyPatch.context() as mp:
    patch_hub_environment(mp, endpoint=server.endpoint, hf_home=tmp_path / "home")
    set_hub_offline(mp, True)
    assert constants.is_offline_mode()
    set_hub_offline(mp, False)
    HfApi().create_repo("solo/repo")
    assert Path(hf_hub_download("solo/repo", ".gitattributes")).is_relative_to(tmp_path / "home" / "hub")
  after = (constants.ENDPOINT, constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE, huggingface_hub.hf_api.api.endpoint)
  assert after == before


def test_snapshot_download_by_branch_sha_and_patterns(local_hub, tmp_path):
  repo_id = "alice/snap"
  files = _make_folder(tmp_path / "folder")
  local_hub.api.create_repo(repo_id)
  first = local_hub.api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "folder")
  local_hub.api.upload_file(path_or_fileobj=b"new", path_in_repo="extra.txt", repo_id=repo_id)

  folder = Path(snapshot_download(repo_id))
  got = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
  assert got == {".gitattributes", "extra.txt", *files}
  assert (folder / "tokenizer/nested/deeper/merges.txt").read_bytes() == files["tokenizer/nested/deeper/merges.txt"]
  assert folder.is_relative_to(local_hub.cache_dir)

  old = Path(snapshot_download(repo_id, revision=first.oid))
  assert old.name == first.oid
  assert not (old / "extra.txt").exists()

  only_json = Path(snapshot_download(repo_id, allow_patterns=["*.json"], local_dir=tmp_path / "json_only"))
  got = {p.relative_to(only_json).as_posix() for p in only_json.rglob("*") if p.is_file() and ".cache" not in p.parts}
  assert got == {"config.json", "tokenizer/vocab.json"}


def test_cache_reuse_then_offline_mode(local_hub, tmp_path):
  repo_id = "alice/offline"
  _make_folder(tmp_path / "folder")
  local_hub.api.create_repo(repo_id)
  local_hub.api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "folder")

  path = hf_hub_download(repo_id, "config.json")
  snapshot = snapshot_download(repo_id)
  assert hf_hub_download(repo_id, "config.json") == path

  with local_hub.offline():
    assert constants.is_offline_mode()
    assert hf_hub_download(repo_id, "config.json") == path
    assert snapshot_download(repo_id) == snapshot
    with pytest.raises(LocalEntryNotFoundError):
      hf_hub_download(repo_id, "never_downloaded.txt")
    with pytest.raises(OfflineModeIsEnabled):
      local_hub.api.model_info(repo_id)
  assert not constants.is_offline_mode()
  assert local_hub.api.model_info(repo_id).sha


def test_error_mapping(local_hub):
  repo_id = "alice/errors"
  local_hub.api.create_repo(repo_id)

  with pytest.raises(EntryNotFoundError):
    hf_hub_download(repo_id, "missing.bin")
  with pytest.raises(RepositoryNotFoundError):
    hf_hub_download("alice/does-not-exist", "config.json")
  with pytest.raises(RevisionNotFoundError):
    hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")
  with pytest.raises(RevisionNotFoundError):
    hf_hub_download(repo_id, ".gitattributes", revision="0" * 40)
  with pytest.raises(RepositoryNotFoundError):
    local_hub.api.model_info("alice/does-not-exist")
  with pytest.raises(RevisionNotFoundError):
    local_hub.api.model_info(repo_id, revision="nope")
  with pytest.raises(RepositoryNotFoundError):
    snapshot_download("alice/does-not-exist")
  with pytest.raises(RevisionNotFoundError):
    snapshot_download(repo_id, revision="nope")
  with pytest.raises(EntryNotFoundError):
    list(local_hub.api.list_repo_tree(repo_id, path_in_repo="no/such/folder"))

  # Raw protocol: Hub error headers, and X-Repo-Commit on EntryNotFound so clients cache the miss.
  status, headers, _ = _raw_request(f"{local_hub.endpoint}/{repo_id}/resolve/main/missing.bin", "HEAD")
  assert (status, headers["X-Error-Code"]) == (404, "EntryNotFound")
  assert len(headers["X-Repo-Commit"]) == 40
  status, headers, _ = _raw_request(f"{local_hub.endpoint}/alice/nope/resolve/main/x")
  assert (status, headers["X-Error-Code"]) == (404, "RepoNotFound")


def test_branches(local_hub):
  repo_id = "alice/branches"
  api = local_hub.api
  api.create_repo(repo_id)
  base = api.upload_file(path_or_fileobj=b"main-1", path_in_repo="f.txt", repo_id=repo_id)

  api.create_branch(repo_id, branch="dev")
  api.create_branch(repo_id, branch="dev", exist_ok=True)
  with pytest.raises(HfHubHTTPError) as excinfo:
    api.create_branch(repo_id, branch="dev")
  assert excinfo.value.response.status_code == 409
  api.upload_file(path_or_fileobj=b"main-2", path_in_repo="f.txt", repo_id=repo_id)
  api.create_branch(repo_id, branch="feature/x", revision=base.oid)
  assert api.model_info(repo_id, revision="feature/x").sha == base.oid

  dev = api.upload_file(path_or_fileobj=b"dev-1", path_in_repo="g.txt", repo_id=repo_id, revision="dev")
  feat = api.upload_file(path_or_fileobj=b"feat", path_in_repo="f.txt", repo_id=repo_id, revision="feature/x")
  assert Path(hf_hub_download(repo_id, "f.txt")).read_bytes() == b"main-2"
  assert Path(hf_hub_download(repo_id, "f.txt", revision="dev")).read_bytes() == b"main-1"
  assert Path(hf_hub_download(repo_id, "g.txt", revision="dev")).read_bytes() == b"dev-1"
  assert Path(hf_hub_download(repo_id, "f.txt", revision="feature/x")).read_bytes() == b"feat"
  assert api.model_info(repo_id, revision="refs/heads/dev").sha == dev.oid
  assert api.model_info(repo_id, revision="feature/x").sha == feat.oid
  assert api.list_repo_files(repo_id) == [".gitattributes", "f.txt"]
  with pytest.raises(RevisionNotFoundError):
    api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, revision=base.oid)


def test_create_pr_commit(local_hub):
  repo_id = "alice/pr"
  local_hub.api.create_repo(repo_id)
  info = local_hub.api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, create_pr=True)
  assert info.pr_revision == "refs/pr/1"
  assert Path(hf_hub_download(repo_id, "x.txt", revision="refs/pr/1")).read_bytes() == b"x"
  assert local_hub.api.list_repo_files(repo_id) == [".gitattributes"]
  second = local_hub.api.upload_file(path_or_fileobj=b"y", path_in_repo="y.txt", repo_id=repo_id, create_pr=True)
  assert second.pr_revision == "refs/pr/2"
  assert local_hub.api.list_repo_files(repo_id, revision="refs/pr/2") == [".gitattributes", "y.txt"]


def test_transformers_push_to_hub_round_trip(local_hub):
  transformers = pytest.importorskip("transformers")
  config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11)
  config.push_to_hub("alice/tiny-gpt2")  # no endpoint, no token argument

  loaded = transformers.AutoConfig.from_pretrained("alice/tiny-gpt2")
  assert type(loaded).__name__ == "GPT2Config"
  assert (loaded.n_layer, loaded.n_embd, loaded.vocab_size) == (1, 8, 11)
  files = local_hub.api.list_repo_files("alice/tiny-gpt2")
  assert {"config.json", "README.md"} <= set(files)
  readme = Path(hf_hub_download("alice/tiny-gpt2", "README.md")).read_text()
  assert "library_name: transformers" in readme

  # Second push onto a branch (transformers creates it) keeps main intact.
  config.n_layer = 2
  config.push_to_hub("alice/tiny-gpt2", revision="v2")
  assert transformers.AutoConfig.from_pretrained("alice/tiny-gpt2", revision="v2").n_layer == 2
  assert transformers.AutoConfig.from_pretrained("alice/tiny-gpt2").n_layer == 1

  with local_hub.offline():  # transformers honours the in-process offline switch, served from cache
    assert transformers.AutoConfig.from_pretrained("alice/tiny-gpt2").n_layer == 1


def test_unknown_routes_are_404_json_and_logged(local_hub, caplog):
  with caplog.at_level(logging.WARNING, logger="dalle_flax.testing.hub_server"):
    status, headers, body = _raw_request(f"{local_hub.endpoint}/api/not-a-real-endpoint")
  assert status == 404
  assert headers["Content-Type"].startswith("application/json")
  assert "not-a-real-endpoint" in json.loads(body)["error"]
  assert "no route" in caplog.text


def test_stop_refuses_clients_and_removes_the_temporary_root():
  with LocalHubServer() as server:
    api = HfApi(endpoint=server.endpoint, token="anything")
    api.create_repo("solo/x")
    assert api.model_info("solo/x").sha  # the client now holds a pooled connection
    root = server.root
    assert (root / "blobs").is_dir()
  assert not root.exists()
  with pytest.raises(Exception, match="Connection refused"):
    api.model_info("solo/x")
