"""Launching crossent's kernels without Triton's per-call dispatch (issue 10, item 3).

``kernel[grid](*args, **consts)`` runs Triton's ``JITFunction.run`` on every call:
it specialises every argument (``native_specialize_impl``), builds a string key
from the specialisation and the options, reads the launch hooks and knobs,
compares the kernel's globals, builds launch metadata and only then calls the
compiled kernel's launcher.  That costs ~15-19 us of CPU per launch against
~1-2 us for the launcher itself, and a forward+backward makes one or two launches.

A ``Launcher`` (one per kernel and constexprs/options: ``launcher``) sends the
first call of each key through the JIT and keeps the ``CompiledKernel`` that
``JITFunction.run`` returns; later calls with the same key call its launcher as
``JITFunction.run`` does: grid, the current device's current stream, function,
packed metadata, then every bound argument (constexprs included, in signature
order).  The key is at least as fine as Triton's specialisation: the current
device, the knobs that enter the compile options, and per argument its kind
(checked), a tensor's dtype and 16-byte alignment, an int's or bool's value
(Triton specialises ints on == 1, % 16 and the 32/64-bit range: the value
decides all three); floats are never specialised.  Fixed per Launcher: the
constexprs and options.  So a new shape goes through the JIT once.

The JIT is used instead (never the lean path) under TRITON_INTERPRET (no
CompiledKernel), while launch hooks are set (profilers such as proton: the JIT
builds their launch metadata), with pre-run hooks or a stage-inspection hook,
when a global the kernel reads was rebound, where ``JITFunction.run`` reads
anything this module does not mirror (a Triton whose dispatch it has not been
checked against), and with ``CROSSENT_LEAN_LAUNCH=0``.  With the hook chains
empty, the launcher's launch metadata and hooks are passed as None: the
launcher only hands the metadata to the hooks, and empty chains call nothing.
Nothing stream- or capture-dependent is cached: CUDA graph capture records the
same launch the JIT would make.
"""
from __future__ import annotations

import os

import triton
from triton.runtime.jit import JITFunction

try:
    from triton import knobs as _knobs
except ImportError:   # Triton < 3.4: no knobs, a dispatch this module does not mirror
    _knobs = None

# Every name JITFunction.run reads in Triton 3.6 and 3.9, the versions this path is
# checked against (tests/_launch_path.py): a Triton whose run() reads anything else
# keeps the JIT until it is checked too.
_MIRRORED = frozenset((
    "RuntimeError", "_do_compile", "_pack_args", "active", "add_stages_inspection_hook", "append", "callable",
    "compilation", "compute_cache_key", "debug", "device_caches", "driver", "fpsan_homomorphic_casts", "function",
    "get", "get_current_device", "get_current_stream", "hasattr", "instrumentation_mode", "items", "knobs",
    "launch_enter_hook", "launch_exit_hook", "launch_metadata", "len", "object", "packed_metadata",
    "pre_run_hooks", "result", "run", "runtime", "used_global_vals", "values"))

_RUN = JITFunction.run
ENABLED = (os.environ.get("CROSSENT_LEAN_LAUNCH", "1") != "0" and _knobs is not None
           and set(_RUN.__code__.co_names) <= _MIRRORED)
_HookChain = getattr(_knobs, "HookChain", None)
_FPSAN = _knobs is not None and hasattr(type(_knobs.compilation), "fpsan_homomorphic_casts")
_MISSING = object()
_MAX_KEYS = 256        # per Launcher: new shapes keep coming (sequence lengths)


def _quiet(hook) -> bool:
    """A launch hook that does nothing: unset, or an empty HookChain (Triton >= 3.5's default)."""
    return hook is None or (type(hook) is _HookChain and not hook.calls)


def _key_function(args):
    """``key(state, args)`` for calls whose arguments have the kinds of ``args``: a tuple that
    determines Triton's specialisation, or None (a kind changed: the JIT decides).  Generated
    once per Launcher so that a call costs no Python call per argument; None where an
    argument is of a kind not handled here."""
    guards, items = [], []
    for i, a in enumerate(args):
        t = type(a)
        if t is int or t is bool:
            guards.append(f"type(a{i}) is {t.__name__}")
            items.append(f"a{i}")
        elif t is float:
            guards.append(f"type(a{i}) is float")
        elif a is None:
            guards.append(f"a{i} is None")
        elif hasattr(a, "data_ptr") and hasattr(a, "dtype"):
            items.append(f"a{i}.dtype, a{i}.data_ptr() & 15 == 0")   # a non-tensor here: AttributeError
        else:
            return None
    names = "".join(f"a{i}, " for i in range(len(args)))
    src = (f"def key(state, args):\n"
           f"    {names} = args\n"
           f"    if {' and '.join(guards) or 'True'}:\n"
           f"        return (state, {''.join(x + ', ' for x in items)})\n")
    scope = {}
    exec(src, scope)   # noqa: S102 - generated from argument kinds only
    return scope["key"]


class Launcher:
    """``kernel`` with fixed constexprs and options; ``launcher(grid, *args)`` launches it."""
    __slots__ = ("kernel", "consts", "key", "tail", "cache")

    def __init__(self, kernel, consts: dict):
        self.kernel, self.consts = kernel, consts
        self.key = None if ENABLED and type(kernel) is JITFunction else False   # False: always the JIT
        self.tail = None
        self.cache = {}

    def __call__(self, grid: tuple, *args) -> None:
        kernel = self.kernel
        if self.key is False:
            kernel[grid](*args, **self.consts)
            return
        rt = _knobs.runtime
        state = None
        if (not kernel.pre_run_hooks and _quiet(rt.launch_enter_hook) and _quiet(rt.launch_exit_hook)
                and getattr(rt, "add_stages_inspection_hook", None) is None and JITFunction.run is _RUN):
            drv = triton.runtime.driver.active
            device = drv.get_current_device()
            comp = _knobs.compilation
            # what enters the JIT's options besides self.consts ("debug" there too, fixed)
            state = (device, kernel.debug, rt.debug, comp.instrumentation_mode,
                     comp.fpsan_homomorphic_casts if _FPSAN else None)
            hit = None
            if self.key is not None:
                try:
                    hit = self.cache.get(self.key(state, args))
                except (AttributeError, TypeError, ValueError):   # an argument of another kind
                    pass
            if hit is not None:
                run, function, packed, env = hit
                for scope, name, value in env:
                    if scope.get(name, _MISSING) is not value:
                        break   # rebound: the JIT compares the values (and raises if they differ)
                else:
                    run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                        drv.get_current_stream(device), function, packed, None, None, None, *args, *self.tail)
                    return
        ck = kernel[grid](*args, **self.consts)
        if state is not None:
            self._remember(state, args, ck)

    def _remember(self, state, args, ck) -> None:
        """Keep ``ck``, just launched by the JIT for ``args``, for later calls with their key."""
        if not all(hasattr(ck, a) for a in ("run", "function", "packed_metadata")):
            return
        if self.key is None:
            params = self.kernel.params
            if len(args) > len(params) or any(p.name in self.consts for p in params[:len(args)]):
                self.key = False
                return
            # JITFunction.run passes every bound argument: the constexprs too, in signature order
            self.tail = tuple(self.consts[p.name] if p.name in self.consts else p.default
                              for p in params[len(args):])
            self.key = _key_function(args) or False
            if self.key is False:
                return
        try:
            key = self.key(state, args)
        except (AttributeError, TypeError, ValueError):
            return
        if key is None:
            return
        if len(self.cache) >= _MAX_KEYS:
            self.cache.clear()
        env = tuple((scope, name, scope.get(name, _MISSING))
                    for (name, _), (_, scope) in self.kernel.used_global_vals.items())
        self.cache[key] = (ck.run, ck.function, ck.packed_metadata, env)


_LAUNCHERS: dict = {}


def launcher(kernel, **consts) -> Launcher:
    """The Launcher of ``kernel`` with these constexprs and options (one per distinct set)."""
    key = (kernel, tuple(consts.items()))
    launch = _LAUNCHERS.get(key)
    if launch is None:
        if len(_LAUNCHERS) >= 1024:
            _LAUNCHERS.clear()
        launch = _LAUNCHERS[key] = Launcher(kernel, consts)
    return launch


def clear() -> None:
    """Forget every kept kernel (ce.configure: launch knobs moved)."""
    _LAUNCHERS.clear()
