"""Cell claims shared by workers on several hosts (koff.core.claims)."""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

from koff.core.claims import Holder, claim, is_stale


def test_a_claim_names_its_holder_and_is_exclusive_while_held(tmp_path):
    lock = tmp_path / "cells" / "x.lock"
    with claim(lock) as mine:
        assert mine
        held = json.loads(lock.read_text())
        assert held["host"] == socket.gethostname() and held["pid"] == os.getpid() and len(held["token"]) == 16
        with claim(lock) as other:  # a live holder (this process) keeps it
            assert other is False
        assert lock.exists()
    assert not lock.exists()


def test_a_dead_local_holder_is_taken_over_at_once(tmp_path):
    lock = tmp_path / "x.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout.strip())  # the claim file of an older koff: a bare PID
    assert is_stale(lock)
    with claim(lock) as mine:
        assert mine
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "token": "t"}))
    with claim(lock) as mine:
        assert mine


def test_another_hosts_claim_holds_while_its_heartbeat_is_fresh(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"host": "node-17", "pid": 1, "token": "abc"}))  # PID 1 is alive here: irrelevant
    with claim(lock, stale_after=600) as mine:
        assert mine is False
    assert json.loads(lock.read_text())["host"] == "node-17"
    old = time.time() - 601
    os.utime(lock, (old, old))  # node-17 died: nobody touched its claim for 10 minutes
    with claim(lock, stale_after=600) as mine:
        assert mine and json.loads(lock.read_text())["host"] == socket.gethostname()


def test_a_file_being_written_is_not_mistaken_for_a_dead_claim(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text("")  # created by O_EXCL, its content not yet written
    assert Holder.read(lock).host == "?" and not is_stale(lock)
    with claim(lock) as mine:
        assert mine is False


def test_the_heartbeat_keeps_a_long_claim_fresh(tmp_path):
    lock = tmp_path / "x.lock"
    with claim(lock, heartbeat=0.05, stale_after=5) as mine:
        assert mine
        old = time.time() - 60
        os.utime(lock, (old, old))
        deadline = time.time() + 30
        while time.time() - lock.stat().st_mtime > 5 and time.time() < deadline:
            time.sleep(0.05)
        assert time.time() - lock.stat().st_mtime < 5, "the heartbeat never touched the claim"
        assert not is_stale(lock, stale_after=5)


def test_a_claim_taken_over_is_not_removed_by_its_former_holder(tmp_path):
    lock = tmp_path / "x.lock"
    with claim(lock, heartbeat=0.05) as mine:
        assert mine
        lock.write_text(json.dumps({"host": "node-3", "pid": 9, "token": "theirs"}))  # we looked dead to node-3
        time.sleep(0.2)
    assert json.loads(lock.read_text())["token"] == "theirs"


def _contend(lock, start, done, results):
    start.wait()
    with claim(lock) as mine:
        results.put(mine)
        done.wait(120)  # the winner holds it until every worker has tried


def test_exactly_one_of_many_workers_takes_over_a_stale_claim(tmp_path):
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"host": "gone", "pid": 1, "token": "old"}))
    old = time.time() - 3600
    os.utime(lock, (old, old))
    ctx = multiprocessing.get_context("fork")
    start, done, results = ctx.Event(), ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_contend, args=(lock, start, done, results)) for _ in range(6)]
    for w in workers:
        w.start()
    start.set()
    wins = [results.get(timeout=120) for _ in workers]
    done.set()
    for w in workers:
        w.join(timeout=120)
    assert sorted(wins) == [False] * 5 + [True]
