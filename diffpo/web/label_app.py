"""The ``diffpo label`` app: one page, a small JSON API, the candidate images.

    GET  /                 the page (static/label.html)
    GET  /api/state        the prompt to label now, progress (k of n, labelled per hour)
    POST /api/answer       {"task": id, "choice": image index | "tie"}  -> appended to the manifest
    POST /api/skip         {"task": id}      the prompt moves behind the others (not written)
    POST /api/undo         the last action of this session (after a restart: the manifest's last answer)
    GET  /images/{path}    a candidate image, only from the candidates' folder

Which prompt comes next is server state: the queue of unanswered tasks in candidate order, with
skipped ones moved to its end. The page only shows it, so a reload or a second tab never labels
a prompt twice (an answer for a task that is no longer pending is refused with 409).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Route

from diffpo.web.candidates import Candidates
from diffpo.web.files import image_response
from diffpo.web.labels import TIE, Manifest

STATIC = Path(__file__).parent / "static"


class LabelSession:
    """The queue of pending tasks, this session's undo history and pace, over a ``Manifest``."""

    def __init__(self, candidates: Candidates, out_dir: str | Path):
        self.candidates = candidates
        self.tasks = {task.id: task for task in candidates.tasks}
        self.manifest = Manifest(out_dir)
        self.queue = [task.id for task in candidates.tasks if task.id not in self.manifest.answered]
        self.history: list[tuple[str, str]] = []  # ("answer" | "skip", task id)
        self.answer_times: list[float] = []  # this session's answers, for the labelled-per-hour pace
        self._lock = threading.Lock()

    def state(self) -> dict:
        with self._lock:
            task = self.tasks[self.queue[0]] if self.queue else None
            total = len(self.tasks)
            return {
                "task": None if task is None else {
                    "id": task.id,
                    "prompt": task.prompt,
                    "images": [f"/images/{quote(self.candidates.url_path(p))}" for p in task.images],
                },
                "answered": total - len(self.queue),
                "total": total,
                "session_answers": len(self.answer_times),
                "per_hour": self._per_hour(),
                "manifest": str(self.manifest.path),
                "can_undo": bool(self.history) or bool(self.manifest.answered),
            }

    def _per_hour(self) -> float | None:
        """Answers per hour over this session's answers (first to last); None before two."""
        times = self.answer_times
        if len(times) < 2 or times[-1] <= times[0]:
            return None
        return 3600.0 * (len(times) - 1) / (times[-1] - times[0])

    def _pending(self, task_id: str) -> None:
        if task_id not in self.queue:
            raise Conflict(f"task '{task_id}' is not pending (already answered, or unknown)")

    def answer(self, task_id: str, choice: int | str) -> None:
        with self._lock:
            self._pending(task_id)
            self.manifest.append(self.tasks[task_id], choice)
            self.queue.remove(task_id)
            self.history.append(("answer", task_id))
            self.answer_times.append(time.monotonic())

    def skip(self, task_id: str) -> None:
        with self._lock:
            self._pending(task_id)
            self.queue.remove(task_id)
            self.queue.append(task_id)
            self.history.append(("skip", task_id))

    def undo(self) -> str | None:
        """Undo a skip (the prompt comes back first) or the last answer (removed from the manifest)."""
        with self._lock:
            action, task_id = self.history.pop() if self.history else ("answer", None)
            if action == "skip":
                self.queue.remove(task_id)
            else:
                task_id = self.manifest.undo_last()
                if task_id is None:
                    return None
                if self.answer_times:
                    self.answer_times.pop()
            if task_id in self.tasks:
                self.queue.insert(0, task_id)
            return task_id


class Conflict(Exception):
    pass


def create_app(session: LabelSession) -> Starlette:
    async def page(request: Request):
        return FileResponse(STATIC / "label.html", headers={"Cache-Control": "no-store"})

    async def state(request: Request):
        return JSONResponse(session.state())

    async def act(request: Request, action) -> JSONResponse:
        if not _is_json(request):
            return _not_json()
        try:
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("task"), str):
                raise ValueError("expected a JSON object with 'task'")
            action(body)
        except Conflict as err:
            return JSONResponse({"error": str(err)}, status_code=409)
        except ValueError as err:  # bad JSON or a bad choice
            return JSONResponse({"error": str(err)}, status_code=400)
        return JSONResponse(session.state())

    async def answer(request: Request):
        def run(body):
            choice = body.get("choice")
            session.answer(body["task"], choice if choice == TIE else _index(choice))
        return await act(request, run)

    async def skip(request: Request):
        return await act(request, lambda body: session.skip(body["task"]))

    async def undo(request: Request):
        if not _is_json(request):
            return _not_json()
        session.undo()
        return JSONResponse(session.state())

    async def image(request: Request):
        return image_response(session.candidates.root, request.path_params["path"])

    return Starlette(routes=[
        Route("/", page),
        Route("/api/state", state),
        Route("/api/answer", answer, methods=["POST"]),
        Route("/api/skip", skip, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/images/{path:path}", image),
    ])


def _is_json(request: Request) -> bool:
    """Changes must come as application/json: a browser sends that type across origins only after
    a CORS preflight, which this app does not answer, so another web page open in the same browser
    cannot write to the manifest (a plain form or text/plain POST would need no preflight)."""
    return request.headers.get("content-type", "").split(";")[0].strip() == "application/json"


def _not_json() -> JSONResponse:
    return JSONResponse({"error": "send application/json"}, status_code=415)


def _index(choice) -> int:
    if isinstance(choice, bool) or not isinstance(choice, int):
        raise ValueError(f"choice must be an image index or 'tie', got {choice!r}")
    return choice
