"""Job submission: the documented `ray job submit` path, `medtune submit`, and the RayJob it builds.

Unit tier: the entry point, recipe path and exit-status rules; `medtune submit --kubernetes
--dry-run` against the chart's own RayJob (the objects are checked with kubernetes_validate,
pod templates as `PodTemplate`s); the create path through the real `kubernetes` client against
a small Kubernetes API stand-in on loopback, which records the REST calls it receives.

Slow tier: a real head (`ray start --head`, token auth on, its own temp dir and ports) in a
session of its own, so the test can stop exactly its processes and never another Ray on the
machine (`ray stop` would stop them all). Against it: the README's
`ray job submit --address ... --working-dir . -- python -m ray_jobs.train RECIPE`, then
`medtune submit`, then the run-log copy through Ray's state API.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from helpers import free_port
from ray_jobs import submit
from ray_jobs.core.recipe import load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "medtune"
PROFILES = sorted((CHART / "profiles").glob("*.yaml"))
VENV_BIN = Path(sys.executable).parent
QUICKSTART = REPO / "configs" / "quickstart" / "tiny-llama-lora.yaml"
K8S_VERSION = "1.34.0"
S3_ROOT = "s3://medtune-test/medtune"


# --------------------------------------------------------------------------- unit: Ray path
def test_entrypoint_is_the_documented_command_with_overrides() -> None:
    entrypoint = submit.train_entrypoint("configs/x.yaml", ["train.lr=1e-4", "data.system_prompt=You are a coder"])
    assert entrypoint.startswith("python -m ray_jobs.train configs/x.yaml --set train.lr=1e-4 ")
    assert shlex.split(entrypoint) == [
        "python",
        "-m",
        "ray_jobs.train",
        "configs/x.yaml",
        "--set",
        "train.lr=1e-4",
        "--set",
        "data.system_prompt=You are a coder",
    ]


def test_recipe_argument_follows_the_upload(tmp_path: Path) -> None:
    inside = REPO / "configs" / "quickstart" / "tiny-llama-lora.yaml"
    assert submit.recipe_argument(inside, REPO, "http://10.0.0.5:8265") == "configs/quickstart/tiny-llama-lora.yaml"
    outside = tmp_path / "r.yaml"
    outside.write_text("name: x\n")
    assert submit.recipe_argument(outside, REPO, "http://127.0.0.1:8265") == str(outside.resolve())
    with pytest.raises(submit.SubmitError, match="--working-dir"):
        submit.recipe_argument(outside, REPO, "http://ray-head.ml.svc:8265")


def test_exit_status_is_the_jobs() -> None:
    from ray.job_submission import JobInfo, JobStatus

    def info(status: JobStatus, code: int | None = None) -> JobInfo:
        return JobInfo(status=status, entrypoint="python -m ray_jobs.train r.yaml", driver_exit_code=code)

    assert submit.job_exit_status(info(JobStatus.SUCCEEDED, 0)) == 0
    assert submit.job_exit_status(info(JobStatus.FAILED, 2)) == 2  # the driver's own status (user error)
    assert submit.job_exit_status(info(JobStatus.FAILED)) == 1
    assert submit.job_exit_status(info(JobStatus.STOPPED)) == 1


def test_upload_excludes_what_must_never_travel() -> None:
    env = submit.runtime_env(REPO)
    assert env["working_dir"] == str(REPO)
    assert {".git", ".venv", "medtune-output", "**/__pycache__"} <= set(env["excludes"])


# --------------------------------------------------------------------------- unit: the RayJob
def dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    code = submit.main(
        [
            str(QUICKSTART),
            "--kubernetes",
            "-n",
            "ml",
            "--release",
            "medtune",
            "--dry-run",
            "--set",
            f"storage.root={S3_ROOT}",
            *args,
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    return [doc for doc in yaml.safe_load_all(out.out) if doc]


def render_chart_rayjob(values: dict[str, Any]) -> dict[str, Any]:
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name="medtune", namespace="ml")
    (job,) = [
        d
        for path, t in manifests.items()
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(t)
        if d and d.get("kind") == "RayJob"
    ]
    return job


@pytest.mark.parametrize("profile", [None, *PROFILES], ids=["defaults", *(p.stem for p in PROFILES)])
def test_dry_run_is_the_charts_rayjob_for_this_recipe(capsys: pytest.CaptureFixture[str], profile: Path | None) -> None:
    values_args = ["-f", str(profile)] if profile else []
    config_map, job = dry_run(capsys, *values_args, "--set", "train.max_steps=7")
    assert (config_map["kind"], job["kind"], job["apiVersion"]) == ("ConfigMap", "RayJob", "ray.io/v1")
    kubernetes_validate.validate(config_map, K8S_VERSION, strict=True)

    # The ConfigMap holds exactly the recipe as validated here, overrides applied.
    mounted = yaml.safe_load(config_map["data"]["recipe.yaml"])
    expected = load_recipe(QUICKSTART, [f"storage.root={S3_ROOT}", "train.max_steps=7"])
    assert parse_recipe(mounted) == expected

    # Names: one run, within KubeRay's length budget, recipe mounted from the run's ConfigMap.
    name = job["metadata"]["name"]
    assert name.startswith("medtune-train-") and len(name) <= submit.MAX_RAYJOB_NAME
    assert config_map["metadata"]["name"] == f"{name}-recipe"
    assert job["metadata"]["namespace"] == config_map["metadata"]["namespace"] == "ml"
    assert job["metadata"]["labels"]["medtune.io/run"] == name
    assert job["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "medtune-submit"

    spec = job["spec"]
    assert spec["entrypoint"] == "python -m ray_jobs.train /etc/medtune/recipe.yaml"
    # Its own cluster, always (a release's RayCluster mounts the release's recipe).
    assert "clusterSelector" not in spec and spec["shutdownAfterJobFinishes"] is True
    templates = [
        spec["rayClusterSpec"]["headGroupSpec"]["template"],
        *(g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]),
    ]
    for template in templates:
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template},
            K8S_VERSION,
            strict=True,
        )
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes["recipe"]["configMap"]["name"] == config_map["metadata"]["name"]
    kubernetes_validate.validate(
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "x"},
            "template": spec["submitterPodTemplate"],
        },
        K8S_VERSION,
        strict=True,
    )

    # Same shape as the chart's RayJob for these values: only the run's names differ.
    values = submit.chart_values(expected, [profile] if profile else [])
    chart_job = render_chart_rayjob(values)
    assert set(spec) <= set(yaml.safe_load(json.dumps(chart_job["spec"])))
    normalised = json.loads(
        json.dumps(spec).replace(config_map["metadata"]["name"], "medtune-recipe").replace('"medtune-submit"', '"Helm"')
    )
    assert normalised == chart_job["spec"]


def test_kubernetes_refuses_local_storage(capsys: pytest.CaptureFixture[str]) -> None:
    code = submit.main([str(QUICKSTART), "--kubernetes", "--dry-run"])
    assert code == 2
    assert "storage.root" in capsys.readouterr().err


def test_bad_recipe_fails_before_anything_is_sent(capsys: pytest.CaptureFixture[str]) -> None:
    code = submit.main([str(QUICKSTART), "--address", "http://127.0.0.1:9", "--set", "train.lrr=1"])
    assert code == 2
    assert "train.lrr: unknown key" in capsys.readouterr().err


# --------------------------------------------------------------------------- unit: create on Kubernetes
class FakeKubernetesApi:
    """Answers the handful of REST calls `medtune submit --kubernetes` makes, and records them.

    The `kubernetes` client under test is the real one: it serialises the objects, builds the
    paths and parses the answers exactly as against a real API server.
    """

    def __init__(self, service_accounts: set[str], has_crd: bool = True, statuses: list[dict[str, Any]] | None = None):
        self.calls: list[tuple[str, str, Any]] = []
        self.service_accounts, self.has_crd = service_accounts, has_crd
        self.statuses = list(statuses or [{"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _handle(self) -> None:
                body = self._body()
                api.calls.append((self.command, self.path, copy.deepcopy(body)))
                parts = self.path.split("?")[0].strip("/").split("/")
                not_found = {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "NotFound",
                    "code": 404,
                }
                if self.command == "GET" and parts[-2] == "serviceaccounts":
                    if parts[-1] in api.service_accounts:
                        return self._answer(
                            200, {"kind": "ServiceAccount", "apiVersion": "v1", "metadata": {"name": parts[-1]}}
                        )
                    return self._answer(404, not_found)
                if parts[:3] == ["apis", "ray.io", "v1"] and not api.has_crd:
                    return self._answer(404, not_found)
                if self.command == "POST":
                    body["metadata"]["uid"] = f"uid-{len(api.calls)}"
                    return self._answer(201, body)
                if self.command == "PATCH":
                    return self._answer(
                        200,
                        {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": parts[-1], **body["metadata"]}},
                    )
                if self.command == "GET" and parts[-2] == "rayjobs":
                    status = api.statuses.pop(0) if len(api.statuses) > 1 else api.statuses[0]
                    return self._answer(
                        200,
                        {
                            "apiVersion": "ray.io/v1",
                            "kind": "RayJob",
                            "metadata": {"name": parts[-1]},
                            "status": status,
                        },
                    )
                return self._answer(404, not_found)

            do_GET = do_POST = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "test",
                    "clusters": [{"name": "test", "cluster": {"server": self.url}}],
                    "users": [{"name": "test", "user": {"token": "test-token"}}],
                    "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": "ml"}}],
                }
            )
        )
        return path


@pytest.fixture
def fake_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubernetesApi]:
    api = FakeKubernetesApi(
        service_accounts={"medtune"},
        statuses=[
            {},
            {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
            {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
        ],
    )
    monkeypatch.setenv("KUBECONFIG", str(api.kubeconfig(tmp_path / "kubeconfig")))
    yield api
    api.server.shutdown()


def built_objects(values_files: list[Path] | None = None) -> list[dict[str, Any]]:
    recipe = load_recipe(QUICKSTART, [f"storage.root={S3_ROOT}"])
    return submit.build_rayjob(
        recipe, release="medtune", namespace="ml", values_files=values_files or [], suffix="t0001-ab12"
    )


def test_create_sends_the_objects_and_follows_the_job(fake_api: FakeKubernetesApi) -> None:
    objects = built_objects()
    assert submit.create_on_kubernetes(objects, wait=True, poll_s=0.01) == 0
    verbs = [(method, path.split("?")[0]) for method, path, _ in fake_api.calls]
    assert verbs[:4] == [
        ("GET", "/api/v1/namespaces/ml/serviceaccounts/medtune"),
        ("POST", "/api/v1/namespaces/ml/configmaps"),
        ("POST", "/apis/ray.io/v1/namespaces/ml/rayjobs"),
        ("PATCH", "/api/v1/namespaces/ml/configmaps/medtune-train-t0001-ab12-recipe"),
    ]
    assert set(verbs[4:]) == {("GET", "/apis/ray.io/v1/namespaces/ml/rayjobs/medtune-train-t0001-ab12")}
    assert len(verbs[4:]) == 3  # polled until Complete
    assert fake_api.calls[1][2] == objects[0] and fake_api.calls[2][2] == objects[1]
    # The recipe ConfigMap is owned by the RayJob, so it goes when the job is deleted.
    (owner,) = fake_api.calls[3][2]["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "name": "medtune-train-t0001-ab12",
        "uid": "uid-3",
        "blockOwnerDeletion": False,
    }


def test_a_failed_rayjob_is_a_failed_submit(fake_api: FakeKubernetesApi) -> None:
    fake_api.statuses = [{"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}]
    assert submit.create_on_kubernetes(built_objects(), wait=True, poll_s=0.01) == 1


def test_cli_no_wait_creates_and_returns(fake_api: FakeKubernetesApi, capsys: pytest.CaptureFixture[str]) -> None:
    code = submit.main(
        [
            str(QUICKSTART),
            "--kubernetes",
            "-n",
            "ml",
            "--release",
            "medtune",
            "--no-wait",
            "--set",
            f"storage.root={S3_ROOT}",
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert [c[0] for c in fake_api.calls] == ["GET", "POST", "POST", "PATCH"]
    assert "kubectl -n ml get rayjob medtune-train-" in out.out


def test_missing_release_or_operator_is_named(fake_api: FakeKubernetesApi, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = load_recipe(QUICKSTART, [f"storage.root={S3_ROOT}"])
    other = submit.build_rayjob(recipe, release="elsewhere", namespace="ml")
    with pytest.raises(submit.SubmitError, match="ServiceAccount elsewhere-medtune not found .*helm install"):
        submit.create_on_kubernetes(other, wait=False)
    fake_api.has_crd = False
    with pytest.raises(submit.SubmitError, match="no ray.io/v1 RayJob resource .* KubeRay operator"):
        submit.create_on_kubernetes(built_objects(), wait=False)


# --------------------------------------------------------------------------- slow: a real head
@dataclass(frozen=True)
class RayHead:
    address: str
    env: dict[str, str]
    temp_dir: Path


def _session_processes(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state ppid pgrp session
            pids.append(int(stat.parent.name))
    return pids


def _stop_session(sid: int) -> None:
    """Stop every process of our head's session, and nothing else.

    Some of the head's processes outlast the SIGTERM grace (with 15 s the teardown took
    15-17 s), so after a short one the rest are killed: the head is a throwaway with its own
    temp dir, removed right after.
    """
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for pid in _session_processes(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while _session_processes(sid) and time.monotonic() < deadline:
            time.sleep(0.2)


def _wait_for_the_job_agent(temp_dir: Path, deadline: float) -> None:
    """Wait until the head's dashboard agent, which job submission goes through, has started its HTTP server.

    The agent writes the port it bound to the session dir (-1 when its HTTP server failed to
    start) just before registering itself with the GCS; `ray job list` answers before that.
    """
    session = temp_dir / "session_latest"
    port = ""
    while not port:
        assert time.monotonic() < deadline, "the head's dashboard agent did not start"
        time.sleep(0.5)
        port = "".join(path.read_text().strip() for path in session.glob("dashboard_agent_listen_port_*"))
    log = session / "logs" / "dashboard_agent.log"
    agent_log = log.read_text()[-3000:] if log.exists() else "(no agent log)"
    assert port != "-1", f"the dashboard agent's HTTP server did not start:\n{agent_log}"


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    # Short: Ray's Unix sockets live under the temp dir (108-byte path limit).
    temp_dir = Path(f"/tmp/mt-{secrets.token_hex(3)}")
    dashboard = free_port()
    env = {
        **os.environ,
        # The job's `python` is whatever PATH finds on the head: make it the venv's.
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "HF_HUB_OFFLINE": "1",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--num-cpus",
        "2",
        "--port",
        str(free_port()),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--ray-client-server-port",
        str(free_port()),
        # 0: the agent binds a port the OS knows is free. A port picked here beforehand can
        # be taken by one of the ports Ray picks itself before the agent binds it; the agent
        # then stays up without its HTTP server, and every submit fails with "No available
        # agent" (seen once in CI).
        "--dashboard-agent-listen-port",
        "0",
        "--object-store-memory",
        str(600 * 2**20),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
    ]
    # A session of its own: every process of this head (GCS, raylet, dashboard, workers)
    # inherits the session id, which is how the teardown finds them.
    starter = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = starter.communicate(timeout=180)
        assert starter.returncode == 0, output[-3000:]
        _wait_for_the_job_agent(temp_dir, deadline=time.monotonic() + 120)
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 60
        while (
            subprocess.run(
                [str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True
            ).returncode
            != 0
        ):
            assert time.monotonic() < deadline, "the head's job API did not come up"
            time.sleep(1)
        yield RayHead(address, env, temp_dir)
    finally:
        starter.kill() if starter.poll() is None else None
        _stop_session(starter.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(recipe, storage root): a tiny Llama, 48 synthetic notes, 2 optimizer steps, on CPU.

    No eval split: these tests check that a submitted job trains and publishes an adapter,
    and an eval split would add a Ray Data write, a second dataset split and an eval pass to
    every job.
    """
    root = tmp_path_factory.mktemp("submit")
    notes = json.loads((REPO / "sample_data" / "synthetic" / "entities" / "notes.json").read_text())[:48]
    (root / "notes.json").write_text(json.dumps(notes))
    storage = root / "store"
    recipe = {
        "name": "submit-tiny",
        "model": {"base": "tiny:llama"},
        "data": {"format": "entities", "train": str(root / "notes.json"), "max_seq_len": 128, "eval_fraction": 0.0},
        "lora": {"r": 4, "alpha": 8},
        "train": {
            "max_steps": 2,
            "micro_batch_size": 2,
            "workers": 1,
            "cpus_per_worker": 1,
            "gpus_per_worker": 0,
            "checkpoint_every": 1,
            "log_every": 1,
            "warmup_steps": 0,
        },
        "storage": {"root": str(storage)},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, storage


def adapter_versions(storage: Path) -> dict[str, Path]:
    root = storage / "adapters" / "submit-tiny"
    return {p.name: p for p in root.iterdir()} if root.is_dir() else {}


def assert_complete_adapter(version: Path) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json", "_COMPLETE"):
        assert (version / name).is_file(), f"{version}: no {name}"


@pytest.mark.slow
@pytest.mark.integration
def test_documented_ray_job_submit_trains_an_adapter(ray_head: RayHead, tiny_run: tuple[Path, Path]) -> None:
    recipe, storage = tiny_run
    before = set(adapter_versions(storage))
    # Exactly the README's command, from the repository root.
    command = [
        "ray",
        "job",
        "submit",
        "--address",
        ray_head.address,
        "--working-dir",
        ".",
        "--",
        "python",
        "-m",
        "ray_jobs.train",
        str(recipe),
    ]
    done = subprocess.run(command, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "[medtune] adapter published:" in output
    new = set(adapter_versions(storage)) - before
    assert len(new) == 1, output[-3000:]
    assert_complete_adapter(adapter_versions(storage)[new.pop()])


@pytest.mark.slow
@pytest.mark.integration
def test_medtune_submit_follows_the_job_and_passes_overrides(ray_head: RayHead, tiny_run: tuple[Path, Path]) -> None:
    recipe, storage = tiny_run
    before = set(adapter_versions(storage))
    command = [str(VENV_BIN / "medtune"), "submit", str(recipe), "--address", ray_head.address, "--set", "lora.r=8"]
    done = subprocess.run(command, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    assert "[medtune] submitted raysubmit_" in output and "SUCCEEDED" in output
    assert "[medtune] adapter published:" in output  # the job's own log, followed
    (new,) = set(adapter_versions(storage)) - before
    version = adapter_versions(storage)[new]
    assert_complete_adapter(version)
    assert json.loads((version / "adapter_config.json").read_text())["r"] == 8  # --set reached the job


@pytest.mark.slow
@pytest.mark.integration
def test_medtune_submit_returns_the_jobs_failure(ray_head: RayHead, tiny_run: tuple[Path, Path]) -> None:
    recipe, _ = tiny_run
    # Valid as a recipe, impossible on this 2-CPU cluster: the job itself fails.
    command = [
        str(VENV_BIN / "medtune"),
        "submit",
        str(recipe),
        "--address",
        ray_head.address,
        "--set",
        "train.workers=4",
        "--set",
        "train.cpus_per_worker=2",
    ]
    done = subprocess.run(command, cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]  # the driver's exit status: a user error
    assert "FAILED" in output and "train.workers x train.cpus_per_worker" in output


PROBE = """
import sys
import ray
from ray_jobs.runlogs import copy_run_logs
from ray_jobs.core.storage import Storage

marker, root = sys.argv[1], sys.argv[2]
print("probe driver started", flush=True)
ray.init()

@ray.remote
def shout(text):
    print(text, flush=True)
    return text

assert ray.get(shout.remote(marker)) == marker
print("copied", len(copy_run_logs(Storage.from_uri(root), "probe-run")), flush=True)
"""


@pytest.mark.slow
@pytest.mark.integration
def test_run_logs_are_copied_through_the_state_api(ray_head: RayHead, tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(PROBE)
    marker, root = f"marker-{secrets.token_hex(4)}", tmp_path / "store"
    command = [
        "ray",
        "job",
        "submit",
        "--address",
        ray_head.address,
        "--working-dir",
        str(tmp_path),
        "--",
        "python",
        "probe.py",
        marker,
        str(root),
    ]
    done = subprocess.run(command, cwd=tmp_path, env=ray_head.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    logs = root / "runs" / "probe-run" / "logs"
    index = json.loads((logs / "index.json").read_text())
    assert index["source"] == "state-api" and index["submission_id"].startswith("raysubmit_")
    files = {Path(f).name: Path(f) for f in index["files"]}
    driver = files[f"job-driver-{index['submission_id']}.log"]
    assert "probe driver started" in driver.read_text()
    workers = [p for n, p in files.items() if n.startswith("worker-") and n.endswith(".out")]
    assert any(marker in p.read_text() for p in workers), sorted(files)
    assert "raylet.out" in files
