"""nanochat's chat evals (scripts/chat_eval.py, commit 92d63d4) on jaxchat's forward and decode engine.

categorical (ARC, MMLU): the conversation without its answer is rendered to ids ending in <|assistant_start|>; one
    forward over a batch of such prompts; at each prompt's last position, only the logits of the task's answer
    letters (each must be one token) are compared, and the argmax letter is the model's answer.
generative (GSM8K): per problem, `num_samples` completions from the decode engine (greedy at temperature 0), its
    calculator serving the model's <|python_start|> calls; a problem passes if any completion's '####' number
    equals the reference's.
Accuracy per task; the centered mean (acc - baseline) / (1 - baseline) over the tasks run is nanochat's ChatCORE
when the tasks are all of nanochat's (it also counts HumanEval, which jaxchat does not run).

nanochat forwards prompts of any length; jaxchat's model has a fixed context, so a longer prompt keeps its last
tokens: all of the context for a categorical prompt, and for a generative one enough to leave room for
min(max_new_tokens, context / 2) new tokens.
"""

from __future__ import annotations

from jaxchat.chat.conversation import Specials, render_prompt
from jaxchat.chat.engine import Sampling
from jaxchat.config import ConfigError
from jaxchat.evals.chat_tasks import TASKS, gsm8k_correct


def prompt_ids(tok, conversation: dict, where: str) -> list[int]:
    """The ids that prime the assistant's answer: the conversation without its last (assistant) message."""
    return render_prompt(tok, conversation["messages"][:-1], where)


def letter_id(tok, letter: str) -> int:
    ids = tok.encode(letter)
    if len(ids) != 1:
        raise ConfigError(f"the answer letter {letter!r} is {len(ids)} tokens in this tokenizer; the letter-logit "
                          f"comparison needs each letter to be one token")
    return ids[0]


def categorical_accuracy(scorer, tok, conversations: list[dict], name: str = "task") -> float:
    """Fraction of conversations whose answer letter has the largest logit among the task's letters."""
    prompts = [prompt_ids(tok, c, f"{name} example {i}")[-scorer.context:] for i, c in enumerate(conversations)]
    logits = scorer.logits_at(prompts, [len(p) - 1 for p in prompts])
    passed = 0
    for conv, row in zip(conversations, logits):
        letters = conv["letters"]
        focus = row[[letter_id(tok, x) for x in letters]]
        passed += letters[int(focus.argmax())] == conv["messages"][-1]["content"]
    return passed / len(conversations)


def generative_accuracy(engine, tok, conversations: list[dict], num_samples: int = 1, max_new_tokens: int = 512,
                        sampling: Sampling = Sampling(temperature=0.0, top_k=50), seed: int = 0,
                        name: str = "task", log=None) -> float:
    """Fraction of problems where any of `num_samples` completions has the reference answer (GSM8K's check)."""
    sp = Specials.of(tok)
    room = min(max_new_tokens, engine.context // 2)
    passed = 0
    for i, conv in enumerate(conversations):
        ids = prompt_ids(tok, conv, f"{name} example {i}")[-(engine.context - room):]
        gen = engine.generate(ids, num_samples, max_new_tokens, sampling, seed=seed,
                              stop_ids=(sp.assistant_end, sp.bos))
        passed += any(gsm8k_correct(conv, tok.decode(t)) for t in gen.tokens)
        if log is not None:
            log(f"\r  {name}: {passed}/{i + 1} ({100 * passed / (i + 1):.2f}%)")
    return passed / len(conversations)


def centered_mean(results: dict[str, float]) -> float:
    return sum((acc - TASKS[n].baseline) / (1.0 - TASKS[n].baseline) for n, acc in results.items()) / len(results)
