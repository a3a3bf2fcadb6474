"""Fetching the default dataset over real HTTP (a loopback server) and verifying it."""

from __future__ import annotations

import functools
import http.server
import tarfile
import threading

import pytest

from flystage import datasets


@pytest.fixture()
def archive_server(tmp_path, bdgp_root):
    """Serves BDGP-like archives from tmp_path over HTTP on loopback; yields a URL maker."""

    def make(name: str, corrupt: str | None = None) -> str:
        with tarfile.open(tmp_path / name, "w:gz") as tar:
            for rel in datasets.bdgp_checksums():
                arcname = f"insitu-tools-{datasets.BDGP_COMMIT}/data/{rel}"
                if rel == corrupt:
                    broken = tmp_path / "broken.bmp"
                    broken.write_bytes(b"BM not really")
                    tar.add(broken, arcname=arcname)
                else:
                    tar.add(bdgp_root / rel, arcname=arcname)
            stray = tmp_path / "README.md"
            stray.write_text("not an image")
            tar.add(stray, arcname=f"insitu-tools-{datasets.BDGP_COMMIT}/README.md")
        return f"http://127.0.0.1:{server.server_port}/{name}"

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield make
    server.shutdown()


def test_checksum_list_covers_the_set():
    sums = datasets.bdgp_checksums()
    assert len(sums) == 193
    assert all(len(d) == 40 for d in sums.values())


def test_env_folder_is_verified(bdgp_root, monkeypatch):
    monkeypatch.setenv("FLYSTAGE_DATA", str(bdgp_root))
    assert datasets.fetch_bdgp() == bdgp_root


def test_env_folder_that_is_incomplete_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYSTAGE_DATA", str(tmp_path))
    with pytest.raises(datasets.DatasetError, match="not a complete BDGP"):
        datasets.fetch_bdgp()


def test_download_extracts_only_listed_images_and_verifies(archive_server, tmp_path, monkeypatch):
    monkeypatch.delenv("FLYSTAGE_DATA", raising=False)
    url = archive_server("good.tar.gz")
    dest = tmp_path / "cache" / "bdgp"
    folder = datasets.fetch_bdgp(dest, url)
    assert folder == dest.resolve()
    assert datasets.verify(folder) == []
    assert not (folder / "README.md").exists()
    # A second call uses the verified cache (the URL is not even reachable now).
    assert datasets.fetch_bdgp(dest, "http://127.0.0.1:9/none.tar.gz") == folder


def test_download_with_a_bad_file_fails_verification(archive_server, tmp_path, monkeypatch):
    monkeypatch.delenv("FLYSTAGE_DATA", raising=False)
    bad = next(iter(datasets.bdgp_checksums()))
    url = archive_server("bad.tar.gz", corrupt=bad)
    with pytest.raises(datasets.DatasetError, match="failed verification"):
        datasets.fetch_bdgp(tmp_path / "cache", url)


def test_unreachable_url_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("FLYSTAGE_DATA", raising=False)
    with pytest.raises(datasets.DatasetError, match="set FLYSTAGE_DATA"):
        datasets.fetch_bdgp(tmp_path / "cache", "http://127.0.0.1:9/none.tar.gz")


def test_never_replaces_a_folder_it_did_not_make(archive_server, tmp_path, monkeypatch):
    monkeypatch.delenv("FLYSTAGE_DATA", raising=False)
    mine = tmp_path / "my-images"
    mine.mkdir()
    (mine / "precious.tif").write_bytes(b"data")
    url = archive_server("good.tar.gz")
    with pytest.raises(datasets.DatasetError, match="not made by flystage"):
        datasets.fetch_bdgp(mine, url)
    assert (mine / "precious.tif").read_bytes() == b"data"
