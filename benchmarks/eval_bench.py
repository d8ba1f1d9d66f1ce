"""Evaluation speed: CORE-style scoring and chat_eval generation, one item at a time vs batched.

CORE scoring of real CORE items (a few tasks of each kind, few-shot contexts cropped to the
model's context) three ways:
- ours, batched: nanochat.core_eval.score_sequences (shared prefix prefilled once, the tails of
  up to --max-rows sequences in one forward);
- ours, batch 1: the same code, one item per forward;
- Hugging Face LlamaForCausalLM of the same shape, one sequence at a time (a forward per choice,
  loss over the continuation): the loop people otherwise write.
Generation: chat prompts (spelling and GSM8K questions) through the Engine, one prompt per call
vs --gen-batch prompts per call, greedy, exactly --max-new-tokens each. Both models have random
weights: this measures speed, not accuracy.

    python -m benchmarks.eval_bench [--depth 6] [--items 24] [--threads 2]

Needs the trained tokenizer (python -m scripts.tok_train). Prints a table, then one JSON line.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from nanochat.core_eval import (CORE_TASK_BY_LABEL, fewshot_indices, load_core_items, render_texts, score_sequences,
                                tokenize_item)
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_for_depth
from nanochat.tokenizer import get_tokenizer
from tasks.gsm8k import GSM8K
from tasks.spelling import SpellingBee


def random_gpt(config):
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():  # off the zero-initialised projections, so every layer computes something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def llama_like(config):
    """HF Llama with our depth, width, heads, MLP width and vocabulary (untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                        num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
                        intermediate_size=4 * config.n_embd, max_position_embeddings=config.sequence_len,
                        tie_word_embeddings=False)
    return LlamaForCausalLM(shape).eval()


def core_requests(tokenizer, labels, n, max_len):
    """The first n items of each task as scorer input: per item [(tokens, start)]."""
    requests = []
    for label in labels:
        task = CORE_TASK_BY_LABEL[label]
        items = load_core_items(task)
        for i in range(n):
            shots = [items[j] for j in fewshot_indices(i, len(items), task.num_fewshot)]
            requests.append(tokenize_item(tokenizer, render_texts(items[i], shots, task.kind, task.delimiter), max_len))
    return requests


@torch.inference_mode()
def hf_scores(model, requests):
    """Per item, per sequence: (mean continuation loss, all argmax), one forward per sequence."""
    out = []
    for sequences in requests:
        scored = []
        for tokens, start in sequences:
            logits = model(torch.tensor([tokens])).logits[0, start - 1:-1]
            targets = torch.tensor(tokens[start:])
            scored.append((F.cross_entropy(logits, targets).item(), bool((logits.argmax(-1) == targets).all())))
        out.append(scored)
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=6, help="model depth (width = 64 x depth)")
    parser.add_argument("--seq-len", type=int, default=512, help="model context; longer items are cropped")
    parser.add_argument("--tasks", default="hellaswag_zeroshot,arc_easy,piqa,winogrande,lambada_openai,squad",
                        help="CORE tasks whose first --items items are scored")
    parser.add_argument("--items", type=int, default=24, help="items per CORE task")
    parser.add_argument("--max-rows", type=int, default=64, help="sequences per batched forward")
    parser.add_argument("--gen-items", type=int, default=32, help="chat prompts generated for")
    parser.add_argument("--gen-batch", type=int, default=32, help="prompts per batched generate call")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = get_tokenizer()
    config = config_for_depth(args.depth, vocab_size=tokenizer.get_vocab_size(), sequence_len=args.seq_len)
    ours, hf = random_gpt(config), llama_like(config)
    labels = args.tasks.split(",")
    print(f"d{args.depth} ({config.n_embd} wide, vocab {config.vocab_size}, context {args.seq_len}), "
          f"{args.threads} threads; CORE: the first {args.items} items of each task, items/s")
    print(f"{'task':<20} {'seqs':>5} | {'HF 1-by-1':>9} {'ours b1':>8} {'batched':>8} | {'vs HF':>6}")
    warm = core_requests(tokenizer, labels[:1], 2, args.seq_len)
    score_sequences(ours, warm, progress=False)
    hf_scores(hf, warm)
    totals, per_task, drift = {"hf": 0.0, "batch1": 0.0, "batched": 0.0}, {}, 0.0
    for label in labels:  # the three timed back to back per task, so load changes hit them alike
        requests = core_requests(tokenizer, [label], args.items, args.seq_len)
        with torch.inference_mode():
            batched, t_batched = timed(score_sequences, ours, requests, max_rows=args.max_rows, progress=False)
            single, t_single = timed(score_sequences, ours, requests, max_rows=1, progress=False)
        _, t_hf = timed(hf_scores, hf, requests)
        drift = max([drift] + [abs(a[0] - b[0]) for x, y in zip(batched, single) for a, b in zip(x, y)])
        for key, seconds in (("hf", t_hf), ("batch1", t_single), ("batched", t_batched)):
            totals[key] += seconds
        n = len(requests)
        per_task[label] = {"hf": n / t_hf, "batch1": n / t_single, "batched": n / t_batched}
        print(f"{label:<20} {sum(len(r) for r in requests):>5} | {n / t_hf:>9.2f} {n / t_single:>8.2f} "
              f"{n / t_batched:>8.2f} | {t_hf / t_batched:>5.1f}x")
    n_items = args.items * len(labels)
    print(f"{'all':<20} {'':>5} | {n_items / totals['hf']:>9.2f} {n_items / totals['batch1']:>8.2f} "
          f"{n_items / totals['batched']:>8.2f} | {totals['hf'] / totals['batched']:>5.1f}x")

    items = [SpellingBee("test", size=args.gen_items // 2)[i] for i in range(args.gen_items // 2)]
    items += [GSM8K()[i] for i in range(args.gen_items - len(items))]
    prompts = [tokenizer.render_for_completion(item) for item in items]
    engine = Engine(ours, tokenizer)
    # No stop token ends a row early: every prompt decodes exactly max_new_tokens.
    engine.stop_tokens = set()
    generate = dict(max_tokens=args.max_new_tokens, temperature=0)
    engine.generate_batch(prompts[:2], **generate)  # warm-up
    _, g_single = timed(lambda: [engine.generate_batch([p], **generate) for p in prompts])
    _, g_batched = timed(lambda: [engine.generate_batch(prompts[i:i + args.gen_batch], **generate)
                                  for i in range(0, len(prompts), args.gen_batch)])

    print(f"generation, items/s: batch 1 {len(prompts) / g_single:.2f}, "
          f"{args.gen_batch} prompts per call {len(prompts) / g_batched:.2f}")
    result = {"benchmark": "eval", "depth": args.depth, "threads": args.threads, "core_items": n_items,
              "core_items_per_s": {k: n_items / v for k, v in totals.items()}, "core_per_task": per_task,
              "core_speedup_vs_hf": totals["hf"] / totals["batched"],
              "core_speedup_vs_batch1": totals["batch1"] / totals["batched"], "core_batch_drift": drift,
              "gen_items_per_s": {"batch1": len(prompts) / g_single, "batched": len(prompts) / g_batched},
              "gen_speedup": g_single / g_batched}
    print(f"CORE scoring: batched {result['core_speedup_vs_hf']:.1f}x HF one at a time (target >= 4x), "
          f"{result['core_speedup_vs_batch1']:.1f}x our batch 1 (max loss difference {drift:.1e}); "
          f"generation: batched {result['gen_speedup']:.1f}x batch 1")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
