"""`medtune submit`: send a training run to a Ray cluster, or create it as a KubeRay RayJob.

    medtune submit configs/quickstart/tiny-llama-lora.yaml --address http://127.0.0.1:8265
    medtune submit RECIPE --set train.max_steps=50 --no-wait          # print the job id, return
    medtune submit RECIPE --kubernetes --namespace medtune --release medtune \\
        -f charts/medtune/profiles/gpu-1x8.yaml                      # a RayJob, from the chart
    medtune submit RECIPE --kubernetes ... --dry-run                  # print its YAML only

The first form is exactly the documented
`ray job submit --address URL --working-dir . -- python -m ray_jobs.train RECIPE [--set ...]`,
done through `ray.job_submission.JobSubmissionClient`: it uploads the working directory,
follows the job's logs and exits with the job's status (0 when it SUCCEEDED).

Design decisions:
- The recipe is validated here first, so a typo fails in a second, not after an upload.
- Upload: Ray honours `.gitignore` and `.rayignore` in the working directory; `UPLOAD_EXCLUDES`
  adds what must never travel (.git, virtualenvs, outputs), whatever those files say.
- The job reads the recipe from the uploaded copy, so it must lie inside the working
  directory; only a cluster on this machine (loopback address) can read it from elsewhere.
- `--kubernetes` renders the Helm chart itself (helm-python-sdk: Helm's own Go engine) with
  this recipe as `values.recipe` and `trainJob.enabled=true`, and creates only the recipe
  ConfigMap and the RayJob, renamed per run. So the RayJob is the chart's RayJob, never a
  second hand-written copy that could drift from it; the release's ServiceAccount, Secrets
  and NetworkPolicy (from `helm install`) apply to its pods unchanged.
- Ray token auth: the client reads `RAY_AUTH_MODE` / `RAY_AUTH_TOKEN`, as the `ray` CLI does.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import ipaddress
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

import yaml

from ray_jobs.core.errors import MedtuneError, report
from ray_jobs.core.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHART = REPO / "charts" / "medtune"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Never uploaded, whatever .gitignore says: history, environments, outputs, caches.
UPLOAD_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "medtune-output",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "benchmarks/results",
    "build",
    "dist",
    ".gpu",
    ".whl",
]
RAY_API = ("ray.io", "v1", "rayjobs")
# KubeRay names the job's cluster <rayjob>-<5 chars> and its head Service <cluster>-head-svc;
# both must stay within a 63-character DNS label.
MAX_RAYJOB_NAME = 47
# Objects created here are not part of the Helm release: `helm upgrade` must not adopt them.
MANAGED_BY = "medtune-submit"
EXIT_FAILED = 1


class SubmitError(MedtuneError):
    """The run cannot be submitted; the message names the flag or key to change."""


# --------------------------------------------------------------------------- Ray job submission
def train_entrypoint(recipe_arg: str, overrides: list[str]) -> str:
    """The documented entry point, shell-quoted: `python -m ray_jobs.train RECIPE [--set k=v ...]`."""
    args = ["python", "-m", "ray_jobs.train", recipe_arg]
    for override in overrides:
        args += ["--set", override]
    return shlex.join(args)


def _is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def recipe_argument(recipe: Path, working_dir: Path, address: str) -> str:
    """How the job names the recipe: relative to the uploaded working dir when inside it."""
    recipe, working_dir = recipe.resolve(), working_dir.resolve()
    if recipe.is_relative_to(working_dir):
        return recipe.relative_to(working_dir).as_posix()
    if _is_loopback(address):
        return str(recipe)  # the cluster runs on this machine and can read the file
    raise SubmitError(
        f"recipe {recipe} is outside the working directory {working_dir}, so the job on "
        f"{address} cannot read it: move it under the working directory or pass --working-dir"
    )


def runtime_env(working_dir: Path) -> dict[str, Any]:
    return {"working_dir": str(working_dir), "excludes": list(UPLOAD_EXCLUDES)}


def job_exit_status(info: Any) -> int:
    """0 when the job SUCCEEDED; otherwise the driver's own exit code when Ray knows it, else 1."""
    from ray.job_submission import JobStatus

    if info.status == JobStatus.SUCCEEDED:
        return 0
    code = getattr(info, "driver_exit_code", None)
    return code if isinstance(code, int) and code > 0 else EXIT_FAILED


def _warn_local_storage(recipe: Recipe, err: TextIO) -> None:
    root = recipe.storage.root
    if not root.startswith("s3://") and not Path(root).is_absolute():
        print(
            f"medtune: warning: storage.root {root!r} is relative: the job resolves it inside its "
            "uploaded working directory, which Ray deletes with the session; use an absolute path "
            "or s3://",
            file=err,
        )


def submit_to_ray(
    recipe_path: Path,
    overrides: list[str],
    *,
    address: str,
    working_dir: Path,
    wait: bool = True,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Submit `python -m ray_jobs.train` as a Ray job; with `wait`, follow it and return its status.

    Raises:
        RecipeError: the recipe (with overrides) is invalid.
        SubmitError: the recipe cannot reach the job, or the cluster refused the job.
    """
    from ray.job_submission import JobSubmissionClient

    out, err = out or sys.stdout, err or sys.stderr
    recipe = load_recipe(recipe_path, overrides)
    _warn_local_storage(recipe, err)
    entrypoint = train_entrypoint(recipe_argument(recipe_path, working_dir, address), overrides)
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env(working_dir), metadata={"medtune.recipe": recipe.name}
        )
    except Exception as exc:  # connection refused, bad token, cluster-side errors: all the user's to fix
        raise SubmitError(f"could not submit to {address}: {exc}") from None
    print(f"[medtune] submitted {job_id} to {address}: {entrypoint}", file=out, flush=True)
    if not wait:
        print(f"[medtune] follow it with: ray job logs --address {address} --follow {job_id}", file=out, flush=True)
        return 0
    try:
        asyncio.run(_follow_logs(client, job_id, out))
    except KeyboardInterrupt:
        print(
            f"\n[medtune] stopped following; the job keeps running (ray job stop --address {address} {job_id})",
            file=err,
            flush=True,
        )
        return 130
    info = _wait_until_finished(client, job_id)
    status = job_exit_status(info)
    print(f"[medtune] job {job_id} {info.status.value}" + (f" (exit {status})" if status else ""), file=out, flush=True)
    return status


async def _follow_logs(client: Any, job_id: str, out: TextIO) -> None:
    async for lines in client.tail_job_logs(job_id):
        out.write(lines)
        out.flush()


def _wait_until_finished(client: Any, job_id: str, timeout_s: float = 60) -> Any:
    # The log stream can close a moment before the status turns terminal.
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal() or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


# --------------------------------------------------------------------------- Kubernetes (RayJob)
def _merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's rule: maps merge key by key, anything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = (
            _merge_values(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def chart_values(recipe: Recipe, values_files: list[Path]) -> dict[str, Any]:
    """The values the chart renders this run with: the files in order, then the recipe and job."""
    values: dict[str, Any] = {}
    for path in values_files:
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise SubmitError(f"--values {path}: not a mapping of chart values")
        values = _merge_values(values, loaded)
    # The recipe replaces any recipe in the files as a whole (merging two recipes key by key
    # would run neither).
    values["recipe"] = recipe.model_dump(mode="json", exclude_none=True)
    # Always the job's own cluster: a release's long-running RayCluster mounts the release's
    # recipe, not this one (submit there with `medtune submit RECIPE --address ...`).
    # No CRD check: this renders offline; creating the RayJob reports a missing CRD.
    return _merge_values(
        values,
        {"trainJob": {"enabled": True, "existingCluster": {"enabled": False}}, "kuberay": {"skipCrdCheck": True}},
    )


def run_suffix() -> str:
    return time.strftime("%m%d%H%M") + "-" + uuid.uuid4().hex[:4]


def _retarget(node: Any, config_map: tuple[str, str]) -> None:
    """Point configMap volumes at the run's ConfigMap; mark every label set as ours, not Helm's."""
    if isinstance(node, dict):
        if isinstance(node.get("configMap"), dict) and node["configMap"].get("name") == config_map[0]:
            node["configMap"]["name"] = config_map[1]
        labels = node.get("labels")
        if isinstance(labels, dict) and labels.get("app.kubernetes.io/managed-by") == "Helm":
            labels["app.kubernetes.io/managed-by"] = MANAGED_BY
        for value in node.values():
            _retarget(value, config_map)
    elif isinstance(node, list):
        for value in node:
            _retarget(value, config_map)


def build_rayjob(
    recipe: Recipe,
    *,
    release: str,
    namespace: str,
    values_files: list[Path] | None = None,
    chart: Path = DEFAULT_CHART,
    suffix: str | None = None,
) -> list[dict[str, Any]]:
    """[ConfigMap, RayJob] for one training run, rendered by the chart (helm_python).

    Raises:
        SubmitError: helm-python-sdk is missing, the chart is not found, or Helm rejects the values.
    """
    try:
        import helm_python as helm
    except ImportError:
        raise SubmitError(
            "--kubernetes renders charts/medtune with helm-python-sdk: "
            "pip install 'helm-python-sdk>=0.2.2,<0.3' (it is in the dev extra)"
        ) from None
    if not (chart / "Chart.yaml").is_file():
        raise SubmitError(f"--chart {chart}: no Chart.yaml there (a checkout's charts/medtune)")
    if not recipe.storage.root.startswith("s3://"):
        raise SubmitError(
            f"storage.root: {recipe.storage.root!r} is local, but the pods of a RayJob share only "
            "object storage (and their disks vanish with the job): use s3://bucket/prefix "
            "(--set storage.root=s3://...)"
        )
    values = chart_values(recipe, list(values_files or []))
    try:
        with helm.Chart.load(chart) as loaded:
            manifests = loaded.render(values, name=release, namespace=namespace)
    except helm.HelmError as exc:
        raise SubmitError(f"the chart rejected these values: {exc}") from None
    rendered = [
        doc
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    (config_map,) = [o for o in rendered if o["kind"] == "ConfigMap"]
    (job,) = [o for o in rendered if o["kind"] == "RayJob"]

    suffix = suffix or run_suffix()
    base = job["metadata"]["name"][: MAX_RAYJOB_NAME - len(suffix) - 1].rstrip("-")
    job_name = f"{base}-{suffix}"
    old_config_map = config_map["metadata"]["name"]
    config_map_name = f"{job_name}-recipe"
    for obj in (config_map, job):
        _retarget(obj, (old_config_map, config_map_name))
    for obj, name in ((config_map, config_map_name), (job, job_name)):
        obj["metadata"]["name"] = name
        obj["metadata"]["namespace"] = namespace
        obj["metadata"]["labels"]["medtune.io/run"] = job_name
        obj["metadata"]["labels"]["medtune.io/recipe"] = recipe.name
    return [config_map, job]


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objects, sort_keys=False)


def _kubernetes_clients() -> tuple[Any, Any]:
    from kubernetes import client, config

    try:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # read now, not at import
    except config.ConfigException:
        try:
            config.load_incluster_config()
        except config.ConfigException as exc:
            raise SubmitError(f"no Kubernetes credentials (KUBECONFIG or in-cluster): {exc}") from None
    return client.CoreV1Api(), client.CustomObjectsApi()


def create_on_kubernetes(
    objects: list[dict[str, Any]], *, wait: bool = True, poll_s: float = 10, out: TextIO | None = None
) -> int:
    """Create the ConfigMap and the RayJob; with `wait`, poll until the job finishes.

    The ConfigMap is then owned by the RayJob, so deleting the job deletes its recipe.
    """
    from kubernetes.client.exceptions import ApiException

    out = out or sys.stdout
    config_map, job = objects
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    core, custom = _kubernetes_clients()
    group, version, plural = RAY_API
    account = (
        job["spec"]
        .get("rayClusterSpec", {})
        .get("headGroupSpec", {})
        .get("template", {})
        .get("spec", {})
        .get("serviceAccountName")
    )
    if account and account != "default":
        try:
            core.read_namespaced_service_account(account, namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise SubmitError(
                    f"ServiceAccount {account} not found in namespace {namespace}: install the chart "
                    f"first (helm install <release> charts/medtune -n {namespace}) and pass that "
                    "release as --release"
                ) from None
            raise SubmitError(_explain_api_error(exc, namespace)) from None
    try:
        core.create_namespaced_config_map(namespace, config_map)
        created = custom.create_namespaced_custom_object(group, version, namespace, plural, job)
        owner = {
            "apiVersion": job["apiVersion"],
            "kind": "RayJob",
            "name": name,
            "uid": created["metadata"]["uid"],
            "blockOwnerDeletion": False,
        }
        core.patch_namespaced_config_map(
            config_map["metadata"]["name"], namespace, {"metadata": {"ownerReferences": [owner]}}
        )
    except ApiException as exc:
        raise SubmitError(_explain_api_error(exc, namespace)) from None
    print(
        f"[medtune] created RayJob {namespace}/{name}\n"
        f"  kubectl -n {namespace} get rayjob {name} -w\n"
        f"  kubectl -n {namespace} logs -f job/{name}",
        file=out,
        flush=True,
    )
    if not wait:
        return 0
    last = None
    while True:
        status = custom.get_namespaced_custom_object(group, version, namespace, plural, name).get("status", {})
        now = (status.get("jobDeploymentStatus"), status.get("jobStatus"))
        if now != last:
            print(f"[medtune] {name}: deployment {now[0] or '-'}, job {now[1] or '-'}", file=out, flush=True)
            last = now
        if now[0] in ("Complete", "Failed"):
            return 0 if now[1] == "SUCCEEDED" else EXIT_FAILED
        time.sleep(poll_s)


def _explain_api_error(exc: Any, namespace: str) -> str:
    reason = f"{exc.status} {exc.reason}"
    if exc.status == 404:
        return (
            f"{reason}: the cluster has no ray.io/v1 RayJob resource (install the KubeRay operator, "
            f"docs/kubernetes.md step 2) or namespace {namespace} does not exist"
        )
    if exc.status == 409:
        return f"{reason}: an object of that name exists already; submit again for a new run name"
    return f"the Kubernetes API refused the request: {reason}: {exc.body or ''}".rstrip(": ")


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtune submit",
        description=(
            "Run `python -m ray_jobs.train RECIPE` on a Ray cluster (default) or as a KubeRay RayJob (--kubernetes)."
        ),
    )
    parser.add_argument("recipe", type=Path, help="path to the recipe YAML")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a recipe value (repeatable), passed on to the job",
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
        help="the Ray dashboard / job API, e.g. http://127.0.0.1:8265 (a port-forward to the head)",
    )
    parser.add_argument(
        "--working-dir",
        type=Path,
        default=Path.cwd(),
        help="directory uploaded as the job's working dir (default: the current directory)",
    )
    parser.add_argument(
        "--no-wait", dest="wait", action="store_false", help="return once the job is submitted instead of following it"
    )
    k8s = parser.add_argument_group("Kubernetes (a RayJob rendered by charts/medtune)")
    k8s.add_argument("--kubernetes", action="store_true", help="create a RayJob instead of submitting to --address")
    k8s.add_argument("--namespace", "-n", default="default", help="namespace of the Helm release")
    k8s.add_argument(
        "--release",
        default="medtune",
        help="name of the installed Helm release (its ServiceAccount, Secrets, policies)",
    )
    k8s.add_argument(
        "--values",
        "-f",
        dest="values_files",
        action="append",
        type=Path,
        default=[],
        help="chart values files, as given to helm install (repeatable), e.g. a profile",
    )
    k8s.add_argument("--chart", type=Path, default=DEFAULT_CHART, help="the chart directory (default: this checkout's)")
    k8s.add_argument("--dry-run", action="store_true", help="print the ConfigMap and RayJob as YAML; create nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.kubernetes:
            if args.dry_run:
                raise SubmitError("--dry-run needs --kubernetes (for Ray, `medtune validate` checks the recipe)")
            return submit_to_ray(
                args.recipe, args.overrides, address=args.address, working_dir=args.working_dir, wait=args.wait
            )
        recipe = load_recipe(args.recipe, args.overrides)
        objects = build_rayjob(
            recipe, release=args.release, namespace=args.namespace, values_files=args.values_files, chart=args.chart
        )
        if args.dry_run:
            print(to_yaml(objects), end="")
            return 0
        return create_on_kubernetes(objects, wait=args.wait)
    except (MedtuneError, FileNotFoundError) as error:
        return report(error)


if __name__ == "__main__":
    raise SystemExit(main())
