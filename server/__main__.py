"""``python -m server``: run the editor with uvicorn on FACE_EDITOR_HOST:FACE_EDITOR_PORT."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from server.config import get_settings


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    p = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    p.add_argument("--host", default=settings.host)
    p.add_argument("--port", type=int, default=settings.port)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).info("serving on http://%s:%d/ (API docs at /docs)", args.host, args.port)
    uvicorn.run("server.boot:app", host=args.host, port=args.port, workers=args.workers, log_level="info")


if __name__ == "__main__":
    main()
