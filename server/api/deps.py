"""Dependencies as ``Annotated`` aliases (FastAPI full-stack template style)."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import Depends, Request

from server.config import Settings
from server.service import EditService
from server.state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.face_editor


async def get_loaded_state(request: Request) -> AppState:
    """The state once the start-up load has finished (waited for off the event loop, bounded)."""
    state: AppState = request.app.state.face_editor
    if not state.loaded.is_set():
        await anyio.to_thread.run_sync(state.loaded.wait, state.settings.startup_wait_s)
    return state


async def get_service(request: Request) -> EditService:
    return (await get_loaded_state(request)).service


def get_app_settings(request: Request) -> Settings:
    return request.app.state.face_editor.settings


StateDep = Annotated[AppState, Depends(get_state)]
LoadedStateDep = Annotated[AppState, Depends(get_loaded_state)]
ServiceDep = Annotated[EditService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
