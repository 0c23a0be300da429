"""Loading LaMP benchmark data (Salemi et al. 2023) for the generation tasks 4, 5 and 7.

Two layouts are read:

- LaMP's official one: a questions file (a JSON list of `{id, input, profile: [...]}`) and an
  outputs file (`{"task": "LaMP_7", "golds": [{id, output}, ...]}`);
- JSONL, one user per line with the gold `output` inline (`../shared/data/lamp7/dev.jsonl`).

Malformed files raise `InputError` naming the file and line. The query and corpus follow
LaMP's own code (prompts/prompts.py, prompts/utils.py): the query is the input's text after
`article:` (4), `paper:` (5) or the first colon (7); the corpus text is title+text (4),
title+abstract (5) or text (7).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rpo_local.errors import InputError
from rpo_local.importers import read_text_file


@dataclass(frozen=True)
class TaskSpec:
    name: str
    fields: tuple[str, ...]  # profile fields, joined with a space for the corpus text
    marker: str  # the input's content starts after the first occurrence of this
    kind: str  # history item kind (rpo_local.store.KINDS)


MAX_ANSWER_TOKENS = 64  # generation budget: every answer of these tasks is a title or a tweet

TASKS = {
    "LaMP_4": TaskSpec("LaMP_4", ("title", "text"), "article:", "post"),
    "LaMP_5": TaskSpec("LaMP_5", ("title", "abstract"), "paper:", "other"),
    "LaMP_7": TaskSpec("LaMP_7", ("text",), ":", "tweet"),
    # Whole replies built from LaMP-7 users (rpo_local.replies): the input is the generic reply.
    "LaMP_7_replies": TaskSpec("LaMP_7_replies", ("text",), "", "tweet"),
}


@dataclass
class LampUser:
    id: str | int  # kept as given, so predictions files match LaMP's golds exactly
    input: str
    profile: list[dict]
    output: str
    where: str  # "file:line", for messages


@dataclass
class LampData:
    task: str
    users: list[LampUser]
    source: str


def normalize_task(task: str | int) -> str:
    """'7', 'LaMP-7', 'lamp_7', 'LaMP_7' → 'LaMP_7' (tasks 4, 5 and 7 only)."""
    number = re.sub(r"(?i)^lamp[-_ ]?", "", str(task).strip())
    name = f"LaMP_{number}"
    if name not in TASKS or not number.isdigit():
        raise InputError(f"LaMP task {task!r} is not supported; use one of 4, 5, 7 (the generation tasks)")
    return name


def query_text(task: str, text: str) -> str:
    """The content of a task input, as LaMP extracts it for its BM25 query.

    For LaMP-7 this is the neutral paraphrase the user's tweet is to be recovered from.
    """
    marker = TASKS[task].marker
    idx = text.find(marker)
    return text[idx + len(marker):].strip() if idx >= 0 else text.strip()


def item_text(task: str, entry: dict) -> str:
    """A profile entry as one history item (LaMP's corpus text for the task)."""
    return " ".join(str(entry[f]).strip() for f in TASKS[task].fields if str(entry.get(f) or "").strip())


def select(users: Sequence[LampUser], *, offset: int = 0, limit: int | None = None) -> list[LampUser]:
    """Users `offset` .. `offset + limit` in file order: the same selection on every run."""
    if offset < 0 or (limit is not None and limit < 0):
        raise InputError("--offset and --limit must not be negative")
    end = None if limit is None else offset + limit
    return list(users[offset:end])


# -- loading ----------------------------------------------------------------------------------

def load(
    data: Path | None = None,
    *,
    questions: Path | None = None,
    outputs: Path | None = None,
    task: str | None = None,
) -> LampData:
    """Load either layout: `data` as JSONL, or `questions` (or `data`) with `outputs`."""
    if questions is not None and data is not None:
        raise InputError("give either DATA or --questions, not both")
    questions = questions or (data if outputs is not None else None)
    if questions is not None:
        if outputs is None:
            raise InputError(f"{questions}: LaMP's questions file needs its --outputs file (the golds)")
        return load_questions(questions, outputs, task=task)
    if data is None:
        raise InputError("no data: give a JSONL file, or --questions and --outputs")
    head = _read(data).lstrip()[:1]
    if head == "[":
        raise InputError(f"{data}: this is LaMP's questions layout; give its golds with --outputs")
    return load_jsonl(data, task=task)


def load_jsonl(path: Path, *, task: str | None = None) -> LampData:
    users: list[LampUser] = []
    for lineno, line in enumerate(_read(path).split("\n"), 1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: invalid JSON ({exc.msg})") from None
        users.append(_user(obj, where, need_output=True))
    return _finish(users, path, task)


def load_questions(questions: Path, outputs: Path, *, task: str | None = None) -> LampData:
    q_text = _read(questions)
    q_list = _parse(q_text, questions)
    if not isinstance(q_list, list):
        raise InputError(f"{questions}:1: expected a JSON list of questions")
    q_lines = _element_lines(q_text)
    users = [_user(obj, f"{questions}:{q_lines[i]}", need_output=False) for i, obj in enumerate(q_list)]

    o_text = _read(outputs)
    o_doc = _parse(o_text, outputs)
    if not isinstance(o_doc, dict) or not isinstance(o_doc.get("golds"), list):
        raise InputError(f"{outputs}:1: expected an object with a 'golds' list (LaMP's outputs file)")
    o_lines = _element_lines(o_text, key="golds")
    golds: dict[str, str] = {}
    for i, gold in enumerate(o_doc["golds"]):
        where = f"{outputs}:{o_lines[i]}"
        if not isinstance(gold, dict) or "id" not in gold or not isinstance(gold.get("output"), str):
            raise InputError(f"{where}: each gold must be an object with 'id' and a string 'output'")
        golds[str(gold["id"])] = gold["output"]
    for user in users:
        if str(user.id) not in golds:
            raise InputError(f"{user.where}: question {user.id!r} has no gold output in {outputs}")
        user.output = golds[str(user.id)]
    file_task = o_doc.get("task")
    if file_task is not None:
        file_task = normalize_task(file_task)
        if task is not None and normalize_task(task) != file_task:
            raise InputError(f"{outputs}: holds task {file_task}, not {normalize_task(task)}")
    return _finish(users, questions, task or file_task)


def _read(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    text = read_text_file(path)
    return text[1:] if text.startswith("\ufeff") else text


def _parse(text: str, path: Path) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def _user(obj: object, where: str, *, need_output: bool) -> LampUser:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object for one user")
    missing = [k for k in ("id", "input", "profile") + (("output",) if need_output else ()) if k not in obj]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise InputError(f"{where}: 'id' must be a string or an integer")
    if not isinstance(obj["input"], str) or not obj["input"].strip():
        raise InputError(f"{where}: 'input' must be a non-empty string")
    profile = obj["profile"]
    if not isinstance(profile, list) or not all(isinstance(p, dict) for p in profile):
        raise InputError(f"{where}: 'profile' must be a list of objects")
    output = obj.get("output", "")
    if not isinstance(output, str):
        raise InputError(f"{where}: 'output' must be a string")
    return LampUser(obj["id"], obj["input"], profile, output, where)


def _finish(users: list[LampUser], source: Path, task: str | None) -> LampData:
    if not users:
        raise InputError(f"{source}: no users in the file")
    name = normalize_task(task) if task is not None else detect_task(users)
    seen: set[str] = set()
    for user in users:
        if str(user.id) in seen:
            raise InputError(f"{user.where}: duplicate user id {user.id!r}")
        seen.add(str(user.id))
        for entry in user.profile:
            if not item_text(name, entry):
                fields = " or ".join(TASKS[name].fields)
                raise InputError(f"{user.where}: a profile entry of user {user.id!r} has no {fields} ({name})")
    return LampData(name, users, str(source))


def detect_task(users: Sequence[LampUser]) -> str:
    """The task a file holds, from its profile fields (LaMP-5: abstract, 4: title, 7: text only)."""
    keys = {k for user in users[:50] for entry in user.profile for k in entry}
    if "abstract" in keys:
        return "LaMP_5"
    if "title" in keys:
        return "LaMP_4"
    return "LaMP_7"


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _element_lines(text: str, key: str | None = None) -> list[int]:
    """1-based line of each element of the top-level list (or of the list under `key`).

    Only called on text that already parsed as JSON, so the walk needs no error handling.
    """
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if key is not None:  # walk the top-level object's members up to `key`
        pos = _skip_ws(text, pos + 1)
        while True:
            name, pos = decoder.raw_decode(text, pos)
            pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past ':'
            if name == key:
                break
            _, pos = decoder.raw_decode(text, pos)
            pos = _skip_ws(text, _skip_ws(text, pos) + 1)  # past ','
    lines: list[int] = []
    pos = _skip_ws(text, pos + 1)  # past '['
    while text[pos] != "]":
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        if text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    return lines
