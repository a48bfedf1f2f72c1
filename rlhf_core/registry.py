"""Model registry: every policy version with its lineage, and the promotion gate.

A version is a finished run's kept policy (its LoRA adapter folder), recorded with everything that
made it: base model, adapter hash, reward- and cost-model folders and hashes, the hashes of the
preference data it learned from, the constitution version, the annotators, the config hash and its
held-out evaluation. One version at a time is "production"; a new one becomes production only if
its unsafe-compliance and over-refusal rates pass the configured thresholds and do not regress
against the current production version — otherwise it stays a "candidate" with the reasons.

The registry is one JSON file, rewritten atomically (temp file + rename) under a lock file, so a
crash never leaves it half-written and two writers never interleave.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_core.io import atomic_write_text

STAGES = ("candidate", "production", "archived")


class RegistryError(ValueError):
    """Bad registry input; the message names the version or field."""


def folder_sha256(folder: str | Path) -> str:
    """Hash of a folder's files (names and bytes, sorted): the identity of an adapter or model."""
    h = hashlib.sha256()
    root = Path(folder)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def lineage_from_manifest(manifest: dict, iteration: int) -> dict:
    """What made the policy of `iteration` in a run: read from the run's manifest.json."""
    its = manifest["iterations"]
    upto = [its[str(k)] for k in range(1, iteration + 1) if str(k) in its]
    adapter = its[str(iteration)]["policy"]["adapter"]
    annotators = sorted({it["preferences"]["annotator"] for it in upto if "preferences" in it}
                        | {name for it in upto for name in it.get("human_feedback", {}).get("annotators", {})})
    last = its[str(iteration)]
    return {
        "run_id": manifest["run_id"], "iteration": iteration, "base_model": manifest["models"]["policy"],
        "adapter": adapter, "adapter_sha256": folder_sha256(adapter),
        "reward_model": last.get("reward_model", {}).get("path"), "cost_model": last.get("cost_model", {}).get("path"),
        "preference_sha256": [it["preferences"]["sha256"] for it in upto if "preferences" in it],
        "human_labels_sha256": [it["human_feedback"]["human_labels_sha256"] for it in upto if "human_feedback" in it],
        "constitution_version": manifest.get("judge", {}).get("constitution_version"),
        "annotators": annotators, "config_hash": manifest["config_hash"], "seed": manifest["seed"],
        "parent": manifest.get("retrain", {}).get("parent"),   # the production version a retrain started from
        "algorithm": manifest["config"]["ppo"]["advantage_estimator"]
        + ("+safe-rlhf" if manifest["config"].get("safe_rlhf", {}).get("enabled") else ""),
    }


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: list[str]


def promotion_gate(candidate: dict, production: dict | None, max_unsafe: float, max_over_refusal: float,
                   tolerance: float = 0.0) -> GateResult:
    """Does a candidate's evaluation pass the thresholds and not regress against production?

    candidate, production: eval metrics (`unsafe_compliance`, `over_refusal`, in %). A regression is
    a rate more than `tolerance` points worse than production's — checked only when both were
    measured the same way (`measure`: judge version and headline set); rates read by another judge
    or on other prompts are not comparable, and the thresholds alone decide.
    """
    reasons = []
    if production is not None and (production.get("measure"), production.get("headline_set")) != \
            (candidate.get("measure"), candidate.get("headline_set")):
        production = None
    for key, bound in (("unsafe_compliance", max_unsafe), ("over_refusal", max_over_refusal)):
        value = candidate.get(key)
        if value is None or value != value:
            reasons.append(f"{key} missing from the candidate's evaluation")
        elif value > bound:
            reasons.append(f"{key} {value:.1f} % is over the threshold {bound:g} %")
        elif production is not None and value > production[key] + tolerance:
            reasons.append(f"{key} {value:.1f} % regresses against production's {production[key]:.1f} % "
                           f"(tolerance {tolerance:g} points)")
    return GateResult(not reasons, reasons)


class Registry:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ----- storage ---------------------------------------------------------------------------
    def _read(self) -> dict:
        if not self.path.exists():
            return {"versions": {}, "events": []}
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RegistryError(f"{self.path}: not a registry file: {e}") from e

    @contextlib.contextmanager
    def _locked(self):
        """Exclusive lock (O_EXCL lock file) around read-modify-write; stale after 60 s."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_suffix(self.path.suffix + ".lock")
        deadline = time.monotonic() + 30
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - lock.stat().st_mtime > 60:
                        lock.unlink()
                        continue
                if time.monotonic() > deadline:
                    raise RegistryError(f"{lock}: registry is locked by another writer") from None
                time.sleep(0.05)
        try:
            data = self._read()
            yield data
            atomic_write_text(self.path, json.dumps(data, indent=2))
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    # ----- queries ---------------------------------------------------------------------------
    def versions(self) -> list[dict]:
        return sorted(self._read()["versions"].values(), key=lambda v: v["registered_at"])

    def get(self, version: str) -> dict:
        v = self._read()["versions"].get(version)
        if v is None:
            raise RegistryError(f"no version {version!r} in {self.path}")
        return v

    def production(self) -> dict | None:
        prod = [v for v in self._read()["versions"].values() if v["stage"] == "production"]
        return prod[0] if prod else None

    def events(self) -> list[dict]:
        return self._read()["events"]

    def watermark(self, source: str) -> int:
        """The newest label id of `source` (a label database) that a retrain has already used; 0: none."""
        return int(self._read().get("watermarks", {}).get(source, {}).get("label_id", 0))

    def set_watermark(self, source: str, label_id: int, run_id: str) -> None:
        with self._locked() as data:
            data.setdefault("watermarks", {})[source] = {"label_id": int(label_id), "run_id": run_id, "at": _now()}
            data["events"].append({"at": _now(), "event": "watermark", "source": source, "label_id": int(label_id),
                                   "run_id": run_id})

    # ----- changes ---------------------------------------------------------------------------
    def register(self, version: str, lineage: dict, metrics: dict) -> dict:
        """Add a candidate version (ids are unique: re-registering is an error)."""
        with self._locked() as data:
            if version in data["versions"]:
                raise RegistryError(f"version {version!r} is already registered")
            entry = {"version": version, "stage": "candidate", "registered_at": _now(), "lineage": lineage,
                     "metrics": metrics, "gate": None}
            data["versions"][version] = entry
            data["events"].append({"at": entry["registered_at"], "event": "register", "version": version})
        return entry

    def evaluate_gate(self, version: str, max_unsafe: float, max_over_refusal: float, tolerance: float = 0.0,
                      promote: bool = True) -> GateResult:
        """Run the gate against the current production version; promote when it passes (and `promote`)."""
        with self._locked() as data:
            entry = _entry(data, version)
            prod = next((v for v in data["versions"].values() if v["stage"] == "production"), None)
            result = promotion_gate(entry["metrics"], prod["metrics"] if prod and prod is not entry else None,
                                    max_unsafe, max_over_refusal, tolerance)
            entry["gate"] = {"passed": result.passed, "reasons": result.reasons, "at": _now(),
                             "against": prod["version"] if prod else None}
            if result.passed and promote:
                _promote(data, entry, "gate passed")
        return result

    def promote(self, version: str, reason: str = "manual promotion") -> dict:
        """Make `version` production (the previous production version is archived)."""
        with self._locked() as data:
            entry = _entry(data, version)
            _promote(data, entry, reason)
        return entry

    def rollback(self) -> dict:
        """Production goes back to the version that was production before the current one."""
        with self._locked() as data:
            promotions = [e for e in data["events"] if e["event"] == "promote"]
            if len(promotions) < 2:
                raise RegistryError("nothing to roll back to: fewer than two promotions so far")
            current = _entry(data, promotions[-1]["version"])
            previous = next((_entry(data, e["version"]) for e in reversed(promotions[:-1])
                             if e["version"] != current["version"]), None)
            if previous is None:
                raise RegistryError("nothing to roll back to")
            _promote(data, previous, f"rollback from {current['version']}")   # current is archived
        return previous


def _entry(data: dict, version: str) -> dict:
    try:
        return data["versions"][version]
    except KeyError:
        raise RegistryError(f"no version {version!r} in the registry") from None


def _promote(data: dict, entry: dict, reason: str) -> None:
    for v in data["versions"].values():
        if v["stage"] == "production" and v is not entry:
            v["stage"] = "archived"
    entry["stage"] = "production"
    data["events"].append({"at": _now(), "event": "promote", "version": entry["version"], "reason": reason})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
