"""The Gradio demo at ``/gradio``: upload, model picker, one slider per attribute, the edited photo,
the mask overlay and the faces' close-ups, with the demo photos as examples.

It calls the app's own in-process edit service (no HTTP to itself), so it shares the service's
caches: after the first edit of a photo, a slider move re-runs only the decoder. Its API works from
``gradio_client``::

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:8000/gradio/")
    edited, overlay, faces = client.predict(handle_file("photo.jpg"), "stgan", '{"Young": 1}', api_name="/edit_json")

The JS editor at ``/`` stays the default page; each links to the other.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# no network: Gradio's usage analytics would phone home from a machine that must not
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import numpy as np
from PIL import Image

from models.attributes import implication_text
from models.checkpoint import CONFIG_FILE, CheckpointError, read_config
from server.errors import ServiceError
from server.service import EditRequest, EditService

log = logging.getLogger(__name__)

PATH = "/gradio"
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "photos"


def served_models(weights_dir: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Generator folders of ``weights_dir`` and their attributes, read from config.json (no model load:
    the page is built while the models still load in the background)."""
    names, attributes = [], {}
    for folder in sorted(p for p in Path(weights_dir).glob("*") if (p / CONFIG_FILE).is_file()):
        try:
            doc = read_config(folder)
        except CheckpointError:
            continue
        if doc.get("kind") == "generator":
            names.append(folder.name)
            attributes[folder.name] = list(doc.get("attributes") or doc["config"].get("attributes", []))
    return names, attributes


def _b64_image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def build_blocks(
    service: EditService,
    weights_dir: Path,
    default_model: str | None = None,
    wait_ready: Callable[[], object] = lambda: None,
) -> gr.Blocks:
    """``wait_ready()`` returns once the app's start-up load of the models is done."""
    names, attributes = served_models(weights_dir)
    all_attributes = sorted({a for attrs in attributes.values() for a in attrs})
    preferred = [n for n in (default_model, "stgan", "mugan") if n in names]  # as the server picks its default
    default = preferred[0] if preferred else (names[0] if names else None)

    def run_edit(photo: str | None, model: str | None, edits: dict[str, float]) -> tuple[Any, Any, list[Any]]:
        if not photo:
            raise gr.Error("Upload a photo first.")
        data = Path(photo).read_bytes()
        wait_ready()
        usable = {a: v for a, v in edits.items() if v and a in attributes.get(model or "", all_attributes)}
        try:
            result = service.edit(EditRequest(image=data, edits=usable, model=model))
        except ServiceError as exc:
            raise gr.Error(exc.detail) from None
        close_ups = []
        for face in result.faces:
            k = face.index
            close_ups += [
                (_b64_image(face.aligned), f"face {k}: before"),
                (_b64_image(face.edited), f"face {k}: after"),
                (_b64_image(face.mask), f"face {k}: mask"),
            ]
        return np.asarray(result.image), np.asarray(result.overlay), close_ups

    def edit_sliders(photo: str | None, model: str | None, *values: float) -> tuple[Any, Any, list[Any]]:
        return run_edit(photo, model, dict(zip(all_attributes, values, strict=True)))

    def edit_json(photo: str | None, model: str | None, edits: str) -> tuple[Any, Any, list[Any]]:
        try:
            parsed = json.loads(edits or "{}")
        except json.JSONDecodeError as exc:
            raise gr.Error(f"edits is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise gr.Error('edits must be a JSON object like {"Young": 1}')
        return run_edit(photo, model, {str(k): float(v) for k, v in parsed.items()})

    with gr.Blocks(title="Face attribute editor (Gradio)") as blocks:
        gr.Markdown(
            "# Face attribute editor\n"
            "Upload a photo, pick a model, move the sliders: the faces are found, aligned, edited by a GAN "
            "trained by this project and pasted back; the overlay shows where the model changed the face. "
            "[The full editor](/) · [REST API](/docs). Trained weights: non-commercial research use only."
        )
        with gr.Row():
            with gr.Column(scale=1):
                photo = gr.Image(type="filepath", label="Photo", sources=["upload"], elem_id="photo")
                model = gr.Dropdown(names, value=default, label="Model", elem_id="model")
                sliders = [
                    gr.Slider(-1.0, 1.0, value=0.0, step=0.05, label=a, info=implication_text(a), elem_id=f"slider-{a}")
                    for a in all_attributes
                ]
                json_edits = gr.Textbox(visible=False)
                if PHOTOS.is_dir():
                    gr.Examples([[str(p)] for p in sorted(PHOTOS.glob("*.jpg"))], inputs=[photo])
            with gr.Column(scale=2):
                edited = gr.Image(label="Edited photo", elem_id="edited", interactive=False, format="png")
                overlay = gr.Image(label="Attention mask overlay", elem_id="overlay", interactive=False, format="png")
                close_ups = gr.Gallery(label="Faces as the model saw them", columns=3, elem_id="closeups")
        inputs = [photo, model, *sliders]
        outputs = [edited, overlay, close_ups]
        photo.change(edit_sliders, inputs, outputs, api_name="edit", trigger_mode="always_last")
        model.change(edit_sliders, inputs, outputs, api_name=False, trigger_mode="always_last")
        for slider in sliders:
            slider.release(edit_sliders, inputs, outputs, api_name=False, trigger_mode="always_last")
        # a stable API name for scripts: one JSON argument instead of one per slider
        json_button = gr.Button(visible=False)
        json_button.click(edit_json, [photo, model, json_edits], outputs, api_name="edit_json")
    return blocks


def build_app(
    service: EditService,
    weights_dir: Path,
    default_model: str | None = None,
    wait_ready: Callable[[], object] = lambda: None,
) -> Any:
    """A FastAPI app serving the Gradio Blocks at its root (the caller mounts it at ``/gradio``)."""
    from fastapi import FastAPI

    sub = FastAPI()
    blocks = build_blocks(service, weights_dir, default_model, wait_ready)
    app = gr.mount_gradio_app(sub, blocks, path="")
    quiet_queue(blocks)
    return app


#: How often Gradio's idle queue looks for work, in seconds (Gradio's own: 1 ms on Linux; progress: 10 ms).
QUEUE_POLL_S = 0.02
PROGRESS_POLL_S = 0.1


def quiet_queue(blocks: Any) -> None:
    """Make Gradio's queue poll every :data:`QUEUE_POLL_S` instead of every millisecond.

    Its two polling loops run on the server's event loop even when nobody uses the demo page: a thousand
    wake-ups a second competing with the compute thread for the GIL. On the 2-core EPYC the idle server's
    event loop used 9 % of a core, 2 % with this (3 s of ``/proc`` CPU ticks), and the README's REST edit of
    portrait-1 (eager decoder, before the OpenMP fix of server/compute.py) took 268 ms p50 with the Gradio app
    mounted, 197 ms without it. A Gradio event now starts up to 20 ms later."""
    queue = getattr(blocks, "_queue", None)
    if queue is None:  # pragma: no cover - a Gradio without the attribute keeps its defaults
        log.warning("Gradio's queue not found: its idle polling is left at Gradio's defaults")
        return
    queue.sleep_when_free = max(getattr(queue, "sleep_when_free", 0.0), QUEUE_POLL_S)
    queue.progress_update_sleep_when_free = max(getattr(queue, "progress_update_sleep_when_free", 0.0), PROGRESS_POLL_S)
