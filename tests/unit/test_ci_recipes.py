"""The CI recipes in the README: the workflow files parse as YAML and hold the steps
the suite runs (tests/integration/test_ci_snapshot.py runs the plain-shell ones)."""

from __future__ import annotations

import yaml
from support.ci_recipes import RECIPE_REGISTRY, fenced_blocks, shell_recipe


def workflows() -> tuple[dict, dict]:
    """(GitHub Actions workflow, GitLab CI file), in README order."""
    docs = [yaml.safe_load(block) for block in fenced_blocks("yaml")]
    assert len(docs) == 2, f"want a GitHub Actions and a GitLab CI block, found {len(docs)} yaml blocks"
    return docs[0], docs[1]


def test_github_workflow_runs_the_recipe_next_to_a_registry_service() -> None:
    github, _ = workflows()
    job = github["jobs"]["snapshot"]
    assert job["services"]["registry"]["image"] == "registry:2"
    assert "5000:5000" in job["services"]["registry"]["ports"]
    runs = [step["run"] for step in job["steps"] if "run" in step]
    assert any(r.startswith("skopeo copy ") and f"docker://{RECIPE_REGISTRY}/app:1.0" in r for r in runs)
    snapshot = next(r for r in runs if r.startswith("make snapshot "))
    assert f'IMAGES="{RECIPE_REGISTRY}/app:1.0"' in snapshot and f"PLAIN_HTTP={RECIPE_REGISTRY}" in snapshot
    assert "PUSH=" in snapshot
    triggers = github.get("on", github.get(True))  # YAML 1.1 reads the key `on` as true
    assert "push" in triggers


def test_gitlab_job_runs_the_recipe_next_to_a_registry_service() -> None:
    _, gitlab = workflows()
    job = gitlab["snapshot"]
    service = job["services"][0]
    assert service["name"] == "registry:2"
    host = f"{service['alias']}:5000"
    assert any(line.startswith("skopeo copy ") and f"docker://{host}/app:1.0" in line for line in job["script"])
    snapshot = next(line for line in job["script"] if line.startswith("make snapshot "))
    assert f'IMAGES="{host}/app:1.0"' in snapshot and f"PLAIN_HTTP={host}" in snapshot and "PUSH=" in snapshot


def test_plain_shell_recipe_pushes_then_snapshots() -> None:
    lines = shell_recipe().splitlines()
    assert lines[0].startswith("skopeo copy ") and lines[1].startswith("make snapshot ")
    assert f"PUSH={RECIPE_REGISTRY}/" in lines[1]
