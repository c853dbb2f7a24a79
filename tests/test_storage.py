"""Run directories on Cloud Storage (lm.storage), against a local emulator the tests start.

gs:// goes through etils.epath + gcsfs (small files), Orbax + tensorstore (checkpoints) and
tensorboardX (events), each pointed at tests/gcs_emulator.py on 127.0.0.1. A run trained there,
SIGKILLed and resumed logs exactly the losses of the same run on a local disk, evaluates to the
same figures and exports the same weights; two processes write each small file once and each
its own checkpoint shards. Bad run directories are one line and write nothing.
"""

from __future__ import annotations

import http.server
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from lm import storage
from lm.errors import LMError

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "lm-test"
TIMEOUT_S = 180


def storage_env(endpoint: str) -> dict[str, str]:
    """The environment that points every Cloud Storage client at `endpoint`, and keeps each
    credential lookup on this machine."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "STORAGE_EMULATOR_HOST": endpoint,  # gcsfs, google-cloud-storage (tensorboardX)
            "TENSORSTORE_GCS_HTTP_URL": endpoint,  # tensorstore (Orbax)
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
            "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: anonymous, as without credentials
            "GCE_METADATA_HOST": "127.0.0.1:1", "GCE_METADATA_IP": "127.0.0.1:1",  # google-auth's probes
            "GCE_METADATA_ROOT": "127.0.0.1:1", "NO_GCE_CHECK": "true",
            "EPATH_USE_TF": "false"}  # etils: gcsfs even where TensorFlow is installed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """tests/gcs_emulator.py on a free port with the bucket lm-test; yields its URL."""
    port, log = free_port(), tmp_path_factory.mktemp("emulator") / "emulator.log"
    with log.open("w") as out:  # a file, not a pipe nobody reads: a full pipe would stop the server
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "gcs_emulator.py"), str(port), BUCKET],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/", timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the storage emulator did not start"
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def object_names(url: str, prefix: str) -> list[str]:
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?{query}") as r:
        return [item["name"] for item in json.load(r).get("items", [])]


def read_object(url: str, name: str) -> str:
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media") as r:
        return r.read().decode()


def lm_command(argv: list[str], env: dict[str, str], cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def assert_one_line_error(result: subprocess.CompletedProcess, phrase: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert phrase in result.stderr, result.stderr


# -- Bad run directories: one line, nothing written (not even a local `gs:` folder).

NO_GCSFS = ("import os, runpy, sys; sys.modules['gcsfs'] = None; sys.argv = sys.argv[1:]; "
            "sys.path.insert(0, os.path.dirname(sys.argv[0])); runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.parametrize("run_dir, phrase, without_gcsfs", [
    ("", "run_dir is empty; set it to a directory", False),
    ("s3://bucket/run", "is on s3://, which lm does not store to", False),
    ("gs:///run", "names no bucket", False),
    ("gs://lm-test/run", "needs the 'gcsfs' package; install the gcs extra with pip install -e '.[gcs]'", True),
])
def test_bad_run_dirs_are_one_line_and_write_nothing(run_dir, phrase, without_gcsfs, tmp_path):
    argv = [str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.yaml"), f"run_dir={run_dir}"]
    result = lm_command(["-c", NO_GCSFS, *argv] if without_gcsfs else argv, {**os.environ, "JAX_PLATFORMS": "cpu"},
                        cwd=tmp_path)
    assert_one_line_error(result, phrase)
    assert list(tmp_path.iterdir()) == []


class Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every request with Cloud Storage's error for `code` (set per server)."""

    code = 401

    def do_GET(self):
        body = json.dumps({"error": {"code": self.code, "message": "Anonymous caller does not have "
                                     "storage.objects.list access to the Google Cloud Storage bucket."}}).encode()
        self.send_response(self.code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("code, phrase", [
    (401, "no Google Cloud credentials were found (HTTP 401); on a TPU or Compute Engine VM grant its service "
          "account roles/storage.objectAdmin"),
    (403, "these credentials may not list gs://lm-test"),
])
def test_a_bucket_without_access_is_one_line(code, phrase, tmp_path):
    handler = type("Refusing", (Refusing,), {"code": code})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = lm_command(["-m", "lm", "plot", "gs://lm-test/run", "-o", str(tmp_path / "p.png")],
                            storage_env(f"http://127.0.0.1:{server.server_address[1]}"))
    finally:
        server.shutdown()
    assert_one_line_error(result, phrase)
    assert "gcloud auth application-default login" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_missing_bucket_is_one_line(emulator, tmp_path):
    result = lm_command(["-m", "lm", "plot", "gs://no-such-bucket/run", "-o", str(tmp_path / "p.png")],
                        storage_env(emulator))
    assert_one_line_error(result, "the bucket gs://no-such-bucket does not exist; create it with gcloud storage "
                                  "buckets create gs://no-such-bucket")


# -- metrics.jsonl on an object store: kept in memory, the object rewritten whole when synced.

class FakeObject:
    """An object at gs://fake/metrics.jsonl: counts its uploads."""

    def __init__(self, text: str | None = None):
        self.text, self.uploads = text, 0

    def __str__(self) -> str:
        return "gs://fake/metrics.jsonl"

    def exists(self) -> bool:
        return self.text is not None

    def read_text(self, encoding: str) -> str:
        return self.text

    def write_text(self, text: str, encoding: str) -> None:
        self.text, self.uploads = text, self.uploads + 1


def test_lines_rewrite_an_object_whole_on_sync_and_append_to_a_local_file(tmp_path):
    remote = FakeObject('{"step": 1}\n')
    lines = storage.Lines(remote, every_s=3600)
    lines.write('{"step": 2}\n')
    assert (remote.text, remote.uploads) == ('{"step": 1}\n', 0)  # nothing uploaded between syncs
    lines.sync()
    lines.sync()  # nothing new: no upload
    assert (remote.text, remote.uploads) == ('{"step": 1}\n{"step": 2}\n', 1)
    storage.Lines(remote, every_s=0).write('{"step": 3}\n')  # the interval passed: uploaded at once
    assert remote.text.splitlines()[-1] == '{"step": 3}' and remote.uploads == 2

    local = tmp_path / "metrics.jsonl"
    lines = storage.Lines(local)
    lines.write("a\n")
    assert local.read_text() == "a\n"  # appended at once, as before


def test_local_paths_are_pathlib_and_checked_without_io(tmp_path):
    from lm.tools.plot import plot_runs

    assert storage.path(str(tmp_path / "run")) == tmp_path / "run"
    assert not storage.is_remote(tmp_path) and storage.is_remote("gs://b/x")
    with pytest.raises(LMError, match="names no bucket"):
        storage.check("gs://", "run_dir")
    with pytest.raises(LMError, match="lm plot draws into a local file, not 'gs://b/curves.png'"):
        plot_runs([str(tmp_path)], "gs://b/curves.png")


# -- The contract: train to gs://, SIGKILL, resume exactly; eval, export and plot from there.

def train_argv(run_dir: str, text_file: pathlib.Path) -> list[str]:
    return ["train.py", "--config", "configs/tiny.yaml", f"data.text_file={text_file}", f"run_dir={run_dir}",
            "checkpoint.keep_best=true"]


def comparable(metrics_jsonl: str) -> dict[tuple[int, str], dict]:
    """Records keyed by (step, kind), without wall-clock fields; a step logged twice is an error."""
    out = {}
    for line in metrics_jsonl.splitlines():
        record = json.loads(line)
        key = (record["step"], "val" if "val_loss" in record else "train")
        assert key not in out, f"{key} logged twice"
        out[key] = {k: v for k, v in record.items() if k not in ("tokens_per_sec", "eta_sec", "mfu")}
    return out


@pytest.mark.slow
def test_a_run_in_a_bucket_resumes_after_sigkill_exactly_and_evaluates_like_a_local_one(emulator, tmp_path,
                                                                                      shakespeare):
    from safetensors.numpy import load_file

    env, local = storage_env(emulator), tmp_path / "local"
    reference = subprocess.Popen([sys.executable, *train_argv(str(local), shakespeare)], cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # alongside the other

    # Train into the bucket; SIGKILL once step 10's checkpoint is committed and step 15 logged.
    log = tmp_path / "first.log"
    with log.open("w") as out:
        run = subprocess.Popen([sys.executable, *train_argv("gs://lm-test/run", shakespeare)], cwd=ROOT, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT_S
    while not ("step     15/30 | loss" in log.read_text()
               and "run/checkpoints/10/commit_success.txt" in object_names(emulator, "run/checkpoints/10/")):
        assert run.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "timed out waiting for step 15"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL

    # The same command resumes from that checkpoint and logs what the local run logs.
    resumed = lm_command(train_argv("gs://lm-test/run", shakespeare), env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from gs://lm-test/run/checkpoints/10" in resumed.stdout
    assert reference.wait(timeout=TIMEOUT_S) == 0
    got, expected = (comparable(text) for text in (read_object(emulator, "run/metrics.jsonl"),
                                                   (local / "metrics.jsonl").read_text()))
    assert (30, "val") in expected and {key: got.get(key) for key in expected} == expected
    assert set(got) - set(expected) == {(11, "train")}  # a resumed run logs its first step
    names = object_names(emulator, "run/")
    assert {"run/config.yaml", "run/tokenizer.json"} <= set(names)
    assert any(name.startswith("run/events.out.tfevents.") for name in names)  # TensorBoard's, via tensorboardX

    # eval.py prints the same figures; the export of the best checkpoint holds the same weights; lm plot
    # reads the bucket.
    figures = [lm_command(["eval.py", "--run_dir", run_dir, "--json"], env) for run_dir in ("gs://lm-test/run",
                                                                                            str(local))]
    assert figures[0].returncode == 0, figures[0].stderr
    assert json.loads(figures[0].stdout) == json.loads(figures[1].stdout)
    for run_dir, out in (("gs://lm-test/run", tmp_path / "hf_bucket"), (str(local), tmp_path / "hf_local")):
        exported = lm_command(["-m", "lm", "hf", "export", run_dir, str(out), "--step", "best"], env)
        assert exported.returncode == 0 and "best checkpoint: step " in exported.stderr, exported.stderr
    bucket_weights, local_weights = (load_file(tmp_path / d / "model.safetensors") for d in ("hf_bucket", "hf_local"))
    assert bucket_weights.keys() == local_weights.keys()
    assert all((bucket_weights[k] == local_weights[k]).all() for k in local_weights)
    plotted = lm_command(["-m", "lm", "plot", "gs://lm-test/run", "-o", str(tmp_path / "curves.png")], env)
    assert plotted.returncode == 0 and (tmp_path / "curves.png").stat().st_size > 0, plotted.stderr


@pytest.mark.slow
def test_two_processes_write_the_small_files_once_and_each_its_own_checkpoint_shards(emulator, shakespeare):
    env = {**storage_env(emulator),
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()}
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *train_argv("gs://lm-test/two", shakespeare), "train.steps=4",
                               "checkpoint.every=2", "eval.every=0", "checkpoint.keep_best=false", "log.every=2",
                               f"parallel.coordinator_address=127.0.0.1:{port}", "parallel.num_processes=2",
                               f"parallel.process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    names = object_names(emulator, "two/")
    for process in (0, 1):  # each host its own shards of each item
        assert f"two/checkpoints/4/params/ocdbt.process_{process}/manifest.ocdbt" in names
    assert "two/checkpoints/4/commit_success.txt" in names
    assert sum(name.startswith("two/events.out.tfevents.") for name in names) == 1  # process 0 only
    assert [json.loads(line)["step"] for line in read_object(emulator, "two/metrics.jsonl").splitlines()] == [1, 2, 4]
    assert "step      4/4 | loss" in outputs[0] and "| loss" not in outputs[1]  # process 0 logs
