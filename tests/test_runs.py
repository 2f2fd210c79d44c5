import argparse
import errno
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import (RunError, RunLock, claim_run_dir, output_path, parse_device, positive_float, remove_if_only_config,
                  writing)

ROOT = Path(__file__).resolve().parents[1]

# The fewest page faults taken by one of several 64 MB CPU tensors (16,384 pages each), made and freed one
# after another: by default glibc maps every block this large afresh; kept, the heap settles after a few.
PROBE = """
import resource, sys, torch
from runs import keep_freed_host_memory
took = keep_freed_host_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**24)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(took, min(faults[5:]))
"""


def faults_on_reuse(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


def huge_pages_always() -> bool:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return thp.exists() and "[always]" in thp.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc only")
@pytest.mark.skipif(huge_pages_always(), reason="2 MB pages: a fresh block takes too few faults to tell apart")
def test_keep_freed_host_memory_reuses_large_blocks_without_page_faults():
    took, kept = faults_on_reuse("keep")
    assert took == "True"
    _, default = faults_on_reuse("default")
    assert default > 4000, "the default allocator should fault on every page of a fresh 64 MB block"
    assert kept < 1000


# ---------------------------------------------------------------- checks before a run starts


@pytest.mark.parametrize("text", ["nan", "-1", "0", "inf", "-inf", "abc", ""])
def test_positive_float_refuses_in_one_line(text):
    with pytest.raises(argparse.ArgumentTypeError) as err:
        positive_float(text)
    assert str(err.value) == f"must be a positive finite number, not {text}"


def test_positive_float_on_the_command_line(capsys):
    p = argparse.ArgumentParser(prog="driver.py")
    p.add_argument("--lr", type=positive_float)
    assert p.parse_args(["--lr", "2e-3"]).lr == 2e-3
    with pytest.raises(SystemExit):
        p.parse_args(["--lr", "nan"])
    assert capsys.readouterr().err.splitlines()[-1] == \
        "driver.py: error: argument --lr: must be a positive finite number, not nan"


@pytest.mark.parametrize("name", ["tpu", "mps", "meta", "CPU", "cuda:", "cuda:x", "cpu:0", ""])
def test_parse_device_names_the_choices(name):
    with pytest.raises(RunError) as err:
        parse_device(name)
    assert str(err.value) == f"--device {name}: choose auto, cpu, cuda or cuda:N"


def test_parse_device_checks_the_machine(monkeypatch):
    assert parse_device("cpu") == torch.device("cpu")
    assert parse_device("auto").type in ("cpu", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RunError, match="CUDA is not available"):
        parse_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda:1") == torch.device("cuda", 1) and parse_device("cuda") == torch.device("cuda")
    with pytest.raises(RunError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        parse_device("cuda:2")


def test_claim_run_dir_takes_the_next_free_number(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    name = lambda n: f"{n:03d}-quick-builtin"  # noqa: E731
    assert claim_run_dir(root, name) == root / "001-quick-builtin"
    (root / "007-paper-data").mkdir()
    assert claim_run_dir(root, name) == root / "008-quick-builtin"
    # Another run took 009 between our look at the folder and our mkdir: we take 010.
    monkeypatch.setattr("runs.run_numbers", lambda root: [8])
    (root / "009-quick-builtin").mkdir()
    assert claim_run_dir(root, name) == root / "010-quick-builtin"
    assert (root / "010-quick-builtin").is_dir()


def test_claim_run_dir_concurrent_claims_never_share(tmp_path):
    script = "import sys; from runs import claim_run_dir; print(claim_run_dir(sys.argv[1], lambda n: f'{n:03d}-x'))"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "runs")], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE) for _ in range(4)]
    claimed = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert sorted(Path(c).name for c in claimed) == ["001-x", "002-x", "003-x", "004-x"]


def test_claim_run_dir_root_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("x")
    with pytest.raises(RunError, match="runs: not a folder"):
        claim_run_dir(tmp_path / "runs", str)


LOCK_SCRIPT = """
import sys
from runs import RunError, RunLock
try:
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # held until the test closes our stdin
except RunError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def lock_in_a_new_process(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOCK_SCRIPT, str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=120)


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl only")
def test_run_lock_refuses_a_second_process_in_one_line(tmp_path):
    run_dir = tmp_path / "001-quick-builtin"
    run_dir.mkdir()
    first = subprocess.Popen([sys.executable, "-c", LOCK_SCRIPT, str(run_dir)], cwd=ROOT, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert first.stdout.readline().strip() == "locked"
        second = lock_in_a_new_process(run_dir)
        assert second.returncode == 2 and second.stderr.splitlines() == [
            f"error: {run_dir}: another driver.py is using this run folder (pid {first.pid}); "
            "wait for it or choose another --run-dir"]
    finally:
        first.stdin.close()
        first.wait(timeout=60)
    after = lock_in_a_new_process(run_dir)  # released when the first one finished
    assert after.returncode == 0 and after.stdout.strip() == "locked", after.stderr


def test_run_lock_is_released_on_exit_and_a_no_op_without_fcntl(tmp_path, monkeypatch):
    with RunLock(tmp_path):
        with pytest.raises(RunError, match="another driver.py"):  # flock: per open file, so in-process too
            RunLock(tmp_path).__enter__()
    (tmp_path / "other").mkdir()
    with RunLock(tmp_path), RunLock(tmp_path / "other"):  # no error: released, and other folders are free
        pass
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl fails, as on Windows
    with RunLock(tmp_path / "missing"), RunLock(tmp_path / "missing"):
        pass


def test_run_lock_in_a_missing_folder(tmp_path):
    with pytest.raises(RunError, match=r"missing: cannot create \.lock"):
        RunLock(tmp_path / "missing").__enter__()


def test_remove_if_only_config(tmp_path):
    failed = tmp_path / "001-quick-builtin"
    failed.mkdir()
    (failed / "config.json").write_text("{}")
    with RunLock(failed):
        pass
    assert remove_if_only_config(failed) and not failed.exists()
    kept = tmp_path / "002-quick-builtin"
    kept.mkdir()
    (kept / "config.json").write_text("{}")
    (kept / "vqvae_last.pt").write_bytes(b"")
    assert not remove_if_only_config(kept) and (kept / "config.json").exists()
    assert not remove_if_only_config(tmp_path / "never-made")


def test_output_path_problems_are_one_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    assert output_path(tmp_path / "m.json") == tmp_path / "m.json"
    assert output_path(tmp_path / "new_folder", "folder") == tmp_path / "new_folder"
    assert output_path(tmp_path, "folder") == tmp_path
    for path, kind, message in [
        (tmp_path, "file", f"{tmp_path}: is a folder; expected the name of a file to write"),
        (tmp_path / "a_file", "folder", f"{tmp_path / 'a_file'}: is a file; expected a folder to write into"),
        (tmp_path / "nope" / "m.json", "file",
         f"{tmp_path / 'nope' / 'm.json'}: its folder {tmp_path / 'nope'} does not exist; "
         "create it first or choose another path"),
        (tmp_path / "a_file" / "out", "folder",
         f"{tmp_path / 'a_file' / 'out'}: its folder {tmp_path / 'a_file'} is not a folder; "
         "create it first or choose another path"),
    ]:
        with pytest.raises(RunError) as err:
            output_path(path, kind)
        assert str(err.value) == message


def test_writing_turns_os_errors_into_one_line(tmp_path):
    out = tmp_path / "gone" / "m.json"
    with pytest.raises(RunError) as err, writing(out):
        out.write_text("{}")
    assert str(err.value) == f"{out}: cannot write (No such file or directory)"
    with pytest.raises(RunError) as err, writing(tmp_path / "figures"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value) == f"{tmp_path / 'figures'}: cannot write (No space left on device)"


FULL_DISK = """
import resource, signal, sys, torch
from runs import RunError, atomic_save, writing
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, a write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    with writing(sys.argv[1]):
        atomic_save({"w": torch.zeros(10**6)}, sys.argv[1])
except RunError as e:
    print(e)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ")
def test_checkpoint_write_that_runs_out_of_space_is_one_line(tmp_path):
    ckpt = tmp_path / "vqvae_last.pt"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(ckpt)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == f"{ckpt}: cannot write (File too large)", out.stderr
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temp file
