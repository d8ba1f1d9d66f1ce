"""Training-step speed and MFU on CPU: our GPT + MuonAdamW against Hugging Face LlamaForCausalLM +
torch.optim.AdamW of the same shape, in fp32 and bf16, on the same random token batches.

    python -m benchmarks.train_bench [--depths 4 6] [--dtypes float32 bfloat16] [--threads 1 2] [--repeats 2]
    python -m benchmarks.train_bench --profile --depths 6 --dtypes float32 --threads 1   # where the time goes

A step is forward + backward + optimizer step (+ zero_grad); no dataloader, so only the step is
timed. MFU = estimate_flops() x tokens/s / peak, the peak being nanochat.mfu.measured_matmul_peak
for that dtype, measured in the same process with the same thread count. The Llama baseline has
the same depth, width, heads and vocab; its SwiGLU MLP has three matrices, so its hidden size is
8/3 of the width (rounded to 64) to carry about the same weights as our 4x relu^2 MLP; its MFU
uses its own FLOP count. bf16 means our master-weight Linear with NANOCHAT_DTYPE=bfloat16, and
torch.autocast(bfloat16) over fp32 weights for Llama. NANOCHAT_DTYPE is read when nanochat is
imported, so each (dtype, threads) pair runs in a subprocess of this script.

On a shared machine other processes steal cycles: each model is timed in interleaved rounds, the
median and the best step are reported, and tokens/s is also given on the process CPU clock, which
leaves out the time other processes held the cores (a quiet-machine estimate, exact for 1 thread).
About 7 minutes with the defaults on 2 quiet cores. Prints a table, then one JSON line.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = ("float32", "bfloat16")  # values of NANOCHAT_DTYPE


def cpu_bf16_support():
    """The /proc/cpuinfo flags that give a CPU native bf16 matmul (AVX512-BF16 dot products, AMX tiles)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return []
    return sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def llama_hidden(n_embd):
    """SwiGLU hidden size with about the weights of a 4x two-matrix MLP: 3 * h ~ 8 * n_embd."""
    return max(64, round(8 * n_embd / 3 / 64) * 64)


def build_ours(config):
    from nanochat.gpt import GPT
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model.train(), model.setup_optimizer()


def build_llama(config):
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_config = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                            num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
                            intermediate_size=llama_hidden(config.n_embd), max_position_embeddings=config.sequence_len,
                            tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_config).train()
    # fused=True is torch's fastest AdamW on CPU: the strongest baseline, not the default for-loop one.
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def llama_flops(config, seq_len):
    """Training FLOPs per token of the Llama baseline, counted as estimate_flops counts ours."""
    n, hidden = config.n_embd, llama_hidden(config.n_embd)
    weights = config.n_layer * (4 * n * n + 3 * n * hidden) + n * config.vocab_size
    return 6 * weights + config.n_layer * 12 * n * seq_len


def timed_phases(loss_fn, optimizer):
    """(forward, backward, optimizer, process CPU) seconds of one training step whose forward is loss_fn()."""
    c0, t0 = time.process_time(), time.perf_counter()
    loss = loss_fn()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, time.perf_counter() - t2, time.process_time() - c0


def ours_phases(model, optimizer, x, y):
    """timed_phases of our GPT and MuonAdamW."""
    return timed_phases(lambda: model(x, y), optimizer)


def llama_phases(model, optimizer, x, y, dtype):
    """timed_phases of the Llama baseline; bf16 runs under autocast, the usual HF mixed precision."""
    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
    return timed_phases(loss, optimizer)


def cpu_clock_matmul_peak(dtype, n=1024, repeats=20):
    """measured_matmul_peak on the process CPU clock, for one thread: time other processes hold the
    core is not counted, so with it the step's CPU-clock throughput gives a quiet-machine estimate
    of MFU. (With more threads, OpenMP workers that spin or idle make the CPU clock meaningless.)"""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        a @ b
        best = min(best, time.process_time() - start)
    return 2 * n ** 3 / best


def summarise(phases, tokens, flops_per_token, peak, cpu_peak, threads):
    """Median and best of the timed steps, tokens/s and MFU of the median step on the wall clock,
    and tokens/s on the process CPU clock per thread (and MFU against cpu_peak, for one thread)."""
    totals = [sum(p[:3]) for p in phases]
    median = statistics.median(totals)
    fwd, bwd, opt = (statistics.median(p[i] for p in phases) for i in range(3))
    tok_s = tokens / median
    cpu_tok_s = tokens / (statistics.median(p[3] for p in phases) / threads)
    return dict(step_ms=1e3 * median, best_step_ms=1e3 * min(totals), fwd_ms=1e3 * fwd, bwd_ms=1e3 * bwd,
                opt_ms=1e3 * opt, tok_s=tok_s, best_tok_s=tokens / min(totals), mfu=flops_per_token * tok_s / peak,
                cpu_tok_s=cpu_tok_s, cpu_mfu=flops_per_token * cpu_tok_s / cpu_peak if cpu_peak else None,
                flops_per_token=flops_per_token)


def worker(args):
    """Time both models at every depth in this process's dtype and thread count; one JSON line out."""
    from nanochat.common import COMPUTE_DTYPE
    from nanochat.gpt import config_for_depth
    from nanochat.mfu import measured_matmul_peak
    torch.set_num_threads(args.threads)
    dtype = COMPUTE_DTYPE
    peak = measured_matmul_peak("cpu", dtype)
    cpu_peak = cpu_clock_matmul_peak(dtype) if args.threads == 1 else None
    rows = []
    for depth in args.depths:
        torch.manual_seed(depth)
        config = config_for_depth(depth, vocab_size=args.vocab_size, sequence_len=args.seq_len,
                                  window_pattern=args.window_pattern, head_dim=args.head_dim)
        x = torch.randint(args.vocab_size, (args.batch_size, args.seq_len))
        y = torch.randint(args.vocab_size, (args.batch_size, args.seq_len))
        ours, ours_opt = build_ours(config)
        if args.profile:
            profile(ours, ours_opt, x, y)
            continue
        llama, llama_opt = build_llama(config)
        runs = {"ours": lambda: ours_phases(ours, ours_opt, x, y),
                "hf": lambda: llama_phases(llama, llama_opt, x, y, dtype)}
        for run in runs.values():
            for _ in range(args.warmup):
                run()
        times = {name: [] for name in runs}
        for _ in range(args.repeats):  # interleaved rounds: contention hits both models alike
            for name, run in runs.items():
                times[name] += [run() for _ in range(args.steps)]
        tokens = args.batch_size * args.seq_len
        row = dict(depth=depth, n_embd=config.n_embd, n_head=config.n_head, dtype=str(dtype).removeprefix("torch."),
                   threads=args.threads, peak_tflops=peak / 1e12, cpu_peak_tflops=cpu_peak and cpu_peak / 1e12,
                   ours=summarise(times["ours"], tokens, ours.estimate_flops(args.seq_len), peak, cpu_peak, args.threads),
                   hf=summarise(times["hf"], tokens, llama_flops(config, args.seq_len), peak, cpu_peak, args.threads))
        rows.append(row)
        del ours, ours_opt, llama, llama_opt
    print(json.dumps(rows))


def profile(model, optimizer, x, y):
    """Operator table of a few of our training steps, by self CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function
    for _ in range(2):
        ours_phases(model, optimizer, x, y)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            with record_function("forward"):
                loss = model(x, y)
            with record_function("backward"):
                loss.backward()
            with record_function("optimizer"):
                optimizer.step()
            model.zero_grad(set_to_none=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)


def pct(fraction):
    return "    -" if fraction is None else f"{100 * fraction:>4.1f}%"


def rounded4(value):
    return round(value, 4) if isinstance(value, float) else value


def check_targets(rows, bf16_flags):
    """Our speed targets on the wall clock (d6 fp32 MFU >= 45% of the measured matmul peak, tokens/s at
    least HF's, bf16 faster than fp32 where the CPU has bf16 instructions): (description, value, met)."""
    by_key = {(r["depth"], r["dtype"], r["threads"]): r for r in rows}
    targets = []
    for (depth, dtype, threads), r in by_key.items():
        tag = f"d{depth} {dtype} {threads}t"
        if depth == 6 and dtype == "float32":
            targets.append((f"{tag}: MFU >= 45% of the measured fp32 matmul peak", r["ours"]["mfu"],
                            r["ours"]["mfu"] >= 0.45))
        targets.append((f"{tag}: tokens/s >= HF Llama + AdamW", r["speedup_vs_hf"], r["speedup_vs_hf"] >= 1))
        fp32 = by_key.get((depth, "float32", threads))
        if dtype == "bfloat16" and fp32 and bf16_flags:
            ratio = r["ours"]["tok_s"] / fp32["ours"]["tok_s"]
            targets.append((f"{tag}: bf16 faster than fp32 (CPU has {'+'.join(bf16_flags)})", ratio, ratio > 1))
    return targets


def run_worker(args, dtype, threads):
    env = {**os.environ, "NANOCHAT_DTYPE": dtype, "OMP_NUM_THREADS": str(threads)}
    argv = [sys.executable, "-m", "benchmarks.train_bench", "--worker", "--threads", str(threads),
            "--depths", *map(str, args.depths), "--vocab-size", str(args.vocab_size), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--head-dim", str(args.head_dim),
            "--window-pattern", args.window_pattern, "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--repeats", str(args.repeats)] + (["--profile"] if args.profile else [])
    out = subprocess.run(argv, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    return [] if args.profile else json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 6], help="model depths to compare")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="compute dtypes")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary of both models")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step")
    parser.add_argument("--head-dim", type=int, default=128, help="128: the one-dial family (d4 256 wide, d6 384)")
    parser.add_argument("--window-pattern", default="SSSL", help="our sliding-window pattern (S short, L full)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of our step instead")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        return worker(args)

    bf16_flags = cpu_bf16_support()
    print(f"seq_len {args.seq_len}, batch {args.batch_size} rows = {args.seq_len * args.batch_size} tokens/step, "
          f"vocab {args.vocab_size}, window pattern {args.window_pattern}, head_dim {args.head_dim}; "
          f"CPU bf16 flags: {' '.join(bf16_flags) or 'none (no native bf16 matmul: expect bf16 no faster than fp32)'}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    rows = [row for threads in args.threads for dtype in args.dtypes for row in run_worker(args, dtype, threads)]
    if args.profile:
        return
    print("wall: median step on the wall clock (best step in 'best'); cpu: the same on the process CPU clock per "
          "thread, which leaves out time other processes held the cores (exact for 1 thread; its MFU only there)")
    print(f"{'model':>5} {'dtype':>8} {'thr':>3} {'peak TF':>7} | {'ours ms':>7} {'fwd':>5} {'bwd':>5} {'opt':>5} "
          f"{'tok/s':>6} {'best':>6} {'MFU':>5} {'cpu tok/s':>9} {'MFU':>5} | {'HF ms':>6} {'opt':>5} {'tok/s':>6} "
          f"{'MFU':>5} {'cpu tok/s':>9} {'MFU':>5} | {'vs HF':>5} {'cpu':>5}")
    for r in rows:
        o, h = r["ours"], r["hf"]
        r["speedup_vs_hf"] = o["tok_s"] / h["tok_s"]
        r["cpu_speedup_vs_hf"] = o["cpu_tok_s"] / h["cpu_tok_s"]
        print(f"{'d' + str(r['depth']):>5} {r['dtype']:>8} {r['threads']:>3} {r['peak_tflops']:>7.3f} | "
              f"{o['step_ms']:>7.0f} {o['fwd_ms']:>5.0f} {o['bwd_ms']:>5.0f} {o['opt_ms']:>5.0f} {o['tok_s']:>6.0f} "
              f"{o['best_tok_s']:>6.0f} {100 * o['mfu']:>4.1f}% {o['cpu_tok_s']:>9.0f} {pct(o['cpu_mfu'])} | "
              f"{h['step_ms']:>6.0f} {h['opt_ms']:>5.0f} {h['tok_s']:>6.0f} {100 * h['mfu']:>4.1f}% "
              f"{h['cpu_tok_s']:>9.0f} {pct(h['cpu_mfu'])} | {r['speedup_vs_hf']:>4.2f}x "
              f"{r['cpu_speedup_vs_hf']:>4.2f}x")
    targets = check_targets(rows, bf16_flags)
    for description, value, met in targets:
        print(f"{'met' if met else 'MISSED':>6}  {description}: {value:.2f}")
    rounded = [{k: ({kk: rounded4(vv) for kk, vv in v.items()} if isinstance(v, dict) else rounded4(v))
                for k, v in r.items()} for r in rows]
    print(json.dumps(dict(benchmark="train", seq_len=args.seq_len, batch_size=args.batch_size,
                          vocab_size=args.vocab_size, cpu_bf16_flags=bf16_flags, results=rounded,
                          targets=[dict(target=d, value=round(v, 4), met=m) for d, v, m in targets])))


if __name__ == "__main__":
    main()
