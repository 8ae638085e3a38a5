"""docs/DEPLOY.md stays true to the files it describes."""

from __future__ import annotations

import re

from deploy_common import DOCKER, REPO

DOC = REPO / "docs" / "DEPLOY.md"


def test_every_path_named_in_the_guide_exists():
    text = DOC.read_text()
    # (`deploy/vllm-kvcomp` in the kubectl commands is a resource, not a path.)
    pattern = r"(?<![\w/.-])((?:deploy/k8s|deploy/tools|docker|tests/deploy|configs)/[\w./-]*[\w/])"
    paths = set(re.findall(pattern, text))
    assert paths, "the guide names the deployment files"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"docs/DEPLOY.md names paths that do not exist: {missing}"


def test_root_dockerignore_text_matches_the_allow_list():
    """The guide gives the lines for a root .dockerignore: they must be the real allow-list."""
    text = DOC.read_text()
    block = re.search(r"root; give it the same lines:\n\n\s*```\n(.*?)\n\s*```", text, re.S)
    assert block, "the guide shows the .dockerignore lines"
    documented = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    actual = [
        line.strip()
        for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert documented == actual
