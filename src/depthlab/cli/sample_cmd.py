"""`depthlab sample`: generate text from a run, checkpoint, HF folder or GGUF file."""

from __future__ import annotations

from depthlab.cli import common


def register(sub, help_: str) -> None:
    p = sub.add_parser("sample", help=help_, description="Generate text from a model (depthlab run or checkpoint, "
                       "Hugging Face folder or hub id, GGUF file, or 'smollm2').")
    common.add_model(p)
    p.add_argument("--prompt", default="ROMEO:", help="text to continue (default: %(default)r)")
    p.add_argument("--max-new-tokens", type=common.Number(int, 1), default=100, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=common.Number(float, 0), default=0.8, help="0 for greedy (default: %(default)s)")
    p.add_argument("--top-k", type=common.Number(int, 0), default=50, help="sample from the k most likely tokens (default: %(default)s)")
    common.add_seed(p)
    common.add_device(p)
    common.add_dtype(p)
    common.add_json(p, "prompt and text")
    p.set_defaults(func=run)


def run(args) -> int:
    from depthlab.errors import ConfigError
    from depthlab.loading import load_model
    from depthlab.model.generate import generate_text
    from depthlab.model.view import ModelView

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    context = ModelView(model).context
    prompt_tokens = len(tokenizer.encode(args.prompt))
    if context and prompt_tokens + args.max_new_tokens > context:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} plus the prompt's {prompt_tokens} tokens exceed "
                          f"the model's context of {context} tokens")
    text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    if not common.emit_json(args, {"model": args.model, "prompt": args.prompt, "text": text, "seed": args.seed}):
        print(text)
    return 0
