"""Limits a new user hit: a seed too large for 64 bits, and, as a user who is not root, files
and folders the command may not read or write. Each is one line that says what to do.

The permission cases run the command in a forked child that drops to the user nobody (when the
tests run as root, as on the project's machines): root reads and writes everything."""

import importlib
import io
import multiprocessing
import os
import pkgutil
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import pytest

from backprop_ninja.cli import main
from helpers import one_line_error

SMALL = ["--n-hidden", "16", "--no-progress", "--num-samples", "0", "--eval-every", "0",
         "--device", "cpu"]
NOBODY = 65534


def test_a_seed_beyond_64_bits_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    one_line_error(capsys, main(["train", "--seed", "99999999999999999999", "-o", str(out), *SMALL]),
                   "--seed", "64 bits")
    assert not out.exists()
    one_line_error(capsys, main(["sample", "--seed", "99999999999999999999", "-o", str(out)]),
                   "--seed", "64 bits")


def as_other_user(argv: list[str]) -> tuple[int, str]:
    """main(argv) in a child as a user that is not root; its exit code and stderr.

    The child is forked from a fresh single-threaded server (multiprocessing's forkserver), not
    from this process: a fork of a process whose OpenMP threads have run (any earlier test's)
    can deadlock in the child. It imports the whole package while still root (the interpreter's
    own files may be root's alone), then drops to nobody and runs the command."""
    context = multiprocessing.get_context("forkserver")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=run_as_nobody, args=(argv, sorted(sys.modules), send))
    child.start()
    send.close()
    code, err = receive.recv() if receive.poll(300) else (97, "no answer from the child")
    child.join(30)
    return code, err.strip()


def run_as_nobody(argv: list[str], modules: list[str], send) -> None:
    import backprop_ninja

    # what this test process has imported (the stdlib's codecs, torch's lazy parts), and the
    # whole package: after the drop, files under root's home cannot be read to import more
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException:  # a module that only imports in its own context (e.g. __main__)
            pass
    for module in pkgutil.walk_packages(backprop_ninja.__path__, "backprop_ninja."):
        if not module.name.endswith("__main__") and ".templates" not in module.name:
            importlib.import_module(module.name)
    import encodings.utf_32_le  # noqa: F401  (data's fast encoder looks it up by name)
    import torch._dynamo  # noqa: F401  (the meta device's memory estimate imports it lazily)
    from backprop_ninja.cli import main as command

    err, code = io.StringIO(), 99
    sys.stdout, sys.stderr = io.StringIO(), err
    try:
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        code = command(argv)
    except BaseException:
        traceback.print_exc()
    send.send((code if isinstance(code, int) else 98, err.getvalue()))


def assert_one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def shared(tmp_path):
    """A folder every user can reach (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="bpn-perm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def words(path: Path) -> Path:
    path.write_text("\n".join(f"w{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}" for i in range(200)))
    return path


def test_an_unreadable_input_file(shared):
    secret = words(shared / "secret.txt")
    secret.chmod(0o600)
    writable = shared / "w"
    writable.mkdir()
    writable.chmod(0o777)
    rc, err = as_other_user(["train", "-i", str(secret), "-o", str(writable / "run"), *SMALL])
    assert_one_line(rc, err, str(secret), "cannot read", "permission denied")
    assert list(writable.iterdir()) == []  # the failed train took away the folder it made


def test_a_work_directory_in_a_read_only_folder(shared):
    words(shared / "words.txt").chmod(0o644)
    rc, err = as_other_user(["train", "-i", str(shared / "words.txt"), "-o",
                             str(shared / "run"), *SMALL])
    assert_one_line(rc, err, str(shared / "run"), "permission denied", "-o")
    assert not (shared / "run").exists()


def test_resuming_a_run_in_a_read_only_folder(shared, capsys):
    data = words(shared / "words.txt")
    run = shared / "run"
    assert main(["train", "-i", str(data), "-o", str(run), "--steps", "20", *SMALL]) == 0
    capsys.readouterr()
    for path in (data, *run.iterdir()):
        path.chmod(0o644)
    run.chmod(0o755)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    rc, err = as_other_user(["train", "-o", str(run), "--resume", "--steps", "40", *SMALL])
    assert_one_line(rc, err, str(run), "permission denied", "copy")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    rc, err = as_other_user(["eval", "-o", str(run)])  # reading needs no write access
    assert rc == 0, err


def test_a_failed_train_leaves_no_folder_and_no_lock(tmp_path, capsys):
    out = tmp_path / "a" / "run"
    one_line_error(capsys, main(["train", "-i", str(tmp_path / "missing.txt"), "-o", str(out),
                                 *SMALL]), "does not exist")
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    one_line_error(capsys, main(["train", "-i", str(tmp_path / "missing.txt"), "-o",
                                 str(existing), *SMALL]), "does not exist")
    assert existing.is_dir() and list(existing.iterdir()) == []  # the user's folder stays
