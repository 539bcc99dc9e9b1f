"""The `esd` commands. Results go to standard output (tables, paths, or JSON with `--json`);
progress bars and notes to standard error; any error is one line there and a non-zero exit:
1 for what the platform refused or could not do, 2 for a bad option, 130 for ^C."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cli import config as configuration
from cli import requests
from cli.api import Api, ApiError
from cli.uploads import CheckpointUpload, state_dir

app = typer.Typer(
    name="esd",
    help="The ESD platform from the command line: checkpoints, endpoints, images, LoRA training, jobs, events.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
checkpoints_app = typer.Typer(help="Model files: upload, list, delete.", no_args_is_help=True)
endpoints_app = typer.Typer(help="Endpoints (pools of GPU workers): create, list, delete.", no_args_is_help=True)
jobs_app = typer.Typer(help="Inference jobs and trainings: list, show, cancel.", no_args_is_help=True)
app.add_typer(checkpoints_app, name="checkpoints")
app.add_typer(endpoints_app, name="endpoints")
app.add_typer(jobs_app, name="jobs")

err = Console(stderr=True)
# tables to a pipe or a file are not cut to 80 columns
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 1000)

FINISHED = ("succeed", "failed", "canceled")
TRAINING_FINISHED = ("Completed", "Failed", "Stopped")
POLL_SECONDS = 0.5


class Interrupted(Exception):
    """^C, after what it should do (cancel a job) was done."""


@dataclass
class State:
    """The global options, and the API client made from the configuration when needed."""

    json: bool = False
    _api: Api | None = None

    def api(self) -> Api:
        if self._api is None:
            path = configuration.config_path()
            self._api = Api(configuration.load(path).checked())
        return self._api


def state(ctx: typer.Context) -> State:
    return ctx.ensure_object(State)


@app.callback()
def options(
    ctx: typer.Context,
    json_output: bool = typer.Option(False, "--json", help="Print results as JSON (for scripts)."),
) -> None:
    ctx.obj = State(json=json_output)


def emit(st: State, value: Any, human: Callable[[], None]) -> None:
    """`value` as JSON with --json, else what `human` prints."""
    if st.json:
        out.print_json(json.dumps(value, default=str)) if sys.stdout.isatty() else print(json.dumps(value, default=str))
    else:
        human()


def when(value: str | None) -> str:
    """A record's time as a person reads it (ESD gives some as Unix seconds)."""
    try:
        return datetime.fromtimestamp(float(value or "")).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return (value or "")[:19]


def note(message: str) -> None:
    err.print(message, highlight=False)


# --- login and ping ---------------------------------------------------------------------------


@app.command()
def login(
    ctx: typer.Context,
    url: str = typer.Option(None, help="The gateway's URL.", show_default=False),
    key: str = typer.Option(None, "--key", help="The API key (asked for when not given)."),
    user: str = typer.Option(None, help="The user to act as."),
    password: bool = typer.Option(
        False,
        "--password",
        help="Sign in with the user's password (asked for) and keep a bearer token instead: what a "
        "server in the token auth mode (ESD_AUTH_MODE=token) requires.",
    ),
    token: str = typer.Option(None, "--token", help="A bearer token from POST /tokens to use."),
) -> None:
    """Remember the gateway, the API key and the user or token (in a file only you can read)."""
    path = configuration.config_path()
    try:
        current = configuration.load(path)
    except configuration.ConfigError:
        current = configuration.Config()
    url = url or typer.prompt("Gateway URL", default=current.url)
    key = key or typer.prompt("API key", hide_input=True, default=current.api_key or None)
    user = user or typer.prompt("User", default=current.user or None)
    chosen = configuration.Config(url=url.rstrip("/"), api_key=key, user=user, token=token or "")
    api = Api(chosen)
    api.call("GET", "/ping")
    if password:
        secret = typer.prompt(f"Password of {user}", hide_input=True)
        issued = api.call("POST", "/tokens", json={"username": user, "password": secret})
        chosen = configuration.Config(url=chosen.url, api_key=key, user=user, token=issued["token"])
        api = Api(chosen)
    api.call("GET", "/users", params={"username": user})  # 401 when there is no such user
    configuration.save(path, chosen)
    emit(
        state(ctx),
        {"url": chosen.url, "user": chosen.user, "config": str(path)},
        lambda: out.print(f"signed in to {chosen.url} as {chosen.user} (saved in {path})"),
    )


@app.command()
def ping(ctx: typer.Context) -> None:
    """Check that the gateway answers and the key is right."""
    st = state(ctx)
    api = st.api()
    began = time.perf_counter()
    api.call("GET", "/ping")
    ms = round((time.perf_counter() - began) * 1000, 1)
    emit(st, {"url": api.config.url, "ms": ms}, lambda: out.print(f"pong from {api.config.url} in {ms} ms"))


@app.command()
def logout(ctx: typer.Context) -> None:
    """Revoke the kept bearer token (if any) and forget it."""
    path = configuration.config_path()
    current = configuration.load(path)
    if current.token:
        Api(current).call("DELETE", "/tokens")
        configuration.save(path, configuration.Config(url=current.url, api_key=current.api_key, user=current.user))
    emit(
        state(ctx),
        {"revoked": bool(current.token)},
        lambda: out.print("signed out" if current.token else "no token kept"),
    )


# --- checkpoints ------------------------------------------------------------------------------


def checkpoint_list(api: Api, types: str | None = None, status: str | None = None) -> list[dict]:
    found: list[dict] = []
    page = 1
    while True:
        data = api.call("GET", "/checkpoints", params={"types": types, "status": status, "page": page, "per_page": 500})
        found += data.get("checkpoints", [])
        if page >= data.get("pages", 1):
            return found
        page += 1


def file_names(api: Api, kind: str) -> list[str]:
    return [name for item in checkpoint_list(api, kind, "Active") for name in item["name"]]


@checkpoints_app.command("upload")
def checkpoints_upload(
    ctx: typer.Context,
    files: list[Path] = typer.Argument(..., exists=True, dir_okay=False, readable=True, help="Model files."),
    checkpoint_type: str = typer.Option(
        ..., "--type", "-t", help="Stable-diffusion, Lora, VAE, ControlNet, embeddings, ESRGAN, rembg, ..."
    ),
    parallel: int = typer.Option(4, help="Parts sent at once.", min=1, max=32),
) -> None:
    """Upload model files as one checkpoint.

    The parts go in parallel straight to storage. An interrupted upload resumes when the same
    command is run again."""
    st = state(ctx)
    upload = CheckpointUpload(st.api(), files, checkpoint_type, states=state_dir(), parallel=parallel, say=note)
    with bar(bytes_=True) as progress:
        task = progress.add_task("uploading", total=upload.total_bytes, completed=upload.done_bytes)
        checkpoint = upload.run(lambda sent: progress.advance(task, sent))
    names = ", ".join(path.name for path in files)
    emit(st, checkpoint, lambda: out.print(f"{checkpoint.get('id')}  {names}  {checkpoint.get('status', 'Active')}"))


@checkpoints_app.command("list")
def checkpoints_list(
    ctx: typer.Context,
    checkpoint_type: str = typer.Option(None, "--type", "-t", help="Only these types (comma-separated)."),
    status: str = typer.Option(None, help="Only these statuses: Active, Initial, Disabled."),
) -> None:
    """List checkpoints, newest first."""
    st = state(ctx)
    found = checkpoint_list(st.api(), checkpoint_type, status)

    def table() -> None:
        rows = Table("id", "type", "status", "files", "created", box=None)
        for item in found:
            rows.add_row(item["id"], item["type"], item["status"], ", ".join(item["name"]), when(item["created"]))
        out.print(rows)

    emit(st, found, table)


@checkpoints_app.command("rm")
def checkpoints_rm(ctx: typer.Context, checkpoints: list[str] = typer.Argument(..., help="Ids or file names.")) -> None:
    """Delete checkpoints (their files too)."""
    st = state(ctx)
    api = st.api()
    ids = requests.checkpoint_ids(checkpoints, checkpoint_list(api))
    api.call("DELETE", "/checkpoints", json={"checkpoint_id_list": ids})
    emit(st, {"deleted": ids}, lambda: out.print("\n".join(f"deleted {i}" for i in ids)))


# --- endpoints --------------------------------------------------------------------------------


def endpoint_list(api: Api) -> list[dict]:
    found: list[dict] = []
    start = None
    while True:
        data = api.call("GET", "/endpoints", params={"limit": 100, "exclusive_start_key": start})
        found += data.get("endpoints", [])
        start = data.get("last_evaluated_key")
        if not start:
            return found


def endpoint_named(api: Api, name: str) -> dict:
    endpoints = endpoint_list(api)
    chosen = requests.resolve_endpoint(name, [item["endpoint_name"] for item in endpoints])
    return next(item for item in endpoints if item["endpoint_name"] == chosen)


@endpoints_app.command("create")
def endpoints_create(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Its name (stored as esd-<type>-<name>)."),
    endpoint_type: str = typer.Option("Async", "--type", help="Async or Real-time."),
    instance_type: str = typer.Option("local", help="Where its workers run."),
    count: int = typer.Option(1, help="Workers to start with.", min=1),
    autoscaling: bool = typer.Option(True, help="Scale by the queue's depth."),
    minimum: int = typer.Option(None, "--min", help="Fewest workers when autoscaling (Async: 0 by default)."),
    maximum: int = typer.Option(None, "--max", help="Most workers when autoscaling."),
    role: list[str] = typer.Option(["IT Operator"], help="Roles whose users may use it."),
    wait: bool = typer.Option(False, "--wait", help="Wait until it is InService."),
) -> None:
    """Create an endpoint."""
    st = state(ctx)
    api = st.api()
    body = {
        "endpoint_name": name,
        "endpoint_type": endpoint_type,
        "instance_type": instance_type,
        "initial_instance_count": count,
        "autoscaling_enabled": autoscaling,
        "assign_to_roles": role,
        "min_instance_number": minimum,
        "max_instance_number": maximum,
    }
    endpoint = api.call("POST", "/endpoints", json={key: value for key, value in body.items() if value is not None})
    if wait:
        with err.status(f"waiting for {endpoint['endpoint_name']} to be InService"):
            endpoint = wait_endpoint(api, endpoint["endpoint_name"])
    emit(st, endpoint, lambda: out.print(f"{endpoint['endpoint_name']}  {endpoint['endpoint_status']}"))


def wait_endpoint(api: Api, name: str) -> dict:
    while True:
        endpoint = next((e for e in endpoint_list(api) if e["endpoint_name"] == name), None)
        if endpoint is None:
            raise ApiError(f"endpoint {name} is gone")
        if endpoint["endpoint_status"] == "Failed":
            raise ApiError(f"endpoint {name} failed: {endpoint.get('error') or 'see the worker logs'}")
        if endpoint["endpoint_status"] == "InService":
            return endpoint
        time.sleep(POLL_SECONDS)


@endpoints_app.command("list")
def endpoints_list(ctx: typer.Context) -> None:
    """List endpoints with their status and worker counts."""
    st = state(ctx)
    found = endpoint_list(st.api())

    def table() -> None:
        rows = Table("name", "type", "status", "workers", "min", "max", "autoscaling", box=None)
        for item in found:
            rows.add_row(
                item["endpoint_name"],
                item["endpoint_type"],
                item["endpoint_status"],
                str(item["current_instance_count"]),
                str(item["min_instance_number"]),
                str(item["max_instance_number"]),
                "yes" if item["autoscaling"] else "no",
            )
        out.print(rows)

    emit(st, found, table)


@endpoints_app.command("rm")
def endpoints_rm(
    ctx: typer.Context,
    names: list[str] = typer.Argument(..., help="Endpoint names."),
    wait: bool = typer.Option(False, "--wait", help="Wait until they are gone."),
) -> None:
    """Delete endpoints (running jobs finish first)."""
    st = state(ctx)
    api = st.api()
    known = [item["endpoint_name"] for item in endpoint_list(api)]
    chosen = [requests.resolve_endpoint(name, known) for name in names]
    api.call("DELETE", "/endpoints", json={"endpoint_name_list": chosen})
    if wait:
        with err.status("waiting for the endpoints to go"):
            while set(chosen) & {item["endpoint_name"] for item in endpoint_list(api)}:
                time.sleep(POLL_SECONDS)
    emit(st, {"deleted": chosen}, lambda: out.print("\n".join(f"deleted {name}" for name in chosen)))


# --- generating -------------------------------------------------------------------------------


def generation_options(
    negative: str, steps: int, size: str, sampler: str, seed: int, cfg: float, batch: int
) -> dict[str, Any]:
    return {
        "negative": negative,
        "steps": steps,
        "size": requests.parse_size(size),
        "sampler": sampler,
        "seed": seed,
        "cfg": cfg,
        "batch": batch,
    }


NEGATIVE = typer.Option("", "--negative", "-n", help="The negative prompt.")
STEPS = typer.Option(20, help="Sampling steps.", min=1, max=150)
SIZE = typer.Option("512x512", help="WIDTHxHEIGHT, multiples of 8.")
SAMPLER = typer.Option("Euler a", help="An AUTOMATIC1111 sampler name (Euler, DPM++ 2M Karras, DDIM, ...).")
SEED = typer.Option(-1, help="The seed (-1: random).")
CFG = typer.Option(7.0, "--cfg", help="CFG scale.")
LORA = typer.Option(None, "--lora", help="NAME:WEIGHT of a Lora checkpoint (repeatable).")
MODEL = typer.Option(None, help="The Stable-diffusion checkpoint (default: the newest Active one).")
ENDPOINT = typer.Option(None, help="The endpoint (default: the least busy one you may use).")
BATCH = typer.Option(1, help="Images at once.", min=1, max=8)
OUT = typer.Option(Path("."), "--out", "-o", help="Folder the PNGs are saved in.", file_okay=False)


@app.command()
def generate(
    ctx: typer.Context,
    prompt: str = typer.Argument(..., help="The prompt (AUTOMATIC1111 syntax)."),
    negative: str = NEGATIVE,
    steps: int = STEPS,
    size: str = SIZE,
    sampler: str = SAMPLER,
    seed: int = SEED,
    cfg: float = CFG,
    lora: list[str] = LORA,
    model: str = MODEL,
    endpoint: str = ENDPOINT,
    batch: int = BATCH,
    out_dir: Path = OUT,
) -> None:
    """Generate images (txt2img) with a live progress bar; saves the PNGs and prints their paths."""
    options = generation_options(negative, steps, size, sampler, seed, cfg, batch)
    run_generation(state(ctx), "txt2img", requests.Generation(prompt, **options), lora, model, endpoint, out_dir)


@app.command()
def img2img(
    ctx: typer.Context,
    image: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True, help="The initial image."),
    prompt: str = typer.Argument(..., help="The prompt (AUTOMATIC1111 syntax)."),
    denoise: float = typer.Option(0.75, help="Denoising strength: how far from the image to go.", min=0, max=1),
    negative: str = NEGATIVE,
    steps: int = STEPS,
    size: str = SIZE,
    sampler: str = SAMPLER,
    seed: int = SEED,
    cfg: float = CFG,
    lora: list[str] = LORA,
    model: str = MODEL,
    endpoint: str = ENDPOINT,
    batch: int = BATCH,
    out_dir: Path = OUT,
) -> None:
    """Generate images from an image (img2img); saves the PNGs and prints their paths."""
    options = generation_options(negative, steps, size, sampler, seed, cfg, batch)
    request = requests.Generation(prompt, denoise=denoise, init_image=image.read_bytes(), **options)
    run_generation(state(ctx), "img2img", request, lora, model, endpoint, out_dir)


def run_generation(
    st: State,
    task: str,
    request: requests.Generation,
    lora_options: list[str] | None,
    model: str | None,
    endpoint: str | None,
    out_dir: Path,
) -> None:
    api = st.api()
    choices = [requests.parse_lora(value) for value in lora_options or []]
    if model is None:
        newest = checkpoint_list(api, "Stable-diffusion", "Active")
        if not newest:
            raise ApiError("no Active Stable-diffusion checkpoint: upload one with `esd checkpoints upload`")
        model = newest[0]["name"][0]
        note(f"model: {model}")
    else:
        model = requests.pick_checkpoint(model, file_names(api, "Stable-diffusion"), "Stable-diffusion")
    loras = []
    if choices:
        available = file_names(api, "Lora")
        loras = [(requests.pick_checkpoint(c.name, available, "Lora"), c.weight) for c in choices]
    body: dict[str, Any] = {
        "task_type": task,
        "inference_type": "Async",
        "models": requests.job_models(model, loras),
        "payload_string": json.dumps(request.payload(loras)),
    }
    if endpoint is not None:
        chosen = endpoint_named(api, endpoint)
        body["sagemaker_endpoint_name"] = chosen["endpoint_name"]
        body["inference_type"] = chosen["endpoint_type"]
    started = api.call("POST", "/inferences", json=body)
    inference_id = started.get("inference", {}).get("inference_id") or started.get("InferenceJobId")
    note(f"job {inference_id}")
    job = started if started.get("status") in FINISHED else follow_job(api, inference_id)
    if job["status"] != "succeed":
        raise ApiError(f"job {inference_id} {job['status']}: {job.get('error') or 'no reason given'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, url in enumerate(job["img_presigned_urls"]):
        path = out_dir / f"{inference_id}-{index}.png"
        path.write_bytes(api.download(url))
        paths.append(str(path))
    info = job.get("info") or {}
    emit(
        st,
        {"inference_id": inference_id, "status": job["status"], "images": paths, "seeds": info.get("all_seeds")},
        lambda: out.print("\n".join(paths)),
    )


def follow_job(api: Api, inference_id: str) -> dict:
    """Follow a job's events to its end with a progress bar; ^C cancels it. The job as it ended."""
    try:
        with bar() as progress:
            task = progress.add_task("queued", total=None)
            try:
                for event in api.events(f"/inferences/{inference_id}/events"):
                    if event.type == "inference.started":
                        progress.update(task, description="running")
                    elif event.type == "inference.progress":
                        progress.update(
                            task, description="running", total=event.data["total"], completed=event.data["step"]
                        )
                    elif event.type in ("inference.succeeded", "inference.failed", "inference.canceled"):
                        break
            except ApiError as error:  # the stream broke off: the job goes on, ask for it instead
                note(f"{error}; polling instead")
            return wait_job(api, inference_id)
    except KeyboardInterrupt:
        api.call("PUT", f"/inferences/{inference_id}/cancel")
        note(f"canceled job {inference_id}")
        raise Interrupted from None


def wait_job(api: Api, inference_id: str) -> dict:
    while (job := api.call("GET", f"/inferences/{inference_id}"))["status"] not in FINISHED:
        time.sleep(POLL_SECONDS)
    return job


# --- training ---------------------------------------------------------------------------------


@app.command()
def train(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="Images, each with an optional same-named .txt caption.", file_okay=False),
    base: str = typer.Option(..., help="The Stable-diffusion checkpoint to train on."),
    name: str = typer.Option(None, help="The LoRA's name (default: the folder's, made unique)."),
    dataset: str = typer.Option(None, help="The dataset's name (default: the folder's, made unique)."),
    repeats: int = typer.Option(None, help="kohya's repeats per image (default: from a `10_cube` folder name, or 10)."),
    concept: str = typer.Option(None, help="kohya's concept (default: from the folder's name)."),
    fm_type: str = typer.Option("sd_1_5", help="sd_1_5 or sd_xl, as the base model is."),
    epochs: int = typer.Option(10, help="max_train_epochs", min=1),
    learning_rate: float = typer.Option(None, "--lr", help="learning_rate"),
    network_dim: int = typer.Option(None, "--dim", help="network_dim"),
    network_alpha: float = typer.Option(None, "--alpha", help="network_alpha"),
    resolution: int = typer.Option(None, help="resolution"),
    batch_size: int = typer.Option(None, "--batch", help="train_batch_size"),
    save_every: int = typer.Option(None, help="save_every_n_epochs"),
    seed: int = typer.Option(None, help="seed"),
    optimizer: str = typer.Option(None, help="optimizer_type: AdamW or AdamW8bit"),
) -> None:
    """Train a LoRA on a folder of images; prints the new LoRA's name.

    Uploads the folder as a dataset, follows the epochs and the loss. ^C stops the training;
    its saved epochs are kept."""
    st = state(ctx)
    api = st.api()
    data = requests.dataset_folder(folder, repeats=repeats, concept=concept)
    base = requests.pick_checkpoint(base, file_names(api, "Stable-diffusion"), "Stable-diffusion")
    stem = requests.KOHYA_FOLDER.sub(r"\2", folder.resolve().name) or "lora"
    dataset = dataset or f"{stem}-{secrets.token_hex(3)}"
    output_name = name or f"{stem}_{secrets.token_hex(3)}".replace("-", "_")
    created = api.call(
        "POST",
        "/datasets",
        json={
            "dataset_name": dataset,
            "prefix": data.prefix,
            "content": data.content(),
            "params": {"description": f"{folder.name}, by esd train"},
        },
    )
    urls = created["s3PresignUrl"]
    with bar(bytes_=True) as progress:
        task = progress.add_task("dataset", total=sum(path.stat().st_size for path in data.files))
        for path in data.files:
            api.put_file(urls[path.name], path)
            progress.advance(task, path.stat().st_size)
    api.call("PUT", f"/datasets/{dataset}", json={"status": "Enabled"})
    body = requests.training_body(
        base=base,
        dataset=dataset,
        output_name=output_name,
        fm_type=fm_type,
        epochs=epochs,
        learning_rate=learning_rate,
        network_dim=network_dim,
        network_alpha=network_alpha,
        resolution=resolution,
        batch_size=batch_size,
        save_every=save_every,
        seed=seed,
        optimizer=optimizer,
    )
    training_id = api.call("POST", "/trainings", json=body)["id"]
    note(f"training {training_id} on dataset {dataset}")
    training = follow_training(api, training_id)
    if training["job_status"] != "Completed":
        reason = training.get("error") or f"saved epochs: {training.get('saved_checkpoint_ids') or 'none'}"
        raise ApiError(f"training {training_id} {training['job_status']}: {reason}")
    emit(st, training, lambda: out.print(training["lora_name"]))


def follow_training(api: Api, training_id: str) -> dict:
    """Poll the training to its end with a bar of its steps, its epoch and loss; ^C stops it."""
    try:
        with bar() as progress:
            task = progress.add_task("queued", total=None)
            while (training := api.call("GET", f"/trainings/{training_id}"))["job_status"] not in TRAINING_FINISHED:
                if (now := training.get("progress")) is not None:
                    progress.update(
                        task,
                        description=f"epoch {now['epoch']}/{now['epochs']}  loss {now['loss']:.4f}",
                        total=now["steps"],
                        completed=now["step"],
                    )
                time.sleep(POLL_SECONDS)
            return training
    except KeyboardInterrupt:
        api.call("PUT", f"/trainings/{training_id}/stop")
        note(f"stopping training {training_id}: its saved epochs stay as Lora checkpoints")
        raise Interrupted from None


# --- jobs and events ------------------------------------------------------------------------


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    kind: str = typer.Option(
        "txt2img,img2img,training", "--type", help="Task types and/or `training`, comma-separated."
    ),
    limit: int = typer.Option(10, help="Most of each type.", min=1, max=100),
) -> None:
    """List your recent jobs, newest first."""
    st = state(ctx)
    api = st.api()
    rows: list[dict] = []
    for wanted in [part.strip() for part in kind.split(",") if part.strip()]:
        if wanted == "training":
            for item in api.call("GET", "/trainings", params={"limit": limit}).get("trainings", []):
                rows.append(
                    {"id": item["id"], "type": "training", "status": item["job_status"], "created": item.get("created")}
                )
        else:
            for item in api.call("GET", "/inferences", params={"type": wanted, "limit": limit}).get("inferences", []):
                rows.append(
                    {
                        "id": item["InferenceJobId"],
                        "type": item["taskType"],
                        "status": item["status"],
                        "created": item.get("createTime"),
                    }
                )
    rows.sort(key=lambda row: row["created"] or "", reverse=True)

    def table() -> None:
        listing = Table("id", "type", "status", "created", box=None)
        for row in rows:
            listing.add_row(row["id"], row["type"], row["status"], when(row["created"]))
        out.print(listing)

    emit(st, rows, table)


def find_job(api: Api, job_id: str) -> tuple[str, dict]:
    """("inference" | "training", the job)."""
    try:
        return "inference", api.call("GET", f"/inferences/{job_id}")
    except ApiError as error:
        if "HTTP 404" not in str(error):
            raise
    try:
        return "training", api.call("GET", f"/trainings/{job_id}")
    except ApiError as error:
        if "HTTP 404" not in str(error):
            raise
    raise ApiError(f"no inference job or training with id {job_id} (HTTP 404)")


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: str = typer.Argument(..., help="A job's or a training's id.")) -> None:
    """Show a job or a training: status, progress, error, images, parameters."""
    st = state(ctx)
    kind, job = find_job(st.api(), job_id)

    def human() -> None:
        if kind == "inference":
            info = job.get("info") or {}
            lines = [
                f"inference {job['InferenceJobId']}  {job['taskType']}  {job['status']}",
                f"endpoint: {job['params']['sagemaker_inference_endpoint_name']}",
                f"created: {job.get('createTime')}  completed: {job.get('completeTime') or '-'}",
            ]
            if job.get("progress"):
                p = job["progress"]
                lines.append(f"progress: step {p['step']}/{p['steps']} ({p['percent']:g}%)")
            if job.get("error"):
                lines.append(f"error: {job['error']}")
            lines += [f"image: {url}" for url in job.get("img_presigned_urls", [])]
            lines += info.get("infotexts", [])[:1]
        else:
            lines = [
                f"training {job['id']}  {job['job_status']}",
                f"created: {job.get('created')}  completed: {job.get('completed') or '-'}",
            ]
            if job.get("progress"):
                p = job["progress"]
                lines.append(
                    f"progress: epoch {p['epoch']}/{p['epochs']}, step {p['step']}/{p['steps']}, loss {p['loss']:.4f}"
                )
            if job.get("lora_name"):
                lines.append(f"LoRA: {job['lora_name']}")
            if job.get("error"):
                lines.append(f"error: {job['error']}")
        out.print("\n".join(lines))

    emit(st, {"kind": kind, **job}, human)


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str = typer.Argument(..., help="A job's or a training's id.")) -> None:
    """Cancel a job, or stop a training.

    A queued job never runs, a running one stops at its next step; a stopped training keeps its
    saved epochs."""
    st = state(ctx)
    api = st.api()
    try:
        job = api.call("PUT", f"/inferences/{job_id}/cancel")
        status = job["status"]
    except ApiError as error:
        if "HTTP 404" not in str(error):
            raise
        job = api.call("PUT", f"/trainings/{job_id}/stop")
        status = "stopping" if job["job_status"] == "Training" else job["job_status"]
    emit(st, job, lambda: out.print(f"{job_id} {status}"))


@app.command()
def events(
    ctx: typer.Context,
    types: str = typer.Option(None, "--type", help="Event types, shell patterns, comma-separated: inference.*"),
    last_event_id: int = typer.Option(None, help="Resume after this event (its `id`)."),
    count: int = typer.Option(None, help="Stop after this many events."),
) -> None:
    """Follow the events you may see as they happen (^C to stop)."""
    st = state(ctx)
    seen = 0
    try:
        for event in st.api().events("/events", params={"type": types}, last_event_id=last_event_id):
            if st.json:
                print(json.dumps({"id": event.id, "type": event.type, "data": event.data}), flush=True)
            else:
                out.print(f"{event.id}  {event.type}  {summary(event.data)}")
            seen += 1
            if count is not None and seen >= count:
                return
    except KeyboardInterrupt:
        return


def summary(data: dict) -> str:
    skip = {"id", "occurred_at", "version", "preview", "webhook", "webhook_events_filter"}
    return " ".join(f"{key}={value}" for key, value in data.items() if key not in skip and value not in (None, "", []))


# --- the shared pieces ------------------------------------------------------------------------


@contextmanager
def bar(*, bytes_: bool = False) -> Iterator[Progress]:
    columns = [TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()]
    columns += [DownloadColumn()] if bytes_ else [MofNCompleteColumn()]
    with Progress(*columns, TimeRemainingColumn(), console=err, transient=True) as progress:
        yield progress


def main() -> None:
    """The console script: the app, with every error as one line and an exit code."""
    try:
        app()
    except (ApiError, configuration.ConfigError) as error:
        err.print(f"error: {error}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except requests.OptionError as error:
        err.print(f"error: {error}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(2)
    except Interrupted:
        sys.exit(130)
    except OSError as error:
        err.print(f"error: {error}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(1)
    except Exception as error:  # a bug: still one line, the trace on demand
        if os.environ.get("ESD_DEBUG"):
            raise
        err.print(
            f"error: {type(error).__name__}: {error} (a bug in esd; ESD_DEBUG=1 shows where)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
        sys.exit(1)
