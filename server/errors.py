"""What can go wrong with an edit, in the service's words. No HTTP here: the API layer
(``server/api/errors.py``) maps each kind to a status code, the batch CLI and the Gradio page show the
``detail`` to their users."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a user can cause or meet; ``detail`` says what to do about it."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidRequestError(ServiceError):
    """Bad edits, an unknown model or face index, an undecodable image, a photo without a face."""


class NoFaceFoundError(InvalidRequestError):
    """The detector found no face in the photo."""


class UnsupportedImageError(ServiceError):
    """A format or content type the service does not read (the message lists the ones it does)."""


class ImageTooLargeError(ServiceError):
    """An upload or a decoded image past the configured limits."""


class PhotoNotCachedError(ServiceError):
    """A ``photo_id`` that is not (or no longer) in the feature cache: send the image again."""


class UnavailableError(ServiceError):
    """The service cannot take the edit now: no model loaded, or saturated. ``retry_after`` in seconds."""

    def __init__(self, detail: str, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class BusyError(UnavailableError):
    """Admission refused the edit: too many queued, or it waited too long."""
