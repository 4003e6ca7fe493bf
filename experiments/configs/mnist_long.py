"""The default MNIST setup (``mnist.py``: the same 2-core CPU model, recipe and sampling) trained
for longer: 12,000 steps instead of 2,600, for users who want the best samples a 2-core CPU gives
in one to two hours.

    python -m experiments.train_mnist --workdir runs/mnist_long \
        --config=experiments/configs/mnist_long.py

The step costs what the default's does (same model, same batch of 32), so the run takes about
12,000 / 2,600 = 4.6 times the default's training time (the default's is in the README's Results).
Longer training is the measured cure for the default's remaining gap: issue 18 reports the default
recipe at four times its steps with far less haze and higher accuracy than at 2,600. The EMA
decay is raised with the length of the run (its warm-up, ``(1 + step) / (10 + step)``, still
governs the first few thousand steps), and the learning-rate warm-up with it; it samples with
less guidance (1.15 instead of 1.5), as measured on its own run.

Measured (README Results): 91 min on 2 CPU cores shared with other jobs; about 73 min at the
2.75 steps/s of its last, least contended stretch.
"""

from experiments.configs import mnist


def get_config():
    c = mnist.get_config()
    c.training.num_steps = 12_000
    c.training.warmup_steps = 300
    c.training.ema_decay = 0.999
    c.training.learning_rate = 2e-3   # what the measured long run used (the default's is 3e-3 now)
    c.training.checkpoint_every = 1000
    c.sampling.every = 3000
    # The longer-trained model needs less guidance: DDPM-50 at w = 1.15 gives accuracy 0.987 with
    # FD 8.57 and recall 0.867 at N = 1000, against FD 13.08 / recall 0.801 at the default's 1.5
    # (benchmarks/results/cpu/eval_sweep_long.md, eval_sweep_long_w.md)
    c.sampling.guidance_scale = 1.15
    return c
