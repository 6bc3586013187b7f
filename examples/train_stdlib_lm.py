"""Train a small Llama-style language model on the Python standard library's own
source, three ways, and compare them: transformers' default loss, crossent's
loss (``use_crossent(model)``), and crossent's fused head
(``use_crossent(model, fused=True)``: no logits in training).

Needs no download: the BPE tokenizer (the ``tokenizers`` package, vocabulary
32768) is trained here on the ``*.py`` files of this Python's standard library,
and the model is random-init from a config.

    python examples/train_stdlib_lm.py            # full run (20 steps): minutes on 2 quiet cores, 21 on busy shared ones
    python examples/train_stdlib_lm.py --smoke    # the same pipeline in miniature (CI)

What it prints and writes (to --out, default examples/out/):
  * a table: tokens/s (median fwd+bwd+AdamW step), extra peak memory of one
    training step, final loss, largest relative loss difference from
    transformers' default over all steps;
  * loss_curves.png (the three loss curves, and their relative differences);
  * summary.json (every number).

Method.  The three models start from the same weights and see the same
batches; their steps are interleaved (default, crossent, fused, default, ...)
so the machine's load hits all three alike.  Memory is measured separately,
one fresh process per mode: RSS high-water mark over one training step
(after a warm-up step, so gradients and AdamW state already exist) minus RSS
before it, as ``crossent bench`` measures (VmHWM reset through
/proc/self/clear_refs).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

MODES = ("default", "crossent", "fused")
EOS = "<|endoftext|>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="seconds: tiny vocabulary, model and run (CI)")
    p.add_argument("--out", default=str(Path(__file__).with_name("out")), help="output folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--memory-worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.seq, args.vocab, args.hidden, args.layers = 4, 2, 64, 1024, 64, 1
    return args


# ----------------------------------------------------------------------------- data
def stdlib_sources(smoke: bool) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if smoke:
        files = files[:40]
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            pass
    return texts


def train_tokenizer(texts: list[str], vocab: int, path: Path):
    """Byte-level BPE, cached in ``path`` (it depends only on the vocabulary
    size and this Python's standard library)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(path))
    return tok


def token_stream(tok, texts: list[str], n_tokens: int, seed: int = 0) -> torch.Tensor:
    """Files in a fixed random order, EOS between them, until n_tokens."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos, ids = tok.token_to_id(EOS), []
    for i in order:
        ids += tok.encode(texts[i]).ids + [eos]
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise SystemExit(f"the corpus has {len(ids)} tokens, {n_tokens} needed")
    return torch.tensor(ids[:n_tokens])


# ----------------------------------------------------------------------------- model and training
def build_models(args, vocab: int) -> dict:
    import transformers

    from crossent.transformers import use_crossent
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    default = transformers.LlamaForCausalLM(config).train()
    return {"default": default,
            "crossent": use_crossent(copy.deepcopy(default)),
            "fused": use_crossent(copy.deepcopy(default), fused=True)}


def make_step(model, lr: float):
    # foreach=False: AdamW updates one parameter at a time, so its temporaries
    # are one parameter large, the same for all three modes.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)

    def step(batch: torch.Tensor) -> float:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return loss.item()
    return step


def batches(tokens: torch.Tensor, args):
    per = args.batch * args.seq
    return [tokens[i * per:(i + 1) * per].view(args.batch, args.seq) for i in range(args.steps)]


def memory_worker(args) -> None:
    """One mode, a fresh process: extra peak RSS of one training step."""
    from crossent._bench import _peak_kib, _reset_peak, _rss_kib
    tokens = torch.load(Path(args.out) / "tokens.pt")
    vocab = int(json.loads((Path(args.out) / "vocab.json").read_text())["vocab"])
    step = make_step(build_models(args, vocab)[args.memory_worker], args.lr)
    data = batches(tokens, args)
    step(data[0])  # warm-up: gradients and AdamW state exist from here on
    base, method = _rss_kib("VmRSS"), _reset_peak()
    step(data[1])
    print(json.dumps({"extra_peak_mib": (_peak_kib(method) - base) / 1024, "rss_method": method}))


def measure_memory(args) -> dict:
    out = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, "--memory-worker", mode, "--out", args.out] + (
            ["--smoke"] if args.smoke else
            ["--lr", str(args.lr), "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--vocab",
             str(args.vocab), "--hidden", str(args.hidden), "--layers", str(args.layers)])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def plot(losses: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG")
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = range(1, len(losses["default"]) + 1)
    for mode, style in zip(MODES, ("-", "--", ":")):
        a.plot(steps, losses[mode], style, label=mode, linewidth=2)
    a.set(xlabel="step", ylabel="training loss", title="loss (the three curves coincide)")
    a.legend()
    ref = losses["default"]
    for mode in MODES[1:]:
        rel = [max(abs(x - r) / abs(r), 1e-10) for x, r in zip(losses[mode], ref)]
        b.semilogy(steps, rel, label=f"{mode} vs default")
    b.set(xlabel="step", ylabel="|loss - default| / default", title="relative difference (floored at 1e-10)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = [m for m in ("tokenizers", "transformers") if importlib.util.find_spec(m) is None]
    if missing:   # the main job installs crossent and torch only
        sys.exit(f"this example needs {' and '.join(missing)}; from the repository root: "
                 'pip install torch==2.13.0 -e ".[hf-dev]"')
    if args.memory_worker:
        memory_worker(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    texts = stdlib_sources(args.smoke)
    tok_path = out / f"tokenizer-{args.vocab}{'-smoke' if args.smoke else ''}.json"
    cached = tok_path.exists()
    tok = train_tokenizer(texts, args.vocab, tok_path)
    vocab = tok.get_vocab_size()
    tokens = token_stream(tok, texts, args.steps * args.batch * args.seq)
    torch.save(tokens, out / "tokens.pt")
    (out / "vocab.json").write_text(json.dumps({"vocab": vocab}))
    print(f"tokenizer: BPE, vocabulary {vocab}, trained on {len(texts)} stdlib files "
          f"({sum(map(len, texts)) / 2**20:.1f} MiB)" + (f" (cached in {tok_path})" if cached else
                                                         f" in {time.perf_counter() - t0:.0f} s"))

    models = build_models(args, vocab)
    steps = {m: make_step(models[m], args.lr) for m in MODES}
    nparams = sum(p.numel() for p in models["default"].parameters())
    print(f"model: Llama, {nparams / 1e6:.1f} M parameters, {args.layers} layers, hidden {args.hidden}; "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} steps, AdamW lr {args.lr}, fp32, "
          f"{torch.get_num_threads()} threads")
    losses = {m: [] for m in MODES}
    times = {m: [] for m in MODES}
    for i, batch in enumerate(batches(tokens, args)):
        for m in MODES:  # interleaved: the machine's load hits all three alike
            t = time.perf_counter()
            losses[m].append(steps[m](batch))
            times[m].append(time.perf_counter() - t)
        if not args.smoke and (i + 1) % 5 == 0:
            print(f"  step {i + 1}: loss " + ", ".join(f"{m} {losses[m][-1]:.4f}" for m in MODES), flush=True)
    memory = measure_memory(args)

    logits_mib = args.batch * args.seq * vocab * 4 / 2**20
    rows = {}
    for m in MODES:
        med = statistics.median(times[m][1:] or times[m])  # step 1 warms up allocator and kernels
        rel = max(abs(x - r) / abs(r) for x, r in zip(losses[m], losses["default"]))
        rows[m] = {"tokens_per_s": args.batch * args.seq / med, "step_s": med,
                   "extra_peak_mib": memory[m]["extra_peak_mib"], "final_loss": losses[m][-1],
                   "max_rel_loss_diff": rel}
    d = rows["default"]
    print(f"\none logits tensor: {logits_mib:.0f} MiB (fp32, {args.batch * args.seq} tokens x {vocab})")
    print(f"{'mode':<10}{'tokens/s':>10}{'step s':>9}{'x default':>11}{'peak MiB':>10}{'x default':>11}"
          f"{'final loss':>12}{'max rel diff':>14}")
    for m, r in rows.items():
        print(f"{m:<10}{r['tokens_per_s']:>10.0f}{r['step_s']:>9.3f}{r['step_s'] / d['step_s']:>11.2f}"
              f"{r['extra_peak_mib']:>10.1f}{r['extra_peak_mib'] / d['extra_peak_mib']:>11.2f}"
              f"{r['final_loss']:>12.4f}{r['max_rel_loss_diff']:>14.2e}")
    png = plot(losses, out / "loss_curves.png")
    summary = {"args": {k: v for k, v in vars(args).items() if k != "memory_worker"}, "vocab": vocab,
               "parameters": nparams, "logits_mib": logits_mib, "rows": rows, "losses": losses, "step_s": times,
               "max_rel_loss_diff": {m: rows[m]["max_rel_loss_diff"] for m in MODES},
               "rss_method": memory["default"]["rss_method"], "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {out / 'summary.json'}" + (f" and {out / 'loss_curves.png'}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
