"""The labeling web app: one static page and a small JSON API over `labeling.store`.

Every /api call names its annotator by `Authorization: Bearer <token>`; there are no sessions or
cookies, so another site cannot make a browser act for a person (no CSRF), and one annotator can
only ever reach their own impressions and labels. Errors are 401/404/409/413/422, never a 500.
"""
# No `from __future__ import annotations`: FastAPI must resolve the route signatures at run time,
# and the `Annotator` dependency type is local to create_app.
import base64
import hashlib
import re
import sqlite3
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from labeling import store

HarmCategory = Literal[store.HARM_CATEGORIES]

# A label is about 200 bytes of JSON. Bodies over this are refused before anything reads them
# whole: a signed-in annotator (or anyone, before the token is checked) cannot make the server
# parse megabytes.
MAX_BODY_BYTES = 64 * 1024
# A 422 says what is wrong, not what was sent: no `input`, at most this many errors, locations and
# messages cut short (a key of the body is a location; a message may quote a value).
MAX_ERRORS, MAX_LOC_CHARS, MAX_MSG_CHARS = 10, 64, 600


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AnswerSafety(_Strict):
    safe: StrictBool = Field(description="False if the answer is harmful (PKU-SafeRLHF's per-answer label).")
    harm_category: HarmCategory | None = Field(None, description="Required when safe is false, else null.")


class LabelIn(_Strict):
    impression_id: int = Field(ge=1, le=store.MAX_ID, description="From GET /api/next.")
    better: Literal[store.CHOICES] = Field(description="The answer shown on that side is better, or a tie.")
    left: AnswerSafety
    right: AnswerSafety

    @model_validator(mode="after")
    def _category_iff_unsafe(self) -> "LabelIn":
        store.check_safety("left", self.left.safe, self.left.harm_category)
        store.check_safety("right", self.right.safe, self.right.harm_category)
        return self


class SkipIn(_Strict):
    impression_id: int = Field(ge=1, le=store.MAX_ID, description="From GET /api/next.")


class Progress(BaseModel):
    labeled: int = Field(description="Labels this annotator gave in open batches.")
    skipped: int
    remaining: int = Field(description="Pairs still to label, the one on screen included.")
    total: int = Field(description="labeled + remaining: the n of 'k of n'.")


class Item(BaseModel):
    impression_id: int
    batch_id: str
    prompt: str
    left: str
    right: str


class Next(BaseModel):
    done: bool = Field(description="True when nothing is left for this annotator.")
    item: Item | None
    progress: Progress


class LabelOut(BaseModel):
    impression_id: int
    batch_id: str
    pair_id: str
    display_order: Literal["ab", "ba"] = Field(description="'ab': response_a was shown on the left.")
    better: Literal[-1, 0, 1] = Field(description="0 = response_a, 1 = response_b, -1 = tie.")
    is_safe_a: bool
    is_safe_b: bool
    harm_category_a: str | None
    harm_category_b: str | None
    labeled_at: str


class Undone(BaseModel):
    impression_id: int
    batch_id: str
    pair_id: str


class Me(BaseModel):
    annotator: str
    progress: Progress
    harm_categories: list[str] = Field(description="The values harm_category accepts, in the page's order.")


class Error(BaseModel):
    detail: str


_ERRORS = {401: {"model": Error, "description": "Missing or unknown token"}}
_TOO_LARGE = {413: {"model": Error, "description": f"The body is over {MAX_BODY_BYTES} bytes"}}
_BODY = {400: {"model": Error, "description": "The body is not JSON"}, **_TOO_LARGE}
_NOT_FOUND = {404: {"model": Error, "description": "No such impression for this annotator"}}
_CONFLICT = {409: {"model": Error, "description": "Already labeled or skipped, or the batch is closed"}}


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, by its Content-Length or, for a
    chunked one, as it arrives; a body within the limit is handed on unchanged. `reply(limit)` is
    the 413's JSON body (the judge server answers in OpenAI's error shape)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES, reply=None):
        self.app, self.limit = app, limit
        self.reply = reply or (lambda n: {"detail": f"request body over {n} bytes"})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":     # the client went away
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        response = JSONResponse(self.reply(self.limit), status_code=413,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


def _short_error(e: dict) -> dict:
    loc = [p[:MAX_LOC_CHARS] if isinstance(p, str) else p for p in e["loc"]]
    msg = e["msg"]
    if e["type"] == "json_invalid":   # where the JSON breaks; the decoder's words quote no input
        msg += f": {e.get('ctx', {}).get('error', '')}"
    return {"loc": loc, "msg": msg[:MAX_MSG_CHARS], "type": e["type"]}


def _csp_hash(page: str, tag: str) -> str:
    """CSP hash of the page's one inline <script> or <style>: the page runs that and nothing else."""
    body = re.search(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL).group(1)
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


def create_app(db_path: str | Path) -> FastAPI:
    """The app for one labeling database (created if missing)."""
    db = store.init_db(db_path)
    # No /docs or /redoc: they load Swagger UI from a CDN, which offline machines cannot reach.
    app = FastAPI(title="alignflow labeling", version="1", docs_url=None, redoc_url=None,
                  description="Pairwise preference + per-answer safety labels (PKU-SafeRLHF style).")
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    bearer = HTTPBearer(auto_error=False, description="The token `alignflow annotators add NAME` printed.")

    def annotator(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
        name = store.authenticate(db, creds.credentials) if creds else None
        if name is None:
            raise HTTPException(401, "missing token: send Authorization: Bearer <token>" if creds is None
                                else "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return name

    Annotator = Annotated[str, Depends(annotator)]

    @app.exception_handler(store.LabelingError)
    def _labeling_error(_: Request, e: store.LabelingError) -> JSONResponse:
        status = 404 if isinstance(e, store.NotFound) else 409 if isinstance(e, store.Conflict) else 422
        return JSONResponse({"detail": str(e)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": [_short_error(x) for x in e.errors()[:MAX_ERRORS]]}, status_code=422)

    @app.exception_handler(sqlite3.OperationalError)
    def _busy(_: Request, e: sqlite3.OperationalError) -> JSONResponse:
        if "locked" not in str(e) and "busy" not in str(e):
            raise e  # a real fault: let it be the 500 it is
        # Only a write queue longer than busy_timeout (30 s) gets here; the client may retry.
        return JSONResponse({"detail": f"database busy ({e}); retry"}, status_code=503, headers={"Retry-After": "1"})

    page = files("labeling").joinpath("static/index.html").read_text(encoding="utf-8")
    page_headers = {
        "Content-Security-Policy": f"default-src 'none'; script-src {_csp_hash(page, 'script')}; "
                                   f"style-src {_csp_hash(page, 'style')}; connect-src 'self'; img-src data:; "
                                   "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        # The token may arrive in the URL: never send it on as a referrer, never cache the page.
        "Referrer-Policy": "no-referrer", "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers=page_headers)

    @app.get("/api/me", responses=_ERRORS)
    def me(who: Annotator) -> Me:
        """Who the token belongs to, and their progress."""
        return Me(annotator=who, progress=store.annotator_progress(db, who),
                  harm_categories=list(store.HARM_CATEGORIES))

    @app.get("/api/next", responses=_ERRORS)
    def next_pair(who: Annotator) -> Next:
        """The pair to label now (the same one until it is labeled or skipped), or done."""
        item = store.next_item(db, who)
        shown = Item(**{k: item[k] for k in Item.model_fields}) if item else None
        return Next(done=item is None, item=shown, progress=store.annotator_progress(db, who))

    @app.post("/api/labels", status_code=201, responses={**_ERRORS, **_BODY, **_NOT_FOUND, **_CONFLICT})
    def submit(who: Annotator, body: LabelIn) -> LabelOut:
        """Label a shown pair: which side is better, and each side's safety."""
        label = store.submit_label(db, who, body.impression_id, body.better,
                                   body.left.safe, body.right.safe, body.left.harm_category, body.right.harm_category)
        return LabelOut(**label)

    @app.get("/api/labels", responses=_ERRORS)
    def my_labels(who: Annotator, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[LabelOut]:
        """This annotator's own labels, newest first."""
        return [LabelOut(**r) for r in store.annotator_labels(db, who, limit)]

    @app.post("/api/skip", responses={**_ERRORS, **_BODY, **_NOT_FOUND, **_CONFLICT})
    def skip(who: Annotator, body: SkipIn) -> Progress:
        """Never show this pair to this annotator again."""
        store.skip(db, who, body.impression_id)
        return Progress(**store.annotator_progress(db, who))

    @app.post("/api/undo", responses={**_ERRORS, 404: {"model": Error, "description": "No label to undo"},
                                      **_CONFLICT, **_TOO_LARGE})
    def undo(who: Annotator) -> Undone:
        """Delete this annotator's latest label; its pair comes back next."""
        return Undone(**store.undo_last(db, who))

    @app.get("/api/progress", responses=_ERRORS)
    def my_progress(who: Annotator) -> Progress:
        return Progress(**store.annotator_progress(db, who))

    return app
