"""`soup-run`: generate, score and chat with an exported specialist (argparse: no extra dependency).

Examples:
    soup-run generate exports/demo/acme --prompt "It is a truth universally acknowledged"
    soup-run generate exports/demo/acme --prompt "Once" --prompt "In the beginning" --temperature 0.8 --top-p 0.9 --seed 1
    soup-run score exports/demo/acme my_texts/*.txt
    soup-run chat exports/demo/acme
    soup-run generate exports/smalltalk --prompt "In the beginning"   # a SmallTalk mixture: routes first
    soup-run serve exports/demo --port 8000     # the JavaScript runner's page, in a browser
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from soup_run.contract import MODEL_FILE, ORT_FILE
from soup_run.errors import RunError, read_text


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="export directory (or its onnx/) written by soup-export build, "
                   "or a mixture directory written by soup-export mixture")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--no-verify", action="store_true", help="skip the manifest's SHA-256 check")
    p.add_argument("--ort-format", action="store_true", help=f"load {ORT_FILE} (onnxruntime mobile format)")
    p.add_argument("--engine", choices=["ort", "genai"], default="ort",
                   help="ort: this runner; genai: onnxruntime-genai on the same files (if installed)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="soup-run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = root.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text, streamed as it is produced",
                       epilog='Example: soup-run generate exports/demo/acme --prompt "It is a truth"')
    _model_args(g)
    _sampling_args(g)
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    g.add_argument("--prompt-file", type=Path, help="one prompt per line")
    s = sub.add_parser("score", help="per-file perplexity", epilog="Example: soup-run score exports/demo/acme notes/*.txt")
    _model_args(s)
    s.add_argument("files", nargs="+", type=Path)
    s.add_argument("--json", action="store_true")
    c = sub.add_parser("chat", help="interactive loop keeping the KV cache across turns",
                       epilog="Example: soup-run chat exports/demo/acme   (/reset, /quit)")
    _model_args(c)
    _sampling_args(c)
    v = sub.add_parser("serve", help="serve the JavaScript runner's page and the exports on localhost",
                       epilog="Example: soup-run serve exports/demo --port 8000   (then open http://127.0.0.1:8000/)")
    v.add_argument("model", type=Path, help="an export, mixture or batch directory written by soup-export")
    v.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--web", type=Path, help="runtimes/web of the repository (default: next to this package)")
    return root


def _config(args):
    from soup_run.generate import GenerationConfig
    from soup_run.sampling import Sampling

    if args.max_new_tokens < 1:
        raise RunError("--max-new-tokens must be >= 1")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    return GenerationConfig(args.max_new_tokens, sampling, tuple(args.stop), args.seed)


def _load(args):
    if args.engine == "genai":
        from soup_run.genai_engine import GenaiSpecialist

        return GenaiSpecialist(args.model, verify_files=not args.no_verify)
    from soup_run.model import Specialist

    return Specialist(args.model, threads=args.threads, verify_files=not args.no_verify,
                      ort_format=True if args.ort_format else None)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        text = read_text(args.prompt_file, f"--prompt-file {args.prompt_file}", "pass a text file, one prompt per line")
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise RunError("give at least one --prompt TEXT (or --prompt-file FILE)")
    return prompts


def _describe_route(name: str, e: int, scores) -> str:
    listed = ", ".join(f"router {i} {s:.3f}" for i, s in enumerate(scores))
    return f"soup-run: {name} -> expert {e} (prefix log-likelihood per token: {listed})"


def _run_mixture(args) -> int:
    """generate / score / chat on a SmallTalk mixture: route by the prefix, then run the expert."""
    from soup_run.mixture import RoutedMixture

    if args.engine != "ort":
        raise RunError("a SmallTalk mixture runs on the ort engine only")
    if getattr(args, "ort_format", False):
        raise RunError(f"--ort-format is for a single specialist; a mixture loads each model's {MODEL_FILE}")
    cfg = _config(args) if args.command != "score" else None
    prompts = _prompts(args) if args.command == "generate" else []  # bad options fail before any model loads
    mixture = RoutedMixture(args.model, threads=args.threads, verify_files=not args.no_verify)
    if args.command == "generate":
        for prompt in prompts:
            e, scores = mixture.route(prompt)
            print(_describe_route(repr(prompt[:40]), e, scores), file=sys.stderr)
            sys.stdout.write(prompt)
            for event in mixture.expert(e).stream([prompt], cfg):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            sys.stdout.write("\n" if len(prompts) == 1 else "\n---\n")
    elif args.command == "score":
        from soup_run.score import score_files

        rows = []
        for path in args.files:
            e, scores = mixture.route(read_text(path, str(path), "pass text files to score"))
            rows += [{**r, "expert": e, "router_scores": scores.tolist()} for r in score_files(mixture.expert(e), [path])]
        if args.json:
            print(json.dumps(rows, indent=2))
        for r in rows if not args.json else []:
            print(f"{r['file']}: expert {r['expert']}, {r['tokens']} tokens, perplexity {r['perplexity']:.3f}")
    else:
        from soup_run.mixture import run_routed_chat

        print("soup-run chat: the first line routes to an expert; /reset starts over (and routes again), /quit leaves",
              file=sys.stderr)
        run_routed_chat(mixture, cfg, sys.stdin, lambda t: (sys.stdout.write(t), sys.stdout.flush()),
                        lambda e, s: print(_describe_route("conversation", e, s), file=sys.stderr))
    return 0


def run(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve":
        from soup_run.serve import serve

        serve(args.model, args.port, args.host, args.web)
        return 0
    from soup_run.mixture import is_mixture

    if is_mixture(args.model):
        return _run_mixture(args)
    if args.command == "generate":
        cfg, prompts = _config(args), _prompts(args)
        model = _load(args)
        if len(prompts) == 1:
            sys.stdout.write(prompts[0])
            for event in model.stream(prompts, cfg):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            for prompt, text in zip(prompts, model.generate(prompts, cfg)):
                print(f"{prompt}{text}\n---")
    elif args.command == "score":
        if args.engine != "ort":
            raise RunError("score runs on the ort engine only")
        from soup_run.score import score_files

        rows = score_files(_load(args), args.files)
        if args.json:
            print(json.dumps(rows, indent=2))
        for r in rows if not args.json else []:
            print(f"{r['file']}: {r['tokens']} tokens, perplexity {r['perplexity']:.3f}")
    else:
        if args.engine != "ort":
            raise RunError("chat runs on the ort engine only")
        from soup_run.chat import run_chat

        model = _load(args)
        print("soup-run chat: type text and press enter; /reset starts over, /quit leaves", file=sys.stderr)
        run_chat(model, _config(args), sys.stdin, lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except RunError as exc:
        print(f"soup-run: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
