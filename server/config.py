"""Service settings (pydantic-settings): every field can be set as ``FACE_EDITOR_<NAME>``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACE_EDITOR_", env_file=None, extra="ignore")

    weights_dir: Path = Field(PROJECT_ROOT / "weights", description="folder of released model folders")
    default_model: str | None = Field(None, description="model served when a request names none")
    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda, cuda:1 …")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 where it is faster and agrees with fp32 within bf16_tolerance"
    )
    bf16_tolerance: float = Field(0.08, description="max |bf16 - fp32| of a model's output image in [-1, 1]")
    layout: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto",
        description="memory layout of the served networks; auto: channels_last on CUDA, in bf16 and where the "
        "decoders are compiled (the compiled decoder is the faster in channels_last), else on a CPU in fp32 the "
        "faster of the two in a decoder timing trial per architecture at load",
    )
    compile: Literal["auto", "decoder", "off"] = Field(
        "auto",
        description="compile the decoders with AOTInductor in a child process after loading (slider moves "
        "about 1.5x faster on a 2-core EPYC); auto: on a CPU with a C++ compiler; a compiled decoder is used "
        "only once it matches the eager one and is faster",
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="where compiled decoders are kept for the next start or reload with the same weights "
        "(default: $XDG_CACHE_HOME or ~/.cache, then face-attribute-editor/decoders)",
    )
    max_upload_bytes: int = Field(15 * 1024 * 1024, description="larger uploads get 413")
    max_pixels: int = Field(40_000_000, description="larger images get 413 (decompression-bomb limit)")
    max_faces: int = Field(16, description="at most this many faces (the largest) are edited per photo")
    detect_max_side: int = Field(640, description="detection runs on a copy downscaled to this side")
    min_face_score: float = Field(0.9, description="MTCNN probability below which a face is ignored")
    max_concurrent: int = Field(2, description="edits computed at the same time")
    max_queue: int = Field(16, description="edits waiting beyond max_concurrent; more get 503 + Retry-After")
    queue_timeout_s: float = Field(30.0, description="an edit waiting longer than this gets 503")
    startup_wait_s: float = Field(
        60.0, description="a request that needs a model waits at most this long for the start-up load"
    )
    compute_workers: int = Field(
        1,
        description="threads running torch work; keep 1 on a CPU (more threads than cores make every op "
        "slower, see server/compute.py), raise it on a GPU so micro-batching has calls to merge",
    )
    micro_batch: int = Field(
        8, description="max faces merged into one decoder pass (1: off; needs compute_workers > 1 to merge)"
    )
    micro_batch_wait_ms: float = Field(5.0, description="how long a decoder call waits for others to join it")
    cache_size: int = Field(16, description="photos whose decoded pixels and encoder features are kept (LRU)")
    cpu_threads: int = Field(0, description="torch intra-op threads (0: torch's default)")
    retain_freed_mb: int = Field(
        1024,
        description="glibc keeps freed blocks up to this size for reuse instead of returning them to the OS, so "
        "photo-sized tensors are not page-faulted in on every request (models/memory.py; 0: glibc's default)",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = Field(None, description="enables POST /v1/models/reload when set")


@lru_cache
def get_settings() -> Settings:
    return Settings()
