"""What each docker image of ``docker/`` installs and copies, and a check that it is enough.

    python scripts/images.py requirements control            # pinned pip lines, from pyproject.toml
    python scripts/images.py requirements trainer --only torch
    python scripts/images.py check-imports control           # import the image's code with only
                                                             # the image's packages (exit 1 if short)

The Dockerfiles call ``requirements`` at build time, so pyproject.toml stays the one place where
versions are pinned. ``check-imports`` runs here, without a container engine: it imports every
module the image must import while a meta-path finder refuses any distribution the image
does not install (with its dependencies) and any repository file the image does not copy. A lazy
import inside a function body is not exercised; import-time dependencies are.
Needs Python >= 3.11 (tomllib) and, for ``check-imports``, the project's virtualenv.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata as md
import pkgutil
import re
import sys
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


@dataclass(frozen=True)
class ImageSpec:
    dockerfile: str  # path from the repository root
    distributions: tuple[str, ...] | None  # pyproject dependencies it installs (None: all of them)
    copies: tuple[str, ...]  # repository paths copied into /app (the build context is the root)
    imports: tuple[str, ...]  # modules, or packages with all their modules, that import in the image
    modules: tuple[str, ...]  # ``python -m`` entry points the image runs


IMAGES: dict[str, ImageSpec] = {
    # The control plane never imports torch (STYLE.md): its image is small and starts fast.
    "control": ImageSpec(
        "docker/control.Dockerfile",
        (
            "fastapi",
            "uvicorn",
            "pydantic",
            "pydantic-settings",
            "redis",
            "httpx",
            "grpcio",
            "grpcio-health-checking",
            "grpcio-reflection",
            "protobuf",
            "typer",
            "pyyaml",
            "prometheus-client",
            "tqdm",
        ),
        ("contracts", "proto", "services/__init__.py", "services/control", "services/rpc"),
        # the API server; the `distill` CLI and the local demo stack (same package) run on the
        # user's machine and start torch processes, so they are not part of this image
        ("services.control.serve", "services.rpc"),
        ("services.control",),
    ),
    "services": ImageSpec(
        "docker/services.Dockerfile",
        None,
        ("contracts", "proto", "services"),
        ("services.teacher", "services.reward", "services.rpc"),
        ("services.teacher", "services.reward", "services.rpc.healthcheck"),
    ),
    "trainer": ImageSpec(
        "docker/trainer.Dockerfile",
        None,
        ("contracts", "kernels", "learner", "proto", "services"),
        ("learner", "kernels", "services.rollout"),
        ("learner", "services.rollout"),
    ),
}


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(line: str) -> str:
    match = _NAME.match(line)
    if match is None:
        raise ValueError(f"dependencies: cannot read a distribution name in {line!r}")
    return normalize(match.group(1))


def pyproject_dependencies(pyproject: Path) -> dict[str, str]:
    """``{normalized name: requirement line}`` of ``[project] dependencies``."""
    data = tomllib.loads(pyproject.read_text())
    return {requirement_name(line): line for line in data["project"]["dependencies"]}


def requirements(image: str, pyproject: Path, only: Sequence[str] = ()) -> list[str]:
    """The pinned requirement lines the image installs (restricted to ``only`` when given)."""
    deps = pyproject_dependencies(pyproject)
    wanted = IMAGES[image].distributions
    names = [normalize(n) for n in wanted] if wanted is not None else list(deps)
    if only:
        names = [n for n in names if n in {normalize(o) for o in only}]
    missing = [n for n in [*names, *(normalize(o) for o in only)] if n not in deps]
    if missing:
        raise KeyError(f"image {image}: {', '.join(sorted(set(missing)))} not in {pyproject} dependencies")
    return [deps[n] for n in names]


def installed_closure(names: Iterable[str]) -> set[str]:
    """The distributions ``pip install names`` brings in: the names and their requirements,
    recursively, without extras (as installed here, so versions are this venv's)."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    stack = [normalize(n) for n in names]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(normalize(req.name))
    return seen


class ImageFinder(importlib.abc.MetaPathFinder):
    """Finds modules as ``PathFinder`` does, except those the image could not import: for them it
    answers "not found", so an import fails and an optional import (``find_spec`` probe) skips."""

    def __init__(self, allowed: set[str], copies: Sequence[str], root: Path) -> None:
        self.allowed, self.root = allowed, root
        self.copies = [(root / c).resolve() for c in copies]
        self.dists = {top: {normalize(d) for d in ds} for top, ds in md.packages_distributions().items()}
        self.refused: dict[str, str] = {}  # module -> why

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.origin is None or fullname.partition(".")[0] in sys.stdlib_module_names:
            return spec
        why = self._refusal(fullname, Path(spec.origin).resolve())
        if why is None:
            return spec
        self.refused[fullname] = why
        return None

    def find_distributions(
        self, context: md.DistributionFinder.Context | None = None
    ) -> Iterable[md.Distribution]:
        """Metadata of the allowed distributions only (``importlib.metadata`` asks meta-path finders)."""
        found = importlib.machinery.PathFinder.find_distributions(context or md.DistributionFinder.Context())
        return [d for d in found if normalize(d.metadata["Name"]) in self.allowed]

    def _refusal(self, fullname: str, origin: Path) -> str | None:
        if origin.is_relative_to(self.root) and not origin.is_relative_to(self.root / ".venv"):
            if any(origin == c or origin.is_relative_to(c) for c in self.copies):
                return None
            return f"{origin.relative_to(self.root)} is not copied into the image"
        owners = self.dists.get(fullname.partition(".")[0], set())
        if owners and not owners & self.allowed:
            return f"distribution {', '.join(sorted(owners))} is not installed in the image"
        return None


def check_imports(image: str, pyproject: Path) -> list[str]:
    """Import the image's modules under :class:`ImageFinder`; the failures.

    The finder replaces every path-based finder (the editable install's included), so only the
    repository checkout and the allowed distributions of this virtualenv can be imported.
    """
    spec = IMAGES[image]
    allowed = installed_closure(requirement_name(line) for line in requirements(image, pyproject))
    finder = ImageFinder(allowed, spec.copies, ROOT)
    sys.path.insert(0, str(ROOT))
    sys.meta_path[:] = [importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter, finder]
    failures: list[str] = []
    for name in spec.imports:
        for module in _walk(name, failures):
            try:
                importlib.import_module(module)
            except ImportError as err:
                refused = "; ".join(f"{k}: {v}" for k, v in finder.refused.items() if k in str(err))
                failures.append(f"{module}: {err}" + (f" ({refused})" if refused else ""))
    return failures


def _walk(package: str, failures: list[str]) -> list[str]:
    try:
        pkg = importlib.import_module(package)
    except ImportError as err:
        failures.append(f"{package}: {err}")
        return []
    if not hasattr(pkg, "__path__"):
        return [package]
    found = pkgutil.walk_packages(pkg.__path__, f"{package}.", onerror=lambda n: failures.append(n))
    # __main__ modules run their process when imported: their imports are those of the package.
    return [package, *(m.name for m in found if not m.name.endswith(".__main__"))]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/images.py", description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["requirements", "check-imports"])
    p.add_argument("image", choices=sorted(IMAGES))
    p.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    p.add_argument("--only", action="append", default=[], help="requirements: just this distribution")
    a = p.parse_args(argv)
    if a.action == "requirements":
        sys.stdout.write("".join(f"{line}\n" for line in requirements(a.image, a.pyproject, a.only)))
        return 0
    failures = check_imports(a.image, a.pyproject)
    sys.stdout.write("".join(f"{line}\n" for line in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
