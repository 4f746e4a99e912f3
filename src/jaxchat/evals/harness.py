"""jaxchat as a model of EleutherAI's lm-evaluation-harness: `lm_eval --model jaxchat --model_args run=DIR,...`.

Registration: the class is registered under the name "jaxchat" by lm_eval's `register_model` when this module is
imported, and pyproject.toml declares it as an `lm_eval.models` entry point, which lm_eval releases with plugin
discovery (EleutherAI/lm-evaluation-harness PR #4013) read on their own. lm_eval 0.4.13 (the newest on PyPI as of
this writing) does not read entry points yet; for it, `jaxchat-lm-eval ARGS` (lmeval_cli.py) imports this module
and then runs lm_eval's own command line with ARGS (the same arguments as `lm_eval`).

model_args: run=DIR (required), step=N (default: latest), max_gen_toks=N (default 256); the loglikelihood batch
size is lm_eval's own --batch_size (default 8 here; "auto" means 8).

The three request types, on jaxchat's own forward (evals/scoring.py) and decode engine (chat/engine.py):
    loglikelihood          sum of log p over the continuation's tokens given the context, and whether greedy
                           decoding would produce them; requests are scored in batches of batch_size
    loglikelihood_rolling  a document's total log p, in lm_eval's disjoint windows of the model's context, each
                           window's first token conditioned on the one before it (the first on BOS); all windows
                           of all documents scored in batches
    generate_until         the compiled decode loop with its KV cache, one request at a time (greedy unless the
                           task sets a temperature), stopped early at a BOS or once a stop string appears, and
                           cut at the first stop string
Text is encoded with BOS in front (jaxchat's documents start with BOS in training, as nanochat's CORE prompts do);
a context longer than the model's keeps its last tokens.
"""

from __future__ import annotations

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"the lm-evaluation-harness model needs lm_eval: pip install 'jaxchat[lmeval]' ({e})") from None

from jaxchat.chat.engine import Engine, Sampling
from jaxchat.config import ConfigError
from jaxchat.evals.scoring import Scorer
from jaxchat.run import Run

STREAM_CHUNK = 16  # decode steps between checks for a stop string


@register_model("jaxchat")
class JaxchatLM(TemplateLM):
    """A jaxchat run's checkpoint as an lm_eval LM."""

    def __init__(self, run: str, step: int | str | None = None, batch_size: int | str = 8,
                 max_gen_toks: int | str = 256, **ignored):
        super().__init__()
        # lm_eval also passes device / max_batch_size; the run decides its own devices (JAX), so they are ignored
        loaded = Run.load(run, None if step in (None, "") else int(step))
        self.run_dir, self.step = run, int(loaded.state["step"])
        self.tok = loaded.tokenizer
        self.context = loaded.cfg.model.sequence_len
        bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
        if bs < 1:
            raise ConfigError(f"batch_size {batch_size} must be >= 1")
        self.scorer = Scorer(loaded.fns, loaded.params, self.tok.bos_id, bs)
        self.engine = Engine(loaded.fns, loaded.params, self.tok)
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------------------------------------------
    # what TemplateLM asks for

    @property
    def eot_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def tokenizer_name(self) -> str:
        return f"jaxchat-{self.tok.fingerprint()}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        ids = self.tok.encode(string)
        return ids if add_special_tokens is False else [self.tok.bos_id] + ids

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p of `cont` given `ctx`, greedy reproduces `cont`) per pair, in batches."""
        seqs = []
        for ctx, cont in pairs:
            if not cont:
                raise ConfigError("an lm_eval request has an empty continuation")
            if len(cont) > self.context:
                raise ConfigError(f"a continuation of {len(cont)} tokens exceeds the model's context of "
                                  f"{self.context}")
            seqs.append((ctx + cont)[-(self.context + 1):])  # the last token is only a target, never an input
        out = []
        for (ctx, cont), (logp, greedy) in zip(pairs, self.scorer.token_scores(seqs)):
            n = len(cont)
            out.append((float(logp[-n:].sum()), bool((greedy[-n:] == cont).all())))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        answers = self._score_pairs([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for j, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0], add_special_tokens=False)
            for w in get_rolling_token_windows(tokens, self.tok.bos_id, self.context, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(j)
        totals = [0.0] * len(requests)
        for j, (logp, _) in zip(owner, self._score_pairs(windows)):
            totals[j] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", True) else 0.0
            ids = self.tok_encode(context)[-max(self.context - max_new, 1):]
            text = self._generate(ids, max_new, Sampling(temperature=temperature), until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out

    def _generate(self, ids, max_new: int, sampling: Sampling, until: list[str]) -> str:
        tokens: list[int] = []
        for item in self.engine.stream(ids, 1, max_new, sampling, stop_ids=(self.tok.bos_id,), chunk=STREAM_CHUNK):
            if not isinstance(item, list):
                break
            tokens += item[0]
            if until and any(u in self.tok.decode(tokens) for u in until):
                break
        text = self.tok.decode(tokens)
        for u in until:
            text = text.split(u)[0]
        return text

