"""Which waiting jobs join a batch (serve --max-batch N): when a worker takes a txt2img job,
it takes with it the jobs waiting in its queue that may share its UNet calls (the same
settings, VAE and options; prompts, seeds and n may differ), up to N images in all, and runs
them as one pipelines.batch.generate_batch call (Worker._run_batch)."""
from ..pipelines.batch import FIELDS

SHARED = ("prompt", "negative_prompt", "seed", "n")  # what jobs of one batch may differ in


def batch_key(task):
    """What a txt2img task must share with another to run in its batch; None for a task
    that runs alone (another kind, an option generate_batch does not take, or an
    AUTOMATIC1111 batch of several images made one by one)."""
    kw = task.kwargs
    if task.kind != "generate" or not set(kw) <= set(FIELDS) or \
            (task.seed_per_image and kw.get("n", 1) > 1):
        return None
    return task.vae, tuple(sorted((k, v) for k, v in kw.items() if k not in SHARED))


def take_companions(q, lead, max_batch):
    """Take out of `q` (a queue.Queue of Jobs) the waiting jobs that can join `lead`'s
    batch, oldest first, while the images in all stay within `max_batch`; the others keep
    their places."""
    key = batch_key(lead.task)
    room = max_batch - lead.task.kwargs.get("n", 1)
    if key is None or room < 1:
        return []
    taken = []
    with q.mutex:  # queue.Queue's own lock over its deque
        for job in list(q.queue):
            n = job.task.kwargs.get("n", 1)
            if n <= room and not job.cancel_requested.is_set() and \
                    batch_key(job.task) == key:
                q.queue.remove(job)
                taken.append(job)
                room -= n
        if taken:
            q.not_full.notify(len(taken))
    return taken
