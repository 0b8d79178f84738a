"""ComfyUI's own server (its ``main.py``) run on the CPU for the tests, and a client for its API.

The server is the vendored ComfyUI 0.30.0 of ``tests/comfyui.py``, started as
a user starts it (``python main.py --cpu --listen 127.0.0.1 --port N``) with
its own temporary base, output, input, user and temp folders, an in-memory
database, and this checkout installed as a node pack in its ``custom_nodes``
(:func:`install_pack`). Its Python is the test's, where requirements-test.txt
installed cq-core, the plugins and cq-nodes (editable, from this checkout).
torchvision and torchaudio, which ComfyUI imports in modules it does not run
here, are import-only stand-ins when missing (:func:`stub_folder`, as
``tests/comfyui.py`` does in-process). It listens on loopback only, and
:class:`ComfyUIServer` always stops it.

The client speaks ComfyUI's HTTP API (``/object_info``, ``/prompt``,
``/history``) and its websocket (``/ws``: ``executing``, ``progress``,
``executed``, ``execution_cached``, ``execution_error``, ``execution_success``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.comfyui import comfyui_root

REPOSITORY = Path(__file__).resolve().parents[1]
#: The pack's folder name in custom_nodes (what `git clone <repo> ComfyUI/custom_nodes/cq` makes).
PACK_NAME = "cq"

#: A ``sitecustomize`` module: import-only stand-ins for packages ComfyUI imports but the
#: server test never runs (the same stand-in as ``cq_models.generate_shape_reads``, which
#: cannot be imported here: it imports torch, and ComfyUI's main.py wants torch imported later).
SITECUSTOMIZE = '''\
import importlib.abc, importlib.machinery, importlib.util, sys, types


def _placeholder(name):
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    return type(name, (), {"__init__": lambda self, *a, **k: None})


class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, package):
        self.package = package

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] == self.package:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _placeholder
        return module

    def exec_module(self, module):
        pass


for _name in ("torchvision", "torchaudio"):
    if importlib.util.find_spec(_name) is None:
        sys.meta_path.insert(0, _Stub(_name))
'''


def stub_folder(folder: Path) -> Path:
    """A folder holding :data:`SITECUSTOMIZE`, for ``PYTHONPATH`` of a ComfyUI process."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def pack_files() -> list[str]:
    """The checkout's files as a clone would hold them, plus what is not committed yet: tracked
    and untracked files that git does not ignore (no .venv, no build output)."""
    result = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPOSITORY,
                            capture_output=True, check=True)
    return [name for name in result.stdout.decode().split("\0") if name and (REPOSITORY / name).is_file()]


def install_pack(custom_nodes: Path) -> Path:
    """``custom_nodes/cq``: a copy of this working tree, the folder ComfyUI imports as the pack.

    A copy rather than a ``git clone``: what is under test is the working tree, uncommitted
    changes included (in CI, a fresh clone, the two are the same files).
    """
    target = custom_nodes / PACK_NAME
    for name in pack_files():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPOSITORY / name, target / name)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    """One queued prompt as the websocket and ``/history`` told it."""

    prompt_id: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m["data"] for m in self.messages if m["type"] == kind]

    @property
    def ok(self) -> bool:
        return self.history.get("status", {}).get("status_str") == "success"

    @property
    def executed_nodes(self) -> list[str]:
        """Node ids in the order they ran (``executing`` messages; cached nodes do not run)."""
        return [d["node"] for d in self.of_type("executing") if d.get("node") is not None]

    def node_seconds(self) -> dict[str, float]:
        """Each node that ran: the seconds from its ``executing`` message to the next one."""
        marks = [(m["data"].get("node"), m["received"]) for m in self.messages if m["type"] == "executing"]
        return {node: later - at for (node, at), (_, later) in zip(marks, marks[1:]) if node is not None}

    @property
    def cached_nodes(self) -> list[str]:
        return [n for d in self.of_type("execution_cached") for n in d["nodes"]]

    @property
    def error(self) -> dict[str, Any] | None:
        errors = self.of_type("execution_error")
        return errors[0] if errors else None

    def ui(self, node: str) -> dict[str, Any]:
        return self.history.get("outputs", {}).get(node, {})


class ComfyUIServer:
    """``main.py --cpu --listen 127.0.0.1`` in ``base``; a context manager that always stops it."""

    def __init__(self, base: Path, startup_timeout: float = 150.0) -> None:
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        self.startup_timeout = startup_timeout
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None
        self.ws = None
        self.started_in: float | None = None

    def folder(self, name: str) -> Path:
        path = self.base / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def __enter__(self) -> ComfyUIServer:
        root = comfyui_root()
        stubs = stub_folder(self.base / "stubs")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        command = [
            sys.executable, str(root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--base-directory", str(self.base), "--output-directory", str(self.folder("output")),
            "--input-directory", str(self.folder("input")), "--temp-directory", str(self.folder("temp")),
            "--user-directory", str(self.folder("user")), "--database-url", "sqlite:///:memory:",
            "--disable-auto-launch",
        ]
        started = time.perf_counter()
        log = open(self.log_path, "wb")  # noqa: SIM115 (closed in __exit__ through the process)
        self.process = subprocess.Popen(command, cwd=self.base, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        log.close()
        try:
            self._wait_until_up()
            self.started_in = time.perf_counter() - started
            import websocket

            self.ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}",
                                                  timeout=120)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n{self.log()[-4000:]}")

    def __exit__(self, *exc) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            except Exception:
                pass
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP ------------------------------------------------------------------

    def get(self, path: str, timeout: float = 60) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload: Any, timeout: float = 60) -> tuple[int, Any]:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
                return response.status, json.loads(body) if body else None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    # -- prompts -----------------------------------------------------------------

    def queue(self, prompt: dict[str, Any]) -> str:
        """``POST /prompt``; returns the prompt id. Raises AssertionError with ComfyUI's answer
        when it refuses the prompt (validation)."""
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        assert status == 200, f"ComfyUI refused the prompt ({status}): {json.dumps(answer)[:3000]}"
        return answer["prompt_id"]

    def run(self, prompt: dict[str, Any], timeout: float = 180) -> Run:
        """Queue ``prompt`` and follow it on the websocket until it ends; then read its ``/history``."""
        run = Run(self.queue(prompt))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = self.ws.recv()
            if isinstance(frame, bytes):  # previews
                continue
            message = json.loads(frame)
            message["received"] = time.perf_counter()
            data = message.get("data", {})
            if data.get("prompt_id") not in (None, run.prompt_id):
                continue
            run.messages.append(message)
            kind = message["type"]
            if kind == "execution_error" or kind == "execution_interrupted":
                break
            if kind == "executing" and data.get("node") is None and data.get("prompt_id") == run.prompt_id:
                break
        else:
            raise TimeoutError(f"prompt {run.prompt_id} did not finish in {timeout} s:\n{self.log()[-3000:]}")
        for _ in range(50):
            run.history = self.get(f"/history/{run.prompt_id}").get(run.prompt_id, {})
            if run.history.get("status", {}).get("completed") is not None:
                break
            time.sleep(0.1)
        return run
