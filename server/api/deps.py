"""Dependencies as ``Annotated`` aliases (FastAPI full-stack template style)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.config import Settings
from server.editor import EditService
from server.state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.face_editor


def get_service(request: Request) -> EditService:
    return request.app.state.face_editor.service


def get_app_settings(request: Request) -> Settings:
    return request.app.state.face_editor.settings


StateDep = Annotated[AppState, Depends(get_state)]
ServiceDep = Annotated[EditService, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
