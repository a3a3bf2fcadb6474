"""The review page and its HTTP API (Flask), for one predictions file.

Security, for a server that exposes a lab's images and writes a labels file:
- bound to 127.0.0.1 only (the command never offers another address), and requests whose
  ``Host`` is not a loopback name are refused (a DNS-rebinding page cannot reach it);
- a per-session token: the printed URL carries it once, the page keeps it in a same-site
  cookie for reads, and every write must also send it in the ``X-Review-Token`` header (which a
  cross-site form cannot set);
- images are named by their index in the predictions file: no path from a request ever
  reaches the file system.

"What the model looked at" (``/overlay/<index>.png?method=``): ``occlusion`` on the ONNX model
works for every artefact; ``gradcam`` (:mod:`flystage.training.gradcam`) needs the artefact's
``weights.pt`` and torch. Without ``method`` the overlay is Grad-CAM where both are there and the
model has a convolutional feature map (not HOG), else occlusion (the ``X-Overlay-Method`` header
says which); an explicit ``method=gradcam`` that cannot be had is a 422 saying why. Torch is
imported only inside the request that asks for Grad-CAM: this module runs without it.
"""

from __future__ import annotations

import bisect
import hmac
import importlib.util
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, abort, jsonify, redirect, render_template, request

from flystage.artefact import WEIGHTS_FILE
from flystage.image_checks import ImageError
from flystage.imaging import PreprocessConfig, load
from flystage.review.predictions import Item
from flystage.review.store import ReviewStore
from flystage.review.thumbnails import ThumbnailCache

COOKIE = "flystage_review"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
PAGE_LIMIT = 200
# One key per stage: digits, then letters that are not the page's own keys (m map, o original, z
# undo).
STAGE_KEYS = "1234567890abcdefghijklnpqrstuvwxy"
SORTS = ("unsure", "stage", "file")
FILTERS = ("all", "unsure", "unreviewed", "reviewed", "corrected")
METHODS = ("gradcam", "occlusion")


def torch_installed() -> bool:
    """Whether torch can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


@dataclass
class ReviewSession:
    """Everything one review server serves: the items, the labels a decision may take, the store."""

    items: list[Item]
    labels: list[str]
    store: ReviewStore
    thumbnails: ThumbnailCache
    title: str = "flystage review"
    model_dir: Path | None = None
    threads: int = 1
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    _predictor: Any = None
    _gradcam: Any = None
    _gradcam_error: str | None = None
    _maps: OrderedDict = field(default_factory=OrderedDict)
    _model_lock: threading.Lock = field(default_factory=threading.Lock)
    _why_no_gradcam: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        # Asked on every page and overlay request; the answer cannot change during a session.
        self._why_no_gradcam = self._check_gradcam()

    def predictor(self):
        """The ONNX model, opened on the first overlay request (most sessions never ask)."""
        with self._model_lock:
            if self._predictor is None and self.model_dir is not None:
                from flystage.predictor import Predictor

                self._predictor = Predictor(self.model_dir, threads=self.threads)
            return self._predictor

    def gradcam_unavailable(self) -> str | None:
        """Why Grad-CAM cannot be offered (no model, no weights.pt, no torch), or None."""
        return self._why_no_gradcam

    def _check_gradcam(self) -> str | None:
        if self.model_dir is None:
            return "no model given: start `flystage review` with --model DIR for the overlay"
        if not (self.model_dir / WEIGHTS_FILE).is_file():
            return (
                f"Grad-CAM needs the torch weights ({self.model_dir / WEIGHTS_FILE}), which this "
                "model directory does not have; use method=occlusion"
            )
        if not torch_installed():
            return "Grad-CAM needs torch, which is not installed here; use method=occlusion"
        return None

    def gradcam(self):
        """The torch model for Grad-CAM, loaded on the first Grad-CAM request; a model it cannot
        explain (HOG features, weights that do not rebuild) raises ``ValueError`` saying why, and
        is not tried again."""
        with self._model_lock:
            if self._gradcam is None and self._gradcam_error is None:
                from flystage.training.gradcam import GradCam  # torch: only when asked for

                try:
                    self._gradcam = GradCam(self.model_dir, threads=self.threads)
                except ValueError as exc:  # GradCamUnavailable, ArtefactError
                    self._gradcam_error = str(exc)
            if self._gradcam is None:
                raise ValueError(self._gradcam_error)
            return self._gradcam

    def overlay(self, key: tuple[int, str], make: Callable[[], bytes]) -> bytes:
        """Overlays (by image and method) of the last few images, kept in memory (a second look
        is instant)."""
        with self._model_lock:
            if key in self._maps:
                self._maps.move_to_end(key)
                return self._maps[key]
        data = make()
        with self._model_lock:
            self._maps[key] = data
            while len(self._maps) > 32:
                self._maps.popitem(last=False)
        return data


def item_json(session: ReviewSession, item: Item) -> dict[str, Any]:
    d = session.store.decisions.get(item.index)
    return {
        "id": item.index,
        "name": item.name,
        "top": [{"stage": s, "p": round(p, 4)} for s, p in item.top],
        "error": item.error,
        "unsure": item.unsure,
        "label": d.label if d else None,
        "decision": d.decision if d else None,
    }


def sort_key(session: ReviewSession, sort: str) -> Callable[[Item], tuple]:
    """The order of a view: a key unique to each item (the index breaks ties) that no decision
    changes, so a page can start after an item whatever was decided since."""
    if sort == "stage":
        order = {label: n for n, label in enumerate(session.labels)}
        return lambda i: (order.get(i.top[0][0], len(order)) if i.top else -1, i.p1, i.index)
    if sort == "file":
        return lambda i: (i.name, i.index)
    return lambda i: (i.p1, i.index)


def select(session: ReviewSession, sort: str, keep: str, stage: str | None) -> list[Item]:
    """The items a view shows, in its order (least sure first by default)."""
    decisions = session.store.decisions
    tests = {
        "all": lambda i: True,
        "unsure": lambda i: bool(i.unsure) or not i.top,
        "unreviewed": lambda i: i.index not in decisions,
        "reviewed": lambda i: i.index in decisions,
        "corrected": lambda i: i.index in decisions and decisions[i.index].decision == "corrected",
    }
    chosen = [
        i
        for i in session.items
        if tests[keep](i) and (not stage or (i.top and i.top[0][0] == stage))
    ]
    chosen.sort(key=sort_key(session, sort))
    return chosen


def create_app(session: ReviewSession) -> Flask:
    """The Flask app for ``session``: the page, the images by index, and the decision API."""
    here = Path(__file__).parent
    app = Flask(
        __name__, static_folder=str(here / "static"), template_folder=str(here / "templates")
    )
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # a decision is a few bytes
    _add_guards(app, session)
    _add_page_and_api(app, session)
    _add_images(app, session)
    return app


def _add_guards(app: Flask, session: ReviewSession) -> None:
    """Loopback Host and the session token on every request, safe headers on every response,
    and errors as JSON."""

    def token_ok(candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(candidate.encode(), session.token.encode())

    @app.before_request
    def guard():
        if urlsplit("//" + (request.host or "")).hostname not in LOOPBACK_HOSTS:
            abort(403, "this review server answers loopback names only (127.0.0.1, localhost)")
        if request.path == "/" and token_ok(request.args.get("token")):
            return None  # the printed URL: sets the cookie below
        if not token_ok(request.cookies.get(COOKIE)) and not token_ok(
            request.headers.get("X-Review-Token")
        ):
            abort(
                403, "open the URL that `flystage review` printed (it carries this session's token)"
            )
        if request.method == "POST" and not token_ok(request.headers.get("X-Review-Token")):
            abort(403, "writes need this session's token in the X-Review-Token header")

    @app.after_request
    def headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self'; frame-ancestors 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.errorhandler(400)
    @app.errorhandler(403)
    @app.errorhandler(404)
    @app.errorhandler(413)
    @app.errorhandler(422)
    def error(exc):
        return jsonify(error=getattr(exc, "description", str(exc)), status=exc.code), exc.code


def _item(session: ReviewSession, index: int) -> Item:
    """The item by its index in the predictions file (404 for any other number)."""
    if not 0 <= index < len(session.items):
        abort(404, "no such image in this review")
    return session.items[index]


def _add_page_and_api(app: Flask, session: ReviewSession) -> None:
    """The page, the items of a view, a decision and its undo."""

    @app.get("/")
    def index():
        if request.args.get("token"):
            # Drop the token from the address bar (and history) once the cookie holds it.
            response = redirect("/", code=303)
            response.set_cookie(COOKIE, session.token, httponly=True, samesite="Strict")
            return response
        keys = {
            label: STAGE_KEYS[n] for n, label in enumerate(session.labels) if n < len(STAGE_KEYS)
        }
        return render_template(
            "index.html",
            title=session.title,
            token=session.token,
            labels=session.labels,
            keys=keys,
            overlay=session.model_dir is not None,
            gradcam=session.gradcam_unavailable() is None,
            n=len(session.items),
        )

    @app.get("/api/items")
    def items():
        """A page of a view: ``limit`` items after the image ``after`` (the last one the page
        shows; none: from the start).

        Not an offset: deciding an image takes it out of the "unreviewed" view, and an offset
        counted before that decision would skip the next image.
        """
        sort = request.args.get("sort", "unsure")
        keep = request.args.get("filter", "all")
        if sort not in SORTS or keep not in FILTERS:
            abort(400, f"sort is one of {SORTS}, filter one of {FILTERS}")
        try:
            after = request.args.get("after")
            after = None if after in (None, "") else int(after)
            limit = min(PAGE_LIMIT, max(1, int(request.args.get("limit", 60))))
        except ValueError:
            abort(400, "after (an image id) and limit are integers")
        view = select(session, sort, keep, request.args.get("stage") or None)
        start = 0
        if after is not None:
            key = sort_key(session, sort)
            start = bisect.bisect_right(view, key(_item(session, after)), key=key)
        rest = view[start:]
        return jsonify(
            total=len(view),
            more=len(rest) > limit,
            items=[item_json(session, i) for i in rest[:limit]],
            counts=session.store.counts(),
        )

    @app.post("/api/decide")
    def decide():
        body = request.get_json(silent=True)
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("id"), int)
            or body.get("label") not in session.labels
        ):
            abort(400, f'send JSON {{"id": <image id>, "label": one of {session.labels}}}')
        item = _item(session, body["id"])
        session.store.decide(item.index, body["label"])
        return jsonify(item=item_json(session, item), counts=session.store.counts())

    @app.post("/api/undo")
    def undo():
        index = session.store.undo()
        item = None if index is None else item_json(session, session.items[index])
        return jsonify(item=item, counts=session.store.counts())


def _png(make: Callable[[], bytes]) -> Response:
    """A PNG response of ``make()``; an image that cannot be shown is a 422 saying why."""
    try:
        data = make()
    except (ImageError, ValueError, OSError) as exc:
        abort(422, f"cannot show this image: {exc}")
    response = Response(data, mimetype="image/png")
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response


def _add_images(app: Flask, session: ReviewSession) -> None:
    """The images by index: as the model saw them, the original, and the overlay (Grad-CAM or
    occlusion)."""

    @app.get("/thumb/<int:index>.png")
    def thumbnail(index: int):
        return _png(lambda: session.thumbnails.thumbnail(_item(session, index).path))

    @app.get("/original/<int:index>.png")
    def original(index: int):
        return _png(lambda: session.thumbnails.original(_item(session, index).path))

    @app.get("/overlay/<int:index>.png")
    def overlay(index: int):
        item = _item(session, index)
        if session.model_dir is None:
            abort(404, "no model given: start `flystage review` with --model DIR for the overlay")
        method = _overlay_method(session)

        def make() -> bytes:
            from flystage.review.occlusion import occlusion_map, overlay_png

            predictor = session.predictor()
            config: PreprocessConfig = predictor.config
            array = load(item.path, config, name=str(item.path))
            if method == "gradcam":
                return overlay_png(array, session.gradcam()(array))
            return overlay_png(array, occlusion_map(predictor, array))

        response = _png(lambda: session.overlay((index, method), make))
        response.headers["X-Overlay-Method"] = method
        return response


def _overlay_method(session: ReviewSession) -> str:
    """The overlay ``method`` asked for (400 if unknown; 422 if Grad-CAM cannot be had), or
    without one the best there is: Grad-CAM where the model allows, else occlusion."""
    asked = request.args.get("method")
    if asked is not None and asked not in METHODS:
        abort(400, f"method is one of {METHODS}")
    if asked == "occlusion":
        return asked
    why_not = session.gradcam_unavailable()
    if why_not is None:
        try:
            session.gradcam()  # loads the torch model once; raises if it cannot be explained
        except ValueError as exc:
            why_not = f"no Grad-CAM for this model: {exc}; use method=occlusion"
    if why_not is None:
        return "gradcam"
    if asked == "gradcam":
        abort(422, why_not)
    return "occlusion"
