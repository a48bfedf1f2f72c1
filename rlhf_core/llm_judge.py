"""An LLM-judge annotator: any OpenAI-compatible chat endpoint compares two answers.

As in Constitutional AI (Bai et al. 2022), each comparison states ONE principle of the
constitution, sampled per pair (here in proportion to its weight, so the judge's emphasis matches
the constitution judge's weighted total). The two answers are shown as "Answer 1"/"Answer 2" in a
random order, recorded as display_order, because LLM judges favour one position (Zheng et al. 2023).
Principle and order are drawn from (seed, pair_id), so relabelling a pair reproduces them whatever
else is in the batch.

An unparseable reply is never turned into a tie (that would teach the reward model that the two
answers are equally good): the pair is skipped and counted in `stats`. It is not re-asked, because
the judge decodes greedily by default and the same prompt would give the same reply.

Only the standard library's urllib talks to the endpoint: rlhf_core stays free of client libraries.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rlhf_core.judge import Constitution, Principle, load_constitution

SOURCE = "llm-judge"
PAIR_KEYS = ("pair_id", "prompt_id", "prompt", "response_a", "response_b")
SERVE_HINT = "start one with `alignflow judge serve --model PATH` or point base_url at a running server"
_RETRY_STATUSES = (408, 429, 500, 502, 503, 504)  # overload or a transient fault: worth another try
_EXCERPT = 300

SYSTEM = "You are a careful, impartial judge of AI assistants' answers. You reply with JSON only."
TEMPLATE = """Compare two answers to the user's request below, judging them by this principle:
{principle}

[User request]
{prompt}

[Answer 1]
{answer_1}

[Answer 2]
{answer_2}

Which answer better follows the principle? Also say whether each answer is safe, meaning it does not help anyone cause serious harm.
Reply with only this JSON object and nothing else:
{{"better": 1 or 2 or "tie", "answer_1_safe": true or false, "answer_2_safe": true or false, "reason": "one short sentence"}}"""


class LLMJudgeError(RuntimeError):
    """The endpoint is unreachable, too slow, or answered with an error or a non-chat response."""


@dataclass(frozen=True)
class Verdict:
    """A parsed reply in display terms: better is 1 or 2 (the answer shown as Answer 1/2) or -1 for a tie."""
    better: int
    answer_1_safe: bool | None = None  # None: the reply did not say
    answer_2_safe: bool | None = None
    reason: str = ""


@dataclass
class JudgeStats:
    """What the latest `label_pairs` call did, so a judge that ignores the format is visible."""
    parsed: int = 0
    unparseable: int = 0
    retries: int = 0  # transport retries: refused connections, timeouts, 408/429/5xx answers
    skipped: dict[str, str] = field(default_factory=dict)  # pair_id -> start of the unparseable reply


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
def _better(value) -> int | None:
    """1, 2 or -1 (tie) from the forms judges write: 1, "2", "Answer 1", "tie"; None otherwise."""
    if isinstance(value, bool):  # bool is an int in Python; `true` is not an answer number
        return None
    if isinstance(value, int):
        return value if value in (1, 2) else None
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("tie", "equal", "both", "neither"):
            return -1
        m = re.fullmatch(r"(?:answer\s*)?([12])", v)
        return int(m.group(1)) if m else None
    return None


def _safe(value) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "safe", "false", "no", "unsafe"):
        return value.strip().lower() in ("true", "yes", "safe")
    return None


def _json_verdicts(text: str) -> list[Verdict]:
    """Every JSON object in the text (fenced, quoted in prose, ...) that carries a valid "better"."""
    decoder, found = json.JSONDecoder(), []
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, m.start())
        except ValueError:
            continue
        if isinstance(obj, dict) and (better := _better(obj.get("better"))) is not None:
            reason = obj.get("reason")
            found.append(Verdict(better, _safe(obj.get("answer_1_safe")), _safe(obj.get("answer_2_safe")),
                                 reason if isinstance(reason, str) else ""))
    return found


# Fallbacks for replies that are not JSON, strongest first. Each yields a choice only; safety is
# then unknown (None), never guessed. A `better` key is either quoted (JSON cut off or malformed),
# its value ending where a JSON value ends, or opens a line and is alone on it ("Better: Answer 2").
# So the echoed formats `"better": 1 or 2 or "tie"` and "Better: Answer 1, Answer 2 or tie" are no
# verdict, and "Answer 1 is better: 2 reasons" is prose, not a key.
_VALUE = r"""["']?(answer\s*[12]|[12]|tie)["']?"""
_KEY_VALUE = [
    re.compile(rf"""["']better["']\s*:\s*{_VALUE}\s*(?:[,}}]|$)""", re.IGNORECASE | re.MULTILINE),
    re.compile(rf"""^\s*better\s*[:=]\s*{_VALUE}[\s.]*$""", re.IGNORECASE | re.MULTILINE),
]
_PROSE = [
    re.compile(r"\banswer\s*([12])\s+is\s+(?:clearly\s+|much\s+|slightly\s+)?(?:the\s+)?(?:better|preferred|superior)\b",
               re.IGNORECASE),
    re.compile(r"\b(?:i\s+)?(?:prefer|choose|pick)\s+answer\s*([12])\b", re.IGNORECASE),
    re.compile(r"\b(?:better|best|preferred)\s+answer\s+is\s+(?:answer\s*)?([12])\b", re.IGNORECASE),
]
_PROSE_TIE = re.compile(r"\b(?:it'?s|it\s+is|this\s+is)\s+a\s+tie\b|\bboth\s+answers\s+are\s+equally\s+(?:good|bad)\b",
                        re.IGNORECASE)


def parse_verdict(text: str) -> Verdict | None:
    """The judge's verdict from a free-form reply, or None when it gives none or contradicts itself.

    A JSON object anywhere in the text wins; then a `better: N` key-value in broken JSON; then
    prose such as "Answer 2 is better". Conflicting verdicts (two JSON objects, or "Answer 1 is
    better ... Answer 2 is better") count as no verdict rather than picking one.
    """
    verdicts = _json_verdicts(text)
    if verdicts:
        return verdicts[0] if len({v.better for v in verdicts}) == 1 else None
    choices = {_better(m.group(1)) for p in _KEY_VALUE for m in p.finditer(text)}
    if not choices:
        choices = {int(m.group(1)) for p in _PROSE for m in p.finditer(text)}
        if _PROSE_TIE.search(text):
            choices.add(-1)
    return Verdict(choices.pop()) if len(choices) == 1 else None


# --------------------------------------------------------------------------------------------
# Prompt and row, in display terms and back
# --------------------------------------------------------------------------------------------
def judge_messages(pair: dict, principle: Principle, display_order: str) -> list[dict]:
    """The chat messages for one comparison; 'ab' shows response_a as Answer 1, 'ba' response_b."""
    first, second = ("response_a", "response_b") if display_order == "ab" else ("response_b", "response_a")
    user = TEMPLATE.format(principle=principle.text, prompt=pair["prompt"], answer_1=pair[first],
                           answer_2=pair[second])
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def preference_row(pair: dict, verdict: Verdict, display_order: str, annotator: str,
                   labeled_at: datetime | None = None) -> dict:
    """A schemas.PREFERENCES row: the verdict's Answer 1/2 mapped back to response_a/b through display_order."""
    if display_order not in ("ab", "ba"):
        raise ValueError(f"display_order must be 'ab' or 'ba', got {display_order!r}")
    swapped = display_order == "ba"
    better = -1 if verdict.better == -1 else (verdict.better - 1) ^ int(swapped)
    safe_a, safe_b = ((verdict.answer_2_safe, verdict.answer_1_safe) if swapped
                      else (verdict.answer_1_safe, verdict.answer_2_safe))
    return {
        "pair_id": pair["pair_id"], "prompt_id": pair["prompt_id"], "prompt": pair["prompt"],
        "response_a": pair["response_a"], "response_b": pair["response_b"], "better": better,
        "is_safe_a": safe_a, "is_safe_b": safe_b, "annotator": annotator, "source": SOURCE,
        "display_order": display_order, "labeled_at": labeled_at or datetime.now(UTC), "weight": 1.0,
    }


def _chat_url(base_url: str) -> str:
    """OpenAI clients take base_url with /v1 ("http://host:8766/v1"); a bare host gets /v1 added."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:8766/v1, got {base_url!r}")
    path = parts.path.rstrip("/") or "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path + "/chat/completions", "", ""))


# --------------------------------------------------------------------------------------------
# The annotator
# --------------------------------------------------------------------------------------------
class LLMJudgeAnnotator:
    """Labels pairs by asking an OpenAI-compatible chat endpoint; rows follow schemas.PREFERENCES."""

    def __init__(self, base_url: str, model: str, constitution: Constitution | None = None, timeout_s: float = 30,
                 retries: int = 2, backoff_s: float = 0.5, seed: int = 0, api_key: str | None = None,
                 temperature: float = 0.0, max_tokens: int = 256):
        if retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"need retries >= 0, timeout_s > 0 and backoff_s >= 0; got {retries}, {timeout_s}, "
                             f"{backoff_s}")
        self.url = _chat_url(base_url)
        self.model = model
        self.constitution = constitution or load_constitution()
        self.principles = [p for p in self.constitution.principles if p.weight > 0]
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.seed, self.api_key = seed, api_key
        self.temperature, self.max_tokens = temperature, max_tokens
        self.annotator = f"{SOURCE}:{model}/seed{seed}"
        self.stats = JudgeStats()

    def draw(self, pair_id: str) -> tuple[Principle, str]:
        """The principle and display order of one pair, from (seed, pair_id) alone."""
        digest = hashlib.sha256(f"{self.seed}\0{pair_id}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        principle = rng.choices(self.principles, weights=[p.weight for p in self.principles])[0]
        return principle, rng.choice(("ab", "ba"))

    def complete(self, messages: list[dict]) -> str:
        """The assistant's reply text, retrying refused connections, timeouts and 408/429/5xx."""
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "seed": self.seed}
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        attempts = self.retries + 1
        for attempt in range(attempts):
            if attempt:
                self.stats.retries += 1
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                break
            except urllib.error.HTTPError as e:  # before URLError: it is a subclass
                excerpt = e.read().decode("utf-8", "replace")[:_EXCERPT]
                failure = LLMJudgeError(f"LLM judge endpoint {self.url} answered HTTP {e.code} {e.reason}"
                                        f"{f' after {attempt + 1} attempts' if attempt else ''}: {excerpt}")
                if e.code not in _RETRY_STATUSES:
                    raise failure from e  # a bad request or key does not get better by asking again
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:  # refused, unreachable, slow
                reason = getattr(e, "reason", e)
                failure = LLMJudgeError(
                    f"LLM judge endpoint {self.url} is down or too slow: {reason!s} (after {attempts} attempt(s), "
                    f"timeout {self.timeout_s:g} s each); {SERVE_HINT}")
        else:
            raise failure
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
            if not isinstance(content, str | None):
                raise TypeError(f"message.content is a {type(content).__name__}, not a string")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise LLMJudgeError(f"LLM judge endpoint {self.url} did not return an OpenAI chat completion "
                                f"({type(e).__name__}: {e}): {raw[:_EXCERPT].decode('utf-8', 'replace')}") from e
        return content or ""  # null content (e.g. a provider's refusal) is an unparseable reply

    def label_pairs(self, pairs: list[dict]) -> list[dict]:
        """One PREFERENCES row per pair the judge gave a verdict on; unparseable pairs are skipped
        and counted in `self.stats` (reset per call). Raises LLMJudgeError when the endpoint fails."""
        for i, pair in enumerate(pairs):
            missing = [k for k in PAIR_KEYS if k not in pair]
            if missing:
                raise ValueError(f"pairs[{i}] is missing key(s) {missing}; each pair needs {list(PAIR_KEYS)}")
        self.stats = JudgeStats()
        rows = []
        for pair in pairs:
            principle, order = self.draw(pair["pair_id"])
            reply = self.complete(judge_messages(pair, principle, order))
            verdict = parse_verdict(reply)
            if verdict is None:
                self.stats.unparseable += 1
                self.stats.skipped[pair["pair_id"]] = reply[:_EXCERPT]
                continue
            self.stats.parsed += 1
            rows.append(preference_row(pair, verdict, order, self.annotator))
        return rows
