"""`vlmbridge models list | load | unload | reload`: a running server's models, through its admin API."""

from __future__ import annotations

import json
import threading
import time
from typing import Annotated, Any

import httpx
import typer

from vlmbridge.cli.console import err_console, out_console
from vlmbridge.errors import VlmbridgeError

__all__ = ["app"]

app = typer.Typer(
    name="models",
    help="List, load, unload and hot-swap the models of a running server (needs its --admin-key).",
    no_args_is_help=True,
    add_completion=False,
)

Url = Annotated[
    str,
    typer.Option("--url", envvar="VLMBRIDGE_URL", help="The server, e.g. http://127.0.0.1:8000 (a /v1 is dropped)."),
]
AdminKey = Annotated[
    str, typer.Option("--admin-key", envvar="VLMBRIDGE_ADMIN_KEY", help="The server's --admin-key.", show_default=False)
]
_POLL_S = 0.25


class _Admin:
    def __init__(self, url: str, key: str) -> None:
        base = url.rstrip("/")
        self.base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.headers = {"Authorization": f"Bearer {key}"}

    def request(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        try:
            response = httpx.request(method, f"{self.base}{path}", json=body, headers=self.headers, timeout=timeout)
        except httpx.HTTPError as exc:
            raise VlmbridgeError(
                f"cannot reach {self.base}: {exc}", fix="check --url and that the server runs"
            ) from None
        if response.status_code == 404 and path.startswith("/admin/models") and not response.content.strip():
            raise VlmbridgeError(f"{self.base} has no admin API", fix="start the server with --admin-key")
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code >= 400:
            error = payload.get("error", {}) if isinstance(payload, dict) else {}
            message = error.get("message") or response.text[:200]
            code = f" [{error['code']}]" if error.get("code") else ""
            raise VlmbridgeError(f"{response.status_code}{code}: {message}")
        return payload

    def rows(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/admin/models")["data"])


@app.command("list")
def list_models(url: Url = "http://127.0.0.1:8000", admin_key: AdminKey = "", json_output: Annotated[
    bool, typer.Option("--json", help="Print the server's answer as JSON.")] = False) -> None:  # fmt: skip
    """Every configured model: state, memory, requests in flight, when it was last used."""
    from rich.table import Table

    from vlmbridge.budget import format_bytes

    rows = _Admin(url, admin_key).rows()
    if json_output:
        out_console.print(json.dumps(rows, indent=2), markup=False, highlight=False)
        return
    table = Table("model", "state", "memory", "in flight", "idle for", "reason")
    now = time.time()
    for row in rows:
        idle = f"{now - row['last_used']:.0f} s" if row.get("last_used") else "-"
        memory = format_bytes(row["memory_bytes"], binary=True) if row.get("memory_bytes") else "-"
        reason = (
            f"{row['code']}: {row['reason']}" if row.get("code") else ("" if row["state"] == "ready" else row["reason"])
        )
        table.add_row(row["name"], row["state"], memory, str(row["in_flight"]), idle, reason)
    out_console.print(table)


def _act(admin: _Admin, name: str, action: str, body: dict[str, Any] | None = None) -> None:
    """POST the action on a thread while a progress bar follows the model's `progress`."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["row"] = admin.request("POST", f"/admin/models/{name}/{action}", body, timeout=3600)
        except VlmbridgeError as exc:
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task(f"{action} {name}", total=1.0)
        while worker.is_alive():
            worker.join(_POLL_S)
            try:
                row = next((r for r in admin.rows() if r["name"] == name), None)
            except VlmbridgeError:
                continue
            if row is not None and row.get("progress") is not None:
                bar.update(task, completed=float(row["progress"]), description=f"{action} {name} ({row['state']})")
        bar.update(task, completed=1.0)
    if "error" in result:
        raise result["error"]
    row = result["row"]
    out_console.print(f"{row['name']}: {row['state']}", markup=False)


@app.command("load")
def load(name: Annotated[str, typer.Argument(help="The model's name.")], url: Url = "http://127.0.0.1:8000",
         admin_key: AdminKey = "") -> None:  # fmt: skip
    """Load a model now (a failed one is tried again); returns when it is ready."""
    _act(_Admin(url, admin_key), name, "load")


@app.command("unload")
def unload(name: Annotated[str, typer.Argument(help="The model's name.")], url: Url = "http://127.0.0.1:8000",
           admin_key: AdminKey = "") -> None:  # fmt: skip
    """Unload a model once the requests it holds have finished."""
    _act(_Admin(url, admin_key), name, "unload")


@app.command("reload")
def reload(
    name: Annotated[str, typer.Argument(help="The model's name.")],
    path: Annotated[str | None, typer.Option(help="Load the new weights from this folder (on the server).")] = None,
    url: Url = "http://127.0.0.1:8000",
    admin_key: AdminKey = "",
) -> None:
    """Hot swap: load the model again (new weights in its folder, or --path), switch once it is warmed up; the old
    copy finishes its requests. If the new one fails, the old one keeps serving."""
    _act(_Admin(url, admin_key), name, "reload", {"path": path} if path else None)
