"""Reinforcement learning of the chat model on generated arithmetic with an exact-answer reward.

    python -m scripts.chat_rl --source sft --level hard --num-iterations 60     # CPU, minutes
    torchrun --nproc_per_node=8 -m scripts.chat_rl --source sft --num-iterations 300

GRPO-style and on-policy (nanochat/rl.py): each step samples --num-samples replies to each of
--prompts-per-step fresh problems (the ranks split the prompts; each prompt is prefilled once and
its KV cache shared by its group), rewards a reply 1 when its final answer is exact, and takes
one policy-gradient step on group-relative advantages, normalised per sampled token. pass@1 and
pass@k on held-out problems (and on GSM8K test, --gsm8k-problems) are measured before and
after. Checkpoints go to base_dir/rl_checkpoints/<tag> (scripts.chat_eval --source rl reads
them); --resume continues exactly; the numbers go to the report card's "rl" stage.
"""

import argparse
import json
import os
import sys

from nanochat import report
from nanochat.checkpoint import checkpoint_dir_for, gpt_from_state, load_checkpoint
from nanochat.common import compute_cleanup, compute_init, print0, run_cli, setup_logging
from nanochat.engine import Engine
from nanochat.rl import evaluate_pass_at_k, grpo_step, rank_share
from nanochat.tokenizer import get_tokenizer
from nanochat.training import Run, Schedule, Start, StepOutput, add_training_args, resume, train
from tasks.arithmetic import LEVELS, Arithmetic
from tasks.gsm8k import GSM8K

SEED_STRIDE = 10 ** 9  # reasoning-gym stream positions per --seed: more than any run draws


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="sft", choices=("sft", "rl"), help="start from sft_ or rl_checkpoints")
    p.add_argument("--model-tag", default=None, help="source checkpoint folder (default: the newest)")
    p.add_argument("--model-step", type=int, default=None, help="source checkpoint step (default: the last)")
    p.add_argument("--output-tag", default=None, help="rl_checkpoints folder (default: the source's tag)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training problems and of the rollouts")
    # the problems and the rollouts
    p.add_argument("--level", default="hard", choices=list(LEVELS), help="arithmetic difficulty to train on")
    p.add_argument("--prompts-per-step", type=int, default=16, help="problems per step, over all ranks")
    p.add_argument("--num-samples", type=int, default=8, help="replies per problem: the group of the advantages")
    p.add_argument("--max-new-tokens", type=int, default=128, help="reply length limit in rollouts and evals")
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    p.add_argument("--top-k", type=int, default=None, help="rollouts sample among the k most likely tokens")
    p.add_argument("--device-batch-size", type=int, default=16, help="rollout rows per training forward")
    # optimisation (upstream nanochat's chat_rl: its base LRs x 0.05, no weight decay)
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the embeddings, x --init-lr-frac")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of the lm_head, x --init-lr-frac")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the block matrices, x --init-lr-frac")
    p.add_argument("--scalar-lr", type=float, default=0.5, help="AdamW LR of the per-layer scalars, x --init-lr-frac")
    p.add_argument("--init-lr-frac", type=float, default=0.05, help="scales every LR above")
    # evaluation
    p.add_argument("--eval-problems", type=int, default=100, help="held-out problems at each evaluation")
    p.add_argument("--gsm8k-problems", type=int, default=16, help="GSM8K test problems at each evaluation (0: none)")
    p.add_argument("--eval-samples", type=int, default=4, help="replies per evaluated problem (pass@k's k)")
    p.add_argument("--eval-temperature", type=float, default=1.0, help="evaluation sampling temperature")
    add_training_args(p, warmup_steps=0, warmdown_ratio=1.0, eval_every=50, evaluates="held-out and GSM8K pass@k")
    args = p.parse_args(argv)
    if args.num_iterations < 1:
        p.error("--num-iterations: give the number of RL steps (the problems are generated, there is no epoch)")
    return args


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    _, rank, _, world_size, device = compute_init(args.device_type)
    if args.prompts_per_step % world_size:
        raise ValueError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of the {world_size} ranks")
    source_dir = checkpoint_dir_for(args.source, args.model_tag)
    checkpoint_dir = checkpoint_dir_for("rl", args.output_tag or os.path.basename(source_dir))
    if os.path.abspath(checkpoint_dir) == os.path.abspath(source_dir):
        raise ValueError(f"--source rl would write its steps over its own start in {source_dir}: give an --output-tag")
    start = resume(checkpoint_dir, device, rank, world_size) if args.resume else Start()
    if start.model_state is None:
        model_state, _, source_meta = load_checkpoint(source_dir, args.model_step, device)
        source = dict(source=args.source, checkpoint=source_dir, step=source_meta["step"])
    else:
        model_state, source_meta, source = start.model_state, start.meta, start.meta["rl_source"]
    model = gpt_from_state(model_state, source_meta, device, phase="train")
    tokenizer = get_tokenizer()
    engine = Engine(model, tokenizer)
    optimizer = model.setup_optimizer(**{f"{name}_lr": getattr(args, f"{name}_lr") * args.init_lr_frac
                                         for name in ("embedding", "unembedding", "matrix", "scalar")},
                                      weight_decay=0.0)
    # item i of reasoning-gym seed s is drawn from Random(s + i): SEED_STRIDE keeps seeds' problems apart
    train_task = Arithmetic("train", size=args.num_iterations * args.prompts_per_step, seed=args.seed * SEED_STRIDE,
                            level=args.level)
    held_out = Arithmetic("test", size=args.eval_problems, level=args.level)
    gsm8k = GSM8K() if args.gsm8k_problems > 0 else None

    def evaluate(step=0):
        generate = dict(num_samples=args.eval_samples, rank=rank, world_size=world_size,
                        max_new_tokens=args.max_new_tokens, temperature=args.eval_temperature)
        metrics = {f"arithmetic_{k}": v for k, v in
                   evaluate_pass_at_k(engine, held_out, args.eval_problems, **generate).items()}
        if gsm8k is not None:
            metrics.update({f"gsm8k_{k}": v for k, v in
                            evaluate_pass_at_k(engine, gsm8k, args.gsm8k_problems, **generate).items()})
        return metrics

    before = start.meta["eval_before"] if start.meta else None
    if start.step == 0 and args.eval_every > 0:
        model.eval()
        before = evaluate()
        print0(" | ".join(["before RL"] + [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in before.items()]))

    def step_fn(step):
        ids = rank_share(step * args.prompts_per_step, args.prompts_per_step, rank, world_size)
        loss, stats = grpo_step(model, engine, train_task, ids, args.num_samples, args.max_new_tokens,
                                args.device_batch_size, args.temperature, args.top_k, args.seed, world_size)
        report.log_step("rl", step + 1, **stats)  # the harness logs the loss beside them
        fields = {"reward": f"{stats['reward']:.3f}", "len": f"{stats['tokens']:.0f}",
                  "trained": f"{stats['trained']:.2f}"}
        return StepOutput(loss, int(stats["tokens"] * args.prompts_per_step * args.num_samples / world_size),
                          {"next_prompt": (step + 1) * args.prompts_per_step}, fields)

    schedule = Schedule(args.num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
    run = Run(checkpoint_dir, args.num_iterations, lambda: {"gpt": model.state_dict()},
              dict(model_config=source_meta["model_config"], user_config=vars(args), rl_source=source,
                   eval_before=before),
              device, rank, world_size, args.eval_every, -1, args.save_every, args.stop_at_step, wandb_name=args.run,
              report_stage="rl")
    summary = train(model, optimizer, schedule, step_fn, run, start, evaluate)
    summary["before"] = before
    if summary["steps"] == args.num_iterations:
        after = {k: v for k, v in (summary["val"] or {}).items() if k != "step"}
        report.log_metrics("rl", **{f"{k}_before": v for k, v in (before or {}).items()},
                           **{f"{k}_after": v for k, v in after.items()})
        report.log_eval("rl", {k.replace("_pass@1", ""): v for k, v in after.items() if k.endswith("_pass@1")})
    print0(json.dumps(summary))
    compute_cleanup()
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
