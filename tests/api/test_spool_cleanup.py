"""Removal of upload spool files that crashed uploads leave behind."""

import os
import time

from fedserve.api.uploads import remove_stale_spool_files


def test_stale_spool_files_removed_fresh_kept(tmp_path):
    stale = tmp_path / "stale.upload"
    fresh = tmp_path / "fresh.upload"
    stale.write_bytes(b"half an upload")
    fresh.write_bytes(b"an upload in progress")
    old = time.time() - 7200
    os.utime(stale, (old, old))

    removed = remove_stale_spool_files(str(tmp_path), 3600)

    assert removed == 1
    assert not stale.exists()
    assert fresh.exists()


def test_spool_cleanup_keeps_folders(tmp_path):
    folder = tmp_path / "nested"
    folder.mkdir()
    old = time.time() - 7200
    os.utime(folder, (old, old))

    assert remove_stale_spool_files(str(tmp_path), 3600) == 0
    assert folder.exists()


def test_spool_cleanup_missing_folder(tmp_path):
    assert remove_stale_spool_files(str(tmp_path / "absent"), 0) == 0
