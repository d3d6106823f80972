"""One run per output directory: a second run fails at once, naming the first one's pid."""

import os
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from gemmaquant.cli import app
from gemmaquant.lock import LOCK_NAME, OutputLocked, hold

HOLDER = "import sys, time; from gemmaquant.lock import hold\nwith hold(sys.argv[1]):\n    print('held', flush=True)\n" \
         "    time.sleep(120)\n"


def test_second_holder_fails_at_once_naming_the_first(tmp_path):
    with hold(tmp_path / "o"):
        t = time.time()
        errors = []

        def second():  # another thread of this process: refused like another process
            try:
                with hold(tmp_path / "o"):
                    pass
            except OutputLocked as e:
                errors.append(str(e))

        thread = threading.Thread(target=second)
        thread.start()
        thread.join()
        assert errors and f"another gemmaquant run is writing to this directory (pid {os.getpid()})" in errors[0]
        assert time.time() - t < 1
        with hold(tmp_path / "o"):  # the same thread again: re-entrant (the CLI around the library call)
            pass
        assert (tmp_path / "o" / LOCK_NAME).exists()  # still held by the outer hold
    assert not (tmp_path / "o" / LOCK_NAME).exists()  # released and removed
    with hold(tmp_path / "o"):  # free again
        pass


def test_lock_left_by_a_killed_run_locks_nothing(tmp_path):
    (tmp_path / LOCK_NAME).write_text("12345\n")  # kill -9 leaves the file; the kernel dropped the lock
    with hold(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_cli_refuses_a_directory_another_process_is_writing(tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t = time.time()
        r = CliRunner().invoke(app, ["quantize", "tiny-moe", "--bits", "4", "--out", str(out)])
        assert r.exit_code == 2 and f"(pid {holder.pid})" in r.output, r.output
        assert time.time() - t < 30  # no quantization started: refused before any work
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()


def test_a_file_in_the_way_is_named(tmp_path):
    from gemmaquant.workflow import UsageError

    (tmp_path / "o").write_text("")
    with pytest.raises(UsageError, match="o: exists and is not a directory"):
        with hold(tmp_path / "o"):
            pass


def test_the_library_call_refuses_a_directory_another_process_is_writing(tmp_path):
    import gemmaquant as gq

    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLocked, match=f"\\(pid {holder.pid}\\)"):
            gq.quantize("tiny-moe", "default/int4-gptq", out=out)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
