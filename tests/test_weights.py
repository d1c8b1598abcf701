"""--weights by name: a local HTTP server on 127.0.0.1 poses as the Hugging Face hub (HF_ENDPOINT).
The first run downloads into the cache, the second uses it, offline with an empty cache is one
clear message, and a download cut off mid-file is refused and not kept."""
import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading

import pytest

from clamp3_lora import weights
from clamp3_lora.errors import CheckpointError
from trainer_fixtures import ROOT

PAYLOAD = bytes(range(256)) * 800   # stands in for a checkpoint: only bytes move here
RESOLVE = "from clamp3_lora import weights\nprint(weights.resolve(sys.argv[1]))"


class FakeHub(http.server.BaseHTTPRequestHandler):
    """HEAD/GET of /REPO/resolve/main/FILE with the headers huggingface_hub reads."""
    truncate = False
    downloads = 0
    payload = PAYLOAD

    def send_file_headers(self):
        self.send_response(200)
        self.send_header("X-Repo-Commit", "c" * 40)
        self.send_header("ETag", f'"{hashlib.sha256(self.payload).hexdigest()}"')
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()

    def do_HEAD(self):
        if "/resolve/" not in self.path:
            return self.send_error(404)
        self.send_file_headers()

    def do_GET(self):
        if "/resolve/" not in self.path:
            return self.send_error(404)
        type(self).downloads += 1
        self.send_file_headers()
        self.wfile.write(self.payload[: len(self.payload) // 3] if self.truncate else self.payload)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    FakeHub.truncate, FakeHub.downloads, FakeHub.payload = False, 0, PAYLOAD
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def hub_env(hub, home, offline=False):
    env = dict(os.environ, HF_ENDPOINT=hub, HF_HOME=str(home), HF_HUB_OFFLINE="1" if offline else "0",
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONIOENCODING="utf-8")
    env.pop("HF_HUB_CACHE", None)
    return env


def resolve(name, hub, home, offline=False):
    return subprocess.run([sys.executable, "-c", "import sys\n" + RESOLVE, name], cwd=ROOT,
                          env=hub_env(hub, home, offline), capture_output=True, text=True, timeout=180)


def test_a_hub_name_is_downloaded_once_then_read_from_the_cache(hub, tmp_path):
    first = resolve("someone/models:tiny.pth", hub, tmp_path / "hf")
    assert first.returncode == 0, first.stderr[-2000:]
    path = first.stdout.strip().splitlines()[-1]
    assert path.startswith(str(tmp_path / "hf")) and open(path, "rb").read() == PAYLOAD
    assert FakeHub.downloads == 1
    second = resolve("someone/models:tiny.pth", hub, tmp_path / "hf")
    assert second.stdout.strip().splitlines()[-1] == path and FakeHub.downloads == 1
    offline = resolve("someone/models:tiny.pth", hub, tmp_path / "hf", offline=True)
    assert offline.returncode == 0 and offline.stdout.strip().splitlines()[-1] == path


def test_offline_with_an_empty_cache_is_one_clear_message(hub, tmp_path):
    result = resolve("c2", hub, tmp_path / "empty", offline=True)
    assert result.returncode != 0 and FakeHub.downloads == 0
    message = result.stderr.strip().splitlines()[-1]
    assert weights.OFFICIAL["c2"][1] in message and "sander-wood/clamp3" in message
    assert "HF_HUB_OFFLINE=1 or no network" in message and "hf download sander-wood/clamp3" in message


def test_a_download_cut_off_mid_file_is_refused_and_not_kept(hub, tmp_path):
    FakeHub.truncate = True
    result = resolve("someone/models:tiny.pth", hub, tmp_path / "hf")
    assert result.returncode != 0
    assert "downloading tiny.pth from someone/models failed" in result.stderr
    blobs = list((tmp_path / "hf").rglob("blobs/*"))
    assert not any(blob.is_file() and not blob.name.endswith(".incomplete") for blob in blobs), blobs


def test_names_and_paths():
    assert weights.hub_file("c2") == ("sander-wood/clamp3", weights.OFFICIAL["c2"][1])
    assert weights.OFFICIAL["saas"][1].startswith("weights_clamp3_saas_h_size_768")
    assert weights.hub_file("user/repo:file.pth") == ("user/repo", "file.pth")
    assert weights.hub_file("demo/base/clamp3_demo_base.pth") is None
    assert weights.resolve("local/path.pth") == "local/path.pth"
    with pytest.raises(CheckpointError, match="'c3': not a file, and not a name of weights: use c2 or saas"):
        weights.resolve("c3")


def test_a_tokenizer_without_network_fails_at_once_naming_the_flag(tmp_path):
    """No hub (nothing listens on the endpoint), not offline mode: one message within seconds (not
    after the download library's retries), naming --text-model as the flag is spelt."""
    import socket
    with socket.socket() as probe:          # a port with nothing behind it
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = dict(os.environ, HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
               TRANSFORMERS_OFFLINE="0")
    code = ("from clamp3_lora.model import load_tokenizer\n"
            "try:\n    load_tokenizer('someone/no-such-tokenizer')\nexcept Exception as error:\n    print(error)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    assert "cannot be reached" in result.stdout and "--text-model" in result.stdout, result.stdout + result.stderr


def test_the_preflight_says_where_hub_weights_come_from_and_uses_them(hub, tmp_path):
    """The hub serves a tiny official-layout checkpoint: the preflight fetches it (first run), finds
    it in the cache (second run), loads it and runs its dry step from it."""
    import io

    import torch
    from clamp3_lora.model import PRESETS, Clamp3
    from trainer_fixtures import make_workspace
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save({"model": Clamp3(PRESETS["tiny"]).state_dict(), "epoch": 1}, buffer)
    FakeHub.payload = buffer.getvalue()
    workspace = make_workspace(tmp_path / "ws", abc_train=4, abc_eval=2)
    argv = ["--weights", "someone/models:tiny.pth", "--text-model", str(workspace["tokenizer"]), "--device", "cpu",
            "--stages", "abc", "--abc-train", str(workspace["abc_train"]), "--abc-eval", str(workspace["abc_eval"]),
            "--batch-size", "2", "--max-patches", "24", "--num-workers", "0", "--output-dir", str(tmp_path / "out")]

    def preflight():
        done = subprocess.run([sys.executable, "test_lora_setup.py", *argv], cwd=ROOT, capture_output=True, text=True,
                              env=hub_env(hub, tmp_path / "hf"), timeout=240)
        return done.returncode, done.stdout + done.stderr

    code, output = preflight()
    assert code == 0, output
    assert "✓ weights: someone/models:tiny.pth = hub file someone/models:tiny.pth: downloaded in" in output
    assert re.search(r"✓ disk for weights: someone/models:tiny\.pth: 0\.0\d GB to download, [\d.]+ GB free", output), output
    assert "✓ ABC step: loss" in output and FakeHub.downloads == 1
    code, output = preflight()
    assert code == 0 and "in the Hugging Face cache: " + str(tmp_path / "hf") in output, output
    assert FakeHub.downloads == 1
