"""lm-eval-harness on a fox model: an `lm_eval.api.model.LM` subclass and the zero-shot run that uses it.

lm-eval builds the requests and computes every score; this module only turns text into log-likelihoods and
greedy continuations, following lm-eval's HF model in the details that change scores: context/continuation
split at the token level, end-of-text as the prefix of an empty context, rolling windows of max_length. With
bos=True every context starts with BOS (the tokenizer's end-of-text), as the official FoX runs score their
models (HFLM with add_bos_token=True): the models were trained on windows that start with BOS. Generation
prompts keep their last tokens (lm-eval's HF model), or, with max_prompt_tokens, lose their middle as LongBench
truncates them (its instructions sit at both ends of a prompt).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import tiktoken
import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from fox.eval.generation import greedy_until
from fox.model import LanguageModel

MAX_BATCH_TOKENS = 2**15  # rows x T per forward on the CPU: fp32 logits of 32k tokens x 50257 (GPT-2) are 6.6 GB


class FoxLM(LM):
    """A LanguageModel scored in windows of max_length tokens (the training context)."""

    def __init__(self, model: LanguageModel, tokenizer: tiktoken.Encoding, max_length: int, *,
                 batch_size: int | str = 16, max_gen_tokens: int = 256, bos: bool = False,
                 max_prompt_tokens: int | None = None, only_first_line: bool = False):
        """batch_size: requests per forward, or "auto": as many as a token budget sized to free GPU memory
        allows, the budget halved whenever a forward runs out of memory. max_prompt_tokens: generation prompts
        longer than this (BOS included) are cut in the middle; None: they keep their last max_length -
        max_gen_toks tokens. only_first_line: a generation is its first line (leading newlines dropped) and the
        task's stop strings are not used, as the FoX paper scores LongBench."""
        super().__init__()
        self.model, self.tokenizer, self.bos = model, tokenizer, bos
        self.max_length, self.max_gen_tokens = max_length, max_gen_tokens
        self.max_prompt_tokens, self.only_first_line = max_prompt_tokens, only_first_line
        self._device = model.lm_head.weight.device
        self.batch_size = None if batch_size == "auto" else batch_size
        self.max_batch_tokens = _token_budget(self._device, model.cfg.vocab_size) if batch_size == "auto" \
            else MAX_BATCH_TOKENS

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer.encode_ordinary(text)

    def _context(self, context: str) -> list[int]:
        """Context tokens; with bos, after BOS (an empty context is BOS alone either way)."""
        return ([self.tokenizer.eot_token] if self.bos or not context else []) + self.tok_encode(context)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation): the whole text is encoded once and split after the context's
        tokens, so merges across the boundary match the whole; trailing spaces move to the continuation."""
        if not context:
            return self._context(context), self.tok_encode(continuation)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        n_context = len(self.tok_encode(context))
        return self._context(context), whole[n_context:]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self.score_pairs([self.encode_pair(*request.args) for request in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Sum of log p over each whole text, in disjoint windows of up to max_length predicted tokens."""
        windows, owner = [], []
        for index, request in enumerate(requests):
            tokens = self.tok_encode(request.args[0])
            for window in get_rolling_token_windows(tokens, prefix_token=self.tokenizer.eot_token,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self.score_pairs(windows), strict=True):
            totals[index] += logprob
        return totals

    def generate_until(self, requests) -> list[str]:
        """Greedy generations on the KV cache, one request at a time, with a progress line every 100."""
        outputs = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [] if self.only_first_line else [until] if isinstance(until, str) else list(until)
            max_new = gen_kwargs.get("max_gen_toks", self.max_gen_tokens)
            outputs.append(greedy_until(self.model, self.generation_prompt(context, max_new), self.tokenizer, until,
                                        max_new, only_first_line=self.only_first_line))
            if (index + 1) % 100 == 0:
                print(f"[fox] generate_until: {index + 1}/{len(requests)} requests", flush=True)
        return outputs

    def generation_prompt(self, context: str, max_new: int) -> list[int]:
        """The prompt's tokens (after BOS with bos), cut to max_prompt_tokens in the middle, or else to the last
        max_length - max_new (room for the answer, as lm-eval's HF model)."""
        tokens = self._context(context)
        if self.max_prompt_tokens is not None:
            return truncate_middle(tokens, self.max_prompt_tokens)
        return tokens[-max(1, self.max_length - max_new):] or [self.tokenizer.eot_token]

    @torch.no_grad()
    def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding yields the continuation) per token pair;
        the context is cut from the left to fit max_length."""
        for _, continuation in pairs:
            if not 0 < len(continuation) <= self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens: lm-eval requests must "
                                 f"continue by 1 to max_length={self.max_length} tokens")
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        pending = list(self._batches(pairs))
        while pending:
            batch = pending.pop(0)
            try:
                self._score_batch(pairs, batch, results)
            except torch.OutOfMemoryError:
                if self.batch_size is not None or len(batch) == 1:
                    raise
                torch.cuda.empty_cache()
                self.max_batch_tokens //= 2  # auto: retry in halves, and keep the smaller budget from now on
                pending = [batch[: len(batch) // 2], batch[len(batch) // 2:], *pending]
        return results

    def _score_batch(self, pairs: Sequence[tuple[list[int], list[int]]], batch: list[int],
                     results: list[tuple[float, bool]]) -> None:
        rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):-1] for i in batch]
        logits_BTV = self.model(_pad(rows, self._device))
        for row, (i, tokens) in enumerate(zip(batch, rows, strict=True)):
            continuation = torch.tensor(pairs[i][1], device=self._device)
            # log-softmax of the continuation's positions only: a full (B, T, V) copy would double the memory
            logprobs_NV = logits_BTV[row, len(tokens) - len(continuation):len(tokens)].float().log_softmax(dim=-1)
            logprob = logprobs_NV.gather(1, continuation[:, None]).sum().item()
            results[i] = (logprob, bool((logprobs_NV.argmax(dim=1) == continuation).all()))

    def _batches(self, pairs: Sequence[tuple[list[int], list[int]]]) -> Iterator[list[int]]:
        """Indices of pairs, longest first (less padding), at most batch_size rows and max_batch_tokens."""
        width = lambda i: min(self.max_length, len(pairs[i][0]) + len(pairs[i][1]) - 1)
        batch: list[int] = []
        for i in sorted(range(len(pairs)), key=width, reverse=True):
            if batch and (len(batch) == self.batch_size
                          or (len(batch) + 1) * width(batch[0]) > self.max_batch_tokens):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch


def truncate_middle(tokens: list[int], limit: int) -> list[int]:
    """The first limit // 2 and the last limit - limit // 2 tokens when there are more than limit (LongBench's
    truncation, on tokens: the official code cuts the tokens, then decodes and re-encodes the text)."""
    if len(tokens) <= limit:
        return tokens
    head = limit // 2
    return tokens[:head] + tokens[len(tokens) - (limit - head):]


def _token_budget(device: torch.device, vocab_size: int) -> int:
    """Tokens per forward for batch_size auto: on a GPU, what half its free memory holds at ~16 bytes of logits
    per vocabulary entry (bf16 logits, their fp32 log-softmax rows and activations); on the CPU, MAX_BATCH_TOKENS."""
    if device.type != "cuda":
        return MAX_BATCH_TOKENS
    free, _ = torch.cuda.mem_get_info(device)
    return max(256, free // 2 // (16 * vocab_size))


def _pad(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """(B, T) ids, right-padded with 0: causal attention keeps padding out of every real position."""
    ids_BT = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids_BT[row, : len(tokens)] = torch.tensor(tokens)
    return ids_BT.to(device)


def run_lm_eval(lm: FoxLM, tasks: Sequence[str], include_path: Path, limit: int | None) -> dict[str, dict]:
    """Zero-shot lm-eval scores {task: {metric: value}}; lm-eval's built-in tasks are indexed only when a task
    is not one of the YAMLs under include_path (indexing them costs ~10 s)."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    local = {path.stem for path in Path(include_path).glob("*.yaml")}
    manager = TaskManager(include_path=str(include_path), include_defaults=not set(tasks) <= local)
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=0, limit=limit,
                              bootstrap_iters=0, log_samples=False)
    return {task: _scores(values) for task, values in results["results"].items()}


def _scores(values: dict) -> dict[str, float]:
    """lm-eval's "metric,filter" entries as {metric: value}, without stderr and bookkeeping entries."""
    return {name.split(",")[0]: float(value) for name, value in values.items()
            if "," in name and "_stderr" not in name and isinstance(value, int | float)}
