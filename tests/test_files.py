"""fox.files: atomic writes, the run-folder lock, and readers that name a damaged file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fox.files import Busy, file_lock, read_json, read_jsonl, write_atomic


def test_a_held_lock_names_its_holder_and_dies_with_it(tmp_path):
    path = tmp_path / "run" / ".train.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; from fox.files import file_lock\n"
                               f"with file_lock({str(path)!r}, owner='the first trainer'):\n"
                               "    print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(Busy, match="is held by the first trainer"), file_lock(path, wait=False):
        pass
    holder.kill()  # SIGKILL: the OS drops the lock, nothing stale is left
    holder.wait()
    with file_lock(path, wait=False, owner="the second"):
        assert path.read_text() == "the second"


def test_damaged_json_is_named(tmp_path):
    path = tmp_path / "eval.json"
    write_atomic(path, json.dumps({"run": "x", "val_loss": 2.5}))
    assert read_json(path)["val_loss"] == 2.5
    path.write_text(path.read_text()[:12])  # cut short
    with pytest.raises(ValueError, match=f"{path}: not valid JSON .*delete it and rerun"):
        read_json(path)


def test_jsonl_drops_a_last_line_cut_short_and_names_damage_elsewhere(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        read_jsonl(path)
