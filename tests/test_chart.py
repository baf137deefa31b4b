"""The Helm chart `charts/medtune`, rendered and linted by Helm's real Go engine.

`helm_python` (helm-python-sdk) binds Helm's Go SDK: `Chart.render` is `helm template`
(offline, and it enforces values.schema.json exactly as `helm install` does), `lint` is
`helm lint`. Every rendered object is checked with `kubernetes_validate`; the pod templates
inside the ray.io/v1 custom resources (which kubernetes_validate has no schema for) are
checked as core `PodTemplate` objects. Unit tier: no cluster, no network, a few seconds.
"""

from __future__ import annotations

import copy
import importlib
import json
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import _native
from ray import serve

import ray_jobs.serve
from ray_jobs.core.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "medtune"
PROFILES = sorted((CHART / "profiles").glob("*.yaml"))
K8S_VERSION = "1.34.0"
RELEASE, NAMESPACE = "medtune", "ml"
OFFLINE = {"kuberay": {"skipCrdCheck": True}}
# The chart has no default recipe (Helm would merge its keys into yours); cases without one
# get this, replacing the key as a whole.
EXAMPLE_RECIPE: dict[str, Any] = {
    "name": "medical-qa",
    "model": {"base": "meta-llama/Llama-3.1-8B-Instruct", "quantization": "4bit"},
    "data": {"format": "qa", "train": ["s3://medtune-data/qa/train.jsonl"], "max_seq_len": 2048},
    "lora": {"r": 16, "alpha": 32, "targets": "all-linear"},
    "train": {"epochs": 1, "workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 4, "gradient_checkpointing": True},
    "storage": {"root": "s3://medtune-artifacts/medtune"},
    "serve": {"adapters": ["medical-qa"], "host": "0.0.0.0", "port": 8000, "gpus_per_replica": 1},
}

# Everything optional switched on at once, so every template branch renders somewhere.
EVERYTHING_ON: dict[str, Any] = {
    "s3": {"endpoint": "https://minio.example:9000", "region": "eu-west-1", "existingSecret": "medtune-s3"},
    "hub": {"existingSecret": "medtune-hf"},
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/medtune"}},
    "imagePullSecrets": [{"name": "ghcr"}],
    "extraEnv": [{"name": "NCCL_DEBUG", "value": "WARN"}],
    "cluster": {"enabled": True},
    "trainJob": {"enabled": True, "runName": "ner-r1", "runtimeEnv": {"env_vars": {"A": "1"}}},
    "serving": {
        "enabled": True,
        "upgradeStrategy": "None",
        "gcsFaultTolerance": {"enabled": True, "redisAddress": "redis.ml.svc:6379", "existingSecret": "medtune-redis"},
        "apiKeys": {"existingSecret": "medtune-api-keys"},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "tls": [{"hosts": ["medtune.example.com"], "secretName": "tls"}],
        },
    },
    "networkPolicy": {"dashboardFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ci"}}}]},
    # Every per-group knob, so the values -> pod template test sees each one rendered.
    "head": {
        "nodeSelector": {"pool": "system"},
        "priorityClassName": "medtune-head",
        "env": [{"name": "HEAD_ONLY", "value": "1"}],
        "annotations": {"example.com/head": "yes"},
        "rayStartParams": {"object-store-memory": "1000000000"},
    },
    "workerGroups": [
        {
            "name": "cpu",
            "replicas": 1,
            "minReplicas": 0,
            "maxReplicas": 2,
            "resources": {"cpu": "4", "memory": "16Gi", "ephemeralStorage": "50Gi"},
            "nodeSelector": {"pool": "cpu"},
            "env": [{"name": "GROUP_ONLY", "value": "cpu"}],
            "rayStartParams": {"num-cpus": "3"},
        },
        {
            "name": "gpu",
            "replicas": 0,
            "minReplicas": 0,
            "maxReplicas": 2,
            "resources": {"cpu": "16", "memory": "128Gi", "gpu": 2},
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 1,
                            "preference": {
                                "matchExpressions": [
                                    {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["us-east-1a"]}
                                ]
                            },
                        }
                    ]
                }
            },
            "priorityClassName": "medtune-gpu",
            "annotations": {"example.com/gpu": "yes"},
        },
    ],
}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


CASES: dict[str, dict[str, Any]] = {"defaults": {}, "everything-on": EVERYTHING_ON}
CASES.update({f"profile-{p.stem}": yaml.safe_load(p.read_text()) for p in PROFILES})


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def with_recipe(values: dict[str, Any]) -> dict[str, Any]:
    return {"recipe": EXAMPLE_RECIPE, **values}


def render(chart: helm.Chart, values: dict[str, Any], offline: bool = True) -> dict[str, str]:
    values = with_recipe(values)
    return chart.render(_merge(values, OFFLINE) if offline else values, name=RELEASE, namespace=NAMESPACE)


def objects(manifests: dict[str, str]) -> list[dict[str, Any]]:
    return [
        doc
        for path, text in sorted(manifests.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def cluster_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The Ray cluster spec(s) embedded in a ray.io object."""
    spec = obj["spec"]
    if obj["kind"] == "RayCluster":
        return [spec]
    if obj["kind"] == "RayJob":
        return [spec["rayClusterSpec"]] if "rayClusterSpec" in spec else []
    if obj["kind"] == "RayService":
        return [spec["rayClusterConfig"]]
    raise AssertionError(f"not a Ray object: {obj['kind']}")


def pod_templates(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod the object makes."""
    found = []
    for spec in cluster_specs(obj):
        found.append(("head", spec["headGroupSpec"]["template"]))
        found += [(f"worker:{g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        found.append(("submitter", obj["spec"]["submitterPodTemplate"]))
    return found


def all_pod_templates(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{o['kind']}/{o['metadata']['name']}/{where}", tpl)
        for o in objs
        if o["apiVersion"] == "ray.io/v1"
        for where, tpl in pod_templates(o)
    ]


@pytest.fixture(scope="module", params=sorted(CASES), ids=sorted(CASES))
def case(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    values = CASES[request.param]
    return request.param, values, objects(render(chart, values))


# --------------------------------------------------------------------------- lint, validity
@pytest.mark.parametrize("name", sorted(CASES))
def test_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART, _merge(with_recipe(CASES[name]), OFFLINE), strict=True, kube_version=f"v{K8S_VERSION}")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report
    assert report["total_charts_linted"] == 1


def test_profiles_exist() -> None:
    assert {p.name for p in PROFILES} >= {"cpu-dev.yaml", "gpu-1x8.yaml", "gpu-4x8.yaml"}


def test_every_object_is_valid_kubernetes(case: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, _, objs = case
    assert objs
    for obj in objs:
        if obj["apiVersion"] == "ray.io/v1":
            for where, template in pod_templates(obj):
                pod_template = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": "x"},
                    "template": template,
                }
                try:
                    kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    pytest.fail(f"{obj['kind']} {where}: {exc}")
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# KubeRay ray.io/v1 fields (KubeRay 1.4; authOptions 1.5.1). No CRD schema is available
# offline, so a misspelt field would otherwise reach the API server and be pruned silently.
RAY_CLUSTER_FIELDS = {
    "rayVersion",
    "enableInTreeAutoscaling",
    "autoscalerOptions",
    "headGroupSpec",
    "workerGroupSpecs",
    "gcsFaultToleranceOptions",
    "authOptions",
    "suspend",
    "managedBy",
    "headServiceAnnotations",
}
AUTOSCALER_FIELDS = {
    "version",
    "upscalingMode",
    "idleTimeoutSeconds",
    "imagePullPolicy",
    "resources",
    "securityContext",
    "env",
    "envFrom",
    "volumeMounts",
    "image",
}
HEAD_FIELDS = {"serviceType", "rayStartParams", "template", "headService", "enableIngress"}
WORKER_FIELDS = {
    "groupName",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "rayStartParams",
    "template",
    "scaleStrategy",
    "suspend",
    "idleTimeoutSeconds",
    "numOfHosts",
}
RAY_JOB_FIELDS = {
    "entrypoint",
    "runtimeEnvYAML",
    "submissionMode",
    "backoffLimit",
    "activeDeadlineSeconds",
    "shutdownAfterJobFinishes",
    "ttlSecondsAfterFinished",
    "rayClusterSpec",
    "clusterSelector",
    "submitterPodTemplate",
    "submitterConfig",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "entrypointResources",
    "jobId",
    "metadata",
    "suspend",
    "managedBy",
    "deletionStrategy",
}
RAY_SERVICE_FIELDS = {
    "serveConfigV2",
    "rayClusterConfig",
    "upgradeStrategy",
    "excludeHeadPodFromServeSvc",
    "serveService",
}


def test_ray_objects_use_known_kuberay_fields(case: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, _, objs = case
    allowed = {"RayJob": RAY_JOB_FIELDS, "RayService": RAY_SERVICE_FIELDS, "RayCluster": RAY_CLUSTER_FIELDS}
    for obj in (o for o in objs if o["apiVersion"] == "ray.io/v1"):
        assert set(obj["spec"]) <= allowed[obj["kind"]], obj["kind"]
        for spec in cluster_specs(obj):
            assert set(spec) <= RAY_CLUSTER_FIELDS
            assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_FIELDS
            assert set(spec["headGroupSpec"]) <= HEAD_FIELDS
            for group in spec["workerGroupSpecs"]:
                assert set(group) <= WORKER_FIELDS
                assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
                assert all(isinstance(v, str) for v in group["rayStartParams"].values())


# --------------------------------------------------------------------------- CRD check
def test_install_fails_clearly_without_kuberay_crds(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError) as failure:
        render(chart, {}, offline=False)
    message = str(failure.value)
    assert "KubeRay operator" in message
    assert "helm install kuberay-operator kuberay/kuberay-operator --version 1.4.2" in message
    assert "kuberay.skipCrdCheck=true" in message


def _render_with_api_versions(chart: helm.Chart, values: dict[str, Any], api_versions: list[str]) -> dict[str, str]:
    # Chart.render has no api_versions keyword in helm-python-sdk 0.2.2, but the native
    # helm_render options accept them (helm template --api-versions).
    options = {"name": RELEASE, "namespace": NAMESPACE, "api_versions": api_versions}
    return json.loads(
        _native.call_string("helm_render", chart._raw(), json.dumps(with_recipe(values)), json.dumps(options))
    )


def test_crd_check_passes_when_the_cluster_has_the_crds(chart: helm.Chart) -> None:
    values = {"trainJob": {"enabled": True}, "serving": {"enabled": True}}
    kinds = ["ray.io/v1/RayCluster", "ray.io/v1/RayJob", "ray.io/v1/RayService"]
    rendered = objects(_render_with_api_versions(chart, values, ["ray.io/v1", *kinds]))
    assert {"RayCluster", "RayJob", "RayService"} <= {o["kind"] for o in rendered}
    with pytest.raises(helm.HelmRenderError, match="RayService"):
        _render_with_api_versions(chart, values, ["ray.io/v1", "ray.io/v1/RayCluster", "ray.io/v1/RayJob"])


# --------------------------------------------------------------------------- schema
BAD_VALUES = [
    (
        {
            "workerGroups": [
                {
                    "name": "cpu",
                    "replicas": "two",
                    "minReplicas": 0,
                    "maxReplicas": 2,
                    "resources": {"cpu": "1", "memory": "1Gi"},
                }
            ]
        },
        "/workerGroups/0/replicas",
    ),
    ({"replicaCount": 3}, "additional properties 'replicaCount' not allowed"),
    ({"serving": {"upgradeStrategy": "BlueGreen"}}, "/serving/upgradeStrategy"),
    ({"trainJob": {"submissionMode": "Batch"}}, "/trainJob/submissionMode"),
    ({"image": {"variant": "tpu"}}, "/image/variant"),
    (
        {
            "workerGroups": [
                {
                    "name": "gpu",
                    "replicas": 0,
                    "minReplicas": 0,
                    "maxReplicas": 1,
                    "resources": {"cpu": "1", "memory": "1Gi", "gpu": -1},
                }
            ]
        },
        "/workerGroups/0/resources/gpu",
    ),
    (
        {
            "workerGroups": [
                {
                    "name": "gpu",
                    "replicas": 0,
                    "minReplicas": 0,
                    "maxReplicas": 1,
                    "gpus": 8,
                    "resources": {"cpu": "1", "memory": "1Gi"},
                }
            ]
        },
        "additional properties 'gpus' not allowed",
    ),
    ({"head": {"rayStartParams": {"num-gpus": 1}}}, "/head/rayStartParams/num-gpus"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"rayAuth": {"mode": "password"}}, "/rayAuth/mode"),
    ({"s3": {"accessKey": "AKIA..."}}, "additional properties 'accessKey' not allowed"),
    ({"head": {"resources": {"cpu": "4", "memory": "lots"}}}, "/head/resources/memory"),
    (
        {"containerSecurityContext": {"allowPrivilegeEscalation": True}},
        "/containerSecurityContext/allowPrivilegeEscalation",
    ),
    (
        {"containerSecurityContext": {"capabilities": {"drop": ["NET_RAW"]}}},
        "/containerSecurityContext/capabilities/drop",
    ),
    (
        {"containerSecurityContext": {"capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}}},
        "additional properties 'add' not allowed",
    ),
    ({"containerSecurityContext": {"privileged": True}}, "/containerSecurityContext/privileged"),
    ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
    ({"autoscaling": {"idleTimeoutSeconds": -1}}, "/autoscaling/idleTimeoutSeconds"),
    ({"autoscaling": {"upscalingMode": "Eager"}}, "/autoscaling/upscalingMode"),
    ({"trainJob": {"activeDeadlineSeconds": 0}}, "/trainJob/activeDeadlineSeconds"),
    ({"trainJob": {"backoffLimit": -1}}, "/trainJob/backoffLimit"),
    ({"trainJob": {"shutdownAfterJobFinishes": "yes"}}, "/trainJob/shutdownAfterJobFinishes"),
    ({"serving": {"serve": {"importPath": "ray_jobs/serve.py"}}}, "/serving/serve/importPath"),
    ({"serving": {"serve": {"port": 70000}}}, "/serving/serve/port"),
    ({"s3": {"existingSecret": "My_Secret"}}, "/s3/existingSecret"),
    ({"s3": {"endpoint": "minio:9000"}}, "/s3/endpoint"),
    (
        {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": 123}}},
        "/serviceAccount/annotations/eks.amazonaws.com~1role-arn",
    ),
    ({"head": {"serviceType": "Ingress"}}, "/head/serviceType"),
    (
        {"recipe": {"name": "Bad Name", "model": {"base": "x"}, "data": {"format": "qa", "train": ["a"]}}},
        "/recipe/name",
    ),
    ({"recipe": {"name": "half-a-recipe", "model": {"base": "x"}}}, "/recipe"),
    ({"fullnameOverride": "x" * 41}, "/fullnameOverride"),
    (
        {
            "workerGroups": [
                {
                    "name": "GPU_group",
                    "replicas": 0,
                    "minReplicas": 0,
                    "maxReplicas": 1,
                    "resources": {"cpu": "1", "memory": "1Gi"},
                }
            ]
        },
        "/workerGroups/0/name",
    ),
]


@pytest.mark.parametrize(("values", "expected"), BAD_VALUES, ids=[e for _, e in BAD_VALUES])
def test_schema_rejects_bad_values_through_helm(chart: helm.Chart, values: dict[str, Any], expected: str) -> None:
    """Helm's engine enforces values.schema.json on render, as `helm install` does."""
    with pytest.raises(helm.HelmValuesError) as failure:
        render(chart, values)
    assert expected in str(failure.value)
    # And the same schema, read by an independent draft-07 validator, agrees.
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert list(
        jsonschema.Draft7Validator(schema).iter_errors(chart.merge_values(_merge(with_recipe(values), OFFLINE)))
    )


def test_schema_accepts_defaults_and_every_profile(chart: helm.Chart) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    for name, values in CASES.items():
        chart.validate_schema(chart.merge_values(with_recipe(values)))
        errors = [
            e.message for e in jsonschema.Draft7Validator(schema).iter_errors(chart.merge_values(with_recipe(values)))
        ]
        assert errors == [], name


def test_recipe_is_required_and_never_merged_with_a_default(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="values.recipe is empty"):
        chart.render(_merge({"recipe": {}}, OFFLINE), name=RELEASE, namespace=NAMESPACE)
    # Each profile's recipe reaches the ConfigMap exactly: no key inherited from anywhere
    # (a merged-in default `quantization: 4bit` once turned the CPU profile into QLoRA).
    for path in PROFILES:
        values = yaml.safe_load(path.read_text())
        (config_map,) = by_kind(objects(render(chart, values)), "ConfigMap")
        assert yaml.safe_load(config_map["data"]["recipe.yaml"]) == values["recipe"], path.name


def test_template_checks_fail_with_clear_messages(chart: helm.Chart) -> None:
    cases = [
        ({"rayAuth": {"existingSecret": ""}}, "rayAuth.existingSecret"),
        (
            {"cluster": {"enabled": False}, "trainJob": {"enabled": True, "existingCluster": {"enabled": True}}},
            "cluster.enabled",
        ),
        ({"serving": {"enabled": True, "gcsFaultTolerance": {"enabled": True}}}, "redisAddress"),
        (
            {
                "workerGroups": [
                    {
                        "name": "x",
                        "replicas": 0,
                        "minReplicas": 3,
                        "maxReplicas": 1,
                        "resources": {"cpu": "1", "memory": "1Gi"},
                    }
                ]
            },
            "minReplicas (3) exceeds maxReplicas (1)",
        ),
    ]
    for values, expected in cases:
        with pytest.raises(helm.HelmRenderError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            render(chart, values)


# --------------------------------------------------------------------------- security
def test_security_defaults_on_every_pod(case: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, _, objs = case
    templates = all_pod_templates(objs)
    assert templates
    for where, template in templates:
        spec = template["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, where
        assert pod_sc["runAsUser"] == 1000, where
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert not any(v.get("emptyDir", {}).get("medium") == "Memory" for v in volumes.values()), (
            f"{where}: KubeRay injects /dev/shm"
        )
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{where}: Ray writes /tmp/ray"
            assert "/dev/shm" not in mounts, where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"]), (
                where
            )
            assert not [
                e
                for e in container.get("env", [])
                if e["name"] in ("RAY_AUTH_TOKEN", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY") and "value" in e
            ], where


def test_autoscaler_sidecar_is_hardened_too(case: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, values, objs = case
    for obj in (o for o in objs if o["apiVersion"] == "ray.io/v1"):
        for spec in cluster_specs(obj):
            assert spec["enableInTreeAutoscaling"] is True
            options = spec["autoscalerOptions"]
            assert options["version"] == "v2"
            assert options["idleTimeoutSeconds"] >= 0
            assert options["securityContext"]["allowPrivilegeEscalation"] is False
            assert options["securityContext"]["readOnlyRootFilesystem"] is True
            assert options["resources"]["requests"] == options["resources"]["limits"]


def test_dashboard_is_not_exposed_outside_the_cluster(case: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, _, objs = case
    assert not by_kind(objs, "Secret"), "the chart must never hold secret values"
    for obj in objs:
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP"
    for obj in (o for o in objs if o["apiVersion"] == "ray.io/v1"):
        for spec in cluster_specs(obj):
            assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"


def test_no_secret_values_in_values_files() -> None:
    for path in [CHART / "values.yaml", *PROFILES]:
        text = path.read_text()
        for marker in ("AKIA", "hf_", "BEGIN PRIVATE KEY", "password:", "token:"):
            assert marker not in text, f"{path.name}: {marker}"


# --------------------------------------------------------------------------- Ray shape
def test_head_runs_no_tasks_and_workers_get_guaranteed_gpus(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    name, _, objs = case
    gpus = 0
    for obj in (o for o in objs if o["apiVersion"] == "ray.io/v1"):
        for spec in cluster_specs(obj):
            head = spec["headGroupSpec"]
            assert head["rayStartParams"]["num-cpus"] == "0"
            assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
            head_container = head["template"]["spec"]["containers"][0]
            assert "nvidia.com/gpu" not in head_container["resources"]["limits"]
            for group in spec["workerGroupSpecs"]:
                resources = group["template"]["spec"]["containers"][0]["resources"]
                # KubeRay derives Ray's num-gpus from the limit; a request below it would
                # let the scheduler overcommit the node.
                assert resources["requests"] == resources["limits"], group["groupName"]
                gpus += int(resources["limits"].get("nvidia.com/gpu", 0))
                if "nvidia.com/gpu" in resources["limits"]:
                    tolerations = group["template"]["spec"].get("tolerations", [])
                    assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), group["groupName"]
    if name.startswith("profile-gpu"):
        assert gpus >= 8
    if name == "profile-cpu-dev":
        assert gpus == 0


def test_gpu_profiles_match_their_names(chart: helm.Chart) -> None:
    for stem, nodes in (("gpu-1x8", 1), ("gpu-4x8", 4)):
        values = CASES[f"profile-{stem}"]
        objs = objects(render(chart, values))
        training = by_kind(objs, "RayJob") or by_kind(objs, "RayCluster")
        spec = cluster_specs(training[0])[0]
        group = max(
            spec["workerGroupSpecs"],
            key=lambda g: int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)),
        )
        assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert group["maxReplicas"] == nodes
        recipe = values["recipe"]["train"]
        assert recipe["workers"] * recipe["gpus_per_worker"] == nodes * 8, stem


def test_images_follow_the_variant_and_app_version(chart: helm.Chart) -> None:
    app_version = chart.metadata["appVersion"]
    for name, values in CASES.items():
        objs = objects(render(chart, values))
        images = {c["image"] for _, t in all_pod_templates(objs) for c in t["spec"]["containers"]}
        expected = f"ghcr.io/medtune/medtune:{app_version}" + ("-cpu" if name == "profile-cpu-dev" else "")
        assert images == {expected}, name


def test_the_serving_cluster_can_run_the_vllm_image_while_training_keeps_the_gpu_image(chart: helm.Chart) -> None:
    values = _merge(EVERYTHING_ON, {"serving": {"imageVariant": "vllm"}})
    images: dict[str, set[str]] = {}
    for where, template in all_pod_templates(objects(render(chart, values))):
        images.setdefault(where.split("/")[0], set()).update(c["image"] for c in template["spec"]["containers"])
    version = chart.metadata["appVersion"]
    assert images["RayService"] == {f"ghcr.io/medtune/medtune:{version}-vllm"}
    assert images["RayJob"] == images["RayCluster"] == {f"ghcr.io/medtune/medtune:{version}"}


# --------------------------------------------------------------------------- recipe, jobs, serving
def test_recipe_configmap_is_a_valid_recipe_mounted_everywhere(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, _, objs = case
    (config_map,) = by_kind(objs, "ConfigMap")
    recipe = parse_recipe(yaml.safe_load(config_map["data"]["recipe.yaml"]), "ConfigMap recipe.yaml")
    assert recipe.name
    for where, template in all_pod_templates(objs):
        if where.endswith("/submitter"):
            continue  # it only calls `ray job submit`; the driver runs on the head
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert volumes[mounts["/etc/medtune"]]["configMap"]["name"] == config_map["metadata"]["name"], where


def test_train_job_runs_the_recipe(chart: helm.Chart) -> None:
    own = objects(render(chart, CASES["profile-gpu-4x8"]))
    (job,) = by_kind(own, "RayJob")
    spec = job["spec"]
    # No --run: the run name derives from the recipe and the data, stable across retries.
    assert spec["entrypoint"] == "python -m ray_jobs.train /etc/medtune/recipe.yaml"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode" and "rayClusterSpec" in spec and "clusterSelector" not in spec
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"env_vars": {"NCCL_DEBUG": "WARN"}}
    submitter_env = {e["name"] for e in spec["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= submitter_env

    shared = objects(render(chart, CASES["profile-cpu-dev"]))
    (job,) = by_kind(shared, "RayJob")
    (cluster,) = by_kind(shared, "RayCluster")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in job["spec"]


def test_serve_config_builds_the_medtune_app(chart: helm.Chart) -> None:
    objs = objects(render(chart, CASES["profile-gpu-1x8"]))
    (service,) = by_kind(objs, "RayService")
    assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "ray_jobs.serve:app_builder"
    assert app["args"] == {"recipe": "/etc/medtune/recipe.yaml"}
    assert app["route_prefix"] == "/"
    assert serve_config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    # test_serve_config_imports_the_real_app imports and calls it on every case.


def test_ray_auth_modes(chart: helm.Chart) -> None:
    def envs(values: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        objs = objects(render(chart, values))
        (cluster,) = by_kind(objs, "RayCluster")
        return [cluster], cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]

    (cluster,), env = envs({})
    names = {e["name"]: e for e in env}
    assert names["RAY_AUTH_MODE"]["value"] == "token"
    assert names["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "medtune-ray-auth", "key": "auth_token"}
    assert "authOptions" not in cluster["spec"]
    assert {e["name"] for e in cluster["spec"]["autoscalerOptions"]["env"]} == {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}

    (cluster,), env = envs({"rayAuth": {"mode": "operator"}})
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & {e["name"] for e in env}

    _, env = envs({"rayAuth": {"enabled": False}})
    assert {e["name"]: e.get("value") for e in env}["RAY_AUTH_MODE"] == "disabled"


def test_optional_features_are_wired(chart: helm.Chart) -> None:
    objs = objects(render(chart, EVERYTHING_ON))
    (service,) = by_kind(objs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis.ml.svc:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "medtune-redis", "key": "password"}}},
    }
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    env = {e["name"]: e for e in worker["containers"][0]["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.example:9000"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "medtune-s3"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "medtune-hf", "key": "HF_TOKEN"}
    # API keys: mounted from the Secret and named in the recipe.
    (config_map,) = by_kind(objs, "ConfigMap")
    recipe = yaml.safe_load(config_map["data"]["recipe.yaml"])
    assert recipe["serve"]["api_keys_file"] == "/var/run/medtune/api-keys/api-keys"
    mounts = {m["mountPath"]: m["name"] for m in worker["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in worker["volumes"]}
    assert volumes[mounts["/var/run/medtune/api-keys"]]["secret"]["secretName"] == "medtune-api-keys"
    # Service account with the cloud identity annotation.
    (account,) = by_kind(objs, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert worker["serviceAccountName"] == account["metadata"]["name"]
    # Ingress -> the Serve service KubeRay creates for the RayService.
    (ingress,) = by_kind(objs, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{service['metadata']['name']}-serve-svc", "port": {"number": 8000}}


def test_network_policy_and_pdb_select_the_release_pods(chart: helm.Chart) -> None:
    objs = objects(render(chart, CASES["profile-gpu-1x8"]))
    (policy,) = by_kind(objs, "NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    templates = all_pod_templates(objs)
    for where, template in templates:
        labels = template["metadata"]["labels"]
        assert selector.items() <= labels.items(), where
    rules = policy["spec"]["ingress"]
    internal = [r for r in rules if "ports" not in r]
    assert internal == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
    serve_rules = [r for r in rules if {"protocol": "TCP", "port": 8000} in r.get("ports", [])]
    assert serve_rules and serve_rules[0]["from"] == CASES["profile-gpu-1x8"].get("networkPolicy", {}).get(
        "serveFrom", chart.values["networkPolicy"]["serveFrom"]
    )

    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    pdb_selector = pdb["spec"]["selector"]["matchLabels"]
    serve_workers = [t for w, t in templates if w.startswith("RayService/") and ":" in w]
    assert serve_workers and all(pdb_selector.items() <= t["metadata"]["labels"].items() for t in serve_workers)
    others = [t for w, t in templates if not (w.startswith("RayService/") and ":" in w)]
    assert not any(pdb_selector.items() <= t["metadata"]["labels"].items() for t in others)


def test_notes_explain_how_to_reach_the_cluster(chart: helm.Chart) -> None:
    notes = render(chart, CASES["profile-gpu-1x8"])["medtune/templates/NOTES.txt"]
    assert "kubectl -n ml port-forward svc/medtune-head-svc 8265:8265" in notes
    assert "ray job submit --address http://localhost:8265" in notes
    assert "export RAY_AUTH_MODE=token" in notes
    assert "port-forward svc/medtune-serve-serve-svc 8000:8000" in notes
    assert "from openai import OpenAI" in notes


# --------------------------------------------------------------------------- values -> every rendered object
# The tests below run on every case (defaults, everything-on, each profile) and derive what
# they expect from the merged values, so a new profile is checked without new test code.
Case = tuple[str, dict[str, Any], list[dict[str, Any]]]
QUANTITY_UNITS = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "Ki": 2**10,
    "M": 1e6,
    "Mi": 2**20,
    "G": 1e9,
    "Gi": 2**30,
    "T": 1e12,
    "Ti": 2**40,
}


def quantity(text: str | int | float) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()  # type: ignore[union-attr]
    return float(number) * QUANTITY_UNITS[unit]


def merged_values(chart: helm.Chart, values: dict[str, Any]) -> dict[str, Any]:
    return chart.merge_values(_merge(with_recipe(values), OFFLINE))


def groups_for(obj: dict[str, Any], v: dict[str, Any]) -> list[dict[str, Any]]:
    """The worker-group values the chart should have used for this Ray object's cluster."""
    own = {
        "RayCluster": [],
        "RayJob": v["trainJob"].get("workerGroups") or [],
        "RayService": v["serving"].get("workerGroups") or [],
    }
    return own[obj["kind"]] or v["workerGroups"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def expected_resources(resources: dict[str, Any]) -> dict[str, str]:
    out = {"cpu": str(resources["cpu"]), "memory": str(resources["memory"])}
    if resources.get("gpu"):
        out["nvidia.com/gpu"] = str(resources["gpu"])
    if resources.get("ephemeralStorage"):
        out["ephemeral-storage"] = str(resources["ephemeralStorage"])
    return out


def assert_scheduling(where: str, spec: dict[str, Any], group: dict[str, Any]) -> None:
    for key in ("nodeSelector", "tolerations", "affinity"):
        assert spec.get(key) == (group.get(key) or None), f"{where}: {key}"
    assert spec.get("priorityClassName") == (group.get("priorityClassName") or None), f"{where}: priorityClassName"


def test_values_reach_every_pod_template(chart: helm.Chart, case: Case) -> None:
    """Head and worker groups: replicas, requests == limits, scheduling knobs, env, annotations."""
    _, values, objs = case
    v = merged_values(chart, values)
    for obj in (o for o in objs if o["apiVersion"] == "ray.io/v1"):
        for spec in cluster_specs(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            head = spec["headGroupSpec"]
            head_spec = head["template"]["spec"]
            (head_container,) = head_spec["containers"]
            assert head_container["resources"] == {
                "requests": expected_resources(v["head"]["resources"]),
                "limits": expected_resources(v["head"]["resources"]),
            }, where
            # The head holds GCS, the dashboard and the job drivers: never a token-sized pod.
            assert quantity(head_container["resources"]["limits"]["memory"]) >= 4 * 2**30, f"{where}: head memory"
            assert "nvidia.com/gpu" not in head_container["resources"]["limits"], where
            # Kept off GPU nodes: it never tolerates their taint (and by default a required
            # node affinity also excludes nodes labelled nvidia.com/gpu.present).
            assert not any(t.get("key") == "nvidia.com/gpu" for t in head_spec.get("tolerations", [])), where
            assert_scheduling(f"{where} head", head_spec, v["head"])
            assert {e["name"] for e in v["head"].get("env", [])} <= set(env_of(head_container)), where
            assert v["head"].get("annotations", {}).items() <= head["template"]["metadata"]["annotations"].items(), (
                where
            )
            assert {
                k: str(x) for k, x in v["head"].get("rayStartParams", {}).items() if k != "num-cpus"
            }.items() <= head["rayStartParams"].items()

            expected = {g["name"]: g for g in groups_for(obj, v)}
            rendered = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
            assert set(rendered) == set(expected), where
            for name, group in rendered.items():
                want = expected[name]
                gwhere = f"{where} worker:{name}"
                assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (
                    want["replicas"],
                    want["minReplicas"],
                    want["maxReplicas"],
                ), gwhere
                pod = group["template"]["spec"]
                (container,) = pod["containers"]
                # KubeRay derives num-cpus/num-gpus/memory from the limits; requests equal
                # them so the scheduler reserves exactly what Ray will use.
                assert container["resources"] == {
                    "requests": expected_resources(want["resources"]),
                    "limits": expected_resources(want["resources"]),
                }, gwhere
                assert_scheduling(gwhere, pod, want)
                if want["resources"].get("gpu"):
                    assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), (
                        f"{gwhere}: GPU taint not tolerated"
                    )
                assert {e["name"] for e in want.get("env", [])} <= set(env_of(container)), gwhere
                assert want.get("annotations", {}).items() <= group["template"]["metadata"]["annotations"].items(), (
                    gwhere
                )
                assert group["rayStartParams"] == {k: str(x) for k, x in want.get("rayStartParams", {}).items()}, gwhere


def test_autoscaling_v2_follows_values(chart: helm.Chart, case: Case) -> None:
    _, values, objs = case
    v = merged_values(chart, values)
    for obj in (o for o in objs if o["apiVersion"] == "ray.io/v1"):
        for spec in cluster_specs(obj):
            options = spec["autoscalerOptions"]
            assert (options["version"], options["idleTimeoutSeconds"], options["upscalingMode"]) == (
                "v2",
                v["autoscaling"]["idleTimeoutSeconds"],
                v["autoscaling"]["upscalingMode"],
            )
            head = spec["headGroupSpec"]["template"]["spec"]
            # Only the head mounts a service-account token: the autoscaler sidecar needs it.
            assert head["automountServiceAccountToken"] is True
            for _, template in pod_templates(obj):
                (container,) = template["spec"]["containers"]
                assert (
                    env_of(container).get("MEDTUNE_CLUSTER_AUTOSCALES", {}).get("value") == "1"
                    or container["name"] == "ray-job-submitter"
                )


def test_without_autoscaling_nothing_autoscales(chart: helm.Chart) -> None:
    objs = objects(render(chart, {"autoscaling": {"enabled": False}}))
    (cluster,) = by_kind(objs, "RayCluster")
    assert "enableInTreeAutoscaling" not in cluster["spec"] and "autoscalerOptions" not in cluster["spec"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["automountServiceAccountToken"] is False
    # The train stage then checks GPUs against what the cluster has right now.
    assert "MEDTUNE_CLUSTER_AUTOSCALES" not in env_of(head["containers"][0])


def test_autoscaler_sidecar_is_a_valid_container(case: Case) -> None:
    """KubeRay turns autoscalerOptions into the head's sidecar container: validate it as one."""
    _, _, objs = case
    for obj in (o for o in objs if o["apiVersion"] == "ray.io/v1"):
        for spec in cluster_specs(obj):
            options = spec["autoscalerOptions"]
            container = {
                "name": "autoscaler",
                "image": "rayproject/ray:2.60.0",
                **{
                    k: options[k]
                    for k in ("imagePullPolicy", "resources", "securityContext", "env", "volumeMounts")
                    if k in options
                },
            }
            head = copy.deepcopy(spec["headGroupSpec"]["template"])
            head["spec"]["containers"].append(container)
            kubernetes_validate.validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": head},
                K8S_VERSION,
                strict=True,
            )
            assert {m["mountPath"] for m in options["volumeMounts"]} == {"/tmp"}


def test_train_job_follows_values(chart: helm.Chart, case: Case) -> None:
    _, values, objs = case
    v = merged_values(chart, values)
    jobs = by_kind(objs, "RayJob")
    assert len(jobs) == (1 if v["trainJob"]["enabled"] else 0)
    for job in jobs:
        spec, want = job["spec"], v["trainJob"]
        run = f" --run {want['runName']}" if want.get("runName") else ""
        assert spec["entrypoint"] == f"python -m ray_jobs.train /etc/medtune/recipe.yaml{run}"
        assert (spec["submissionMode"], spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (
            want["submissionMode"],
            want["backoffLimit"],
            want["activeDeadlineSeconds"],
        )
        if want["runtimeEnv"]:
            assert yaml.safe_load(spec["runtimeEnvYAML"]) == want["runtimeEnv"]
        else:
            assert "runtimeEnvYAML" not in spec
        if want["existingCluster"]["enabled"]:
            # KubeRay rejects shutdownAfterJobFinishes on a cluster the job does not own.
            cluster = want["existingCluster"]["name"] or by_kind(objs, "RayCluster")[0]["metadata"]["name"]
            assert spec["clusterSelector"] == {"ray.io/cluster": cluster}
            assert not {"rayClusterSpec", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished"} & set(spec)
        else:
            assert (spec["shutdownAfterJobFinishes"], spec["ttlSecondsAfterFinished"]) == (
                want["shutdownAfterJobFinishes"],
                want["ttlSecondsAfterFinished"],
            )
            assert "clusterSelector" not in spec and "rayClusterSpec" in spec
        assert ("submitterPodTemplate" in spec) == (want["submissionMode"] == "K8sJobMode")


def test_service_account_and_secret_references(chart: helm.Chart, case: Case) -> None:
    """Cloud identity on the ServiceAccount every pod uses; Secrets only by the names in values."""
    _, values, objs = case
    v = merged_values(chart, values)
    (account,) = by_kind(objs, "ServiceAccount")
    assert account["metadata"].get("annotations", {}) == v["serviceAccount"]["annotations"]
    allowed = {v[k]["existingSecret"] for k in ("s3", "hub", "rayAuth")} | {
        v["serving"]["apiKeys"]["existingSecret"],
        v["serving"]["gcsFaultTolerance"]["existingSecret"],
    }
    allowed.discard("")
    referenced = set()
    for where, template in all_pod_templates(objs):
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], where
        referenced |= {vol["secret"]["secretName"] for vol in template["spec"]["volumes"] if "secret" in vol}
        for container in template["spec"]["containers"]:
            referenced |= {
                e["valueFrom"]["secretKeyRef"]["name"]
                for e in container.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})
            }
    for obj in (o for o in objs if o["apiVersion"] == "ray.io/v1"):
        for spec in cluster_specs(obj):
            password = spec.get("gcsFaultToleranceOptions", {}).get("redisPassword")
            if password:
                referenced.add(password["valueFrom"]["secretKeyRef"]["name"])
    assert referenced <= allowed, referenced - allowed
    if v["rayAuth"]["enabled"] and v["rayAuth"]["mode"] == "secret":
        assert v["rayAuth"]["existingSecret"] in referenced


def test_serve_config_imports_the_real_app(chart: helm.Chart, case: Case, tmp_path: Path) -> None:
    """serveConfigV2's import path is ray_jobs.serve:app_builder, and the real builder accepts
    its args and the mounted recipe; the replica's GPUs fit a serving worker."""
    _, values, objs = case
    v = merged_values(chart, values)
    services = by_kind(objs, "RayService")
    assert len(services) == (1 if v["serving"]["enabled"] else 0)
    for service in services:
        assert service["spec"]["upgradeStrategy"] == {"type": v["serving"]["upgradeStrategy"]}
        cluster = service["spec"]["rayClusterConfig"]
        assert ("gcsFaultToleranceOptions" in cluster) == v["serving"]["gcsFaultTolerance"]["enabled"]
        config = yaml.safe_load(service["spec"]["serveConfigV2"])
        (app,) = config["applications"]
        module_name, _, attribute = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module_name), attribute)
        assert builder is ray_jobs.serve.app_builder
        # The recipe arg is the ConfigMap as mounted in every serving pod.
        (config_map,) = by_kind(objs, "ConfigMap")
        for where, template in pod_templates(service):
            mounts = {m["mountPath"]: m["name"] for m in template["spec"]["containers"][0]["volumeMounts"]}
            volumes = {vol["name"]: vol for vol in template["spec"]["volumes"]}
            assert (
                volumes[mounts[posixpath.dirname(app["args"]["recipe"])]]["configMap"]["name"]
                == config_map["metadata"]["name"]
            ), where
        recipe_file = tmp_path / "recipe.yaml"
        recipe_file.write_text(config_map["data"]["recipe.yaml"])
        application = builder({**app["args"], "recipe": str(recipe_file)})
        assert isinstance(application, serve.Application)
        recipe = yaml.safe_load(config_map["data"]["recipe.yaml"])
        replica_gpus = application._bound_deployment.ray_actor_options.get("num_gpus", 0)
        assert replica_gpus == recipe["serve"].get("gpus_per_replica", 0)
        fits = [
            g
            for g in cluster["workerGroupSpecs"]
            if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
            >= replica_gpus
            and g["maxReplicas"] >= 1
        ]
        assert fits, f"no serving worker group has {replica_gpus} GPUs for a replica"
        assert config["http_options"]["port"] == v["serving"]["serve"]["port"]
        head_ports = {
            p["name"]: p["containerPort"]
            for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
        }
        assert head_ports["serve"] == v["serving"]["serve"]["port"]


def test_training_recipe_fits_its_cluster(chart: helm.Chart, case: Case) -> None:
    """Ray Train's workers x (cpus, gpus) fit the worker groups of the cluster that runs them."""
    _, _, objs = case
    (config_map,) = by_kind(objs, "ConfigMap")
    train = yaml.safe_load(config_map["data"]["recipe.yaml"]).get("train", {})
    workers, gpus, cpus = train.get("workers", 1), train.get("gpus_per_worker", 0), train.get("cpus_per_worker", 1)
    jobs = by_kind(objs, "RayJob")
    clusters = [cluster_specs(j)[0] for j in jobs if "rayClusterSpec" in j["spec"]] or [
        cluster_specs(c)[0] for c in by_kind(objs, "RayCluster")
    ]
    for spec in clusters:
        slots = 0
        for group in spec["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            pod_gpus, pod_cpus = (
                int(limits.get("nvidia.com/gpu", 0)),
                quantity(group["rayStartParams"].get("num-cpus", limits["cpu"])),
            )
            per_pod = min(pod_cpus // cpus, pod_gpus // gpus if gpus else float("inf"))
            slots += int(per_pod) * group["maxReplicas"]
        assert slots >= workers, f"{workers} Ray Train workers x ({cpus} CPU, {gpus} GPU) do not fit"


def test_network_policy_covers_every_pod(chart: helm.Chart, case: Case) -> None:
    _, values, objs = case
    v = merged_values(chart, values)
    policies = by_kind(objs, "NetworkPolicy")
    assert len(policies) == (1 if v["networkPolicy"]["enabled"] else 0)
    for policy in policies:
        selector = policy["spec"]["podSelector"]["matchLabels"]
        for where, template in all_pod_templates(objs):
            assert selector.items() <= template["metadata"]["labels"].items(), where
        dashboard_rules = [
            r for r in policy["spec"]["ingress"] if {"protocol": "TCP", "port": 8265} in r.get("ports", [])
        ]
        (rule,) = dashboard_rules
        # The dashboard (job API, code execution) only from the operator and named peers.
        assert len(rule["from"]) == 1 + len(v["networkPolicy"]["dashboardFrom"])
    pdbs, ingresses = by_kind(objs, "PodDisruptionBudget"), by_kind(objs, "Ingress")
    assert len(pdbs) == (1 if v["serving"]["enabled"] and v["serving"]["pdb"]["enabled"] else 0)
    assert len(ingresses) == (1 if v["serving"]["enabled"] and v["serving"]["ingress"]["enabled"] else 0)


def test_notes_render_for_every_case(chart: helm.Chart, case: Case) -> None:
    name, values, _ = case
    v = merged_values(chart, values)
    notes = render(chart, values)["medtune/templates/NOTES.txt"]
    if v["cluster"]["enabled"]:
        assert "port-forward svc/medtune-head-svc 8265:8265" in notes, name
    if v["trainJob"]["enabled"]:
        assert "kubectl -n ml get rayjob medtune-train" in notes, name
    if v["serving"]["enabled"]:
        assert "from openai import OpenAI" in notes, name
    assert ("export RAY_AUTH_TOKEN=" in notes) == (v["rayAuth"]["enabled"] and v["rayAuth"]["mode"] == "secret")
