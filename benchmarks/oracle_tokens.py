"""Tokens a step of speculative decoding with oracle drafts, counted on the CPU (no GPU, no timing):
how adaptive drafting and the oracle's draws move what a verification step yields.

    python benchmarks/oracle_tokens.py                        # W5's shape: 1 request, 128 tokens, K 4
    python benchmarks/oracle_tokens.py --alphas 0,0.5,0.7,0.9 --seeds 16 --no-adaptive

A small random Whisper (the tests' ``random_whisper``) decodes one 2 s clip to exactly ``--tokens``
new tokens, plainly first (the oracle's path), then with ``OracleDrafter`` drafts at each alpha and
oracle seed: the engine's own scheduling, adaptive K and look-ahead decide how many drafts each
step verifies, as they do on a GPU. Prints, per alpha, each seed's tokens a step, the mean over
all the seeds' tokens, verification steps and drafts proposed.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--alphas", default="0.7")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--no-adaptive", action="store_true", help="K drafts every step")
    p.add_argument("--no-lookahead", action="store_true")
    a = p.parse_args()
    from encdec_cli.engine import Engine, OracleDrafter, Request, SamplingParams
    from tests.support.whisper_models import SOT, load_ours, random_whisper

    torch.set_num_threads(1)
    path = pathlib.Path(tempfile.mkdtemp()) / "whisper"
    random_whisper(path, max_target_positions=a.tokens + 32)
    loaded = load_ours(path)
    wave = (torch.randn(32000, generator=torch.Generator().manual_seed(0)) * 0.1).numpy()

    def requests():
        return [Request(wave, [SOT], SamplingParams(max_new_tokens=a.tokens, stop_token_ids=()), 0)]

    cfg = dict(block_size=16, num_blocks=400, max_num_seqs=8, lookahead=not a.no_lookahead)
    want = {r.request_id: r.token_ids for r in Engine(loaded, **cfg).generate(requests())}
    vocab = loaded.model.vocab_size
    for alpha in map(float, a.alphas.split(",")):
        per, steps, drafts = [], [], []
        for seed in range(a.seeds):
            engine = Engine(loaded, drafter=OracleDrafter(want, alpha, a.k, vocab, seed=seed),
                            speculative_adaptive=not a.no_adaptive, **cfg)  # fmt: skip
            out = {r.request_id: r.token_ids for r in engine.generate(requests())}
            assert out == want  # greedy: speculation never changes the tokens
            st = engine.stats
            per.append(st.tokens_per_step)
            steps.append(st.verify_steps)
            drafts.append(st.draft_tokens)
        mean = len(per) / sum(1 / t for t in per)  # all the seeds' tokens over all their steps
        print(f"alpha {alpha}: tokens a step {mean:.3f} (seeds: {', '.join(f'{t:.2f}' for t in per)}); "
              f"verification steps {np.mean(steps):.1f}, drafts {np.mean(drafts):.1f} a run")  # fmt: skip


if __name__ == "__main__":
    main()
