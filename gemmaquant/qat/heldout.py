"""Never silently worse: QAT keeps the state that does best on held-out text, its GPTQ start included (issue 29).

    held-out windows = heldout= (a file) or the last heldout_share of the training text's tokens, which then
                       never trains (GPTQ still calibrates on the whole file: if anything, that favours the start)
    every eval_every steps, and at step 0 (the GPTQ start):
        kl(step) = mean over held-out tokens of KL(float || student), the student with the values it would
                   export (the moving average, when there is one) swapped in
        a strictly lower kl than the best so far: the exported values are written to qat-best.safetensors
        (temp name + rename), then the resumable checkpoint, so the checkpoint's record of the best never
        points past the file
    after the last step: the best state's values are loaded into the student and exported (export_last=True:
    the last state, as before); the report says which, and says plainly when QAT never beat its GPTQ start.

Cost: select_windows forward passes of seq_len tokens each time, no backward; the float model's log-probabilities
on them are computed once and kept when they fit in HELDOUT_CACHE_BYTES (else recomputed). With the defaults (16
windows, 21 evaluations in a run) measured at 59-65 s of 918-1020 s runs of 200 steps (6-7%: about two thirds of a
training step per evaluation, so about 1.4% of a 1000-step run). Memory: one copy of the trained values while an evaluation runs (as the average is).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemmaquant.qat.prepare import QATError

BEST = "qat-best.safetensors"
HELDOUT_CACHE_BYTES = 512 << 20  # the float model's held-out log-probs are kept when they fit in this


def split_heldout(stream: Tensor, r, heldout_stream: Tensor | None, data="training data",
                  heldout="held-out text") -> tuple[Tensor, Tensor, str]:
    """-> (the training stream, held-out windows [n, seq_len], where they come from). Without a held-out file,
    the last r.heldout_share of the tokens (at least one window) are held out; the windows are non-overlapping
    and spread evenly over the held-out tokens."""
    L = r.seq_len
    if heldout_stream is not None:
        held, train, source = heldout_stream, stream, "the held-out file"
        if held.numel() < L:
            raise QATError(f"{heldout}: {held.numel()} tokens of held-out text, too short for one window of {L} "
                           f"tokens")
    else:
        n_hold = max(L, int(stream.numel() * r.heldout_share))
        train, held = stream[:-n_hold], stream[-n_hold:]
        source = f"the last {100 * r.heldout_share:g}% of the training text ({n_hold} tokens, not trained on)"
        if train.numel() < r.batch_size * L + 1:
            raise QATError(f"{data}: {stream.numel()} tokens of training data, too short to hold out {n_hold} "
                           f"tokens for best-state selection and still train on batches of {r.batch_size} x {L}; "
                           f"give more text, a held-out file (heldout= / --heldout FILE), or select_windows=0")
    n = min(r.select_windows, held.numel() // L)
    starts = torch.linspace(0, held.numel() - L, n).round().long().tolist() if n > 1 else [0]
    return train, torch.stack([held[s:s + L] for s in starts]), source


def eval_every(r) -> int:
    """Steps between held-out evaluations: r.eval_every, else a twentieth of the run (at least 1)."""
    return r.eval_every or max(1, r.steps // 20)


class HeldoutSelection:
    """The held-out evaluations of one QAT run and its best state (see the module docstring)."""

    def __init__(self, teacher: nn.Module, ids: Tensor, work_dir: Path, r, source: str):
        dev = next(teacher.parameters()).device  # the run's device (qat_train moved the teacher there)
        self.teacher, self.ids, self.path, self.source = teacher, ids.to(dev), Path(work_dir) / BEST, source
        self.chunk = r.micro_batch or r.batch_size
        self.every = eval_every(r)
        self.evals: list[dict] = []
        self.best_step, self.best_kl = None, math.inf
        self.seconds = 0.0  # spent evaluating in this process (the cost the report states)
        v = teacher.config.vocab_size
        self._teacher_logp = self._logp_all(teacher) if ids.numel() * v * 4 <= HELDOUT_CACHE_BYTES else None

    # ---- evaluation ----
    @torch.no_grad()
    def _logp(self, model: nn.Module, ids: Tensor) -> Tensor:
        return F.log_softmax(model(ids).float(), -1)

    def _logp_all(self, model: nn.Module) -> Tensor:
        return torch.cat([self._logp(model, c) for c in self.ids.split(self.chunk)])

    @torch.no_grad()
    def kl(self, student: nn.Module) -> float:
        """Mean per-token KL(float || student) on the held-out windows."""
        total, n = 0.0, 0
        for i, chunk in enumerate(self.ids.split(self.chunk)):
            t = (self._teacher_logp[i * self.chunk:i * self.chunk + chunk.shape[0]] if self._teacher_logp is not None
                 else self._logp(self.teacher, chunk))
            s = self._logp(student, chunk)
            total += float((t.exp() * (t - s)).sum())
            n += chunk.shape[0] * chunk.shape[1]
        return total / n

    def due(self, done: int, steps: int) -> bool:
        return done % self.every == 0 or done == steps

    def evaluate(self, step: int, student: nn.Module, average=None) -> bool:
        """Evaluate the values the student would export now; True (and the best file written) when they beat the
        best so far. The student's own values and training mode are left as they were."""
        t0 = time.time()
        trained = {n: p for n, p in student.named_parameters() if p.requires_grad}
        kept = None
        if average is not None:
            kept = {n: p.detach().clone() for n, p in trained.items()}
            average.apply()
        was_training = student.training
        student.eval()
        try:
            kl = self.kl(student)
            better = kl < self.best_kl
            if better:
                from gemmaquant.quantized import save_atomic

                save_atomic({n: p.detach().cpu() for n, p in trained.items()}, self.path,
                            {"step": str(step), "kl": repr(kl)})
                self.best_step, self.best_kl = step, kl
        finally:
            student.train(was_training)
            if kept is not None:
                with torch.no_grad():
                    for n, p in trained.items():
                        p.copy_(kept[n])
        self.evals.append({"step": step, "kl": kl})
        self.seconds += time.time() - t0
        return better

    # ---- the record kept in the resumable checkpoint ----
    def state(self) -> dict[str, str]:
        return {"selection": json.dumps({"evals": self.evals, "best_step": self.best_step,
                                         "best_kl": None if self.best_step is None else self.best_kl})}

    def restore(self, checkpoint: Path) -> None:
        """Take the record of the evaluations and the best state from the resumable checkpoint's metadata."""
        from safetensors import safe_open

        with safe_open(str(checkpoint), framework="pt") as f:
            meta = f.metadata()
        if "selection" not in meta:
            raise QATError(f"{self.path.parent}: the QAT checkpoint has no held-out selection record; remove it "
                           f"or choose another output directory")
        s = json.loads(meta["selection"])
        self.evals, self.best_step = s["evals"], s["best_step"]
        self.best_kl = math.inf if s["best_kl"] is None else s["best_kl"]

    # ---- the end ----
    def apply_best(self, student: nn.Module) -> None:
        """Load the best state's values into the student (in place)."""
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            if f.metadata().get("step") != str(self.best_step):
                raise QATError(f"{self.path}: holds step {f.metadata().get('step')}, the checkpoint's best is step "
                               f"{self.best_step}; remove the output directory's .gemmaquant-work and run again")
            values = {k: f.get_tensor(k) for k in f.keys()}
        with torch.no_grad():
            for n, p in student.named_parameters():
                if p.requires_grad:
                    p.copy_(values[n].to(p.device, p.dtype))

    def summary(self, export_last: bool) -> dict:
        ptq = self.evals[0]["kl"] if self.evals and self.evals[0]["step"] == 0 else None
        last = self.evals[-1] if self.evals else None
        beat = self.best_step not in (None, 0)
        exported = "last" if export_last else ("best" if beat else "gptq")
        return {"source": self.source, "windows": int(self.ids.shape[0]), "seq_len": int(self.ids.shape[1]),
                "every": self.every, "evals": self.evals, "ptq_kl": ptq, "best_step": self.best_step,
                "best_kl": self.best_kl, "last_step": last["step"] if last else None,
                "last_kl": last["kl"] if last else None, "qat_beat_ptq": beat, "exported": exported,
                "seconds": round(self.seconds, 2)}


def selection_text(s: dict) -> list[str]:
    """The report's lines on the held-out selection: what was exported, and plainly when QAT did not help."""
    head = (f"  held-out selection ({s['windows']} x {s['seq_len']} tokens of {s['source']}, every {s['every']} "
            f"steps): KL GPTQ start {s['ptq_kl']:.5f}, best {s['best_kl']:.5f} at step {s['best_step']}, last "
            f"{s['last_kl']:.5f} ({s['seconds']:.0f} s of evaluation)")
    if s["exported"] == "last":
        warning = "; WARNING: QAT never beat its GPTQ start on held-out text"
        tail = "  exported: the last state (export_last)" + ("" if s["qat_beat_ptq"] else warning)
    elif s["qat_beat_ptq"]:
        tail = f"  exported: the best state (step {s['best_step']})"
    else:
        tail = ("  QAT DID NOT BEAT ITS GPTQ START on held-out text: the exported files are the GPTQ start "
                "(export_last / --export-last exports the last state instead)")
    return [head, tail]
