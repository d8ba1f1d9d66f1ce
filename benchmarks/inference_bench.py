"""Prefill and decode tokens/s of our Engine vs Hugging Face LlamaForCausalLM of the same shape.

Both models have random weights, the same depth, width, heads and vocab; both decode greedily with
their own KV cache. Prompts in a batch are distinct (the serving case).

    python -m benchmarks.inference_bench [--depth 6] [--batch-sizes 1 8 32] [--threads 2]

Prints a table, then one JSON line.
"""

import argparse
import json
import time

import torch

from nanochat.corpus import stdlib_text
from nanochat.engine import Engine
from nanochat.gpt import build_gpt, config_for_depth
from nanochat.tokenizer import Tokenizer


def build_ours(config, device):
    model = build_gpt(config, device)
    with torch.no_grad():  # off the zero init so every layer does real work
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def build_hf(config, device):
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_config = LlamaConfig(vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
                            num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
                            intermediate_size=4 * config.n_embd, max_position_embeddings=config.sequence_len,
                            tie_word_embeddings=False)
    return LlamaForCausalLM(hf_config).to(device).eval()


def time_ours(engine, prompts, new_tokens):
    """(prefill seconds, decode seconds, decoded tokens). The first column comes out of prefill."""
    start = time.perf_counter()
    stream = engine.generate(prompts, max_tokens=new_tokens, temperature=0)
    next(stream)
    prefill = time.perf_counter() - start
    steps = sum(1 for _ in stream)
    decode = time.perf_counter() - start - prefill
    return prefill, decode, steps * len(prompts)


@torch.inference_mode()
def time_hf(model, prompts, new_tokens):
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    model(ids, use_cache=True)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    total = time.perf_counter() - start
    steps = out.size(1) - ids.size(1) - 1  # the first new token comes out of generate's own prefill
    return prefill, total - prefill, steps * ids.size(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=6, help="model depth (one-dial family)")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocabulary of both models")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="prompts decoded together")
    parser.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per prompt")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = config_for_depth(args.depth, vocab_size=args.vocab_size)
    ours, hf = build_ours(config, args.device), build_hf(config, args.device)
    tokenizer = Tokenizer.train_from_iterator(iter(stdlib_text(100_000)), vocab_size=300)  # only its specials are used
    engine = Engine(ours, tokenizer)
    specials = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
    vocab = [t for t in range(args.vocab_size) if t not in specials]

    print(f"d{args.depth}: {config.n_embd} wide, {config.n_head} heads, vocab {args.vocab_size}, device {args.device}, "
          f"{args.threads} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"{'batch':>5} | {'prefill tok/s':>14} {'HF':>9} | {'decode tok/s':>13} {'HF':>9} {'speed-up':>9}")
    results = []
    for B in args.batch_sizes:
        g = torch.Generator().manual_seed(B)
        prompts = [[vocab[int(i)] for i in torch.randint(len(vocab), (args.prompt_len,), generator=g)] for _ in range(B)]
        time_ours(engine, prompts[:1], 4)  # warm-up
        time_hf(hf, prompts[:1], 4)
        o_pre, o_dec, o_n = time_ours(engine, prompts, args.new_tokens)
        h_pre, h_dec, h_n = time_hf(hf, prompts, args.new_tokens)
        row = dict(batch=B, prefill_tok_s=B * args.prompt_len / o_pre, hf_prefill_tok_s=B * args.prompt_len / h_pre,
                   decode_tok_s=o_n / o_dec, hf_decode_tok_s=h_n / h_dec)
        row["decode_speedup"] = row["decode_tok_s"] / row["hf_decode_tok_s"]
        results.append(row)
        print(f"{B:>5} | {row['prefill_tok_s']:>14.0f} {row['hf_prefill_tok_s']:>9.0f} | "
              f"{row['decode_tok_s']:>13.0f} {row['hf_decode_tok_s']:>9.0f} {row['decode_speedup']:>8.2f}x")
    print(json.dumps(dict(benchmark="inference", depth=args.depth, device=args.device, threads=args.threads,
                          results=[{k: round(v, 2) for k, v in r.items()} for r in results])))


if __name__ == "__main__":
    main()
