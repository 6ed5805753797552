"""`--strategy`: the `tf.distribute` strategy of a run, and who is its chief.

TensorFlow is imported only inside the functions, so the command line can
check `TF_CONFIG` before TensorFlow loads.
"""

import json
import os


def tf_config_problem(text):
    """What is wrong with a `TF_CONFIG` value for multi-worker training, or None."""
    if not text:
        return (
            "TF_CONFIG is not set; set it on every host to "
            '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": I}} (see README, "Scaling out").'
        )
    try:
        value = json.loads(text)
        workers = value["cluster"].get("worker", []) + value["cluster"].get("chief", [])
        task = value["task"]
        task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"TF_CONFIG is not valid JSON with cluster and task ({error})."
    if not workers:
        return "TF_CONFIG's cluster lists no worker."
    tasks = value["cluster"].get(task["type"])
    if not isinstance(tasks, list) or not 0 <= int(task["index"]) < len(tasks):
        listed = len(tasks) if isinstance(tasks, list) else 0
        return (
            f"TF_CONFIG's task is {task['type']} {task['index']}, but its cluster "
            f"lists {listed} {task['type']} task(s); the index must be in "
            f"[0, {listed})."
        )
    return None


def make_strategy(kind):
    """The `tf.distribute` strategy `--strategy` names.

    - `auto`: `MirroredStrategy` over all GPUs when more than one is visible,
      else the default (one device).
    - `one_device`: the first GPU, or the CPU.
    - `mirrored`: `MirroredStrategy` over all GPUs (the CPU without GPUs).
    - `multi_worker`: `MultiWorkerMirroredStrategy`, its cluster from `TF_CONFIG`.
    """
    import tensorflow as tf

    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=tf.distribute.cluster_resolver.TFConfigClusterResolver()
        )
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if kind == "mirrored" or len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy):
    """Whether this process writes the run's artefacts (checkpoints, logs,
    `summary.json`, the export): always, except on the non-chief workers of a
    multi-worker run."""
    if not strategy.extended._in_multi_worker_mode():
        return True
    return tf_config_is_chief(os.environ.get("TF_CONFIG"))


def tf_config_is_chief(text):
    """Whether `TF_CONFIG` makes this task the chief: the `chief` task, or worker
    0 of a cluster without one (TensorFlow's convention)."""
    value = json.loads(text)
    task = value["task"]
    if task["type"] == "chief":
        return True
    has_chief = bool(value["cluster"].get("chief"))
    return task["type"] == "worker" and int(task["index"]) == 0 and not has_chief


def steps_of_all_workers(strategy, step):
    """Every worker's `step`, gathered with a collective (multi-worker runs)."""
    import tensorflow as tf

    @tf.function(autograph=False)
    def gather():
        local = strategy.run(lambda: tf.constant([step], tf.int64))
        return strategy.gather(local, axis=0)

    return [int(s) for s in gather().numpy()]
