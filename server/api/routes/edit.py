from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field, TypeAdapter

from server.api.deps import ServiceDep, SettingsDep
from server.imaging import JPEG_QUALITY_FULL, b64_images, encode_jpeg
from server.service import EditRequest

router = APIRouter(prefix="/v1", tags=["edit"])


class FaceResult(BaseModel):
    index: int = Field(description="index of the face in the photo (faces sorted left to right)")
    box: list[float] = Field(description="[x0, y0, x1, y1] of the detected face in photo pixels")
    region: list[float] = Field(description="[x0, y0, x1, y1]: the photo area the pasted edit can touch")
    score: float = Field(description="detector probability")
    landmarks: list[list[float]] = Field(description="5 points [x, y]: eyes, nose, mouth corners")
    attributes: dict[str, float] = Field(description="classifier probability of each of the model's attributes")
    aligned: str = Field(description="base64 PNG: the aligned crop the model saw")
    edited: str = Field(description="base64 PNG: the model's edited crop")
    mask: str = Field(description="base64 grayscale PNG: where the model changed the face (0..255)")


class EditResponse(BaseModel):
    model: str = Field(description="the model that made the edit")
    image: str = Field(description="base64 PNG (or JPEG, see image_format) of the edited photo, same size as the input")
    overlay: str = Field(
        description="base64 image: the edited photo with the attention mask tinted over the faces "
        "(empty when the request said overlay=false)"
    )
    image_format: str = Field(
        description="png or jpeg: how image and overlay are encoded (by default as the upload: JPEG in, JPEG out)"
    )
    faces: list[FaceResult]
    timings_ms: dict[str, float] = Field(description="milliseconds per stage")
    cache_hit: bool = Field(description="true when detection, alignment and encoder came from the cache")
    photo_id: str = Field(description="send it as `photo_id` instead of the image for further edits of this photo")


#: Writes an :class:`EditResponse` as JSON bytes (the schema stays declared by ``response_model``).
EDIT_RESPONSE = TypeAdapter(EditResponse)


class ErrorResponse(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        413: "upload or image larger than the limits",
        415: "not a JPEG, PNG, WebP, HEIC/HEIF, AVIF or TIFF image (the message lists them)",
        404: "photo_id no longer cached: send the image again",
        422: "undecodable image, no face, bad edits, unknown model or face index",
        503: "no model loaded, or the service is saturated (see Retry-After)",
    }.items()
}


@router.post(
    "/edit",
    response_model=EditResponse,
    responses={
        200: {
            "content": {"image/png": {}, "image/jpeg": {}},
            "description": "JSON, or the edited photo alone with Accept: image/png or image/jpeg",
        }
    }
    | ERRORS,
    summary="Edit the attributes of the faces in a photo",
)
async def edit(
    request: Request,
    service: ServiceDep,
    settings: SettingsDep,
    image: Annotated[
        UploadFile | None,
        File(description="the photo: JPEG, PNG (8/16 bit), WebP, HEIC/HEIF, AVIF or TIFF (or send `photo_id` instead)"),
    ] = None,
    edits: Annotated[
        str | None,
        Form(description='JSON object {"Attribute_Name": value}, value in [-1, 1]: + adds, - removes, 0 keeps'),
    ] = None,
    model: Annotated[str | None, Form(description="model name (GET /v1/models); the default if absent")] = None,
    faces: Annotated[str, Form(description="'all', 'largest' or comma-separated face indices")] = "all",
    aligned: Annotated[
        bool, Form(description="the image is already an aligned face crop: no detection, the crop is edited")
    ] = False,
    image_format: Annotated[
        Literal["png", "jpeg"] | None,
        Form(
            description="encoding of `image` and `overlay` in the JSON: png (lossless) or jpeg (smaller previews); "
            "by default the upload's: a JPEG upload is answered in JPEG (quality 95), anything else in PNG"
        ),
    ] = None,
    overlay: Annotated[
        bool, Form(description="also return the mask overlay (false: `overlay` is empty, the edit is faster)")
    ] = True,
    photo_id: Annotated[
        str | None,
        Form(
            description="instead of `image`: the `photo_id` of an earlier edit, while the server still caches it "
            "(404 when it no longer does: send the image again). Saves re-uploading the photo on every slider move."
        ),
    ] = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Any:
    data = None
    if image is not None:
        data = await image.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"upload larger than {settings.max_upload_bytes} bytes")
    want_png = accept is not None and "image/png" in accept and "application/json" not in accept
    want_jpeg = accept is not None and "image/jpeg" in accept and "application/json" not in accept and not want_png
    json_answer = not (want_png or want_jpeg)
    edit_request = EditRequest(
        image=data,
        photo_id=photo_id,
        edits=edits,
        model=model,
        faces=faces,
        aligned=aligned,
        content_type=image.content_type if image is not None else None,
        overlay=overlay and json_answer,
        crops=json_answer,
    )
    result = await run_in_threadpool(service.edit, edit_request)
    if want_png:
        png = await run_in_threadpool(result.png)
        return Response(png, media_type="image/png", headers={"X-Photo-Id": result.photo_id})
    if want_jpeg:
        jpeg = await run_in_threadpool(encode_jpeg, result.image, JPEG_QUALITY_FULL)
        return Response(jpeg, media_type="image/jpeg", headers={"X-Photo-Id": result.photo_id})
    quality = 90
    if image_format is None:  # follow the upload (JPEG in, JPEG out), also for edits sent by photo_id
        image_format, quality = result.source_format, JPEG_QUALITY_FULL
    t0 = time.perf_counter()
    images = [result.image, result.overlay] if overlay else [result.image]
    encoded = await run_in_threadpool(b64_images, images, image_format, quality)
    image_b64, overlay_b64 = encoded[0], (encoded[1] if overlay else "")
    timings = result.timings_ms | {"encode_response": round((time.perf_counter() - t0) * 1000, 2)}
    body = EditResponse(
        model=result.model,
        image=image_b64,
        overlay=overlay_b64,
        image_format=image_format,
        faces=[FaceResult.model_validate(f, from_attributes=True) for f in result.faces],
        timings_ms=timings,
        cache_hit=result.cache_hit,
        photo_id=result.photo_id,
    )
    # Serialised by pydantic-core straight to bytes: FastAPI's own path (validate the model again, then
    # json.dumps) took 18 ms for the 2.3 MB answer of a 2-megapixel photo, this 2 ms (2-core EPYC).
    return Response(EDIT_RESPONSE.dump_json(body), media_type="application/json")
