"""The encoder as the engines run it: rewritten, in a measured precision, compiled when it pays.

Three steps, each recorded in every store's ``fast_path`` attribute:

1. **Exact rewrites** (:mod:`nic_fast.encoders.rewrite`): the leading pool moves into
   patchify (``pool_px``), BatchNorms fold into their neighbours.
2. **Precision by measurement** (``--precision auto`` on a CPU): the first batch of real
   patches is encoded in fp32 and in bf16; bf16 is kept only when it is at least
   :data:`BF16_MIN_SPEEDUP` × faster *and* its embeddings are within
   :data:`BF16_MAX_RELATIVE_ERROR` of fp32 (relative L2). CPUs differ wildly here: with
   AMX bf16 convolutions run several times faster, without native bf16 they run many
   times slower, so nothing is assumed. On a GPU ``auto`` means fp16, as before.
3. **Graph compilation** (``torch.compile``, inductor) when the slide's patches repay the
   compile time: ``patches / eager_rate × (1 − 1/speedup) > compile_s``, where ``patches``
   is this slide's times the slides the compressor still expects in its run. Compile times and
   speed-ups measured on this machine go into a small ledger beside inductor's on-disk
   cache (:func:`cache_dir`), so a second run, or a second worker process, knows both:
   the cached compile takes seconds, not the first compile's tens of seconds. A compile
   that fails, or a compiled module that is slower or differs, falls back to the eager
   module with a one-line note.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nic_fast.devices import cpu_model
from nic_fast.encoders import Encoder
from nic_fast.encoders.files import quiet_torch_deprecations
from nic_fast import __version__
from nic_fast.encoders.rewrite import (
    MAX_RELATIVE_ERROR,
    Rewrites,
    Rewritten,
    error_line,
    rewrite_encoder,
    rewrite_error,
    script_to_graph,
)
from nic_fast.job import COMPILE_MODES

__all__ = ["BF16_MAX_RELATIVE_ERROR", "BF16_MIN_SPEEDUP", "COMPILE_MODES", "FastEncoder", "cache_dir",
           "choose_precision", "should_compile"]

log = logging.getLogger(__name__)

BF16_MIN_SPEEDUP = 1.3
BF16_MAX_RELATIVE_ERROR = 1e-2
TRIAL_PATCHES = 32  # patches timed per precision: enough for a stable rate, cheap where bf16 is slow
ASSUMED_COMPILE_S = 30.0  # before this machine has compiled the encoder once (inductor, 2 cores: 10-25 s)
ASSUMED_SPEEDUP = 1.3
MIN_SPEEDUP = 1.05  # a compiled module that is not this much faster is not worth its risk
COMPILED_MAX_RELATIVE_ERROR = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def cache_dir() -> Path:
    """``$NIC_FAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/nic-fast``, else ``~/.cache/nic-fast``."""
    if os.environ.get("NIC_FAST_CACHE_DIR"):
        return Path(os.environ["NIC_FAST_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "nic-fast"


# -- the rules (pure: unit-tested) -----------------------------------------------------------


def choose_precision(fp32_rate: float, bf16_rate: float, bf16_error: float) -> tuple[str, str]:
    """('bf16' | 'fp32', why) by the speed and error measured on the same patches."""
    speedup = bf16_rate / fp32_rate
    if not bf16_error <= BF16_MAX_RELATIVE_ERROR:
        return "fp32", f"bf16 error {bf16_error:.2g} > {BF16_MAX_RELATIVE_ERROR:g}"
    if speedup < BF16_MIN_SPEEDUP:
        return "fp32", f"bf16 only {speedup:.2f}× fp32 (needs {BF16_MIN_SPEEDUP}×)"
    return "bf16", f"bf16 {speedup:.2f}× fp32, error {bf16_error:.2g}"


def should_compile(patches: int, eager_rate: float, ledger: dict[str, Any] | None) -> tuple[bool, str]:
    """Compile when the time it saves on ``patches`` exceeds what compiling costs here."""
    compile_s = ledger.get("compile_s", ASSUMED_COMPILE_S) if ledger else ASSUMED_COMPILE_S
    speedup = ledger.get("speedup", ASSUMED_SPEEDUP) if ledger else ASSUMED_SPEEDUP
    if speedup < MIN_SPEEDUP:
        return False, f"compiled was {speedup:.2f}× eager on this machine"
    saved_s = patches / eager_rate * (1 - 1 / speedup)
    if saved_s <= compile_s:
        return False, f"{patches} patches save ~{saved_s:.1f} s, compiling costs ~{compile_s:.0f} s"
    return True, f"{patches} patches save ~{saved_s:.0f} s, compiling costs ~{compile_s:.0f} s"


# -- the ledger ------------------------------------------------------------------------------


class CompileLedger:
    """Compile seconds and speed-ups measured on this machine, by encoder and setting."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get(self, key: str) -> dict[str, Any] | None:
        return self._read().get(key)

    def put(self, key: str, entry: dict[str, Any]) -> None:
        entries = self._read()
        entries[key] = entry
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
            tmp.replace(self.path)  # atomic: concurrent workers never read half a file
        except OSError as exc:  # a read-only home costs the memory of it, nothing else
            log.debug("cannot write the compile ledger %s: %s", self.path, exc)

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}


# -- rewritten graphs, kept across processes -------------------------------------------------


class RewriteCache:
    """Rewritten encoders as TorchScript files, by encoder file and torch version.

    Capturing a TorchScript encoder's graph takes torch's converter (and dynamo): about 5 s
    per worker start on two cores, every time. The rewritten module is traced once and kept;
    a kept one is used only after it reproduces the encoder as loaded on a fresh batch.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def rewrite(self, encoder: Encoder) -> Rewritten:
        path = self._path(encoder)
        kept = self._load(encoder, path) if path else None
        if kept is not None:
            return kept
        rewritten = rewrite_encoder(encoder)
        if path and rewritten.module is not encoder.module:
            self._keep(rewritten, encoder, path)
        return rewritten

    def _path(self, encoder: Encoder) -> Path | None:
        """One file per encoder file version (path, size, mtime, weights) and torch version."""
        source = Path(encoder.source)
        try:
            stat = source.stat()
        except OSError:
            return None  # a built-in: cheap to capture, nothing on disk to key by
        key = "|".join([str(source.resolve()), str(stat.st_size), str(stat.st_mtime_ns), encoder.spec.sha256,
                        torch.__version__, __version__])
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"

    def _load(self, encoder: Encoder, path: Path) -> Rewritten | None:
        if not path.is_file():
            return None
        extra = {"rewrites.json": ""}
        try:
            with quiet_torch_deprecations():
                module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
            info = json.loads(extra["rewrites.json"])
            rewrites = replace(Rewrites(**info["rewrites"]), kept=True)
            error = rewrite_error(encoder, module, rewrites.pool_px)
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign cache file: rewrite afresh
            log.debug("rewrite cache %s unusable: %s", path, exc)
            return None
        if not error <= MAX_RELATIVE_ERROR:
            return None
        return Rewritten(module, int(info["input_px"]), rewrites)

    def _keep(self, rewritten: Rewritten, encoder: Encoder, path: Path) -> None:
        spec = encoder.spec
        example = torch.zeros(2, spec.channels, rewritten.input_px, rewritten.input_px)
        info = json.dumps({"rewrites": asdict(rewritten.rewrites), "input_px": rewritten.input_px})
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the tracer's notes on constants: checked on every load
                traced = torch.jit.trace(rewritten.module, example, check_trace=False)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                torch.jit.save(traced, str(tmp), _extra_files={"rewrites.json": info})
            tmp.replace(path)
        except Exception as exc:  # noqa: BLE001 - not kept: the next process rewrites again, no harm
            log.debug("rewritten encoder not kept in %s: %s", path, exc)


# -- the encoder -----------------------------------------------------------------------------


@dataclass
class _Precision:
    dtype: torch.dtype
    attrs: dict[str, Any] = field(default_factory=dict)
    decided: bool = True


class FastEncoder:
    """What an engine calls to encode normalised patches of side ``input_px``.

    Built once per compressor from the encoder on the CPU in fp32. ``version`` changes
    whenever the module that runs changes (a compile): a GPU engine re-captures its CUDA
    graphs then.
    """

    def __init__(self, encoder: Encoder, device: torch.device, dtype: torch.dtype, *, precision: str = "auto",
                 compile: str = "auto", fast_path: bool = True, expected_slides: int = 1) -> None:
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        self.spec = encoder.spec
        self.source = encoder.source
        self.device = device
        if fast_path:
            rewritten = RewriteCache(cache_dir() / "rewritten").rewrite(encoder)
            self.rewrites, self.input_px, module = rewritten.rewrites, rewritten.input_px, rewritten.module
        else:
            self.rewrites, self.input_px, module = Rewrites("off", note="--no-fast-path"), self.spec.input_px, encoder.module
        trial = precision == "auto" and device.type == "cpu" and fast_path
        self.precision = _Precision(torch.float32 if trial else dtype, decided=not trial,
                                    attrs={} if trial else {"chosen_by": f"--precision {precision}"})
        # the fp32 host module the trial's bf16 copy (a CPU run) or a half-precision run's reference is made from
        self._fp32: Any = (module if device.type == "cpu" and self.precision.dtype == torch.float32
                           else copy.deepcopy(module) if self.precision.dtype != torch.float32 else None)
        self.module = _to(module, device, self.precision.dtype)
        self.eager = self.module
        self.compile_mode = compile if fast_path else "off"
        self.compile_attrs: dict[str, Any] = {"mode": self.compile_mode, "compiled": False}
        self.version = 0
        self.slide_patches = 0
        self.slides_left = expected_slides  # this slide included, once begin_slide is called
        self._compile_question = False  # asked once per slide: begin_slide sets it
        self.eager_rate: float | None = None
        self._lock = threading.Lock()
        self.ledger = CompileLedger(cache_dir() / "compile-ledger.json")

    @property
    def pool_px(self) -> int:
        return self.rewrites.pool_px

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype

    def attrs(self) -> dict[str, Any]:
        """The store's ``fast_path`` attribute."""
        return {"rewrites": self.rewrites.as_attrs(), "input_px": self.input_px,
                "precision": {"dtype": str(self.dtype).removeprefix("torch."), **self.precision.attrs},
                "compile": dict(self.compile_attrs)}

    def reference_module(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The same (rewritten) encoder in fp32 on the device, taking the same patches: what
        a half-precision run's error is measured against. Made once; the host copy goes."""
        if self._fp32 is None:
            raise RuntimeError("the fp32 reference was already handed out")
        module, self._fp32 = _to(self._fp32, self.device, torch.float32), None
        return lambda x: self._call(module, x.float())

    # -- per slide ----------------------------------------------------------------------------
    def begin_slide(self, patches: int) -> None:
        """Tell the encoder how many patches the coming slide holds. The compile rule weighs
        them times the slides this compressor still expects (later slides are assumed alike)."""
        if self.slide_patches:
            self.slides_left = max(1, self.slides_left - 1)
        self.slide_patches = patches
        self._compile_question = True

    def settle(self, example: torch.Tensor) -> None:
        """Decide (and do) the compile now, on ``example`` (a full batch on the device).

        The GPU engine calls this before it captures its graphs; on the CPU the first
        full batch of each slide does it, after the precision trial."""
        with self._lock:
            self._maybe_compile(example)

    # -- encoding ------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, channels, input_px, input_px) on the encoder's device → (N, code_size), row-major."""
        expected = (self.spec.channels, self.input_px, self.input_px)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"encoder {self.spec.name!r} (fast path) takes (N, {', '.join(map(str, expected))}) "
                             f"patches, got {tuple(x.shape)}")
        if self.device.type == "cpu" and len(x) >= TRIAL_PATCHES:
            with self._lock:
                if not self.precision.decided:
                    self._trial_precision(x)
                self._maybe_compile(x)
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype=self.dtype).contiguous(memory_format=torch.channels_last)
        module = self.module
        if module is not self.eager and len(x) != self.compile_attrs.get("batch", -1):
            module = self.eager  # compiled for one batch size: a partial batch would recompile
        return self._call(module, x)

    @staticmethod
    def _call(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = module(x.contiguous(memory_format=torch.channels_last))
        return (out[0] if isinstance(out, (tuple, list)) else out).contiguous()

    # -- precision -------------------------------------------------------------------------
    def _trial_precision(self, x: torch.Tensor) -> None:
        """fp32 against bf16 on this batch; the first verdict on a machine stands for every
        later run and worker there (the ledger), so one cohort's stores never mix precisions."""
        key = "|".join(["precision", self.spec.sha256[:16] or self.spec.name, f"pool{self.pool_px}",
                        _device_name(self.device), f"torch{torch.__version__}"])
        earlier = self.ledger.get(key)
        if earlier is None:
            earlier = self._measure_precision(x)
            self.ledger.put(key, earlier)
        else:
            earlier = {**earlier, "chosen_by": "measured by an earlier run on this machine (compile ledger)"}
        choice = earlier["choice"]
        self.precision = _Precision(torch.bfloat16 if choice == "bf16" else torch.float32, decided=True,
                                    attrs={k: v for k, v in earlier.items() if k != "choice"})
        self.eager_rate = earlier[f"{choice}_patches_per_s"]
        if choice == "bf16":
            with warnings.catch_warnings():  # deep-copying a graph module narrates torch's own deprecations
                warnings.simplefilter("ignore")
                self.module = self.eager = _to(copy.deepcopy(self._fp32), self.device, torch.bfloat16)
            self.version += 1
        log.info("encoder %r precision: %s (%s)", self.spec.name, choice, earlier["why"])

    def _measure_precision(self, x: torch.Tensor) -> dict[str, Any]:
        patches = x[:TRIAL_PATCHES].float().contiguous(memory_format=torch.channels_last)
        fp32, fp32_rate = _timed(self.eager, patches)
        with warnings.catch_warnings():  # deep-copying a graph module narrates torch's own deprecations
            warnings.simplefilter("ignore")
            bf16_module = _to(copy.deepcopy(self._fp32), self.device, torch.bfloat16)
        slow_s = 3 * len(patches) / fp32_rate  # a first bf16 call this slow cannot end up 1.3 × faster
        bf16, bf16_rate = _timed(bf16_module, patches.to(torch.bfloat16).contiguous(memory_format=torch.channels_last),
                                 give_up_s=slow_s)
        error = float((bf16.double() - fp32.double()).norm() / fp32.double().norm().clamp_min(1e-30))
        del bf16_module
        choice, why = choose_precision(fp32_rate, bf16_rate, error)
        return {"choice": choice, "chosen_by": "measured", "why": why, "trial_patches": len(patches),
                "fp32_patches_per_s": round(fp32_rate, 1), "bf16_patches_per_s": round(bf16_rate, 1),
                "bf16_relative_l2_error": error}

    # -- compilation -----------------------------------------------------------------------
    def _ledger_key(self, batch: int) -> str:
        return "|".join([self.spec.sha256[:16] or self.spec.name, f"pool{self.pool_px}",
                         f"bn{self.rewrites.batchnorms_folded}", str(self.dtype).removeprefix("torch."),
                         _device_name(self.device), f"batch{batch}", f"torch{torch.__version__}"])

    def _maybe_compile(self, x: torch.Tensor) -> None:
        if not self._compile_question or self.compile_mode == "off" or len(x) < TRIAL_PATCHES:
            return
        self._compile_question = False
        if self.compile_attrs["compiled"] or "tried" in self.compile_attrs:
            return
        key = self._ledger_key(len(x))
        if self.compile_mode == "auto":
            if self.eager_rate is None:
                _, self.eager_rate = _timed(self.eager, x.to(self.dtype).contiguous(memory_format=torch.channels_last))
            go, why = should_compile(self.slide_patches * self.slides_left, self.eager_rate, self.ledger.get(key))
            self.compile_attrs["why"] = why
            if not go:
                return  # asked again on the next slide, which may be larger
        self.compile_attrs["tried"] = True
        self._compile(x, key)

    def _compile(self, x: torch.Tensor, key: str) -> None:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        module = self.eager
        try:
            if isinstance(module, torch.jit.ScriptModule):  # dynamo cannot trace TorchScript: its graph can be
                module = script_to_graph(module, x)
            compiled = torch.compile(module, dynamic=False)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = compiled(x)
            compile_s = time.perf_counter() - t0
            del out
            expected, eager_rate = _timed(self.eager, x)
            compiled_out, compiled_rate = _timed(compiled, x)
            error = float((compiled_out.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))
        except Exception as exc:  # noqa: BLE001 - inductor fails in many ways (no compiler, odd ops): stay eager
            note = f"not compiled ({error_line(exc)})"
            log.warning("encoder %r: %s; running it eagerly", self.spec.name, note)
            self.compile_attrs["note"] = note
            return
        speedup = compiled_rate / eager_rate
        self.ledger.put(key, {"compile_s": round(compile_s, 2), "speedup": round(speedup, 3)})
        self.compile_attrs.update({"compile_s": round(compile_s, 2), "speedup": round(speedup, 3),
                                   "relative_error": error, "batch": len(x)})
        if not error <= COMPILED_MAX_RELATIVE_ERROR.get(self.dtype, 1e-2):
            self.compile_attrs["note"] = f"compiled module differs (relative error {error:.2g}); running eagerly"
            log.warning("encoder %r: %s", self.spec.name, self.compile_attrs["note"])
            return
        if speedup < MIN_SPEEDUP and self.compile_mode == "auto":
            self.compile_attrs["note"] = f"compiled {speedup:.2f}× eager; running eagerly"
            return
        self.module = compiled
        self.compile_attrs["compiled"] = True
        self.version += 1
        log.info("encoder %r compiled in %.1f s: %.2f× eager", self.spec.name, compile_s, speedup)


def _to(module: Callable[[torch.Tensor], torch.Tensor], device: torch.device, dtype: torch.dtype) -> Any:
    """The module on ``device`` in ``dtype``, weights channels-last (oneDNN's and cuDNN's layout)."""
    if isinstance(module, torch.nn.Module):
        return module.to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
    return module


def _timed(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
           give_up_s: float = float("inf")) -> tuple[torch.Tensor, float]:
    """(output, patches/s): one warm-up call, then the best of three (a shared machine's noise
    only ever slows a run down). A warm-up slower than ``give_up_s`` is the answer itself:
    where bf16 runs 50 × slower than fp32 there is nothing to refine."""
    with torch.inference_mode():
        _sync(x.device)
        t0 = time.perf_counter()
        out = module(x)
        _sync(x.device)
        best = time.perf_counter() - t0
        for _ in range(3 if best <= give_up_s else 0):
            _sync(x.device)
            t0 = time.perf_counter()
            module(x)
            _sync(x.device)
            best = min(best, time.perf_counter() - t0)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.float(), len(x) / max(best, 1e-9)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} x{torch.get_num_threads()}"

