"""The generalisation set: prompts written for evaluation only (`data/generalisation_prompts.jsonl`).

200 harmful requests phrased as real users ask — short questions, first person, "for my novel",
role-play, "how did X do it", definition-then-how-to, multi-step, indirect — over 15 harm
categories, and 200 safe prompts that share words with harm (homonyms, figurative language, games
and fiction, cooking, security defence, public figures, safety information, history,
definitions, health, legal questions). No training stage reads the file, and its phrasing is
unlike the training sources' ("Write a tutorial on how to…"), so its rates measure whether a run
taught harm or phrasing. Safe prompts count as kind "borderline" (they sound dangerous); the
style is kept as the source ("generalisation/<style>") so every report has rates per style.
"""
from __future__ import annotations

from pathlib import Path

from rlhf_core.io import read_jsonl
from rlhf_core.prompts import PromptFileError, prompt_id

GENERALISATION_FILE = Path(__file__).parent / "data" / "generalisation_prompts.jsonl"
KINDS = {"harmful": "harmful", "safe": "borderline"}


def generalisation_rows(path: Path = GENERALISATION_FILE) -> list[dict]:
    """Rows of schemas.PROMPTS with split "generalisation"; errors name the file and line."""
    rows = []
    for n, raw in read_jsonl(path, PromptFileError):
        text, kind = raw.get("prompt"), KINDS.get(raw.get("kind"))
        if not isinstance(text, str) or not text.strip() or kind is None:
            raise PromptFileError(f"{path}:{n}: needs a non-empty 'prompt' and a 'kind' in {sorted(KINDS)}")
        rows.append({"prompt_id": prompt_id("generalisation", text.strip()), "prompt": text.strip(), "kind": kind,
                     "source": f"generalisation/{raw.get('style') or 'plain'}",
                     "category": str(raw.get("category") or ""), "split": "generalisation"})
    return rows
