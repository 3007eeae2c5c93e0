"""A second look at the deleted tokens: the visual tokens a question-guided stage deletes stay as keys
and values ("held"), frozen at the state they had when deleted, for the decoder layers from F on. A
held token is never updated (no query, no MLP); a live row sees it if it comes after it in the clip,
and so do the answer's tokens. Each layer from F pays the held tokens' key/value projections and the
live rows' attention to them (counted below in the FLOPs, paper convention as `stats.layer_flops`).

Why: `lab.read_depth` found that `moving` needs the whole clip in the last layers. This asks whether
it needs the whole clip's *late* states, or only early ones that the last layers can read back.

    python -m lab.lookback --n 700                          # shapes-hd's tuning clips, 10%
    python -m lab.lookback --model shapes-hd-plain --n 700
    python -m lab.lookback --model shapes-demo --n 700     # ShapesQA's tuning clips (also shapes-ov)

The engine has no such mechanism: for the runs that hold tokens, this probe replaces two of its
internals (the question-guided stage, to keep the rows it deletes, and the layers after it, run here
with an explicit mask), on 1-D RoPE with positions kept. With F past the last layer it reproduces the
engine's answers (`--check N` counts them on the first N questions).
"""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import torch
from transformers.utils import logging

import vidsparse.engine as engine
from lab.shapes_accuracy import TUNING_SEEDS, Run, ask_run, per_type_accuracy, print_table, save_rows
from lab.stprune_ablation import EVERY_TOKEN
from lab.yardsticks import YARDSTICKS
from vidsparse.answer import AskResult
from vidsparse.layers import _finish, _project, grouped_scores, rotary
from vidsparse.pipeline import VideoQA
from vidsparse.stage import mixes
from vidsparse.stats import DecoderShape


@dataclass(frozen=True)
class LookRun(Run):
    lookback: int | None = None  # F: held tokens are read from this layer on (None: the engine untouched)


class Held:
    """The rows the question-guided stages deleted (their states and positions), from the stage that
    deleted them to the layers that read them, and the FLOPs those layers spent on them."""

    def __init__(self, lookback: int, shape: DecoderShape) -> None:
        self.lookback, self.shape = lookback, shape
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.flops = 0

    def stage(self, decoder, plan, index, stages, prompt, generator, facts, hidden, positions, block, *rest):
        if stages[index] >= self.lookback:  # a later stage reads its layer's keys: they must be the live rows'
            raise ValueError(f"held keys from layer {self.lookback} on, but a stage prunes after layer {stages[index]}")
        out = original_stage(decoder, plan, index, stages, prompt, generator, facts, hidden, positions, block, *rest)
        selection = out[3].selection
        gone = torch.ones(block.size, dtype=torch.bool, device=hidden.device)
        gone[selection.keep] = False
        if selection.merge_anchor.numel():  # a mix's anchor is gone (its slot holds the mix; held as itself), ...
            gone[selection.merge_anchor[~mixes(selection)]] = False  # ... a group that is its anchor alone is live
        rows = block.start + torch.nonzero(gone).squeeze(1)
        self.rows.append((hidden[:, rows].clone(), positions[..., rows].clone()))
        return out

    @torch.inference_mode()
    def layers(self, decoder, hidden, positions, cos_sin, cache, layers):
        if not self.rows:  # the head's layers, before the first question-guided stage
            return original_layers(decoder, hidden, positions, cos_sin, cache, layers)
        held = torch.cat([states for states, _ in self.rows], 1)
        held_positions = torch.cat([places for _, places in self.rows], -1)
        held_cos_sin = rotary(decoder, held, held_positions)
        n, m = hidden.shape[1], held.shape[1]
        own_hidden = torch.ones(n, n, dtype=torch.bool, device=hidden.device).triu(1)  # live rows: causal in order
        held_hidden = held_positions[0, 0][None, :] > positions[0, 0][:, None]  # held: by position
        for i in layers:
            layer = decoder.layers[i]
            query, key, value = _project(layer, hidden, cos_sin)
            if i >= self.lookback and m:
                _, held_key, held_value = _project(layer, held, held_cos_sin)
                key, value = torch.cat([held_key, key], -2), torch.cat([held_value, value], -2)
                hidden_keys = torch.cat([held_hidden, own_hidden], 1)
                biases = sum(p.out_features for p in (layer.self_attn.k_proj, layer.self_attn.v_proj)
                             if p.bias is not None)
                self.flops += (m * (self.shape.width * 2 * self.shape.kv_width + biases)
                               + 2 * n * m * self.shape.query_width)
            else:
                hidden_keys = own_hidden
            scores = grouped_scores(query, key, layer.self_attn.scaling).masked_fill(hidden_keys, float("-inf"))
            out = torch.einsum("bkgrn,bknd->bkgrd", scores.softmax(-1).to(value.dtype), value)
            out = out.reshape(1, -1, n, layer.self_attn.head_dim).transpose(1, 2).reshape(1, n, -1)
            cache.update(key, value, i)  # the answer's tokens see the held keys too
            hidden = _finish(layer, hidden, out)
        return hidden


original_stage, original_layers = engine._question_stage, engine.run_layers
DATA = {"shapes-hd": "hd", "shapes-hd-plain": "hd", "shapes-demo": "demo", "shapes-ov": "demo"}  # 1-D RoPE models


def held_accuracy(qa: VideoQA, data, n: int, seed: int, runs: list[LookRun]) -> tuple[list[dict], list[list[str]]]:
    """`lab.shapes_accuracy.per_type_accuracy` with each run's held tokens, their FLOPs added to the
    prefill's (and as a share of their own), and each run's answers."""
    shape = DecoderShape.of(qa.model.decoder)
    held_flops, unpruned = [0] * len(runs), [0] * len(runs)
    answers: list[list[str]] = [[] for _ in runs]

    def ask(run: LookRun, frames: object, question: str) -> AskResult:
        k = runs.index(run)
        held = None if run.lookback is None else Held(run.lookback, shape)
        with nullcontext() if held is None else mock.patch.multiple(
                engine, _question_stage=held.stage, run_layers=held.layers):
            result = ask_run(qa, run, frames, question, positions="keep")
        spent = 0 if held is None else held.flops
        held_flops[k] += spent
        unpruned[k] += result.prefill_flops_unpruned
        answers[k].append(result.answer)
        return replace(result, prefill_flops=result.prefill_flops + spent)

    rows = per_type_accuracy(qa, data, n, seed, runs, ask=ask)
    for k, (row, run) in enumerate(zip(rows, runs, strict=True)):
        row |= {"settings": run.settings, "lookback": run.lookback, "held_flops_share": held_flops[k] / unpruned[k]}
    return rows, answers


def runs(budget: str, last: int) -> list[LookRun]:
    """stprune as shipped, with the deleted tokens held from the layer after its stage 2 or from the last
    layer; larger first stages (M = 2.5B .. every token), and the in-LLM methods (PDrop's three stages'
    deleted tokens all held), each without and with held tokens."""
    shipped = [LookRun("none", "none", "100%", {}, None), LookRun("stprune as shipped", "stprune", budget, {}, None)]
    shipped += [LookRun(f"held from layer {f}", "stprune", budget, {}, f) for f in (2, last)]
    for factor, name in ((2.5, "2.5B"), (4.0, "4B"), (6.0, "6B"), (8.0, "8B"), (EVERY_TOKEN, "n (stage 2 alone)")):
        settings = {"SUMMARY_FACTOR": factor}
        shipped += [LookRun(f"M = {name}", "stprune", budget, settings, None),
                    LookRun(f"M = {name}, held from layer {last}", "stprune", budget, settings, last)]
    for method in ("fastv", "sparsevlm", "pdrop"):  # every token through their first layers
        shipped += [LookRun(method, method, budget, {}, None),
                    LookRun(f"{method}, held from layer {last}", method, budget, {}, last)]
    return shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-hd", choices=sorted(DATA))
    parser.add_argument("--n", type=int, default=700)
    parser.add_argument("--seed", type=int, default=None, help="default: the yardstick's tuning seed (777, 515151)")
    parser.add_argument("--budget", default="10%")
    parser.add_argument("--out", type=Path, default=None, help="default: lab/results/lookback_<model>.json")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="only count, on the first N questions, the answers that the probe's layers with nothing "
                             "held give as the engine does")
    args = parser.parse_args()
    logging.set_verbosity_error()
    yardstick = YARDSTICKS[DATA[args.model]]
    args.seed = TUNING_SEEDS[yardstick.name] if args.seed is None else args.seed
    if args.seed == yardstick.eval_seed:
        parser.error(f"seed {args.seed} is the held-out set's: tuning runs use another seed")
    qa = VideoQA.from_pretrained(args.model, dtype="float32", device="cpu")
    last = len(qa.model.decoder.layers) - 1
    if args.check:
        methods = ("stprune", "pdrop")  # one question-guided stage, three
        _, answers = held_accuracy(qa, yardstick.data, args.check, args.seed, [
            LookRun(label, method, args.budget, {}, lookback) for method in methods
            for label, lookback in ((method, None), (f"{method}, the probe's layers, nothing held", last + 1))])
        for method, engine_answers, probe_answers in zip(methods, answers[::2], answers[1::2], strict=True):
            same = sum(a == b for a, b in zip(engine_answers, probe_answers, strict=True))
            print(f"{method}: {same} of {args.check} answers the same")
        return
    rows, _ = held_accuracy(qa, yardstick.data, args.n, args.seed, runs(args.budget, last))
    print_table(rows, yardstick.data.QUESTION_TYPES)
    args.yardstick = args.model.removeprefix("shapes-")  # save_rows names the file for it
    print(f"wrote {save_rows(args, args.seed, rows, 'lookback')}")


if __name__ == "__main__":
    main()
