"""Tasks: what a run predicts, how it is scored and shown (see `tljax.tasks.base`).

    task = tasks.build_task(config.task, info)     # config.task = {'name': ..., **options}
    model = models.from_config(config, task)       # the backbone with task.head() as `head`

Built in: `classification` (softmax, sigmoid, multi-label; from a decoder's last token with
head_input='last_token'), `token_classification` (NER), `segmentation` (per-pixel classes),
`detection` (FCOS boxes), and for language models `causal_lm` (next-token loss,
perplexity), `verbaliser` (classes scored by label words' likelihood) and `seq2seq`
(encoder-decoder, teacher forcing, generation in eval).
Adding a task is one module here with a `@register("name")` Task subclass, imported below,
and its tests; the README's "Tasks" section walks through one.
"""

from tljax.tasks import (  # noqa: F401  (they register)
    causal_lm,
    classification,
    detection,
    segmentation,
    seq2seq,
    token_classification,
    verbaliser,
)
from tljax.tasks.base import Metrics, Task, build_task, register, task_class, task_options

__all__ = ["Metrics", "Task", "build_task", "register", "task_class", "task_options"]
