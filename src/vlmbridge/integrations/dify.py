"""The Dify plugin folder and its app templates: find them, pack the plugin into a .difypkg, fill a template.

The one real copy of the plugin lives in the repository's `integrations/dify/`. `integrations/.dify_plugin` beside
this module is a symlink to it, listed as package data, so a wheel carries the files themselves; a source checkout
or an editable install reads them through the link (or, where links are not kept, from the checkout directly).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vlmbridge.errors import InvalidRequestError, VlmbridgeError

__all__ = [
    "BUILTIN_PROVIDER",
    "PLUGIN_PROVIDER",
    "TEMPLATE_MODEL",
    "Template",
    "build_package",
    "package_files",
    "plugin_dir",
    "plugin_version",
    "render_template",
    "resolve_provider",
    "templates",
]

PLUGIN_DIR_ENV = "VLMBRIDGE_DIFY_PLUGIN_DIR"
PLUGIN_PROVIDER = "vlmbridge/vlmbridge/vlmbridge"  # <author>/<plugin name>/<provider>, as Dify's DSL names it
BUILTIN_PROVIDER = "langgenius/openai_api_compatible/openai_api_compatible"
TEMPLATE_MODEL = "Qwen3-VL-8B-Instruct"  # the model name the templates ship with; `render_template` replaces it
_PROVIDER_ALIASES = {
    "vlmbridge": PLUGIN_PROVIDER,
    "openai_api_compatible": BUILTIN_PROVIDER,
    "openai-api-compatible": BUILTIN_PROVIDER,
}
_REQUIRED = ("manifest.yaml", "main.py", "requirements.txt", "provider/vlmbridge.yaml", "models/llm/llm.py")
_ALWAYS_IGNORED = ("__pycache__/", "*.pyc", ".DS_Store", ".git/")
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)  # fixed timestamps: the same folder always packs to the same bytes


def plugin_dir() -> Path:
    """The Dify plugin folder: $VLMBRIDGE_DIFY_PLUGIN_DIR, the packaged copy, or the source checkout's."""
    override = os.environ.get(PLUGIN_DIR_ENV)
    candidates = [Path(override)] if override else []
    here = Path(__file__).resolve().parent
    candidates += [here / ".dify_plugin", here.parents[2] / "integrations" / "dify"]
    for folder in candidates:
        if (folder / "manifest.yaml").is_file():
            return folder.resolve()
    raise VlmbridgeError(
        f"the Dify plugin folder is missing (looked in {', '.join(str(c) for c in candidates)})",
        fix=f"reinstall vlmbridge, or point {PLUGIN_DIR_ENV} at a checkout's integrations/dify",
    )


def plugin_version(folder: Path) -> str:
    """The plugin's `version:` from manifest.yaml (top level, first match)."""
    text = (folder / "manifest.yaml").read_text(encoding="utf-8")
    found = re.search(r"^version:\s*[\"']?([^\"'\s#]+)", text, flags=re.MULTILINE)
    if not found:
        raise VlmbridgeError(f"{folder / 'manifest.yaml'} has no top-level version", fix="add `version: X.Y.Z`")
    return found.group(1)


def _ignore_patterns(folder: Path) -> list[str]:
    ignore = folder / ".difyignore"
    lines = ignore.read_text(encoding="utf-8").splitlines() if ignore.is_file() else []
    return [*_ALWAYS_IGNORED, *(ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#"))]


def _ignored(rel: PurePosixPath, is_dir: bool, patterns: list[str]) -> bool:
    # The subset of .gitignore rules plugins use: `name/` (a folder anywhere), globs on a name, or anchored paths.
    for pattern in patterns:
        dir_only = pattern.endswith("/")
        pat = pattern.rstrip("/")
        if dir_only and not is_dir:
            continue
        if "/" in pat:
            if fnmatch.fnmatch(rel.as_posix(), pat.lstrip("/")):
                return True
        elif fnmatch.fnmatch(rel.name, pat):
            return True
    return False


def package_files(folder: Path) -> list[tuple[str, Path]]:
    """(name in the package, file) for every file the .difypkg holds, sorted; honours .difyignore."""
    patterns = _ignore_patterns(folder)
    out: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(folder):
        base = PurePosixPath(Path(root).relative_to(folder).as_posix())
        dirs[:] = sorted(d for d in dirs if not _ignored(base / d, True, patterns))
        out += [
            (str(base / f).removeprefix("./"), Path(root) / f) for f in files if not _ignored(base / f, False, patterns)
        ]
    return sorted(out)


def build_package(out: Path | None = None, folder: Path | None = None) -> Path:
    """Zip the plugin folder into an installable .difypkg (what `dify plugin package` makes); returns its path."""
    folder = folder or plugin_dir()
    missing = [name for name in _REQUIRED if not (folder / name).is_file()]
    if missing:
        raise VlmbridgeError(f"{folder} is not a complete Dify plugin: missing {', '.join(missing)}")
    target = out or Path.cwd() / f"vlmbridge-{plugin_version(folder)}.difypkg"
    if target.is_dir():
        target = target / f"vlmbridge-{plugin_version(folder)}.difypkg"
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, path in package_files(folder):
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, path.read_bytes())
    return target


# --- app templates -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    name: str
    path: Path
    title: str


def templates(folder: Path | None = None) -> list[Template]:
    """The app templates shipped with the plugin (integrations/dify/templates/*.yml)."""
    root = (folder or plugin_dir()) / "templates"
    out = []
    for path in sorted(root.glob("*.yml")):
        title = re.search(r"^\s+name:\s*(.+)$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
        out.append(Template(path.stem, path, title.group(1).strip() if title else path.stem))
    return out


def resolve_provider(provider: str) -> str:
    """A DSL provider id from a short name (vlmbridge, openai_api_compatible) or a full <author>/<plugin>/<name>."""
    value = _PROVIDER_ALIASES.get(provider.strip().lower(), provider.strip())
    if not re.fullmatch(r"[a-z0-9_-]+/[a-z0-9_-]+/[a-zA-Z0-9_-]+", value):
        raise InvalidRequestError(
            f"unknown provider {provider!r}: use vlmbridge, openai_api_compatible, or <author>/<plugin>/<provider>",
            param="provider",
        )
    return value


def render_template(name: str, model: str, provider: str = "vlmbridge", folder: Path | None = None) -> str:
    """Template NAME as DSL text, with every LLM node using `provider` and `model`."""
    found = {t.name: t for t in templates(folder)}
    if name not in found:
        raise InvalidRequestError(f"no template {name!r}; there are: {', '.join(sorted(found))}", param="name")
    if not model.strip():
        raise InvalidRequestError("the model name must not be empty", param="model")
    text = found[name].path.read_text(encoding="utf-8")
    provider_id = resolve_provider(provider)
    # Line-exact replacement keeps the file as written (comments, order); JSON strings are valid YAML scalars.
    text, n_provider = re.subn(
        rf"^(\s+provider:\s*){re.escape(PLUGIN_PROVIDER)}\s*$", rf"\g<1>{provider_id}", text, flags=re.MULTILINE
    )
    text, n_model = re.subn(
        rf"^(\s+name:\s*){re.escape(TEMPLATE_MODEL)}\s*$",
        lambda m: m.group(1) + json.dumps(model.strip(), ensure_ascii=False),
        text,
        flags=re.MULTILINE,
    )
    if n_provider == 0 or n_provider != n_model:
        raise VlmbridgeError(f"template {name!r} does not have the expected model blocks ({n_provider}/{n_model})")
    return text
