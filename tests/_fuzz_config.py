"""crossent's side of the fuzz cases: the backend it runs, and its chunk and
tile sizes shrunk (spec "tiles")."""
from __future__ import annotations

import contextlib
import importlib
import os


def backend(name: str):
    """CROSSENT_BACKEND set for the crossent call (it is read per call)."""
    @contextlib.contextmanager
    def ctx():
        old = os.environ.get("CROSSENT_BACKEND")
        os.environ["CROSSENT_BACKEND"] = name
        try:
            yield
        finally:
            if old is None:
                del os.environ["CROSSENT_BACKEND"]
            else:
                os.environ["CROSSENT_BACKEND"] = old
    return ctx()


# Spec "tiles": crossent's chunk and tile sizes shrunk, so that the fuzz's small
# tensors cross chunk boundaries (the torch backend's row, K-dim and worker-pool
# chunks, the linear heads' row chunks, the vocab-parallel linear head's) and,
# on the triton backend, take the looped and split launch paths as wide
# vocabularies do.  Only crossent's side runs with them; results must not change.
_SMALL_CHUNKS = {
    "crossent.backends.torch_chunked": dict(_CHUNK_BYTES=256, _MIN_CHUNK_BYTES=256, _KDIM_TILE_BYTES=64),
    "crossent.linear": dict(_CPU_CHUNK_BYTES=512, _CPU_MIN_CHUNK_BYTES=512, _TILE_ROWS={"cpu": 2, "cuda": 256}),
    "crossent._linear_ops": dict(_UPCAST_BYTES=256),
    "crossent._autograd.vocab_parallel": dict(_CPU_CHUNK_BYTES=256),
    "crossent._logprobs_ops": dict(_CPU_CHUNK_BYTES=1024),  # log_probs' row blocks, the fused head's chunks
}
# the triton backend's compact block_grad_ tiles too: 4 classes, 2 rows a program
_TRITON_SMALL = {"crossent.backends.triton.block_grad": dict(_TILE_ELEMS=8, _MAX_BLOCK_V=4)}
TRITON_PATHS = {  # classes in tiles of 2-4
    "looped": dict(_SINGLE_MAX=4, _LOOP_BLOCK=4, _TILE_ELEMS=4, _ROW_PATH="twopass", _MEAN_LAUNCH="claim"),
    "multirow": dict(_SINGLE_MAX=4, _LOOP_BLOCK=2, _TILE_ELEMS=8, _ROW_PATH="twopass"),
    "split": dict(_SINGLE_MAX=4, _SPLIT_BLOCK=4, _ROW_PATH="split"),
}


@contextlib.contextmanager
def tiles(name: str | None):
    """crossent's chunk sizes (and triton launch path ``name``) for spec "tiles"."""
    if not name:
        yield
        return
    small = {**_SMALL_CHUNKS, **(_TRITON_SMALL if name in TRITON_PATHS else {})}
    mods = {m: importlib.import_module(m) for m in small}
    old = {(m, k): getattr(mods[m], k) for m, kv in small.items() for k in kv}
    ce = defaults = None
    try:
        for m, kv in small.items():
            for k, v in kv.items():
                setattr(mods[m], k, v)
        if name in TRITON_PATHS:
            from crossent.backends.triton import ce
            defaults = {k: getattr(ce.split if hasattr(ce.split, k) else ce, k) for k in TRITON_PATHS[name]}
            ce.configure(**TRITON_PATHS[name])
        yield
    finally:
        for (m, k), v in old.items():
            setattr(mods[m], k, v)
        if defaults is not None:
            ce.configure(**defaults)
