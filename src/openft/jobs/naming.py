"""OpenAI-style names: ft:<base>:<owner>:<suffix>:<id> and …:ckpt-step-N."""

from __future__ import annotations

import re


def _clean(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def fine_tuned_model_name(job: dict) -> str:
    base = _clean(job["model"].rstrip("/").split("/")[-1])
    return f"ft:{base}:{_clean(job['owner'])}:{_clean(job.get('suffix') or '')}:{job['id'].removeprefix('ftjob-')}"


def checkpoint_model_name(job: dict, step: int) -> str:
    return f"{fine_tuned_model_name(job)}:ckpt-step-{step}"
