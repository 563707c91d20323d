"""Knowledge distillation: train a student model to imitate a teacher.

A job that recovers the quality lost to pruning (the pruned model is the student, the job's
input model the teacher)::

    {"stages": [{"type": "prune", "method": "magnitude", "sparsity": 0.5},
                {"type": "distill", "method": "kd", "dataset_id": "ds_...", "steps": 500}]}

and one that halves the depth, as DistilGPT2 did::

    {"stages": [{"type": "distill", "method": "kd", "dataset_id": "ds_...",
                 "keep_layers": "every_other", "steps": 2000}]}

- ``student.py``: a student made of some of a model's decoder blocks (layer-drop init).
- ``loss.py``: the losses, tensor in / tensor out.
- ``train.py``: the data, the training loop and the handler registered for ``DistillKD``.
"""
